"""Document sources: a `Source` is a re-iterable stream of documents (non-empty strings).

`open_source` resolves a spec to one: the embedded Python-stdlib corpus (offline, on any machine),
local .txt/.jsonl/.parquet files or folders of them, a streamed Hugging Face dataset, or a list
of documents in memory.

A source also cuts itself into `Unit`s, the pieces `prepare` hands to worker processes and
records as done one by one: whole small files grouped, a large .jsonl file's byte ranges (each
line belongs to the range its first byte is in), a .parquet file's row groups, a Hugging Face
dataset's shards (its files). A unit is picklable and reads its documents on its own; the units'
documents, in order, are the source's. The cut depends only on the source and the target size.
"""

from __future__ import annotations

import json
import os
import sys
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from growfam.errors import GrowfamError

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
# Distribution-dependent parts of the stdlib tree (Debian ships the tests separately), left out
# so the embedded corpus is the same on every machine with the same Python version.
_STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class Unit:
    """A piece of a source that a worker process reads on its own (picklable).

    kind: "stdlib" (embedded .py files: `paths`), "topics" (the embedded pydoc topics), "files"
    (whole local files: `paths`), "jsonl" (the lines of paths[0] that start in bytes
    [start, stop)), "parquet" (row groups [start, stop) of paths[0]), "hf" (shard `start` of
    `stop` of the Hugging Face dataset `hf` = (name, config, split)), "memory" (`docs`).
    """

    kind: str
    paths: tuple[str, ...] = ()
    start: int = 0
    stop: int = 0
    text_field: str = "text"
    hf: tuple[str, str | None, str] | None = None
    docs: tuple[str, ...] = ()

    def documents(self) -> Iterator[str]:
        """The unit's documents in source order (empty ones left out)."""
        return (doc for doc in _UNIT_READERS[self.kind](self) if doc)

    def describe(self) -> str:
        """One line naming what the unit covers (stable: recorded in the preparation's settings)."""
        if self.kind in ("jsonl", "parquet"):
            what = "bytes" if self.kind == "jsonl" else "row groups"
            return f"{self.paths[0]} {what} {self.start}..{self.stop}"
        if self.kind == "hf":
            return f"hf:{':'.join(str(p) for p in self.hf)} shard {self.start} of {self.stop}"
        if self.kind == "memory":
            return f"memory: {len(self.docs)} documents"
        return f"{self.kind}: {', '.join(self.paths) or 'pydoc topics'}"


@dataclass(frozen=True)
class Source:
    """A re-iterable stream of documents (non-empty strings) and a one-line description.

    `path` is the file or folder of a local source (None otherwise): an output must not overlap it.
    `cut(target_bytes)` lists its units of about target_bytes of text each (None: one unit that
    only this process can read, e.g. a source capped at its first N documents).
    """

    description: str
    documents: Callable[[], Iterator[str]]
    path: Path | None = None
    cut: Callable[[int], list[Unit]] | None = None

    def __iter__(self) -> Iterator[str]:
        return (doc for doc in self.documents() if doc)

    def units(self, target_bytes: int) -> list[Unit] | None:
        """Its units of about `target_bytes` bytes of text each, or None (see the class)."""
        return None if self.cut is None else self.cut(target_bytes)


