"""What the family tests share: a small text corpus and its prepared dataset."""

import pytest

from growfam.data import prepare

TEXT = [f"Document {i}: the {'quick brown fox' if i % 2 else 'lazy dog'} number {i * 7} "
        f"jumps over {i % 5} fences and lands in field {i % 11}. " * 3 for i in range(400)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "ds"
    prepare(TEXT, "train:300", out, val_fraction=0.05, progress=False)
    return str(out)
