"""Tokenizer loading: a hub name (cached), a saved tokenizer directory, a BERT vocab.txt, or "auto"."""

from __future__ import annotations

import glob
import os
from pathlib import Path

# Importing this module imports the r2d2ds package first, which installs the torchvision shim.

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def dataset_dir(spec: str) -> str:
    """The directory a data spec (directory, manifest path or shard pattern) lives in."""
    if os.path.isdir(spec):
        return spec
    if os.path.isfile(spec):
        return os.path.dirname(spec) or "."
    # A pattern: the directory part before the first brace or glob character.
    cut = min([i for i in (spec.find(c) for c in "{*?[") if i >= 0] + [len(spec)])
    return os.path.dirname(spec[:cut]) or "."


def _vocab_lines(path: Path) -> int:
    # Newline-terminated lines only: bert-base-chinese's vocab holds tokens that str.splitlines() would split.
    data = path.read_bytes()
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


def _from_vocab(path: Path):
    from transformers import BertTokenizerFast

    n = _vocab_lines(path)
    # vocab=, not vocab_file=: transformers 5 silently builds a 5-token vocab from vocab_file= (DESIGN.md 5).
    tok = BertTokenizerFast(vocab=str(path))
    if len(tok) != n:
        raise ValueError(f"data.tokenizer: '{path}' has {n} lines but the tokenizer built from it has "
                         f"{len(tok)} tokens (duplicate or blank lines in the vocab?)")
    missing = [t for t in SPECIAL_TOKENS if t not in tok.get_vocab()]
    if missing:
        raise ValueError(f"data.tokenizer: '{path}' lacks the BERT special tokens {missing}")
    return tok


def _from_dir(path: Path):
    if any((path / f).is_file() for f in _TOKENIZER_FILES):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path), use_fast=True)
        if not tok.is_fast:
            raise ValueError(f"data.tokenizer: '{path}' loads a slow tokenizer; a fast one is required")
        return tok
    if (path / "vocab.txt").is_file():
        return _from_vocab(path / "vocab.txt")
    raise FileNotFoundError(f"data.tokenizer: directory '{path}' has neither a saved tokenizer "
                            f"({', '.join(_TOKENIZER_FILES)}) nor a vocab.txt")


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or spec.endswith((".txt", ".json"))


def load_tokenizer(spec: str, dataset: str | None = None):
    """A transformers fast tokenizer from `spec` (config key `data.tokenizer`).

    spec: "auto" (the dataset directory's saved tokenizer or vocab.txt), a directory saved with
    save_pretrained (or holding a vocab.txt), a path to a BERT vocab.txt, or a hub name that is already in the
    local cache (no network at run time).
    """
    if spec == "auto":
        if not dataset:
            raise ValueError("data.tokenizer='auto' takes the dataset's vocab.txt, but no dataset was given "
                             "(set data.train, or data.tokenizer to a vocab.txt / directory / name)")
        d = Path(dataset_dir(dataset))
        if not d.is_dir():
            raise FileNotFoundError(f"data.tokenizer='auto': dataset directory '{d}' does not exist")
        try:
            return _from_dir(d)
        except FileNotFoundError:
            raise FileNotFoundError(f"data.tokenizer='auto': '{d}' has no vocab.txt or saved tokenizer; "
                                    "set data.tokenizer to a vocab.txt, a tokenizer directory or a name"
                                    ) from None
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        return _from_dir(path)
    if path.is_file():
        if path.suffix == ".json":
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast(tokenizer_file=str(path))
        return _from_vocab(path)
    if _looks_like_path(spec) or glob.has_magic(spec):
        raise FileNotFoundError(f"data.tokenizer: '{spec}' does not exist (expected a vocab.txt, a tokenizer "
                                "directory, or a cached hub name)")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(spec, use_fast=True, local_files_only=True)
    except Exception as exn:  # transformers raises OSError/ValueError variants for a missing cache entry
        raise FileNotFoundError(f"data.tokenizer: '{spec}' is neither a local path nor a hub name in the "
                                f"local cache (no network at run time): {exn}") from exn
    if not tok.is_fast:
        raise ValueError(f"data.tokenizer: '{spec}' loads a slow tokenizer; a fast one is required")
    return tok


def write_vocab(path: str | Path, chars: set[str] | list[str]) -> int:
    """Write a BERT WordPiece vocab: the five special tokens, then each character once, sorted; its size."""
    tokens = list(SPECIAL_TOKENS) + sorted(set(chars) - set(SPECIAL_TOKENS) - {" ", "\n", "\t"})
    Path(path).write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return len(tokens)
