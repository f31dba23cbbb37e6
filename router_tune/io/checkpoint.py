"""Checkpoint directories on disk: find them, refuse unsafe or broken ones, list their tensors.

Checkpoints are untrusted input (hub downloads, merges of unknown origin), so everything
here reads headers and names only: no tensor data is loaded and no pickle is unpickled.
What the tensor names mean (layouts, routers) is `architectures.on_disk`'s business.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.utils import HFValidationError, validate_repo_id

from router_tune.errors import RouterTuneError
from router_tune.io.shards import read_header

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
# What a hub download needs: config, tokenizer and safetensors weights. Pickle weights and
# remote code are fetched only when the user opted into them.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def resolve_checkpoint(
    path_or_hub_id: str | Path, *, allow_pickle: bool = False, trust_remote_code: bool = False
) -> Path:
    """Return the local directory of a checkpoint after checking it is safe and complete.

    Args:
        path_or_hub_id: a local directory, or a hub id (`org/name`) downloaded with
            `huggingface_hub.snapshot_download` when no such directory exists.
        allow_pickle: accept `pytorch_model*.bin` weights (unpickling can execute code).
        trust_remote_code: accept a config whose `auto_map` points at Python files.

    Raises:
        RouterTuneError: missing path, no config.json, pickle-only weights, remote code,
            truncated/corrupt safetensors, or an index whose shards escape the directory.
    """
    path = Path(path_or_hub_id).expanduser()
    if not path.exists():
        path = _download(str(path_or_hub_id), allow_pickle, trust_remote_code)
    if not path.is_dir():
        raise RouterTuneError(
            f"{path} is a file, not a checkpoint directory: pass the directory that holds "
            "config.json and the weight files."
        )
    config = _read_config(path)
    if config.get("auto_map") and not trust_remote_code:
        raise RouterTuneError(
            f"{path}/config.json asks to run custom Python code from the checkpoint (auto_map: "
            f"{sorted(config['auto_map'])}). router_tune refuses it by default because that code runs with "
            "your permissions; read the .py files and pass --trust-remote-code if you trust them."
        )
    files = weight_files(path)
    if files[0].suffix == ".bin" and not allow_pickle:
        raise RouterTuneError(
            f"{path} holds only pickle weights ({', '.join(f.name for f in files)}). Unpickling can execute "
            "arbitrary code, so router_tune refuses it by default; convert the weights to safetensors, or pass "
            "--allow-pickle if you trust the file's origin."
        )
    for f in files:
        if f.suffix == ".safetensors":
            check_safetensors(f)
    return path


def _download(hub_id: str, allow_pickle: bool, trust_remote_code: bool) -> Path:
    try:
        validate_repo_id(hub_id)
    except HFValidationError:
        raise RouterTuneError(
            f"{hub_id} does not exist: pass an existing checkpoint directory "
            "or a hub id such as mistralai/Mixtral-8x7B-v0.1."
        ) from None
    patterns = HUB_PATTERNS + ["*.bin"] * allow_pickle + ["*.py"] * trust_remote_code
    try:
        return Path(snapshot_download(hub_id, allow_patterns=patterns))
    except Exception as err:  # offline, unknown repo, gated repo, network: all end the same way
        raise RouterTuneError(
            f"{hub_id} is not a local directory and could not be downloaded from the Hugging Face hub "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no details'}). Check the path "
            "for typos, or the hub id, your network and HF_TOKEN for gated models (HF_HUB_OFFLINE=1 forbids "
            "downloads)."
        ) from None


def _read_config(path: Path) -> dict:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise RouterTuneError(
            f"{path} has no config.json, so it is not a transformers checkpoint: pass the "
            "directory written by save_pretrained or mergekit-moe."
        )
    try:
        return json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RouterTuneError(f"{cfg} is not valid JSON ({err}): re-download or re-create it.") from None


def weight_files(checkpoint_dir: str | Path) -> list[Path]:
    """The weight files transformers would load: safetensors first, else pickle `.bin`.

    Index-aware: with `model.safetensors.index.json` the shards it names, each checked to lie
    inside the directory (no `../`, no absolute path, no symlink to elsewhere).
    """
    root = Path(checkpoint_dir)
    for index_name, pattern in ((SAFETENSORS_INDEX, "*.safetensors"), (PICKLE_INDEX, "*.bin")):
        if (root / index_name).is_file():
            return _indexed_shards(root, index_name)
        found = sorted(p for p in root.glob(pattern) if p.is_file())
        if found:
            for f in found:
                inside_checkpoint(root, f.name, f.name)
            return found
    raise RouterTuneError(
        f"{root} has config.json but no weight files (*.safetensors or *.bin): the download "
        "or save was incomplete; fetch the checkpoint again."
    )


def _indexed_shards(root: Path, index_name: str) -> list[Path]:
    try:
        weight_map = json.loads((root / index_name).read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise RouterTuneError(f"{root / index_name} is not a valid index (no weight_map): re-download it.") from None
    shards = []
    for name in sorted(set(weight_map.values())):
        shard = inside_checkpoint(root, name, index_name)
        if not shard.is_file():
            raise RouterTuneError(
                f"{index_name} in {root} names shard {name}, which is missing: the download is "
                "incomplete; fetch the checkpoint again."
            )
        shards.append(shard)
    return shards


def inside_checkpoint(root: Path, name: str, referrer: str) -> Path:
    """Refuse file names that leave the checkpoint directory (a crafted index could read any file)."""
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise RouterTuneError(
            f"{referrer} in {root} names {name!r}, which is outside the checkpoint directory; "
            "refusing it. Use shard names relative to the directory."
        )
    target = (root / name).resolve()
    allowed = [root.resolve()]
    if root.parent.name == "snapshots":  # a hub cache snapshot: its files are symlinks into ../../blobs
        allowed.append((root.parent.parent / "blobs").resolve())
    if not any(target.is_relative_to(a) for a in allowed):
        raise RouterTuneError(
            f"{root / name} is a symlink to {target}, outside the checkpoint directory; "
            "refusing it. Copy the real file into the directory instead."
        )
    return root / name


def check_safetensors(file: Path) -> None:
    """Check a safetensors file's header against its size without reading tensor data: an
    interrupted download is shorter than its header says (`shards.read_header` does the checks)."""
    read_header(file)


def tensor_names(checkpoint_dir: str | Path) -> list[str]:
    """On-disk tensor names, read from the index or the safetensors headers (no data loaded)."""
    root = Path(checkpoint_dir)
    for index_name in (SAFETENSORS_INDEX, PICKLE_INDEX):
        if (root / index_name).is_file():
            return sorted(json.loads((root / index_name).read_text())["weight_map"])
    names: list[str] = []
    for f in weight_files(root):
        if f.suffix == ".safetensors":
            names.extend(read_header(f)[1])
        else:  # only reached after the user allowed pickle; weights_only refuses code objects
            names.extend(torch.load(f, map_location="meta", weights_only=True, mmap=True))
    return sorted(names)
