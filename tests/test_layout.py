"""The package layout: every module imports on its own (no import cycles hide behind an order)."""

import subprocess
import sys
from pathlib import Path

import growfam

SRC = Path(growfam.__file__).parent

# For each module: forget every growfam module, then import that one first. Third-party packages
# stay loaded (torch takes seconds), so this is one interpreter, not one per module.
SCRIPT = """
import importlib, sys
import torch, transformers, safetensors, numpy, yaml, tqdm  # warm, not under test
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "growfam" or m.startswith("growfam.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as err:
        failed.append(f"{name}: {type(err).__name__}: {err}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def _modules() -> list[str]:
    names = []
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_every_module_imports_on_its_own():
    modules = _modules()
    assert "growfam.cli" in modules and "growfam.model.llama" in modules and "growfam.data.loader" in modules
    done = subprocess.run([sys.executable, "-c", SCRIPT, *modules], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_test_the_reliability_page_names_exists():
    """docs/reliability.md promises that each guarantee is backed by the tests it names."""
    import re

    root = SRC.parent.parent
    page = (root / "docs" / "reliability.md").read_text()
    named = set(re.findall(r"`(test_[a-z0-9_]+)`", page))
    code = "".join(p.read_text() for p in (root / "tests").rglob("test_*.py"))
    assert len(named) > 40 and not [n for n in sorted(named) if f"def {n}(" not in code]
