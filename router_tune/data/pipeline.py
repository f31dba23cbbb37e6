"""Sources -> held-out split -> tokenize -> pack (per source) -> weighted mixture of blocks.

The training set is a `datasets.IterableDataset`: it streams any size, is deterministic for a
seed, `skip(n)` resumes at block n, and the Trainer shards it across ranks (accelerate dispatches
batches from rank 0, or `datasets.distributed.split_dataset_by_node`).
"""

from __future__ import annotations

import itertools
import time
import warnings
from functools import partial

import datasets
import numpy as np
from datasets import Features, List, Value

from router_tune.data.chat import chat_template_for, tokenize_chats, tokenize_texts
from router_tune.data.packing import PACK_BATCH, pack_documents
from router_tune.data.records import BadRecord, normalise
from router_tune.data.sources import SourceSpec, check_utf8, load_file, resolve_files
from router_tune.data.split import is_heldout
from router_tune.data.tokenizer import check_tokenizer
from router_tune.errors import RouterTuneError

BLOCK_FEATURES = Features(
    {
        "input_ids": List(Value("int32")),
        "labels": List(Value("int32")),
        "position_ids": List(Value("int32")),
        "token_mask": List(Value("int8")),
        "source_id": Value("int32"),
    }
)
_BAD_FIX = "Fix or remove it, or allow skipping malformed records with `max_bad_records`."
# Records of each hub file read and checked before training (local files are read whole).
HUB_CHECK_RECORDS = 100
# The column that carries each record's index in its file through the document shuffle.
RECORD_INDEX = "__router_tune_record__"


class BadRecords:
    """Malformed records met while streaming the training data, skipped and counted.

    Under DDP only rank 0 reads the data (accelerate dispatches batches), so a raise in its data
    loader would leave the other ranks waiting in a collective. The data pipeline therefore only
    counts; the trainer compares the count with `max_bad_records` on every rank at once
    (`RouterTrainingCallback`) and reports the skipped records at the end. `strict` (evaluation,
    one process) raises at the first record over the limit instead.
    """

    def __init__(self, limit: int, *, strict: bool = False):
        self.limit, self.strict = limit, strict
        self.seen: dict[tuple[str, int], str] = {}

    def add(self, path: str, index: int, problem: str) -> None:
        self.seen[(path, index)] = problem
        if self.strict and self.over_limit():
            raise RouterTuneError(f"{path}: record {index + 1}: {problem}. {_BAD_FIX}")

    def over_limit(self) -> bool:
        return len(self.seen) > self.limit

    def summary(self) -> str:
        (path, index), problem = next(iter(self.seen.items()))
        return (
            f"{len(self.seen)} malformed record(s) skipped (max_bad_records = {self.limit}); first: {path}: "
            f"record {index + 1}: {problem}"
        )


