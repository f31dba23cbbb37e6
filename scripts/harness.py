"""What every benchmark here shares, written once (docs/benchmarks.md: a module's `run(args) -> dict` measures
what goes to OUT/NAME.json, its `render(data) -> str` writes the markdown from that JSON alone, `main` runs them).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "router_tune" / "assets" / "demo-moe"
DEMO_RECIPE = ROOT / "recipes" / "demo.yaml"
SAMPLES = ROOT / "router_tune" / "assets" / "samples"
DEMO_ORACLE = {"code": 0, "python_docs": 1, "book": 2, "chat": 3}  # experts in mergekit_moe.yml order
# Recipe keys that keep a measured run to itself: no reports, no progress bars, no saving, no evaluation.
QUIET = dict(report_to="none", disable_tqdm=True, dataloader_num_workers=0, save_strategy="no", eval_before_after=False)


# ---- where a results file came from ------------------------------------------------------------


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()


def provenance(ignore: tuple[str, ...] = ()) -> dict:
    """{"commit": full sha, "clean": no uncommitted change to tracked or untracked files}; `ignore`: paths
    (a benchmark's own outputs) whose changes do not count as changes to the code measured."""
    changes = git("status", "--porcelain", "--", ".", *(f":!{p}" for p in ignore))
    return {"commit": git("rev-parse", "HEAD") or "unknown", "clean": changes == ""}


def describe(p: dict) -> str:
    """One line for a markdown header."""
    return f"commit {p['commit'][:12]}, {'clean tree' if p['clean'] else 'DIRTY tree (uncommitted changes)'}"


def gap_closed(before: float, after: float, oracle: float) -> float:
    """The share of the perplexity gap between untrained routers and oracle routing that training closed."""
    return (before - after) / (before - oracle)


def judge(value: float | None, target: tuple[str, float]) -> str:
    """PASS / MISS of a value against a target (">=" or "<=", bound); n/a when there is no value."""
    if value is None:
        return "n/a"
    op, bound = target
    return "PASS" if (value >= bound if op == ">=" else value <= bound) else "MISS"


def md_row(cells) -> str:
    """A markdown table row; an empty cell is written `| |`."""
    return "|" + "".join(f" {c} |" if str(c) else " |" for c in cells)


def md_table(head, rows) -> list[str]:
    """A markdown table's lines: the header row, its `|---|` rule and one md_row per list of cells in `rows`."""
    return [md_row(head), "|" + "---|" * len(head), *map(md_row, rows)]


# ---- child processes ------------------------------------------------------------------------------


def child_env(threads: int | None = None, **extra: str) -> dict:
    """The environment of a measured child: offline, quiet, `threads` BLAS threads, this tree importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("ACCELERATE_USE_CPU", "OMP_NUM_THREADS")}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="offline",
        TOKENIZERS_PARALLELISM="false",
        TRANSFORMERS_VERBOSITY="error",
        PYTHONWARNINGS="ignore",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return {**env, **extra}


def module_cmd(module: str, *args) -> list[str]:
    """`python -m scripts.MODULE ARGS` with this interpreter."""
    return [sys.executable, "-m", f"scripts.{module}", *map(str, args)]


def run_json(cmd: list[str], threads: int | None = None, timeout: float = 1800, **env: str) -> dict:
    """Run `cmd` in a fresh process (its peak RSS is its own) and return the JSON of its last stdout line."""
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env=child_env(threads, **env), timeout=timeout, check=False
    )
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[1:])} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def flags(**values) -> list[str]:
    """--key value arguments (underscores become dashes; None is left out, True is a bare flag)."""
    out = []
    for key, value in values.items():
        if value is None or value is False:
            continue
        out += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- memory ---------------------------------------------------------------------------------------


def rss() -> int:
    """This process's resident set now, in bytes."""
    import psutil

    return psutil.Process().memory_info().rss


def proc_status_bytes(*keys: str) -> dict[str, int]:
    """Fields of /proc/self/status given in kB (VmHWM, RssAnon, ...), in bytes; empty where there is none."""
    status = Path("/proc/self/status")
    lines = status.read_text().splitlines() if status.is_file() else []
    return {k: int(line.split()[1]) * 1024 for line in lines for k in keys if line.startswith(k + ":")}


def vm_hwm() -> int:
    """This process's peak resident set so far, in bytes. VmHWM, not ru_maxrss: Linux carries ru_maxrss
    over exec from the parent, so a child would inherit the peak of the process that started it."""
    if hwm := proc_status_bytes("VmHWM").get("VmHWM"):
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def rss_parts() -> dict[str, int]:
    """This process's resident set by kind, in bytes: anon (heap, tensors), file (mapped files' pages, e.g.
    safetensors read through mmap: page cache, shared with every process mapping the file), shmem."""
    return {k[3:].lower(): v for k, v in proc_status_bytes("RssAnon", "RssFile", "RssShmem").items()}


def release_free_memory() -> None:
    """Return freed heap pages to the OS so RSS shows what is really held (glibc keeps them otherwise)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakRss:
    """Highest RSS seen by a sampler between start() and stop(); `measure` samples something else
    (e.g. `lambda: rss_parts()["anon"]`)."""

    def __init__(self, measure=None, every: float = 0.02):
        self.peak, self._stop, self._measure, self.every = 0, threading.Event(), measure or rss, every

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._measure())
            time.sleep(self.every)

    def start(self) -> PeakRss:
        self.peak = self._measure()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

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


def dir_files(path: Path) -> dict[str, int]:
    """{relative path: bytes} of every file under `path` (a checkpoint's files)."""
    return {str(f.relative_to(path)): f.stat().st_size for f in path.rglob("*") if f.is_file()}


def matmul_peak_flops(dtype_name: str, size: int = 2048, seconds: float = 3.0) -> float:
    """Dense matmul FLOP/s this process reaches (its current torch thread count): the best of repeated
    size x size products over about `seconds`, after one warm-up product."""
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


# ---- training runs --------------------------------------------------------------------------------


def step_clock(sync: Callable[[], None] = lambda: None, on_last_step: Callable[[], None] | None = None):
    """A TrainerCallback that keeps the wall time of train begin (`begin`) and of every step's end (`times`),
    and the process CPU seconds at each step's end (`cpu`: less sensitive than wall time to other jobs)."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.begin, self.times, self.cpu = None, [], []

        def on_train_begin(self, *a, **k):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            self.times.append(time.perf_counter())
            usage = resource.getrusage(resource.RUSAGE_SELF)
            self.cpu.append(usage.ru_utime + usage.ru_stime)
            if on_last_step and state.global_step >= args.max_steps:  # before the final checkpoint is written
                on_last_step()

        def tokens_per_s(self, tokens_per_step: int, warmup: int = 1) -> float | None:
            """Over the steps after the first `warmup` (untimed: allocator, kernels)."""
            timed = self.times[warmup - 1 :] if warmup else [self.begin, *self.times]
            return (len(timed) - 1) * tokens_per_step / (timed[-1] - timed[0]) if len(timed) > 1 else None

    return StepClock()


def recipe(path: Path | None = None, **overrides):
    """A RouterTuneConfig from `path` (or none) with QUIET and `overrides` applied."""
    from router_tune.training.config import load_recipe

    return load_recipe(path, **{**QUIET, **overrides})


def make_random_mixtral(
    out: Path, *, experts: int = 8, hidden: int = 512, layers: int = 4, intermediate: int = 1024, vocab: int = 32000,
    top_k: int = 2, seed: int = 0, dtype: str = "float32",
) -> Path:  # fmt: skip
    """A random Mixtral saved with `save_pretrained` in `dtype` (legacy layout, like hub frankenMoEs), plus a
    small byte-level tokenizer (RouterTrainer reads one from the model directory; ids never decode)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

    if (out / "config.json").is_file():
        return out
    torch.manual_seed(seed)
    config = MixtralConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_local_experts=experts,
        num_experts_per_tok=top_k, num_attention_heads=8, num_key_value_heads=2, vocab_size=vocab,
        max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = MixtralForCausalLM(config).to(getattr(torch, dtype))
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [p.read_text() for p in sorted((ROOT / "router_tune").glob("*.py"))]
    special, alphabet = ["<unk>", "<s>", "</s>"], pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=1000, special_tokens=special, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(text, trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    ).save_pretrained(tmp)
    tmp.rename(out)
    return out


def save_blocks(rows: dict, out: Path) -> Path:
    from datasets import Dataset

    tmp = out.with_name(out.name + ".partial")
    Dataset.from_dict(rows).save_to_disk(str(tmp))
    tmp.rename(out)
    return out


def make_random_blocks(out: Path, *, vocab: int, seq: int, n_blocks: int, seed: int = 0) -> Path:
    """Uniform random token blocks, every token real: one document per block (kept if `out` exists)."""
    import torch

    if out.is_dir():
        return out
    ids = torch.randint(3, vocab, (n_blocks, seq), generator=torch.Generator().manual_seed(seed)).tolist()
    n, positions = n_blocks, list(range(seq))
    rows = {
        "input_ids": ids,
        "labels": [r[:] for r in ids],
        "position_ids": [positions] * n,
        "token_mask": [[1] * seq] * n,
        "source_id": [0] * n,
    }
    return save_blocks(rows, out)


def sample_sources():
    """The bundled samples as sources: RedPajama-style text 0.75, Wizard-Vicuna chats 0.25."""
    from router_tune.data import parse_sources

    weights = {"redpajama": 0.75, "wizard_vicuna": 0.25}
    return parse_sources([{"source": s, "path": str(SAMPLES / s), "weight": w} for s, w in weights.items()])


# ---- the command line: run + render ---------------------------------------------------------------


def main(
    name: str,
    doc: str,
    run: Callable[[argparse.Namespace], dict],
    render: Callable[[dict], str],
    add_args: Callable[[argparse.ArgumentParser], None] = lambda p: None,
    argv: list[str] | None = None,
    child: Callable[[argparse.Namespace], dict | None] | None = None,
) -> dict | None:
    """Parse the benchmark's arguments, `run` it (or read OUT/NAME.json with --render), write OUT/NAME.json
    and OUT/NAME.md, print the markdown. --smoke: one tiny step of every part, for the tests. --child PART:
    one measured part in this fresh process (`child(args)`), whose JSON it prints as its last line."""
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench", help=f"writes {name}.json and {name}.md here")
    parser.add_argument("--smoke", action="store_true", help="one tiny step of every part (tests)")
    parser.add_argument("--render", action="store_true", help=f"rewrite {name}.md from {name}.json, measure nothing")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    add_args(parser)
    args = parser.parse_args(argv)
    if args.child:
        result = child(args)
        if result is not None:
            print(json.dumps(result))
        return result
    path = args.out / f"{name}.json"
    if args.render:
        data = json.loads(path.read_text())
    else:
        data = run(args)
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    text = render(data)
    (args.out / f"{name}.md").write_text(text)
    print(text)
    return data
