"""Which checkpoint a run resumes from, so that a killed run always resumes with the documented command.

    router-tune train RECIPE --resume_from_checkpoint true      # or `last`, or a checkpoint-N path

transformers writes a checkpoint file by file into `checkpoint-N/` with nothing marking the end,
so a run killed while saving leaves a directory that looks like a checkpoint and is not one.
RouterTrainer writes `COMPLETE` last, after every file of the checkpoint (routers, optimizer,
scheduler, RNG, trainer state) is on disk; only checkpoints holding it are resumed from.

Only rank 0 writes the checkpoint, so on node-local disks only rank 0 is sure to have it: rank 0
chooses the checkpoint, and ranks without it receive rank 0's files (`shared_resume`).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from router_tune.errors import RouterTuneError

COMPLETE = "router_tune_complete"
LATEST = ("true", "last")
NO_RESUME = ("", "false", "none", "no")


def asks_to_resume(value: str | bool | None) -> bool:
    """Whether a `resume_from_checkpoint` value asks to resume at all (true, last or a path)."""
    return not (value is None or value is False or str(value).lower() in NO_RESUME)


logger = logging.getLogger(__name__)


def checkpoint_step(path: Path) -> int | None:
    step = path.name.removeprefix("checkpoint-")
    return int(step) if path.name.startswith("checkpoint-") and step.isdigit() else None


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / COMPLETE).is_file()


def mark_complete(checkpoint: Path) -> None:
    """Write the marker through a temporary name and a rename, so it exists whole or not at all."""
    tmp = checkpoint / f".{COMPLETE}.tmp"
    tmp.write_text("every file of this checkpoint was written\n")
    tmp.replace(checkpoint / COMPLETE)


def checkpoints(output_dir: str | Path) -> list[Path]:
    """checkpoint-N directories of a run, oldest first."""
    root = Path(output_dir)
    found = [p for p in root.glob("checkpoint-*") if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def check_resume_value(value: str | bool | None, output_dir: str | Path) -> None:
    """Validate `resume_from_checkpoint` before any weight is loaded (see `resolve_resume`)."""
    if value is None or value is True or value is False or str(value).lower() in LATEST + NO_RESUME:
        return
    path = Path(value)
    if not path.is_dir():
        raise RouterTuneError(
            f"resume_from_checkpoint {value} does not exist: pass a checkpoint-N directory of the run, or `true` for "
            f"the latest complete checkpoint in {output_dir}."
        )
    if not is_complete(path):
        raise RouterTuneError(
            f"{value} is not a complete router_tune checkpoint (no {COMPLETE}: the run was killed while writing it, "
            f"or it was not written by router-tune). Pass `--resume_from_checkpoint true` to resume from the latest "
            f"complete checkpoint in {output_dir}."
        )


def resolve_resume(value: str | bool | None, output_dir: str | Path) -> str | None:
    """The checkpoint directory to resume from, or None to start at step 0 (on this process's disk).

    `true` / `last` take the latest complete checkpoint in `output_dir`; incomplete ones after it
    (left by a kill while saving) are reported and removed, so that the re-run never mixes their
    stale files with new ones. With no complete checkpoint the run starts at step 0, and says so.
    """
    if not asks_to_resume(value):
        return None
    if value is not True and str(value).lower() not in LATEST:
        check_resume_value(value, output_dir)
        return str(value)
    found = checkpoints(output_dir)
    complete = [p for p in found if is_complete(p)]
    latest = complete[-1] if complete else None
    after_latest = [p for p in found if latest is None or checkpoint_step(p) > checkpoint_step(latest)]
    for partial in (p for p in after_latest if not is_complete(p)):
        logger.warning("%s is incomplete (the run stopped while writing it): skipped and removed", partial)
        shutil.rmtree(partial, ignore_errors=True)
    if latest is None:
        logger.warning("no complete checkpoint in %s: training starts at step 0", output_dir)
        return None
    logger.warning("resuming from %s", latest)
    return str(latest)


# What a run leaves in its output_dir and a new run from step 0 would replace or mix with.
RUN_RESULTS = ("routers.safetensors", "router_tune.json", "eval", "plots")


def previous_run(output_dir: str | Path) -> str | None:
    """What an earlier run left in `output_dir` (its routers, run file, report, plots, checkpoints), or None."""
    root = Path(output_dir)
    found = [name for name in RUN_RESULTS if (root / name).exists()]
    if n := len(checkpoints(root)):
        found.append(f"{n} checkpoint(s)")
    return ", ".join(found) or None


def check_fresh_output_dir(output_dir: str | Path, resume: str | bool | None, overwrite: bool) -> str | None:
    """The message for an output_dir that holds an earlier run a new run would silently replace (None when
    it holds none, or the run resumes it, or `overwrite` was asked for). Checked before any weight is loaded."""
    resuming = asks_to_resume(resume)
    if resuming and overwrite:
        raise RouterTuneError("--overwrite starts from step 0 and --resume_from_checkpoint continues a run: pass one.")
    found = previous_run(output_dir)
    if found is None or resuming or overwrite:
        return None
    return (
        f"output_dir {output_dir} already holds a run ({found}). Continue it with --resume_from_checkpoint true, "
        "train into another directory with --output_dir DIR, or pass --overwrite to train from step 0 and "
        "replace it."
    )


def clear_previous_run(output_dir: str | Path) -> None:
    """Remove an earlier run's results and checkpoints (`--overwrite`), so that a later resume never mixes
    them with the new run's; anything else in the directory (an export, notes) stays."""
    root = Path(output_dir)
    if previous_run(root) is None:
        return
    for path in [*(root / name for name in RUN_RESULTS), *checkpoints(root)]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    logger.warning("--overwrite: removed the earlier run's results and checkpoints from %s", root)


def shared_resume(value: str | bool | None, output_dir: str | Path) -> str | None:
    """`resolve_resume` decided once, by rank 0, for every rank of a launched run (a plain call without
    a process group). All ranks must call it together.

    Only rank 0 writes checkpoints: with an output directory on node-local disks, the other nodes
    have no checkpoint, or an incomplete one (their own RNG files), and a rank that chose on its own
    would start at another step than rank 0 and hang in the first collective. Rank 0 resolves `value`
    and broadcasts its choice (or its error, raised on every rank); `true` / `last` name the chosen
    checkpoint-N in each rank's own `output_dir`. A rank whose copy is not complete receives the
    files of rank 0's (router-only checkpoints: routers, optimizer state, small trainer files), keeps
    its own files that rank 0 does not have (its RNG state), and the marker is written last.
    """
    import torch  # here, not at the top: `train --help` imports this module and must not load torch

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return resolve_resume(value, output_dir)
    main = torch.distributed.get_rank() == 0
    box: list = [None]
    if main:
        try:
            box = [(resolve_resume(value, output_dir), None)]
        except RouterTuneError as err:
            box = [(None, str(err))]
    torch.distributed.broadcast_object_list(box, src=0)
    chosen, error = box[0]
    if error is not None:
        raise RouterTuneError(error)
    if chosen is None:
        return None
    latest = value is True or str(value).lower() in LATEST
    local = Path(output_dir) / Path(chosen).name if latest else Path(chosen)
    missing: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(missing, not is_complete(local))
    if any(missing):
        files = [_read_files(Path(chosen)) if main else None]
        torch.distributed.broadcast_object_list(files, src=0)
        if not is_complete(local):
            logger.warning("%s: not on this rank's disk, copied from rank 0", local)
            _write_files(local, files[0])
    return str(local)


def _read_files(checkpoint: Path) -> dict[str, bytes]:
    """Every file of a checkpoint by its path inside it (DeepSpeed's sit in a global_stepN folder)."""
    return {str(p.relative_to(checkpoint)): p.read_bytes() for p in sorted(checkpoint.rglob("*")) if p.is_file()}


def _write_files(checkpoint: Path, files: dict[str, bytes]) -> None:
    """Each file through a name of this process and a rename (ranks sharing a disk may write the same
    checkpoint at once), the completion marker last."""
    for name in sorted(files, key=lambda n: n == COMPLETE):
        path = checkpoint / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(files[name])
        tmp.replace(path)
