"""Measurement helpers shared by the benchmarks in this folder (`import measure` from a script here):
process RSS, a sampled peak RSS, the kernel's peak (VmHWM), returning freed heap to the OS, the bytes
a checkpoint's safetensors hold, and this machine's dense matmul peak (the denominator of MFU on a CPU).
"""

from __future__ import annotations

import ctypes
import gc
import json
import resource
import sys
import threading
import time
from pathlib import Path


def rss() -> int:
    """This process's resident set now, in bytes."""
    import psutil

    return psutil.Process().memory_info().rss


def vm_hwm() -> int:
    """This process's peak resident set so far, in bytes. VmHWM, not ru_maxrss: Linux carries
    ru_maxrss over exec from the parent, so a child would inherit the peak of the process that
    started it."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def rss_parts() -> dict[str, int]:
    """This process's resident set by kind, in bytes: anon (heap, tensors it allocated), file (mapped
    files' pages, e.g. safetensors read through mmap: page cache, shared with every process mapping the
    same file), shmem."""
    parts = {}
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            for key in ("RssAnon", "RssFile", "RssShmem"):
                if line.startswith(key + ":"):
                    parts[key[3:].lower()] = int(line.split()[1]) * 1024
    return parts


def release_free_memory() -> None:
    """Return freed heap pages to the OS so RSS shows what is really held (glibc keeps them otherwise)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakRss:
    """Highest RSS seen by a 20 ms sampler between start() and stop(); `measure` samples something else
    (e.g. `lambda: rss_parts()["anon"]`)."""

    def __init__(self, measure=None):
        self.peak, self._stop, self._measure = 0, threading.Event(), measure or rss

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._measure())
            time.sleep(0.02)

    def start(self):
        self.peak = self._measure()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self._measure())


def checkpoint_bytes(model_dir: Path) -> int:
    """Bytes of a checkpoint's weights: the safetensors index's total_size, else the files' sizes."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return int(json.loads(index.read_text())["metadata"]["total_size"])
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))


def matmul_peak_flops(dtype_name: str, size: int = 2048, seconds: float = 3.0) -> float:
    """Dense matmul FLOP/s this process reaches (its current torch thread count): the best of
    repeated size x size products over about `seconds`, after one warm-up product."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    torch.mm(a, b)
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best
