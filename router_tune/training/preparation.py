"""The steps before any weight loads, shared by a run (RouterTrainer) and its dry-run plan (`plan.py`):
the checkpoint and its config, then config -> tokenizer -> training dataset. Each step checks what it
can cheaply, so a bad recipe fails before the model is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoConfig

from router_tune import data
from router_tune.architectures import architecture_for
from router_tune.io.checkpoint import resolve_checkpoint


@dataclass
class ModelSource:
    """Where the model comes from: its checkpoint path (or name) and config, and the model object when
    the caller passed one already loaded."""

    path: Path | str
    config: Any
    loaded: Any = None


@dataclass
class TrainingData:
    """A run's tokenizer, training blocks (a `datasets.IterableDataset`) and the names of their sources."""

    tokenizer: Any
    dataset: Any
    source_names: list[str]


def model_source(config, model=None) -> ModelSource:
    """The checkpoint of `model` (a loaded model, a path or hub id) or of `config.model_name_or_path`:
    its files checked (safetensors headers, pickle and remote-code policy) and its architecture supported."""
    if model is not None and not isinstance(model, (str, os.PathLike)):
        return ModelSource(model.config._name_or_path, model.config, model)
    path = resolve_checkpoint(
        model or config.model_name_or_path,
        allow_pickle=config.allow_pickle,
        trust_remote_code=config.trust_remote_code,
    )
    model_config = AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    architecture_for(model_config)
    return ModelSource(path, model_config)


def load_run_tokenizer(config, source: ModelSource):
    """The recipe's `tokenizer_name_or_path`, else the checkpoint's own tokenizer."""
    return data.load_tokenizer(config.tokenizer_name_or_path or source.path, config.trust_remote_code)


def training_data(config, source: ModelSource, tokenizer=None, bad_records: data.BadRecords | None = None):
    """config -> tokenizer -> dataset: the recipe's `datasets` parsed, the block size checked against the
    model, the tokenizer loaded (unless given), every local record checked, and the training blocks built.

    Args:
        config: the RouterTuneConfig (its `datasets` must be set).
        source: from `model_source`.
        tokenizer: the tokenizer to use; default `load_run_tokenizer(config, source)`.
        bad_records: where malformed records met while streaming are counted; default: one that raises
            past `config.max_bad_records`.
    """
    specs = data.parse_sources(config.datasets)
    data.check_block_size(config.block_size, source.config)
    tokenizer = tokenizer if tokenizer is not None else load_run_tokenizer(config, source)
    dataset = data.build_train_dataset(
        specs,
        tokenizer,
        config.block_size,
        seed=config.seed,
        eval_fraction=config.eval_fraction,
        max_bad_records=config.max_bad_records,
        bad_records=bad_records,
        shuffle_buffer=config.shuffle_buffer,
        document_shuffle_buffer=config.document_shuffle_buffer,
    )
    return TrainingData(tokenizer, dataset, data.source_names(specs))
