"""The tokenizer of a run: the checkpoint's own, or one named elsewhere (`tokenizer_name_or_path`)."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from router_tune.errors import RouterTuneError

# Files any transformers tokenizer is loaded from (fast, SentencePiece, BPE vocab, tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "tokenizer.tiktoken")


def load_tokenizer(name_or_path: str | Path, trust_remote_code: bool = False):
    """AutoTokenizer of a checkpoint directory or hub id, with a clear error when a local directory
    holds no tokenizer (merges are often saved without one): name one with `tokenizer_name_or_path`."""
    path = Path(str(name_or_path)).expanduser()
    if path.is_dir() and not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise RouterTuneError(
            f"{path} has no tokenizer ({', '.join(TOKENIZER_FILES)} are all missing): the checkpoint was saved "
            "without one. Name the tokenizer of the model it was merged from: `tokenizer_name_or_path: DIR_OR_HUB_ID` "
            "in the recipe (or --tokenizer_name_or_path), or --tokenizer for inspect and eval."
        )
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=trust_remote_code)
    check_tokenizer(tokenizer)
    return tokenizer


def check_tokenizer(tokenizer) -> None:
    """Raise unless the tokenizer is a fast (Rust) one: batched speed and assistant masks need it."""
    if not getattr(tokenizer, "is_fast", False):
        raise RouterTuneError(
            f"{type(tokenizer).__name__} is a slow tokenizer; the data pipeline needs a fast "
            "one (AutoTokenizer.from_pretrained(..., use_fast=True), tokenizer.json)."
        )
