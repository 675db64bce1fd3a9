"""Document sources: a `Source` is a re-iterable stream of documents (non-empty strings).

`open_source` resolves a spec to one: the embedded Python-stdlib corpus (offline, on any machine),
local .txt/.jsonl/.parquet files or folders of them, a streamed Hugging Face dataset, or a list
of documents in memory.
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
class Source:
    """A re-iterable stream of documents (non-empty strings) and a one-line description.

    `path` is the file or folder of a local source (None otherwise): an output must not overlap it.
    """

    description: str
    documents: Callable[[], Iterator[str]]
    path: Path | None = None

    def __iter__(self) -> Iterator[str]:
        return (doc for doc in self.documents() if doc)


def embedded_source() -> Source:
    """The Python standard library's documentation topics (pydoc_data) and .py sources.

    Exists on any machine that runs growfam, offline. Order: the doc topics by name, then the
    source files by relative path (pydoc_data/topics.py itself excluded: it is the topics).
    """
    root = Path(sysconfig.get_paths()["stdlib"])

    def documents() -> Iterator[str]:
        from pydoc_data.topics import topics

        for name in sorted(topics):
            yield topics[name]
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root)
            if _STDLIB_SKIP.isdisjoint(rel.parts) and rel.as_posix() != "pydoc_data/topics.py":
                yield path.read_bytes().decode("utf-8", errors="replace")

    version = ".".join(map(str, sys.version_info[:3]))
    return Source(f"embedded: Python {version} standard library sources and pydoc topics", documents)


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


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise GrowfamError(f"{path}:{number}: malformed JSON: {err}") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise GrowfamError(f"{path}:{number}: no string field {text_field!r}")
            yield record[text_field]


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise GrowfamError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
    table = pq.ParquetFile(path)
    if text_field not in table.schema_arrow.names:
        raise GrowfamError(f"{path}: no column {text_field!r} (columns: {table.schema_arrow.names})")
    for batch in table.iter_batches(columns=[text_field]):
        yield from (text for text in batch.column(0).to_pylist() if isinstance(text, str))


_READERS = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}


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

    description = f"local: {path.resolve()} ({len(files)} file(s), field {text_field!r})"
    return Source(description, documents, path.resolve())


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


def hf_source(name: str, config: str | None = None, split: str = "train", text_field: str = "text") -> Source:
    """A Hugging Face dataset streamed with `datasets` (installed with growfam's [hub] extra).

    When the Hub cannot be reached (checked first, in HUB_PROBE_TIMEOUT seconds) only the local
    Hugging Face cache is read, and a dataset missing from it is one GrowfamError at once."""
    try:
        import datasets
    except ImportError:
        raise GrowfamError(
            f"hf:{name}: Hugging Face datasets need the `datasets` package (pip install 'growfam[hub]')"
        ) from None

    def documents() -> Iterator[str]:
        online = hub_reachable()
        if not online:
            work_offline(datasets)
        try:
            stream = datasets.load_dataset(name, config, split=split, streaming=True)
            for record in stream:
                yield record[text_field]
        except KeyError:
            raise GrowfamError(f"hf:{name}: records have no field {text_field!r}") from None
        except (OSError, ValueError, ConnectionError) as err:
            if not online:
                raise GrowfamError(f"hf:{name}: the Hugging Face Hub cannot be reached from here and the dataset "
                                   "is not in the local Hugging Face cache; prepare it where there is a network, "
                                   "or give a local .txt/.jsonl/.parquet source") from None
            raise GrowfamError(f"hf:{name}: cannot stream the dataset: {' '.join(str(err).split())[:300]}") from None

    return Source(f"hf: {name} config={config} split={split} field={text_field!r}", documents)


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
        docs = list(spec)
        source = Source(f"memory: {len(docs)} documents", lambda: iter(docs))
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