def _grouped(items: list[tuple[str, int]], target_bytes: int) -> list[list[str]]:
    """Consecutive (name, size) items in groups of at least target_bytes (the last may be less)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, item_size in items:
        groups[-1].append(name)
        size += item_size
        if size >= target_bytes:
            groups.append([])
            size = 0
    return [g for g in groups if g]


def embedded_source() -> Source:
    """The Python standard library's documentation topics (pydoc_data) and .py sources.

    Exists on any machine that runs growfam, offline. Order: the doc topics by name, then the
    source files by relative path (pydoc_data/topics.py itself excluded: it is the topics).
    """
    root = Path(sysconfig.get_paths()["stdlib"])

    def files() -> list[Path]:
        return [path for path in sorted(root.rglob("*.py"))
                if _STDLIB_SKIP.isdisjoint(path.relative_to(root).parts)
                and path.relative_to(root).as_posix() != "pydoc_data/topics.py"]

    def documents() -> Iterator[str]:
        yield from _read_topics(Unit("topics"))
        yield from _read_stdlib(Unit("stdlib", tuple(map(str, files()))))

    def cut(target_bytes: int) -> list[Unit]:
        groups = _grouped([(str(p), p.stat().st_size) for p in files()], target_bytes)
        return [Unit("topics"), *(Unit("stdlib", tuple(group)) for group in groups)]

    version = ".".join(map(str, sys.version_info[:3]))
    return Source(f"embedded: Python {version} standard library sources and pydoc topics", documents, cut=cut)


def _read_topics(unit: Unit) -> Iterator[str]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]


def _read_stdlib(unit: Unit) -> Iterator[str]:
    for path in unit.paths:
        yield Path(path).read_bytes().decode("utf-8", errors="replace")


#: At most this share of a text file's characters may be invalid UTF-8 (each read as U+FFFD):
#: a stray byte in a real corpus passes, a binary or wrongly encoded file does not.
MAX_INVALID_UTF8 = 0.001


def _read_txt(path: Path, text_field: str) -> Iterator[str]:
    yield decode_text(path, path.read_bytes())  # one file, one document


def decode_text(path: Path, data: bytes) -> str:
    """`data` (the bytes of the file `path`) as UTF-8 text; GrowfamError for a file that is not
    text: NUL bytes, or more than MAX_INVALID_UTF8 of it invalid UTF-8 (fewer become U+FFFD)."""
    text = data.decode("utf-8", errors="replace")
    invalid = text.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")
    if "\x00" in text or invalid > MAX_INVALID_UTF8 * max(len(text), 1):
        what = "NUL bytes" if "\x00" in text else f"{invalid:,} of {len(text):,} characters are not valid UTF-8"
        raise GrowfamError(f"{path}: not UTF-8 text ({what}); convert it to UTF-8 or leave it out")
    return text


def _read_jsonl(path: Path, text_field: str, start: int = 0, stop: int | None = None) -> Iterator[str]:
    """The records of the lines of `path` whose first byte is in [start, stop) (all by default).
    Errors name the line number, or for a range that starts inside the file the line's byte offset."""
    with path.open("rb") as file:
        if start > 0:
            file.seek(start - 1)
            file.readline()  # the rest of the line that started before `start`: its range reads it
        number = 0
        while stop is None or file.tell() < stop:
            offset = file.tell()
            raw = file.readline()
            if not raw:
                return
            number += 1
            where = f"{path}:{number}" if start == 0 else f"{path}: the line at byte {offset}"
            line = raw.decode("utf-8", errors="replace")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise GrowfamError(f"{where}: malformed JSON: {err}") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise GrowfamError(f"{where}: no string field {text_field!r}")
            yield record[text_field]


def _parquet_file(path: Path, text_field: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise GrowfamError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.ParquetFile(path)
    except Exception as err:  # pyarrow's errors for a damaged file are of several types
        raise GrowfamError(f"{path}: not a readable Parquet file ({' '.join(str(err).split())[:200]})") from None
    if text_field not in table.schema_arrow.names:
        raise GrowfamError(f"{path}: no column {text_field!r} (columns: {table.schema_arrow.names})")
    return table


def _read_parquet(path: Path, text_field: str, start: int = 0, stop: int | None = None) -> Iterator[str]:
    """The text column of row groups [start, stop) of `path` (all by default)."""
    table = _parquet_file(path, text_field)
    groups = list(range(start, table.num_row_groups if stop is None else stop))
    if not groups:
        return
    for batch in table.iter_batches(columns=[text_field], row_groups=groups):
        yield from (text for text in batch.column(0).to_pylist() if isinstance(text, str))


_READERS = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}


