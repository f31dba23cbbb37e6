"""Splice router tensors into a copy of a source checkpoint, shard by shard, into a staged directory.

    with staged_output(out_dir, force=False, protect=[source_dir]) as tmp:
        splice_checkpoint(source_dir, tmp, routers, layout="legacy")
        ...verify tmp...                       # the directory appears at out_dir only now

Every output shard keeps its source file name, dtype and safetensors metadata; only the
router tensors (cast to the source dtype) and, on request, the expert layout change. Side
files (config, tokenizer, generation config, chat templates) are copied; pickles are not.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from router_tune.architectures import LAYOUTS
from router_tune.architectures.on_disk import detect_layout
from router_tune.errors import RouterTuneError
from router_tune.export.layouts import plan_layout
from router_tune.io import checkpoint
from router_tune.io.shards import TORCH_DTYPES, OutputTensor, Segment, StoredTensor, read_header, write_shard

# Weight formats never copied to the output: pickles could run code, and the spliced
# safetensors replace every weight file anyway.
WEIGHT_SUFFIXES = {
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".pkl",
    ".pickle",
    ".h5",
    ".msgpack",
    ".gguf",
    ".onnx",
    ".npz",
}
MAX_SIDE_FILE = 100 * 2**20  # tokenizers are tens of MB at most; larger files are weights under another name


@dataclass
class SpliceResult:
    architecture: str
    source_layout: str
    layout: str
    shards: list[str]
    num_tensors: int
    total_size: int
    replaced: list[str]  # router parameter names spliced in
    side_files: list[str]


@contextlib.contextmanager
def staged_output(out_dir: str | Path, *, force: bool, protect: list[Path], keep: list[Path] = ()):
    """Yield a temporary sibling of `out_dir`; rename it to `out_dir` when the block succeeds.

    On any exception (KeyboardInterrupt included) the temporary directory is deleted and
    `out_dir` is untouched. With `force` an existing `out_dir` is replaced only after success.
    `protect` (source checkpoints) must neither contain the output nor lie inside it; `keep`
    (the run being exported) may contain it but must not be it or lie inside it (--force
    would delete it).
    """
    out = Path(out_dir).expanduser().absolute()
    resolved = out.resolve()
    for src in map(Path.resolve, protect):
        if resolved == src or resolved.is_relative_to(src) or src.is_relative_to(resolved):
            raise RouterTuneError(
                f"--out {out} overlaps the source checkpoint {src}; the source is never modified. "
                "Choose an output directory outside it."
            )
    for src in map(Path.resolve, keep):
        if src.is_relative_to(resolved):
            raise RouterTuneError(f"--out {out} would replace {src}, which is being exported; choose another --out.")
    if out.exists() and not force:
        raise RouterTuneError(
            f"{out} already exists; choose another --out or pass --force to replace it "
            "(it is replaced only after the new export is complete and verified)."
        )
    if out.exists() and not out.is_dir():
        raise RouterTuneError(f"{out} exists and is not a directory; remove it or choose another --out.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed earlier run of this same pid
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            try:
                tmp.rename(out)
            except BaseException:
                old.rename(out)  # put the previous export back rather than leave no directory
                raise
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def source_tensors(source_dir: Path) -> tuple[list[Path], dict[str, dict[str, str]], list[StoredTensor]]:
    """The safetensors shards of a checkpoint, their metadata, and all tensors in file order."""
    files = checkpoint.weight_files(source_dir)
    if any(f.suffix != ".safetensors" for f in files):
        raise RouterTuneError(
            f"{source_dir} stores its weights as pickle files; export reads safetensors only. "
            "Convert the checkpoint to safetensors first (load it and save_pretrained it)."
        )
    metadata, tensors, seen = {}, [], {}
    for f in files:
        metadata[f.name], stored = read_header(f)
        for t in stored.values():
            if t.name in seen:
                raise RouterTuneError(
                    f"tensor {t.name} is stored twice ({seen[t.name]} and {f.name}) in "
                    f"{source_dir}; the checkpoint is inconsistent."
                )
            seen[t.name] = f.name
        tensors += sorted(stored.values(), key=lambda t: t.start)
    return files, metadata, tensors


def splice_checkpoint(
    source_dir: str | Path, out_dir: str | Path, routers: dict[str, torch.Tensor], *, layout: str = "same"
) -> SpliceResult:
    """Write the source checkpoint with `routers` (in-memory names) spliced in, into `out_dir`.

    Raises:
        RouterTuneError: unsupported architecture, pickle weights, a router missing from the
            source or of the wrong shape.
    """
    source, out = Path(source_dir), Path(out_dir)
    config = json.loads((source / "config.json").read_text())
    architecture = config.get("model_type", "?")
    source_layout = detect_layout(source)
    target = source_layout if layout == "same" else layout
    if target not in LAYOUTS:
        raise RouterTuneError(f"unknown layout {layout!r}: use same, legacy or fused.")
    files, metadata, tensors = source_tensors(source)
    plan = plan_layout(tensors, architecture, target)
    by_shard: dict[str, list] = {f.name: [] for f in files}
    replaced = []
    for item in plan:
        tensor = item.tensor
        if item.param in routers:
            tensor = _router_tensor(tensor, routers[item.param])
            replaced.append(item.param)
        by_shard[item.shard].append(tensor)
    missing = sorted(set(routers) - set(replaced))
    if missing:
        raise RouterTuneError(
            f"the source {source} has no tensor for routers {', '.join(missing[:4])}"
            f"{' ...' if len(missing) > 4 else ''}: these routers were trained for a different "
            "model."
        )
    weight_map, total = {}, 0
    for name, shard_tensors in by_shard.items():
        if not shard_tensors:  # every tensor moved to an earlier shard by a layout conversion
            continue
        total += write_shard(out / name, shard_tensors, metadata[name])
        weight_map.update((t.name, name) for t in shard_tensors)
    shards = sorted(set(weight_map.values()))
    if (source / checkpoint.SAFETENSORS_INDEX).is_file() or len(shards) > 1:
        _write_index(source, out, weight_map, total)
    side = copy_side_files(source, out, {f.name for f in files})
    return SpliceResult(architecture, source_layout, target, shards, len(weight_map), total, replaced, side)


def _router_tensor(stored: OutputTensor, value: torch.Tensor) -> OutputTensor:
    """The trained router in the dtype and shape the source stores it in."""
    if tuple(value.shape) != tuple(stored.shape) or stored.dtype not in TORCH_DTYPES:
        raise RouterTuneError(
            f"router {stored.name} is {tuple(stored.shape)} {stored.dtype} in the source but the "
            f"trained one is {tuple(value.shape)}: these routers were trained for a different model."
        )
    data = value.detach().cpu().to(TORCH_DTYPES[stored.dtype]).contiguous().reshape(-1).view(torch.uint8)
    return OutputTensor(stored.name, stored.dtype, stored.shape, (Segment.literal(data.numpy().tobytes()),))


def _write_index(source: Path, out: Path, weight_map: dict[str, str], total: int) -> None:
    index_meta = {}
    if (source / checkpoint.SAFETENSORS_INDEX).is_file():
        index_meta = json.loads((source / checkpoint.SAFETENSORS_INDEX).read_text()).get("metadata") or {}
    index = {"metadata": {**index_meta, "total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / checkpoint.SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def copy_side_files(source: Path, out: Path, weight_names: set[str]) -> list[str]:
    """Copy config (routing logits off), tokenizer and other small top-level files; returns their names."""
    copied = []
    for f in sorted(source.iterdir()):
        name = f.name
        if (
            name in weight_names
            or name.startswith(".")
            or name == "README.md"
            or not f.is_file()
            or f.suffix in WEIGHT_SUFFIXES
            or name.endswith(".index.json")
        ):
            continue
        checkpoint.inside_checkpoint(source, name, "the source directory")  # a symlink out of the source is refused
        if f.stat().st_size > MAX_SIDE_FILE:
            continue
        if name == "config.json":
            config = json.loads(f.read_text())
            config["output_router_logits"] = False  # inference users want no aux loss or router-logit outputs
            (out / name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copyfile(f, out / name)
        copied.append(name)
    return copied
