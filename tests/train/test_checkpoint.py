"""Checkpoint failures: a full disk, corrupt files, stale temporaries, a broken `latest` pointer."""

import errno
import math
import os

import pytest
import torch

import growfam.train.checkpoint as checkpoint_module
from growfam.train.checkpoint import latest_checkpoint, load_checkpoint, read_trainer_state
from growfam.errors import GrowfamError
from growfam.model import Llama
from growfam.train import make_optimizer, param_groups, train

from train.support import TINY, ArrayDataset, config, step_losses


# ---- checkpoint failures -------------------------------------------------------------------------


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    real_save, calls = torch.save, [0]

    def save(obj, path, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:  # the second checkpoint's optimizer.pt
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", save)
    with pytest.raises(GrowfamError, match="step 8 was not written.*No space left on device.*intact"):
        train(config(tmp_path), dataset=ArrayDataset())
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000004"]  # no temp dir left
    assert latest_checkpoint(tmp_path / "run") == root / "step_0000004"
    model = Llama(TINY)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1))
    assert load_checkpoint(root / "step_0000004", model, optimizer)["step"] == 4
    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    assert train(config(tmp_path), dataset=ArrayDataset()).steps == 8  # and the run resumes


def test_a_checkpoint_with_nonfinite_weights_or_moments_is_never_written(tmp_path):
    model = Llama(TINY)
    optimizer = make_optimizer(model, config(tmp_path), torch.device("cpu"))
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    optimizer.step()
    optimizer.state[model.lm_head.weight]["exp_avg_sq"][0, 0] = math.inf
    with pytest.raises(GrowfamError, match="NaN/inf.*lm_head.weight.*not written"):
        checkpoint_module.save_checkpoint(tmp_path, 1, model, optimizer, {"step": 1})
    optimizer.state[model.lm_head.weight]["exp_avg_sq"].zero_()
    with torch.no_grad():
        model.norm.weight[0] = math.nan
    with pytest.raises(GrowfamError, match="NaN/inf.*norm.weight.*not written"):
        checkpoint_module.save_checkpoint(tmp_path, 1, model, optimizer, {"step": 1})
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


CORRUPTIONS = {
    "weights truncated": ("model.safetensors", _truncate),
    "weights garbage": ("model.safetensors", lambda p: p.write_bytes(b"\xff" * 100)),
    "optimizer truncated": ("optimizer.pt", _truncate),
    "optimizer hostile pickle": ("optimizer.pt", lambda p: p.write_bytes(__import__("pickle").dumps(_Evil(), protocol=2))),
    "optimizer wrong tensors": ("optimizer.pt", lambda p: torch.save({"state": {}, "param_groups": []}, p)),
    "state not json": ("trainer_state.json", lambda p: p.write_text("{not json")),
    "state a list": ("trainer_state.json", lambda p: p.write_text("[1, 2]")),
    "state missing keys": ("trainer_state.json", lambda p: p.write_text('{"step": 8}')),
    "state bad guard": ("trainer_state.json",
                        lambda p: p.write_text(p.read_text().replace('"lr_scale": 1.0', '"lr_scale": "x"'))),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_corrupt_checkpoint_names_itself_and_the_previous_one(tmp_path, monkeypatch, corruption):
    monkeypatch.chdir(tmp_path)
    train(config(tmp_path, keep_last=0), dataset=ArrayDataset())
    root = tmp_path / "run" / "checkpoints"
    name, corrupt = CORRUPTIONS[corruption]
    corrupt(root / "step_0000008" / name)
    before = (root / "step_0000008" / name).read_bytes()
    with pytest.raises(GrowfamError, match=r"checkpoint .*step_0000008 is broken \(.+\); "
                                           r"move it away to resume from step_0000004") as err:
        train(config(tmp_path, keep_last=0), dataset=ArrayDataset())
    assert "\n" not in str(err.value)
    assert (root / "step_0000008" / name).read_bytes() == before  # nothing was touched
    assert not (tmp_path / "pwned").exists()


def test_the_only_checkpoint_broken_says_so(tmp_path):
    train(config(tmp_path, max_steps=4), dataset=ArrayDataset())
    (tmp_path / "run" / "checkpoints" / "step_0000004" / "trainer_state.json").write_text("null")
    with pytest.raises(GrowfamError, match="step_0000004 is broken.*no earlier complete checkpoint"):
        train(config(tmp_path, max_steps=8), dataset=ArrayDataset())


def _disk_full_open(fail_at: int):
    """An `open` whose files raise ENOSPC on the fail_at-th write, after writing half of it."""
    writes = [0]

    class Full:
        def __init__(self, file):
            self.file = file

        def write(self, text):
            writes[0] += 1
            if writes[0] == fail_at:
                self.file.write(text[: len(text) // 2])
                self.file.flush()
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.file.write(text)

        def __getattr__(self, name):
            return getattr(self.file, name)

    return lambda *args, **kwargs: Full(open(*args, **kwargs))


def test_full_disk_while_logging_is_one_clear_error_and_resumes(tmp_path, monkeypatch):
    import growfam.train.metrics

    monkeypatch.setattr(growfam.train.metrics, "open", _disk_full_open(fail_at=9), raising=False)  # step 7's line
    with pytest.raises(GrowfamError, match=r"cannot write .*metrics.jsonl: No space left on device"):
        train(config(tmp_path), dataset=ArrayDataset())
    assert latest_checkpoint(tmp_path / "run").name == "step_0000004"
    monkeypatch.undo()
    train(config(tmp_path), dataset=ArrayDataset())  # the half-written line is dropped on resume
    assert sorted(step_losses(tmp_path / "run")) == list(range(1, 9))


def test_full_disk_in_tensorboard_is_one_clear_error(tmp_path, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SummaryWriter, "add_scalar", full)
    with pytest.raises(GrowfamError, match=r"cannot write .*tensorboard: No space left on device"):
        train(config(tmp_path, tensorboard=True), dataset=ArrayDataset())


def test_stale_checkpoint_temporaries_are_removed_at_start(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    root = tmp_path / "run" / "checkpoints"
    (root / f".step_0000004.tmp-{dead}-abcd").mkdir(parents=True)
    (root / f".step_0000004.tmp-{dead}-abcd" / "model.safetensors").write_bytes(b"x" * 1000)
    train(config(tmp_path, max_steps=4), dataset=ArrayDataset())
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000004"]


def test_unwritable_out_dir_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(GrowfamError, match="cannot write"):
        train(config(tmp_path, out_dir=str(tmp_path / "file" / "run")), dataset=ArrayDataset())


def test_broken_latest_pointer_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    train(config(tmp_path, keep_last=0), dataset=ArrayDataset())
    root = tmp_path / "run" / "checkpoints"
    (root / "latest").write_text("step_0000099\n")
    assert latest_checkpoint(tmp_path / "run") == root / "step_0000008"
    assert read_trainer_state(root / "step_0000004")["step"] == 4
