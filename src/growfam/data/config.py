"""The family YAML's `data:` section (DataConfig), and the dataset a family trains on: given,
found, or prepared from the section's source."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from growfam.checks import Section, as_int, as_number
from growfam.data.mixture import MIXTURE_FILE, parse_mix, read_mix, write_mixture
from growfam.data.preparation import DEFAULT_TOKENIZER, DEFAULT_VAL_FRACTION, prepare
from growfam.errors import ConfigError


@dataclass
class DataConfig(Section):
    """The `data:` section: a prepared dataset `dir`, made from `source` with `tokenizer` (see
    `growfam data prepare`) when it does not exist yet; or `mix`, prepared datasets trained on in
    proportion to their weights ([{dir, weight}], growfam.data.mixture), recorded as a mixture
    folder in `dir` (default: the family's data/)."""

    key: ClassVar[str] = "data"
    dir: str | None = None
    source: Any = None
    tokenizer: str = DEFAULT_TOKENIZER
    max_tokens: int | None = None
    val_fraction: float = DEFAULT_VAL_FRACTION
    mix: list | None = None

    def __post_init__(self) -> None:
        if self.mix is not None:
            parse_mix(self.mix)
            if self.source is not None:
                raise ConfigError("data: give either a source to prepare or a mix of prepared datasets, not both")
        self.val_fraction = as_number(self.val_fraction, "data.val_fraction", at_least=0, at_most=0.5)
        if self.max_tokens is not None:
            self.max_tokens = as_int(self.max_tokens, "data.max_tokens", 1)


def dataset_dir(section: DataConfig, data: str | None, default_dir: Path) -> tuple[str, bool]:
    """The dataset directory to train on, and whether it must be prepared first: `data` if
    given, else the `data:` section's folder (default_dir unless it names one), to be prepared
    when it holds no dataset yet — or, for a `mix`, written when it holds no mixture yet. Nothing
    is written; a folder holding another mix or something else is a ConfigError (never rewritten:
    a family trained on it records its fingerprint)."""
    if data is not None:
        return str(data), False
    path = Path(section.dir) if section.dir else default_dir
    if section.mix is not None:
        wanted = _absolute(parse_mix(section.mix))
        recorded = _absolute(read_mix(path)) if (path / MIXTURE_FILE).is_file() else None
        if recorded is not None and not _same_mix(recorded, wanted):
            shown = ", ".join(f"{m['weight']:.3g} {m['dir']}" for m in recorded)
            raise ConfigError(f"{path} holds another mix ({shown}); give data.dir a new folder for this one")
        if recorded is None and path.is_dir() and any(path.iterdir()):
            raise ConfigError(f"{path} holds something other than a mixture; give data.dir a new folder for the mix")
        return str(path), recorded is None
    if (path / "index.json").exists():
        return str(path), False
    if section.source is None:
        raise ConfigError("no data: pass --data DIR (see `growfam data prepare`) or give the family "
                          "YAML a data: section with a source")
    return str(path), True


def ensure_dataset(section: DataConfig, data: str | None, default_dir: Path, start_from: str | None = None,
                   log=print) -> str:
    """The dataset directory of `dataset_dir`, prepared first when it must be: with the section's
    tokenizer, or the `start_from` model's when the section names none (a family given its
    first member is tokenized as that member was)."""
    path, todo = dataset_dir(section, data, default_dir)
    if not todo:
        return path
    if section.mix is not None and data is None:
        log(f"mixing {', '.join(f'{w:.3g} {d}' for d, w in parse_mix(section.mix))} into {path}")
        write_mixture(path, parse_mix(section.mix))
        return path
    tokenizer = start_from if start_from and section.tokenizer == DEFAULT_TOKENIZER else section.tokenizer
    log(f"preparing {section.source} with tokenizer {tokenizer} into {path}")
    prepare(section.source, tokenizer, path, max_tokens=section.max_tokens, val_fraction=section.val_fraction)
    return path


def _absolute(mix: list[tuple[str, float]]) -> list[dict]:
    return [{"dir": str(Path(d).resolve()), "weight": w} for d, w in mix]


def _same_mix(a: list[dict], b: list[dict]) -> bool:
    """The same datasets in the same order with the same weights (read back and normalised
    again, a weight may differ in its last bits)."""
    return [m["dir"] for m in a] == [m["dir"] for m in b] and \
        all(math.isclose(x["weight"], y["weight"], rel_tol=1e-12) for x, y in zip(a, b))
