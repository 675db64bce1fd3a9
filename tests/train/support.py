"""What the train tests share: a tiny model, an in-memory dataset, a TrainConfig around them,
and readers of a run's losses."""

import json

import numpy as np

from growfam.model import Llama, ModelConfig
from growfam.train import TrainConfig
from growfam.train.metrics import read_metrics


TINY = ModelConfig(d_model=32, n_layers=2, n_heads=2, ffn_dim=64, vocab_size=128, max_seq_len=32)


class ArrayDataset:
    """In-memory stand-in for a prepared dataset: random tokens, no tokenizer."""

    vocab_size = TINY.vocab_size

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.splits = {"train": rng.integers(0, self.vocab_size, 20_000).astype(np.uint16),
                       "val": rng.integers(0, self.vocab_size, 2_000).astype(np.uint16)}

    def tokens(self, split: str) -> np.ndarray:
        return self.splits[split]


def config(tmp_path, **changes) -> TrainConfig:
    base = dict(model=TINY, out_dir=str(tmp_path / "run"), max_steps=8, batch_size=4, micro_batch_size=2,
                seq_len=16, max_lr=1e-2, warmup_frac=0.25, eval_every=4, eval_batches=2, ckpt_every=4,
                log_every=1, tensorboard=False, device="cpu")
    base.update(changes)
    return TrainConfig(**base)


def step_losses(out_dir) -> dict[int, float]:
    """Per-step training loss; a step logged twice (before a kill and after resuming) keeps the last."""
    return {r["step"]: r["loss"] for r in read_metrics(out_dir / "metrics.jsonl", "train")}


def nan_at(model: Llama, calls: set[int]) -> None:
    """Make model.loss return NaN (with a graph, so backward runs) on the given 1-based calls."""
    original, count = model.loss, [0]

    def loss(x, y, loss_chunk=0):
        count[0] += 1
        value = original(x, y, loss_chunk)
        return value * float("nan") if count[0] in calls else value

    model.loss = loss


def cli_config(tmp_path, monkeypatch, extra: str = ""):
    """A train YAML for the tiny model on ArrayDataset (TokenDataset.open is stubbed)."""
    import growfam.data

    monkeypatch.setattr(growfam.data.TokenDataset, "open", classmethod(lambda cls, path: ArrayDataset()))
    path = tmp_path / "train.yaml"
    path.write_text(f"model: {json.dumps(TINY.to_dict())}\ndata: unused\nout_dir: {tmp_path / 'run'}\n"
                    "batch_size: 4\nseq_len: 16\ntensorboard: false\ndevice: cpu\n" + extra)
    return path