def _file_units(path: Path, text_field: str, target_bytes: int) -> list[Unit]:
    """A large .jsonl file's byte ranges or a .parquet file's row groups of about target_bytes
    (uncompressed); one unit for a file that is small or cannot be cut."""
    whole = [Unit("files", (str(path),), text_field=text_field)]
    size = path.stat().st_size
    if path.suffix == ".jsonl" and size > target_bytes:
        bounds = [*range(0, size, target_bytes), size]
        return [Unit("jsonl", (str(path),), a, b, text_field) for a, b in zip(bounds, bounds[1:])]
    if path.suffix == ".parquet":
        meta = _parquet_file(path, text_field).metadata
        sizes = [(str(i), meta.row_group(i).total_byte_size) for i in range(meta.num_row_groups)]
        groups = _grouped(sizes, target_bytes)
        if len(groups) > 1:
            return [Unit("parquet", (str(path),), int(g[0]), int(g[-1]) + 1, text_field) for g in groups]
    return whole


def _read_files(unit: Unit) -> Iterator[str]:
    for path in map(Path, unit.paths):
        yield from _READERS[path.suffix](path, unit.text_field)


_UNIT_READERS: dict[str, Callable[[Unit], Iterator[str]]] = {
    "topics": _read_topics,
    "stdlib": _read_stdlib,
    "files": _read_files,
    "jsonl": lambda u: _read_jsonl(Path(u.paths[0]), u.text_field, u.start, u.stop),
    "parquet": lambda u: _read_parquet(Path(u.paths[0]), u.text_field, u.start, u.stop),
    "hf": lambda u: _hf_records(*u.hf, u.text_field, shard=(u.start, u.stop)),
    "memory": lambda u: iter(u.docs),
}


def local_source(path: str | Path, text_field: str = "text") -> Source:
    """A .txt (one document per file), .jsonl (one per line) or .parquet file, or a folder of them.

    Folders are searched recursively, files taken in sorted path order.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES and p.is_file())
        if not files:
            raise GrowfamError(f"{path}: no {'/'.join(LOCAL_SUFFIXES)} files in this folder")
    elif path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise GrowfamError(f"{path}: unsupported file type (expected {', '.join(LOCAL_SUFFIXES)})")
        files = [path]
    else:
        raise GrowfamError(f"{path}: no such file or folder")

    def documents() -> Iterator[str]:
        for file in files:
            yield from _READERS[file.suffix](file, text_field)

    def cut(target_bytes: int) -> list[Unit]:
        units: list[Unit] = []
        small: list[tuple[str, int]] = []  # consecutive files smaller than the target, grouped

        def flush() -> None:
            units.extend(Unit("files", tuple(g), text_field=text_field) for g in _grouped(small, target_bytes))
            small.clear()

        for file in files:
            size = file.stat().st_size
            if size < target_bytes:
                small.append((str(file), size))
                continue
            flush()
            units.extend(_file_units(file, text_field, target_bytes))
        flush()
        return units

    description = f"local: {path.resolve()} ({len(files)} file(s), field {text_field!r})"
    return Source(description, documents, path.resolve(), cut)


#: Seconds to wait for the Hub's address to answer before working offline.
HUB_PROBE_TIMEOUT = 3.0


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT) -> bool:
    """Whether the Hugging Face Hub ($HF_ENDPOINT) accepts a TCP connection within `timeout`
    seconds; False at once under HF_HUB_OFFLINE / HF_DATASETS_OFFLINE."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
           for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
    except (OSError, ValueError):  # no route, no name resolution, a refused or timed-out connection
        return False
    return True


def work_offline(datasets) -> None:
    """datasets and huggingface_hub offline from now on, also when they were imported before
    (they read the environment at import): a cached dataset still loads, the rest fails at once
    instead of after the hub client's retries (28 s)."""
    import huggingface_hub.constants

    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    huggingface_hub.constants.HF_HUB_OFFLINE = True


def _import_datasets(name: str):
    try:
        import datasets
    except ImportError:
        raise GrowfamError(
            f"hf:{name}: Hugging Face datasets need the `datasets` package (pip install 'growfam[hub]')"
        ) from None
    return datasets


