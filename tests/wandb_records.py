"""Reading an offline wandb run back from disk (wandb 0.31 writes no summary JSON offline)."""

from __future__ import annotations

import json
import struct
import time


def _wandb_records(data: bytes):
    """`wandb.proto` Records of a `run-*.wandb` file.

    wandb 0.31 ships no Python reader (its core is in Go) and writes no summary JSON offline,
    so parse the file: a 7-byte W&B header, then LevelDB log format (32 KiB blocks of records
    with a 7-byte crc/length/type header; types FULL=1, FIRST=2, MIDDLE=3, LAST=4).
    """
    from wandb.proto import wandb_internal_pb2

    if len(data) < 7:  # created, header not written yet: no records so far
        return
    assert data[:4] == b":W&B"
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            return
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def offline_history(run_dir, timeout: float = 30.0) -> list[dict]:
    """History rows of a finished offline run; nested values (histograms, images) as `key/field`.

    `run.finish()` returns before wandb's core process has written the file (for every run after
    the first in a process the file was still empty; it filled ~0.1 s later; under load, once, it did
    not exist yet), so wait for the file and the run's closing `exit` record before reading the rows.
    """
    deadline = time.monotonic() + timeout
    while True:
        files = list(run_dir.glob("run-*.wandb"))
        assert len(files) <= 1, files
        records = list(_wandb_records(files[0].read_bytes())) if files else []
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        assert time.monotonic() < deadline, f"{run_dir} has no run file with an exit record after {timeout} s"
        time.sleep(0.2)
    return [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
