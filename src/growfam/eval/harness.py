"""Zero-shot tasks through lm-evaluation-harness, offline: the member goes in memory into
lm_eval's `HFLM`, the tasks are the configs `tasks.prepare_tasks` writes.

`HF_DATASETS_OFFLINE=1` and `HF_HUB_OFFLINE=1` are set before `datasets` is used, so nothing
reaches for the network. Metrics kept per task: acc and acc_norm where the task defines them,
lambada's perplexity, and the wiki set's word / byte perplexity and bits per byte.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from growfam.errors import GrowfamError
from growfam.eval.tasks import INSTALL_HINT, prepare_tasks

#: Context lm_eval gives the choice tasks at least (its own default max_length).
_CHOICE_MAX_LENGTH = 2048
#: lm_eval metric -> the name growfam reports it under.
METRICS = {"acc": "acc", "acc_norm": "acc_norm", "perplexity": "ppl", "word_perplexity": "word_ppl",
           "byte_perplexity": "byte_ppl", "bits_per_byte": "bpb"}


def offline() -> None:
    """Keep `datasets` and the hub offline, also when they were imported before this call."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets
    import huggingface_hub.constants

    datasets.config.HF_DATASETS_OFFLINE = True
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.disable_progress_bars()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its config notes are not ours to show


def lm_eval_version() -> str:
    """The installed lm_eval's version; GrowfamError with the install line when it is missing."""
    from importlib import metadata

    try:
        return metadata.version("lm_eval")
    except metadata.PackageNotFoundError:
        raise GrowfamError(f"zero-shot evaluation needs lm-evaluation-harness: {INSTALL_HINT}") from None


def load_hf_model(path: str | Path, device: str | torch.device = "cpu"):
    """The member directory as a transformers model (safetensors only, never from the network);
    GrowfamError naming the directory when its weights cannot be read (a corrupt or cut file)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, use_safetensors=True,
                                                     dtype=torch.float32)
    except (SafetensorError, OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise GrowfamError(f"{path}: cannot load the model's weights ({first})") from None
    return model.to(device).eval()


def load_hf_tokenizer(path: str | Path):
    """The Hugging Face tokenizer in `path`; GrowfamError when there is none."""
    from transformers import AutoTokenizer

    from growfam.data.tokenizer import first_line

    if not (Path(path) / "tokenizer.json").is_file() and not (Path(path) / "tokenizer_config.json").is_file():
        raise GrowfamError(f"{path}: no tokenizer files (the zero-shot tasks need the member's tokenizer)")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise GrowfamError(f"{path}: cannot load its tokenizer: {first_line(err)}") from None


def make_lm(model, tokenizer, batch_size: int = 8, device: str | torch.device = "cpu", rolling: bool = False):
    """lm_eval's HFLM over the in-memory `model`.

    A rolling task (wiki) runs in windows of the member's own context. The choice tasks must
    see each answer whole: lm_eval refuses an answer longer than max_length, and a few are
    longer than a small member's context (5 PIQA solutions exceed 256 tokens of the demo's
    BPE), so they get at least lm_eval's default 2048 tokens (RoPE runs past the trained
    context; shorter requests are unaffected)."""
    offline()
    from lm_eval.models.huggingface import HFLM

    context = HFLM(pretrained=model, tokenizer=tokenizer).max_length  # the member's own, as lm_eval reads it
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device),
                max_length=context if rolling else max(context, _CHOICE_MAX_LENGTH))


def run_tasks(model, tokenizer, names: list[str], limit: int | None = None, batch_size: int = 8,
              device: str | torch.device = "cpu") -> tuple[dict[str, dict], dict[str, str]]:
    """Evaluate a transformers causal LM on the tasks `names` (keys of `tasks.TASKS`).

    limit: the first N examples of each task (None: all). Returns ({task: {metric: value,
    "examples": n}}, {task: where its data came from})."""
    lm_eval_version()
    offline()
    from lm_eval.evaluator import evaluate
    from lm_eval.tasks import TaskManager

    configs, origins = prepare_tasks(names)
    manager = TaskManager(include_path=str(configs), include_defaults=False)
    results = {}
    for group, rolling in (([n for n in names if n == "wiki"], True), ([n for n in names if n != "wiki"], False)):
        if not group:
            continue
        lm = make_lm(model, tokenizer, batch_size, device, rolling)
        loaded = manager.load([f"growfam_{name}" for name in group])
        out = evaluate(lm, loaded, limit=limit, bootstrap_iters=0, log_samples=False, verbosity="WARNING")
        for name in group:
            raw = out["results"][f"growfam_{name}"]
            metrics = {ours: raw[f"{theirs},none"] for theirs, ours in METRICS.items() if f"{theirs},none" in raw}
            metrics["examples"] = out["n-samples"][f"growfam_{name}"]["effective"]
            results[name] = metrics
    return {name: results[name] for name in names}, origins


def task_names(spec: str) -> list[str]:
    """'paper' -> the paper's seven tasks; 'none' -> []; else a comma-separated list of task names."""
    from growfam.eval.tasks import PAPER_TASKS, check_task_names

    if spec == "paper":
        return list(PAPER_TASKS)
    if spec == "none":
        return []
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise GrowfamError("--tasks is empty; give 'paper', 'none' or task names")
    return check_task_names(list(dict.fromkeys(names)))


