"""Pack tokenized documents of ONE source into fixed `block_size` blocks, and batch blocks.

Boundary rule: documents are packed back to back, and each document (or the continuation of a
document cut at a block's end) restarts `position_ids` at 0. transformers 5 reads restarting
position_ids, when no attention_mask is passed, as packed sequences and builds a block-diagonal
causal mask (masking_utils.find_packed_sequence_indices; eager and sdpa): no token attends to
another document (tests/test_data.py checks logits against each document run alone). The first
token of every segment gets label -100, so nothing is predicted across a boundary.

Why packing rather than one document per padded block: measured on the bundled samples with the
tests' byte-level tokenizer at block_size 512, honest padding wasted 4.5% (redpajama, 338 docs)
and 9.5% (wizard_vicuna, 239 chats) of every block, packing 0.01% and 0.04%; a forward pass of
the tiny test Mixtral costs the same either way (0.077 s packed vs 0.091 s padded per 8 x 512),
so packing gives the routers 5-10% more real tokens per second here, and far more with a real
tokenizer and block_size 2048, where a Wizard-Vicuna chat fills a fraction of a block. Only the
last block of each pack batch (PACK_BATCH documents) is padded; `token_mask` marks real tokens
for the routing statistics.

Blocks therefore carry NO attention_mask: passing one (even all ones) switches the packed-sequence
detection off and lets documents attend to each other. So does a KV cache, which the model creates
whenever `use_cache` is true (the config default): call the model with input_ids, labels,
position_ids and use_cache=False (checked: with the cache, a packed document's logits are off by
0.11 on the tiny test Mixtral; without it they equal the document run alone). Keep token_mask and
source_id for the routing statistics.
"""

from __future__ import annotations

import torch

from router_tune.data.chat import IGNORE_INDEX
from router_tune.errors import RouterTuneError

BLOCK_KEYS = ("input_ids", "labels", "position_ids", "token_mask", "source_id")
# Documents per packing batch; at most one padded block per batch.
PACK_BATCH = 1000


def pack_documents(batch: dict, block_size: int, pad_id: int, source_id: int) -> dict[str, list]:
    """datasets.map(batched=True) function: documents {"input_ids", "labels"} -> blocks (BLOCK_KEYS).

    Every token of every document lands in exactly one block, in order.
    """
    blocks: dict[str, list] = {k: [] for k in BLOCK_KEYS}
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    real: list[int] = []

    def flush() -> None:
        for key, value in zip(BLOCK_KEYS, (ids, labels, pos, real, source_id)):
            blocks[key].append(value[:] if isinstance(value, list) else value)
        for buf in (ids, labels, pos, real):
            buf.clear()

    for doc_ids, doc_labels in zip(batch["input_ids"], batch["labels"]):
        start = 0
        while start < len(doc_ids):
            take = min(block_size - len(ids), len(doc_ids) - start)
            ids.extend(doc_ids[start : start + take])
            labels.append(IGNORE_INDEX)
            labels.extend(doc_labels[start + 1 : start + take])
            pos.extend(range(take))
            real.extend([1] * take)
            start += take
            if len(ids) == block_size:
                flush()
    if ids:
        n = block_size - len(ids)
        ids.extend([pad_id] * n)
        labels.extend([IGNORE_INDEX] * n)
        pos.extend(range(n))
        real.extend([0] * n)
        flush()
    return blocks


def collate_blocks(blocks: list[dict]) -> dict[str, torch.Tensor]:
    """Stack blocks into int64 tensors: [B, block_size] for token fields, [B] for source_id.

    Blocks of this pipeline carry every BLOCK_KEYS field; blocks made elsewhere need only
    `input_ids` and `labels` (plus an `attention_mask` when they are padded)."""
    if not blocks:
        raise RouterTuneError("collate_blocks got no blocks: there is nothing to batch (see data.first_blocks).")
    keys = [k for k in (*BLOCK_KEYS, "attention_mask") if k in blocks[0]]
    return {key: torch.tensor([b[key] for b in blocks], dtype=torch.long) for key in keys}


def collate_in_batches(blocks: list[dict], size: int, collate=collate_blocks) -> list[dict[str, torch.Tensor]]:
    """`blocks` collated in batches of `size` (the last one shorter), for probes that run the model on a few
    blocks outside the training loop."""
    size = max(1, size)
    return [collate(blocks[i : i + size]) for i in range(0, len(blocks), size)]
