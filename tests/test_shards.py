"""io/shards.py's header parser against the safetensors library on every dtype the format defines."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from safetensors import SafetensorError, safe_open

from router_tune.errors import RouterTuneError
from router_tune.io.shards import read_header


def write_raw(path: Path, dtype: str, shape: list[int], nbytes: int) -> Path:
    """A safetensors file with one tensor, written byte by byte (torch has no F4 / F6 / E8M0 / C64 writer)."""
    header = json.dumps({"x": {"dtype": dtype, "shape": shape, "data_offsets": [0, nbytes]}}).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(range(nbytes)))
    return path


# dtype, shape, bytes: sub-byte types pack elements (4 x F4 = 2 bytes, 4 x F6 = 3 bytes), C64 is two F32s
VALID = [
    ("F8_E8M0", [4], 4),
    ("F4", [2, 4], 4),
    ("F6_E2M3", [4], 3),
    ("F6_E3M2", [2, 4], 6),
    ("C64", [3], 24),
    ("F8_E4M3", [5], 5),
    ("BF16", [2, 3], 12),
]


@pytest.mark.parametrize("dtype, shape, nbytes", VALID)
def test_dtypes_safetensors_reads_are_read(dtype, shape, nbytes, tmp_path):
    path = write_raw(tmp_path / "t.safetensors", dtype, shape, nbytes)
    with safe_open(str(path), "np") as f:  # the reference: the file is valid
        assert list(f.keys()) == ["x"]
    _, tensors = read_header(path)
    assert (tensors["x"].dtype, tensors["x"].shape, tensors["x"].nbytes) == (dtype, tuple(shape), nbytes)


@pytest.mark.parametrize("dtype, shape, nbytes", [("F4", [4], 4), ("F4", [3], 2), ("C64", [2], 8)])
def test_wrong_byte_lengths_are_refused_by_both(dtype, shape, nbytes, tmp_path):
    path = write_raw(tmp_path / "t.safetensors", dtype, shape, nbytes)
    with pytest.raises(SafetensorError):
        safe_open(str(path), "np")
    with pytest.raises(RouterTuneError, match="truncated or corrupt"):
        read_header(path)


def test_unknown_dtype_is_reported_as_such(tmp_path):
    path = write_raw(tmp_path / "t.safetensors", "F3_E1M1", [8], 3)
    with pytest.raises(RouterTuneError) as err:
        read_header(path)
    assert "unknown dtype F3_E1M1" in str(err.value)
    assert "truncated" not in str(err.value) and "corrupt" not in str(err.value)
