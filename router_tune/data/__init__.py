"""Training data: sources -> chat template -> tokenize -> pack -> mix, with a held-out split.

    specs = parse_sources(recipe["datasets"])
    train = build_train_dataset(specs, tokenizer, block_size=2048, seed=0)
    batch = collate_blocks(list(train.take(8)))

Imports: errors only (and the datasets / tokenizers / transformers libraries).
"""

from router_tune.data.chat import IGNORE_INDEX, vicuna_template
from router_tune.data.packing import BLOCK_KEYS, collate_blocks, collate_in_batches
from router_tune.data.pipeline import (
    BadRecords,
    build_eval_blocks,
    build_train_dataset,
    check_block_size,
    check_sources,
    first_blocks,
    pipeline_throughput,
)
from router_tune.data.sources import SourceSpec, parse_sources, source_names
from router_tune.data.split import chat_doc_key, is_heldout
from router_tune.data.tokenizer import load_tokenizer

__all__ = [
    "BLOCK_KEYS",
    "BadRecords",
    "IGNORE_INDEX",
    "SourceSpec",
    "build_eval_blocks",
    "build_train_dataset",
    "check_block_size",
    "check_sources",
    "chat_doc_key",
    "collate_blocks",
    "collate_in_batches",
    "first_blocks",
    "is_heldout",
    "load_tokenizer",
    "parse_sources",
    "pipeline_throughput",
    "source_names",
    "vicuna_template",
]