def hf_source(name: str, config: str | None = None, split: str = "train", text_field: str = "text") -> Source:
    """A Hugging Face dataset streamed with `datasets` (installed with growfam's [hub] extra).

    When the Hub cannot be reached (checked first, in HUB_PROBE_TIMEOUT seconds) only the local
    Hugging Face cache is read, and a dataset missing from it is one GrowfamError at once.
    `name` may be a local folder in the datasets layout (data/train-00000-of-00002.parquet, ...)."""
    _import_datasets(name)  # the missing package is an error now, not at the first document

    def cut(target_bytes: int) -> list[Unit]:
        shards = _hf_stream(name, config, split).n_shards
        return [Unit("hf", start=i, stop=shards, text_field=text_field, hf=(name, config, split))
                for i in range(shards)]

    return Source(f"hf: {name} config={config} split={split} field={text_field!r}",
                  lambda: _hf_records(name, config, split, text_field), cut=cut)


def _hf_stream(name: str, config: str | None, split: str, shard: tuple[int, int] | None = None):
    """The dataset streamed (offline when the Hub cannot be reached: the local cache, or a local
    folder in the datasets layout), or its shard i of n; one GrowfamError when it cannot be."""
    datasets = _import_datasets(name)
    local = Path(name).is_dir()
    online = not local and hub_reachable()
    if not online:
        work_offline(datasets)
    try:
        stream = datasets.load_dataset(name, config, split=split, streaming=True)
        return stream if shard is None else stream.shard(num_shards=shard[1], index=shard[0])
    except (OSError, ValueError, ConnectionError) as err:
        if not online and not local:
            raise GrowfamError(f"hf:{name}: the Hugging Face Hub cannot be reached from here and the dataset "
                               "is not in the local Hugging Face cache; prepare it where there is a network, "
                               "or give a local .txt/.jsonl/.parquet source") from None
        raise GrowfamError(f"hf:{name}: cannot stream the dataset: {' '.join(str(err).split())[:300]}") from None


def _hf_records(name: str, config: str | None, split: str, text_field: str,
                shard: tuple[int, int] | None = None) -> Iterator[str]:
    stream = _hf_stream(name, config, split, shard)
    try:
        for record in stream:
            yield record[text_field]
    except KeyError:
        raise GrowfamError(f"hf:{name}: records have no field {text_field!r}") from None
    except (OSError, ValueError, ConnectionError) as err:
        raise GrowfamError(f"hf:{name}: cannot stream the dataset: {' '.join(str(err).split())[:300]}") from None


SourceSpec = str | Path | dict[str, Any] | list[str] | tuple[str, ...] | Source


def open_source(spec: SourceSpec, *, text_field: str = "text", max_documents: int | None = None) -> Source:
    """Resolve a source spec to a `Source`, optionally capped at `max_documents` documents.

    spec: "embedded"; "hf:NAME[:CONFIG[:SPLIT]]"; a file or folder path; a list of documents
    (in memory); or a dict with one of the keys "embedded" (true), "hf" (name, with optional
    "config", "split") or "path", and optional "text_field" and "max_documents".
    """
    if isinstance(spec, Source):
        source = spec
    elif isinstance(spec, (list, tuple)):
        docs = tuple(spec)
        source = Source(f"memory: {len(docs)} documents", lambda: iter(docs), cut=lambda _: [Unit("memory", docs=docs)])
    elif isinstance(spec, dict):
        spec = dict(spec)
        text_field = spec.pop("text_field", text_field)
        max_documents = spec.pop("max_documents", max_documents)
        if spec.get("hf"):
            source = hf_source(spec["hf"], spec.get("config"), spec.get("split", "train"), text_field)
        elif spec.get("path"):
            source = local_source(spec["path"], text_field)
        elif spec.get("embedded"):
            source = embedded_source()
        else:
            raise GrowfamError(f"data source {spec}: expected one of the keys 'embedded', 'hf', 'path'")
    elif str(spec) == "embedded":
        source = embedded_source()
    elif str(spec).startswith("hf:"):
        name, config, split = (str(spec)[3:].split(":") + [None, None])[:3]
        if not name:
            raise GrowfamError(f"{spec}: expected hf:NAME[:CONFIG[:SPLIT]]")
        source = hf_source(name, config or None, split or "train", text_field)
    else:
        source = local_source(spec, text_field)
    if max_documents is None:
        return source
    return Source(
        f"{source.description}, first {max_documents} documents",
        lambda: islice(iter(source), max_documents),
        source.path,
    )
