"""Text for router training and evaluation: read documents, tokenise them into one stream, split, cut windows.

Sources: text files (--text), a dataset saved with `datasets.save_to_disk` (--dataset), or by default the
Python standard library's `pydoc_data.topics` (~0.5 MB of English and code that every machine has).
The stream is split by position: "train" is the first 1 - heldout_frac of the tokens, "heldout" the rest,
so routers can be trained on one part and evaluated on text they never saw.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np

SPLITS = ("all", "train", "heldout")
HELDOUT_FRAC = 0.1
_CHUNK_CHARS = 4000  # tokenise in pieces of this size: long inputs make HF tokenizers warn about max length


def pydoc_topics() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def read_dataset(path: str | Path, field: str = "text") -> list[str]:
    """The `field` column of a dataset saved with `datasets.save_to_disk` (a Dataset, or a DatasetDict's
    "train" split)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"dataset directory not found: {path}")
    try:
        import datasets
    except ImportError:
        raise ValueError("--dataset needs the `datasets` package (pip install datasets); "
                         "or pass plain text files with --text") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"dataset {path} has splits {list(ds)}; expected a 'train' split")
        ds = ds["train"]
    if field not in ds.column_names:
        raise ValueError(f"dataset {path} has no column {field!r} (columns: {ds.column_names})")
    return [t for t in ds[field] if t]


def read_texts(text_files: list[str] | None = None, dataset: str | None = None,
               field: str = "text") -> tuple[list[str], str]:
    """(documents, a description of the source for manifests and reports)."""
    if text_files and dataset:
        raise ValueError("pass either --text or --dataset, not both")
    if dataset:
        docs, source = read_dataset(dataset, field), f"dataset:{Path(dataset).resolve()}"
    elif text_files:
        docs = []
        for f in text_files:
            p = Path(f)
            if not p.is_file():
                raise FileNotFoundError(f"text file not found: {p}")
            docs.append(p.read_text(encoding="utf-8", errors="replace"))
        source = "text:" + ",".join(str(Path(f).resolve()) for f in text_files)
    else:
        docs, source = pydoc_topics(), "pydoc_data.topics"
    if not any(d.strip() for d in docs):
        raise ValueError(f"no text to tokenise: {source} is empty")
    return docs, source


def _chunks(doc: str) -> list[str]:
    """Cut a document at line ends into pieces of about _CHUNK_CHARS characters (no text lost)."""
    out, start = [], 0
    while start < len(doc):
        end = len(doc) if len(doc) - start <= _CHUNK_CHARS else doc.rfind("\n", start, start + _CHUNK_CHARS) + 1
        if end <= start:  # no line end in reach: cut anywhere
            end = start + _CHUNK_CHARS
        out.append(doc[start:end])
        start = end
    return out


def tokenize(tokenizer, docs: list[str], vocab_size: int) -> np.ndarray:
    """One int32 token stream: the documents in order, separated by a blank line, no special tokens.

    Without a tokenizer (random test models) the UTF-8 bytes modulo the vocabulary stand in for tokens.
    """
    text_pieces = [c for d in docs if d.strip() for c in _chunks(d.strip() + "\n\n")]
    if tokenizer is None:
        print("note: the model has no tokenizer; using UTF-8 bytes (mod vocab size) as token ids",
              file=sys.stderr)
        ids = np.frombuffer("".join(text_pieces).encode("utf-8"), np.uint8).astype(np.int32) % vocab_size
    else:
        enc = tokenizer(text_pieces, add_special_tokens=False)["input_ids"]
        ids = np.fromiter((t for piece in enc for t in piece), np.int32)
    if ids.size == 0:
        raise ValueError("the text tokenised to zero tokens")
    if ids.max() >= vocab_size:
        raise ValueError(f"tokenizer produced id {int(ids.max())} outside the model's vocabulary of {vocab_size}")
    return ids


def split_tokens(tokens: np.ndarray, split: str, heldout_frac: float = HELDOUT_FRAC) -> np.ndarray:
    if split not in SPLITS:
        raise ValueError(f"split {split!r}; choose one of {SPLITS}")
    if not 0 < heldout_frac < 1:
        raise ValueError(f"held-out fraction must lie in (0, 1), got {heldout_frac}")
    cut = int(round(len(tokens) * (1 - heldout_frac)))
    return {"all": tokens, "train": tokens[:cut], "heldout": tokens[cut:]}[split]


def windows(tokens: np.ndarray, length: int, max_windows: int | None = None) -> np.ndarray:
    """Non-overlapping windows [n, length] from the start of the stream (the tail that does not fill one
    is dropped)."""
    n = len(tokens) // length
    if n == 0:
        raise ValueError(f"the text has {len(tokens)} tokens, fewer than one window of {length}")
    if max_windows is not None:
        n = min(n, max_windows)
    return tokens[: n * length].reshape(n, length)


def stream_hash(tokens: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(tokens, np.int32).tobytes()).hexdigest()[:16]


def load_tokens(tokenizer, vocab_size: int, text_files=None, dataset=None, split="all",
                heldout_frac: float = HELDOUT_FRAC) -> tuple[np.ndarray, str]:
    """(token stream of the chosen split, source description) in one call."""
    docs, source = read_texts(text_files, dataset)
    tokens = split_tokens(tokenize(tokenizer, docs, vocab_size), split, heldout_frac)
    if tokens.size == 0:
        raise ValueError(f"the {split!r} split of {source} is empty")
    return tokens, f"{source} [{split}]"
