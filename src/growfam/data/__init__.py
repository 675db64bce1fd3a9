"""Training data: document sources, one-time tokenisation into token files, and packed windows.

Pipeline: `open_source` gives documents (the embedded Python-stdlib corpus, local
.txt/.jsonl/.parquet files, or a streamed Hugging Face dataset); `prepare` tokenises them once
into a self-contained dataset directory; `TokenDataset.open` memory-maps it; `PackedWindows`
turns a split's token array into seeded, resumable batches and `eval_windows` into validation
batches.

Modules, each importing only those listed before it (no cycles):

    tokenizer.py   Tokenizer, load_tokenizer, train_bpe, bounded_pieces, MAX_RUN
    sources.py     Source, Unit, embedded / local (.txt, .jsonl, .parquet) / hf sources, open_source
    dataset.py     TokenDataset, SplitTokens, ShardedTokens, the index checks, FORMAT, SPLITS,
                   token_dtype (imports tokenizer)
    preparation.py prepare, merge, in_val_split, DEFAULT_TOKENIZER, DEFAULT_VAL_FRACTION, units of
                   work, shards and the index (imports tokenizer, sources, dataset)
    loader.py      token_rows, num_windows, PackedWindows, eval_windows (imports nothing of data/: it reads
                   a SplitTokens' vocab_size and origin by duck typing)
    mixture.py     Mixture, MixedWindows, open_dataset, train_windows, write_mixture, parse_mix
                   (imports dataset, loader)
    config.py      DataConfig (the family YAML's `data:` section), dataset_dir, ensure_dataset
                   (imports preparation)

data/ may import the top-level helpers (errors, outputs, text, checks, io, device, lock) and
model/; nothing of grow/, train/, growfam.config or family/.

(`preparation.py`, not `prepare.py`: a module named like the function it exports would be
shadowed by it in this package's namespace.)
"""

from growfam.data.dataset import FORMAT, SPLITS, ShardedTokens, SplitTokens, TokenDataset, token_dtype
from growfam.data.loader import PackedWindows, eval_windows, num_windows, token_rows
from growfam.data.mixture import (MIXTURE_FILE, MixedWindows, Mixture, open_dataset, parse_mix, train_windows,
                                  write_mixture)
from growfam.data.preparation import (BPE_TRAIN_MAX_CHARS, CHUNK_CHARS, DEFAULT_TOKENIZER, DEFAULT_VAL_FRACTION,
                                      SHARD_TOKENS, in_val_split, merge, partial_dir, prepare)
from growfam.data.sources import (
    LOCAL_SUFFIXES,
    Source,
    SourceSpec,
    Unit,
    embedded_source,
    hf_source,
    local_source,
    open_source,
)
from growfam.data.tokenizer import (
    EOT,
    GPT2_PATTERN,
    MAX_RUN,
    MIN_TRAINED_VOCAB,
    HFTokenizer,
    TiktokenGPT2,
    Tokenizer,
    bounded_pieces,
    load_tokenizer,
    train_bpe,
)

__all__ = [
    "BPE_TRAIN_MAX_CHARS",
    "CHUNK_CHARS",
    "DEFAULT_TOKENIZER",
    "DEFAULT_VAL_FRACTION",
    "EOT",
    "FORMAT",
    "GPT2_PATTERN",
    "LOCAL_SUFFIXES",
    "MIXTURE_FILE",
    "MAX_RUN",
    "MIN_TRAINED_VOCAB",
    "SPLITS",
    "HFTokenizer",
    "MixedWindows",
    "Mixture",
    "PackedWindows",
    "SHARD_TOKENS",
    "ShardedTokens",
    "Source",
    "SourceSpec",
    "SplitTokens",
    "TiktokenGPT2",
    "TokenDataset",
    "Tokenizer",
    "Unit",
    "bounded_pieces",
    "embedded_source",
    "eval_windows",
    "num_windows",
    "hf_source",
    "in_val_split",
    "load_tokenizer",
    "local_source",
    "merge",
    "open_dataset",
    "open_source",
    "parse_mix",
    "partial_dir",
    "prepare",
    "token_dtype",
    "token_rows",
    "train_windows",
    "train_bpe",
    "write_mixture",
]
