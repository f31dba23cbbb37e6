"""safetensors files read and written as byte ranges: the one header parser of the package.

Export never holds a shard in memory, and checkpoint checks read no tensor data.

A safetensors file is an 8-byte little-endian header length, a JSON header giving each
tensor's dtype, shape and byte range, then the raw data. Splicing routers or converting the
expert layout only moves byte ranges around (`gate_up_proj[e]` is `w1[e]` then `w3[e]`,
row-major), so the writer streams every output tensor from its source ranges in small
chunks: peak memory is one chunk, not one shard, and copied tensors are byte-identical by
construction. Headers come from untrusted files and are checked before any offset is used.
Copies go through `os.copy_file_range` where the system allows it (no bytes through Python).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from router_tune.errors import RouterTuneError

# Bits per element of every dtype the safetensors format defines (its Rust `Dtype` enum, 0.8): sub-byte
# types (F4, F6_*) pack elements across bytes, so a tensor's byte length is numel * bits / 8, whole bytes.
DTYPE_BITS = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "I64": 64,
    "U64": 64,
    "F64": 64,
}


def dtype_nbytes(dtype: str, numel: int) -> int | None:
    """Bytes of `numel` elements of a safetensors dtype; None when they do not fill whole bytes."""
    bits = numel * DTYPE_BITS[dtype]
    return bits // 8 if bits % 8 == 0 else None


# safetensors dtype names of the floating-point tensors router_tune writes (routers), as torch dtypes
TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
MAX_HEADER = 100 * 2**20  # the safetensors library's own limit: a larger header is a crafted file
CHUNK = 16 * 2**20  # copy buffer: bounds the writer's memory whatever the tensor size


@dataclass(frozen=True)
class Segment:
    """`length` bytes at absolute offset `start` of `file`, or literal bytes in `data`."""

    file: Path | None
    start: int
    length: int
    data: bytes | None = None

    @staticmethod
    def literal(data: bytes) -> Segment:
        return Segment(None, 0, len(data), data)


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a safetensors file: where its bytes are, without reading them."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offset of the first data byte
    nbytes: int

    def nbytes_of(self, numel: int) -> int:
        """Bytes of `numel` consecutive elements of this tensor (a sub-byte dtype must end on a byte)."""
        nbytes = dtype_nbytes(self.dtype, numel)
        if nbytes is None:
            raise RouterTuneError(
                f"{self.name} ({self.dtype}, {DTYPE_BITS[self.dtype]} bits per element): {numel} elements do not end "
                "on a byte boundary, so this part of it cannot be copied as bytes."
            )
        return nbytes

    def segment(self, offset: int = 0, length: int | None = None) -> Segment:
        """A byte range of this tensor, relative to its first byte."""
        length = self.nbytes - offset if length is None else length
        if offset < 0 or offset + length > self.nbytes:
            raise ValueError(f"range {offset}+{length} outside {self.name} ({self.nbytes} bytes)")
        return Segment(self.file, self.start + offset, length)


@dataclass(frozen=True)
class OutputTensor:
    """A tensor to write: dtype and shape for the header, segments whose bytes are its data."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    segments: tuple[Segment, ...]

    @property
    def nbytes(self) -> int:
        return sum(s.length for s in self.segments)