def check_block_size(block_size: int, model_config) -> None:
    """Raise when the model cannot take `block_size` positions (max_position_embeddings)."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if not isinstance(block_size, int) or block_size < 2:
        raise RouterTuneError(f"block_size must be an integer >= 2, got {block_size!r}.")
    if limit is not None and block_size > limit:
        raise RouterTuneError(
            f"block_size {block_size} is larger than the model takes "
            f"(max_position_embeddings = {limit}). Set block_size to {limit} or less."
        )


def check_sources(specs: list[SourceSpec], *, max_bad_records: int = 0) -> dict[str, int]:
    """Read every record of every local source once, before training: files exist, are UTF-8
    and follow the source's schema. Of hub files, the first HUB_CHECK_RECORDS records are read
    and checked; the rest are counted as they stream (`BadRecords`).

    Returns: malformed (skipped) records per source name.
    Raises:
        RouterTuneError: naming the file and record number, when a file is missing or not UTF-8,
            or when more than `max_bad_records` records (all sources together) are malformed.
    """
    skipped: dict[str, int] = {}
    for spec in specs:
        skipped[spec.name] = 0
        for path in resolve_files(spec):
            records = load_file(path)
            if path.startswith("hf://"):
                records = records.take(HUB_CHECK_RECORDS)
            else:
                check_utf8(path)
            for index, record in enumerate(records):
                try:
                    normalise(spec, record, path)
                except BadRecord as exc:
                    skipped[spec.name] += 1
                    if sum(skipped.values()) > max_bad_records:
                        raise RouterTuneError(
                            f"{path}: record {index + 1}: {exc}. {_BAD_FIX} (now {max_bad_records})."
                        ) from None
    if any(skipped.values()):
        warnings.warn(
            f"Skipping malformed records (max_bad_records = {max_bad_records}): "
            + ", ".join(f"{n}: {c}" for n, c in skipped.items() if c),
            stacklevel=2,
        )
    return skipped


def _record_index(_record: dict, index: int) -> dict:
    """A module-level function, not a lambda: DataLoader workers pickle the dataset."""
    return {RECORD_INDEX: index}


def _tokenize_batch(
    batch: dict,
    *,
    spec: SourceSpec,
    path: str,
    tokenizer,
    template,
    keep_heldout: bool,
    eval_fraction: float,
    bad: BadRecords,
) -> dict:
    """Same-length map: each record -> its tokens, or empty lists when it is not in this split."""
    indices = batch[RECORD_INDEX]  # the record's place in its file, for error messages
    fields = {key: values for key, values in batch.items() if key != RECORD_INDEX}
    rows = [dict(zip(fields, values)) for values in zip(*fields.values())]
    docs: list = []
    for index, record in zip(indices, rows):
        try:
            doc = normalise(spec, record, path)
        except BadRecord as exc:
            bad.add(path, index, str(exc))
            doc = None
        docs.append(doc[1] if doc is not None and is_heldout(doc[0], eval_fraction) == keep_heldout else None)
    kept = [d for d in docs if d is not None]
    if spec.is_chat:
        ids, labels = tokenize_chats(tokenizer, kept, template, spec.assistant_only_loss)
    else:
        ids, labels = tokenize_texts(tokenizer, kept)
    it = iter(zip(ids, labels))
    pairs = [next(it) if d is not None else ([], []) for d in docs]
    return {"input_ids": [p[0] for p in pairs], "labels": [p[1] for p in pairs]}


def source_blocks(
    spec: SourceSpec,
    source_id: int,
    tokenizer,
    block_size: int,
    *,
    heldout: bool,
    eval_fraction: float,
    bad: BadRecords | None = None,
    document_shuffle_buffer: int = 0,
    seed: int = 0,
) -> datasets.IterableDataset:
    """The packed blocks of one source, files taken round-robin (malformed records counted in
    `bad`; by default none is allowed). With `document_shuffle_buffer` > 1, the files' order is
    shuffled and each file's documents pass a shuffle buffer of that many before tokenizing;
    otherwise documents come in file order."""
    bad = bad if bad is not None else BadRecords(0, strict=True)
    template = chat_template_for(spec, tokenizer) if spec.is_chat else None
    files = resolve_files(spec)
    shuffle = document_shuffle_buffer > 1
    if shuffle:
        files = [files[i] for i in np.random.default_rng(seed).permutation(len(files))]
    per_file = []
    for number, path in enumerate(files):
        records = load_file(path).map(_record_index, with_indices=True)
        if shuffle:
            records = records.shuffle(seed=seed + number, buffer_size=document_shuffle_buffer)
        docs = records.map(
            partial(
                _tokenize_batch,
                spec=spec,
                path=path,
                tokenizer=tokenizer,
                template=template,
                keep_heldout=heldout,
                eval_fraction=eval_fraction,
                bad=bad,
            ),
            batched=True,
        )
        per_file.append(docs.select_columns(["input_ids", "labels"]))
    docs = (
        per_file[0]
        if len(per_file) == 1
        else datasets.interleave_datasets(per_file, stopping_strategy="all_exhausted_without_replacement")
    )
    if spec.max_documents is not None:
        docs = docs.take(spec.max_documents)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    return docs.map(
        partial(pack_documents, block_size=block_size, pad_id=pad_id, source_id=source_id),
        batched=True,
        batch_size=PACK_BATCH,
        features=BLOCK_FEATURES,
    )


def build_train_dataset(
    specs: list[SourceSpec],
    tokenizer,
    block_size: int,
    *,
    seed: int = 0,
    eval_fraction: float = 0.05,
    max_bad_records: int = 0,
    check: bool = True,
    bad_records: BadRecords | None = None,
    shuffle_buffer: int = 0,
    document_shuffle_buffer: int = 0,
) -> datasets.IterableDataset:
    """The training blocks: each source's documents shuffled in a buffer of
    `document_shuffle_buffer`, packed on their own, then sources drawn block by block with
    probabilities proportional to their weights (so weights are shares of training tokens), then
    shuffled in a buffer of `shuffle_buffer` blocks.

    Args:
        specs: from `parse_sources`.
        tokenizer: a fast tokenizer (the model's).
        block_size: tokens per block (see `check_block_size`).
        seed: the mixture's seed; the same seed yields the same blocks in the same order.
        eval_fraction: share of whole documents kept out of training for `build_eval_blocks`.
        max_bad_records: malformed records that may be skipped (warned about) instead of raising.
        check: read local sources once up front (`check_sources`) so errors come before training.
        bad_records: where malformed records met while streaming are counted (the trainer checks it
            on every rank); default: one that raises past `max_bad_records`.
        shuffle_buffer: blocks held by datasets' `IterableDataset.shuffle` (0 or 1 = stream order).
            Packing cuts a long document into consecutive blocks, so without it a 10k-token file
            fills the source's share of a dozen steps in a row.
        document_shuffle_buffer: documents held by a shuffle buffer per file, before tokenizing (0
            or 1 = file order; files are then also taken in their listed order). Data files are
            often sorted (by repository, by book, by module), and a run that reads them in order
            trains on a prefix unlike the held-out documents, which are drawn from the whole file.

    Returns:
        An IterableDataset of blocks {"input_ids", "labels", "position_ids", "token_mask",
        "source_id"} (see router_tune.data.packing); `collate_blocks` batches them. Its epoch ends
        when every source has been used up at least once ("all_exhausted": smaller sources repeat,
        which keeps the weights exact and drops no data).
    """
    check_tokenizer(tokenizer)
    if not 0.0 <= eval_fraction < 1.0:
        raise RouterTuneError(f"eval_fraction must be in [0, 1), got {eval_fraction!r}.")
    bad = bad_records if bad_records is not None else BadRecords(max_bad_records, strict=True)
    if check:
        check_sources(specs, max_bad_records=bad.limit)
    streams = [
        source_blocks(
            s,
            i,
            tokenizer,
            block_size,
            heldout=False,
            eval_fraction=eval_fraction,
            bad=bad,
            document_shuffle_buffer=document_shuffle_buffer,
            seed=seed + 1000 * i,  # each source (and, inside, each file) its own document order
        )
        for i, s in enumerate(specs)
    ]
    if len(streams) == 1:
        mixed = streams[0]
    else:
        total = sum(s.weight for s in specs)
        mixed = datasets.interleave_datasets(
            streams, probabilities=[s.weight / total for s in specs], seed=seed, stopping_strategy="all_exhausted"
        )
    return mixed.shuffle(seed=seed, buffer_size=shuffle_buffer) if shuffle_buffer > 1 else mixed


def build_eval_blocks(
    specs: list[SourceSpec],
    tokenizer,
    block_size: int,
    *,
    eval_fraction: float = 0.05,
    max_blocks: int | None = None,
    max_bad_records: int = 0,
) -> dict[str, list[dict]]:
    """The held-out blocks of each source, by source name (documents `build_train_dataset` never yields).

    Raises:
        RouterTuneError: a source holds no held-out document (raise eval_fraction or add data).
    """
    check_tokenizer(tokenizer)
    out: dict[str, list[dict]] = {}
    bad = BadRecords(max_bad_records, strict=True)
    for i, spec in enumerate(specs):
        blocks = source_blocks(spec, i, tokenizer, block_size, heldout=True, eval_fraction=eval_fraction, bad=bad)
        out[spec.name] = list(blocks.take(max_blocks) if max_blocks is not None else blocks)
        if not out[spec.name]:
            raise RouterTuneError(
                f"Dataset {spec.name!r} has no held-out document at eval_fraction "
                f"{eval_fraction}: raise eval_fraction or add documents."
            )
    return out


def first_blocks(dataset, n: int) -> list[dict]:
    """The first `n` training blocks (for the rescale probe), or a clear error when there are none."""
    if dataset is None:
        return []
    blocks = list(itertools.islice(iter(dataset), n))
    if not blocks:
        raise RouterTuneError(
            "there are no training blocks: every document of the training sources is held out for evaluation "
            "(eval_fraction), skipped as malformed, or empty. Lower eval_fraction, add documents, or check the "
            "`datasets` paths."
        )
    return blocks


def pipeline_throughput(specs: list[SourceSpec], tokenizer, block_size: int, n_blocks: int, *, seed: int = 0) -> float:
    """Real (non-padding) tokens per second the training pipeline delivers, over its first n_blocks."""
    dataset = build_train_dataset(specs, tokenizer, block_size, seed=seed, check=False)
    start, tokens = time.perf_counter(), 0
    for block in dataset.take(n_blocks):
        tokens += sum(block["token_mask"])
    return tokens / max(time.perf_counter() - start, 1e-9)
