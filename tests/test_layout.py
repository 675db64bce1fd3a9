"""The package layout, read statically: imports point one way along the stage order that
docs/architecture.md states, and no import cycle at module level can make a module's import
depend on which module was imported first."""

import ast
import re
from pathlib import Path

import pytest

import growfam

SRC = Path(growfam.__file__).parent

# The units in import order: a module may import its own unit and the units before it. The
# top-level helpers come first, then the stages, then config.py (it types the family YAML's
# sections with the stages' classes), the stages that read a family, and the CLI on top.
ORDER = ["errors", "outputs", "text", "checks", "io", "device", "lock",
         "model", "data", "grow", "train", "config", "family", "eval", "infer", "posttrain", "report", "cli"]


def _unit(module: str) -> str:
    """growfam.train.loop -> "train"; growfam.io -> "io"; growfam.__main__ -> "cli"."""
    parts = module.split(".")
    if parts[1:] == ["__main__"]:
        return "cli"
    return parts[1]


def module_sources(root: Path = SRC) -> dict[str, str]:
    """Every module under `root` (a package folder) by dotted name, with its source."""
    sources = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        sources[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path.read_text()
    return sources


def imports_of(name: str, source: str, modules: set[str]) -> tuple[set[str], set[str]]:
    """(the growfam modules `name` imports at module level, every growfam module it imports,
    function bodies too). An import of a.b.c runs a and a.b first, so those count as well,
    except the importer's own ancestors (already running whenever it is imported)."""
    package = name if f"{name}.__init__" in modules or any(m.startswith(name + ".") for m in modules) else \
        name.rpartition(".")[0]
    top, every = set(), set()

    def targets(node) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names]
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(anchor + ([base] if base else []))
        return [base] + [f"{base}.{a.name}" for a in node.names]

    def visit(node, nested: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in targets(child):
                    parts = target.split(".")
                    for i in range(1, len(parts) + 1):
                        dotted = ".".join(parts[:i])
                        if dotted in modules and not (name == dotted or name.startswith(dotted + ".")):
                            every.add(dotted)
                            if not nested:
                                top.add(dotted)
            inside = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            # `if TYPE_CHECKING:` imports never run
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            visit(child, inside)

    visit(ast.parse(source), False)
    return top, every


def rule_violations(sources: dict[str, str]) -> list[str]:
    """Each import that runs against ORDER, as 'importer -> imported (unit after unit)'."""
    modules = set(sources)
    out = []
    for name, source in sorted(sources.items()):
        if name == "growfam":
            continue  # the top-level exports: errors and model
        for imported in sorted(imports_of(name, source, modules)[1]):
            if ORDER.index(_unit(imported)) > ORDER.index(_unit(name)):
                out.append(f"{name} -> {imported} ({_unit(imported)} comes after {_unit(name)})")
    return out


def import_cycles(sources: dict[str, str]) -> list[list[str]]:
    """The module-level import cycles (each as the modules along it, the first repeated last)."""
    modules = set(sources)
    graph = {name: sorted(imports_of(name, source, modules)[0]) for name, source in sources.items()}
    cycles, state = [], {}  # state: 1 on the current path, 2 done

    def walk(node, path):
        state[node] = 1
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            walk(start, [start])
    return cycles


def test_the_source_follows_the_import_rules():
    sources = module_sources()
    assert {"growfam.cli", "growfam.model.llama", "growfam.family.directory", "growfam.text"} <= set(sources)
    assert {_unit(name) for name in sources if name != "growfam"} == set(ORDER)  # every unit is placed
    assert rule_violations(sources) == []
    assert import_cycles(sources) == []


def _fake(**modules: str) -> dict[str, str]:
    return {f"growfam.{name}": source for name, source in modules.items()}


@pytest.mark.parametrize("sources, broken", [
    # a stage importing a later stage, at module level or inside a function
    (_fake(**{"model.llama": "from growfam.train.loop import train\n", "train.loop": ""}),
     ["growfam.model.llama -> growfam.train.loop (train comes after model)"]),
    (_fake(**{"grow.width": "def f():\n    from growfam.report import tables\n", "report": "", "report.tables": ""}),
     ["growfam.grow.width -> growfam.report (report comes after grow)",
      "growfam.grow.width -> growfam.report.tables (report comes after grow)"]),
    # a helper importing a stage; relative imports resolve like absolute ones
    (_fake(**{"io": "from growfam.text import si\nfrom growfam.model import Llama\n", "text": "", "model": ""}),
     ["growfam.io -> growfam.model (model comes after io)"]),
    (_fake(**{"data": "", "data.loader": "from ..family import plan\n", "family": "", "family.plan": ""}),
     ["growfam.data.loader -> growfam.family (family comes after data)",
      "growfam.data.loader -> growfam.family.plan (family comes after data)"]),
    # what is allowed: earlier units, and TYPE_CHECKING imports (they never run)
    (_fake(**{"train.loop": "from growfam.model import Llama\nif TYPE_CHECKING:\n    from growfam.family import x\n",
              "model": "", "family": ""}), []),
])
def test_the_import_rules_catch_an_import_against_the_order(sources, broken):
    assert rule_violations(sources) == broken


def test_a_module_level_cycle_is_caught_and_a_deferred_import_breaks_it():
    cyclic = _fake(**{"train": "from growfam.train.loop import train\n",
                      "train.loop": "from growfam.train.setup import prepare\n",
                      "train.setup": "from growfam.train.loop import step\n"})
    assert import_cycles(cyclic) == [["growfam.train.loop", "growfam.train.setup", "growfam.train.loop"]]
    cyclic["growfam.train.setup"] = "def f():\n    from growfam.train.loop import step\n"
    assert import_cycles(cyclic) == []
    # importing a package runs its __init__, which can close a cycle across packages
    across = _fake(**{"model": "from growfam.model.llama import Llama\n", "model.llama": "from growfam.data import x\n",
                      "data": "from growfam.model import Llama\n"})
    assert ["growfam.data", "growfam.model", "growfam.model.llama", "growfam.data"] in import_cycles(across)


def test_every_test_the_reliability_page_names_exists():
    """docs/reliability.md promises that each guarantee is backed by the tests it names."""
    root = SRC.parent.parent
    page = (root / "docs" / "reliability.md").read_text()
    named = set(re.findall(r"`(test_[a-z0-9_]+)`", page))
    code = "".join(p.read_text() for p in (root / "tests").rglob("test_*.py"))
    assert len(named) > 40 and not [n for n in sorted(named) if f"def {n}(" not in code]


def test_every_growfam_name_the_benchmarks_import_exists():
    """bench/ is not imported by the suite: a module or name moved in src/ would break it unseen."""
    import importlib.util

    missing = []
    for path in sorted((SRC.parent.parent / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "growfam":
                module = importlib.import_module(node.module)
                missing += [f"{path.name}: {node.module}.{a.name}" for a in node.names if not hasattr(module, a.name)
                            and importlib.util.find_spec(f"{node.module}.{a.name}") is None]
    assert missing == []