def read_header(file: Path) -> tuple[dict[str, str], dict[str, StoredTensor]]:
    """The metadata and tensors of a safetensors file, each tensor's range checked against the file."""
    size = file.stat().st_size
    with open(file, "rb") as fh:
        head = fh.read(8)
        header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if header_len < 0 or header_len > MAX_HEADER or 8 + header_len > size:
            raise _corrupt(file, f"its header length field is invalid for a {size}-byte file")
        try:
            header = json.loads(fh.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _corrupt(file, "its header is not JSON") from None
    if not isinstance(header, dict):
        raise _corrupt(file, "its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(file, "its __metadata__ is not a string-to-string map")
    data_start, tensors, ranges = 8 + header_len, {}, []
    for name, entry in header.items():
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if isinstance(dtype, str) and dtype not in DTYPE_BITS:
            raise RouterTuneError(
                f"{file}: tensor {name!r} has unknown dtype {dtype}: not one of the safetensors dtypes router_tune "
                "reads (those of safetensors 0.8). The file may be valid for a newer safetensors release; update "
                "router_tune, or convert the tensor to a known dtype."
            )
        try:
            shape, (begin, end) = tuple(entry["shape"]), entry["data_offsets"]
            numel = 1
            for dim in shape:
                numel *= dim
            valid = (
                dtype in DTYPE_BITS
                and all(type(d) is int and d >= 0 for d in shape)
                and type(begin) is int
                and type(end) is int
                and 0 <= begin <= end
                and end - begin == dtype_nbytes(dtype, numel)
            )
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid or data_start + end > size:
            raise _corrupt(file, f"tensor {name!r} has an invalid dtype, shape or byte range")
        tensors[name] = StoredTensor(name, file, dtype, shape, data_start + begin, end - begin)
        ranges.append((begin, end))
    ranges.sort()
    if any(b < prev_end for (_, prev_end), (b, _) in zip(ranges, ranges[1:])):
        raise _corrupt(file, "two tensors share the same bytes")
    return metadata, tensors


def _corrupt(file: Path, problem: str) -> RouterTuneError:
    return RouterTuneError(
        f"{file} is truncated or corrupt, not a valid safetensors file: {problem}. Re-download or re-create it."
    )


def write_shard(path: Path, tensors: list[OutputTensor], metadata: dict[str, str]) -> int:
    """Write one safetensors file from byte segments; returns the bytes of tensor data written.

    Tensors are laid out in the given order; the header is padded with spaces to a multiple
    of 8 bytes as the format recommends, so every tensor stays aligned as in files written
    by the safetensors library.
    """
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    handles: dict[Path, object] = {}
    try:
        with open(path, "wb", buffering=0) as out:  # unbuffered: literal writes and kernel copies share one offset
            _write_all(out, struct.pack("<Q", len(blob)) + blob)
            for t in tensors:
                for seg in t.segments:
                    if seg.data is not None:
                        _write_all(out, seg.data)
                        continue
                    src = handles.get(seg.file) or handles.setdefault(seg.file, open(seg.file, "rb"))
                    if not _copy_range(src, out, seg.start, seg.length):
                        raise RouterTuneError(
                            f"{seg.file} ended early while copying {t.name}: the source "
                            "changed during export; re-run it."
                        )
    finally:
        for h in handles.values():
            h.close()
    return offset


def _write_all(out, data) -> None:
    view = memoryview(data)
    while view:
        view = view[out.write(view) :]


def _copy_range(src, out, start: int, length: int) -> bool:
    """Append `length` bytes at `start` of `src` to `out`; False if `src` is shorter.

    `os.copy_file_range` copies inside the kernel (or shares extents on file systems that can),
    about 8x faster than a read/write loop here (0.19 s vs 1.57 s for a 0.49 GB shard,
    scripts/bench_export.py's checkpoint); the loop remains for systems and file pairs that
    refuse it (other OS, across file systems on old kernels).
    """
    left, offset = length, start
    copy_range = getattr(os, "copy_file_range", None)
    while left and copy_range is not None:
        try:
            done = copy_range(src.fileno(), out.fileno(), min(left, 2**30), offset)
        except OSError:
            break
        if not done:  # end of file, or a file system that copies nothing (procfs-like): the loop decides
            break
        left, offset = left - done, offset + done
    src.seek(offset)
    while left:
        chunk = src.read(min(CHUNK, left))
        if not chunk:
            return False
        _write_all(out, chunk)
        left -= len(chunk)
    return True


def read_segment(segment: Segment) -> bytes:
    """The bytes of a (small) segment, e.g. one router tensor."""
    if segment.data is not None:
        return segment.data
    with open(segment.file, "rb") as fh:
        fh.seek(segment.start)
        data = fh.read(segment.length)
    if len(data) != segment.length:
        raise RouterTuneError(f"{segment.file} ended early: the file is truncated; re-create it.")
    return data


def same_bytes(a: Segment, b: Segment) -> bool:
    """Whether two file ranges hold the same bytes, compared CHUNK by CHUNK (memory: two chunks,
    whatever the tensor size; a comparison runs at memory speed, several times faster than hashing)."""
    if a.length != b.length:
        return False
    with open(a.file, "rb") as fa, open(b.file, "rb") as fb:
        fa.seek(a.start)
        fb.seek(b.start)
        left = a.length
        while left:
            n = min(CHUNK, left)
            x, y = fa.read(n), fb.read(n)
            if len(x) != n or x != y:
                return False
            left -= n
    return True
