import contextlib
import resource
import signal

import pytest
import torch

from growfam.model import Llama, ModelConfig

# The suite's models are tiny: a second intra-op thread per pytest worker only adds barrier
# waits, and while another worker runs a group of gloo processes, oversubscribed cores made a
# 2 s family test take 20 s.
torch.set_num_threads(1)


def tiny_config(**changes) -> ModelConfig:
    """A model small enough for exact checks in milliseconds."""
    base = dict(d_model=64, n_layers=2, n_heads=4, ffn_dim=128, vocab_size=97, max_seq_len=64)
    base.update(changes)
    return ModelConfig(**base)


@pytest.fixture(params=[(4, False), (2, False), (4, True), (1, True)],
                ids=["mha-untied", "gqa-untied", "mha-tied", "mqa-tied"])
def attn_variant(request):
    n_kv, tied = request.param
    return tiny_config(n_kv_heads=n_kv, tie_embeddings=tied)


def documents(n: int = 300) -> list[str]:
    """n short synthetic documents: the corpus the suite prepares its datasets from."""
    return [f"Document {i}: the {'quick brown fox' if i % 2 else 'lazy dog'} number {i * 7} "
            f"jumps over {i % 5} fences and lands in field {i % 11}. " * 3 for i in range(n)]


def dataset_and_model(root, cfg: ModelConfig, name: str, seed: int, val_fraction: float = 0.05):
    """root/ds prepared from `documents()` (a 300-token BPE trained on them) and a random model
    of `cfg` saved as root/name with that tokenizer; returns root."""
    from growfam.data import prepare
    from growfam.model import save_pretrained

    prepare(documents(), "train:300", root / "ds", val_fraction=val_fraction, progress=False)
    save_pretrained(random_model(cfg, seed=seed), root / name, tokenizer=root / "ds" / "tokenizer")
    return root


def random_model(cfg: ModelConfig, seed: int = 0, dtype=torch.float32) -> Llama:
    torch.manual_seed(seed)
    model = Llama(cfg).to(dtype)
    # Non-trivial norm gains, so tests see them used.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    return model.eval()


def checksums(folder) -> dict[str, str]:
    """sha256 of every file under `folder`, by path relative to it: what a refused command must
    leave exactly as it was."""
    import hashlib
    from pathlib import Path

    root = Path(folder)
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Every file this process writes stops at `limit` bytes (RLIMIT_FSIZE; SIGXFSZ ignored, so
    the write fails with EFBIG "File too large"): a full disk for every writer, Python's, Rust's
    (safetensors, tokenizers) and C++'s (torch.save) alike, without privileges."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


@contextlib.contextmanager
def read_only(folder):
    """`folder` read-only for this process while the block runs: a read-only bind mount when
    running as root (root ignores permission bits), else its write permission removed; a skip
    where neither is possible."""
    import os
    import stat
    import subprocess

    folder = str(folder)
    if os.geteuid() != 0:
        mode = stat.S_IMODE(os.stat(folder).st_mode)
        os.chmod(folder, mode & ~0o222)
        try:
            yield
        finally:
            os.chmod(folder, mode)
        return
    mounted = subprocess.run(["mount", "--bind", folder, folder], capture_output=True).returncode == 0
    if not mounted or subprocess.run(["mount", "-o", "remount,bind,ro", folder], capture_output=True).returncode:
        if mounted:
            subprocess.run(["umount", folder], check=True)
        pytest.skip("cannot make a read-only folder here (root without mount)")
    try:
        yield
    finally:
        subprocess.run(["umount", folder], check=True)
