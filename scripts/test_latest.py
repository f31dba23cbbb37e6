"""The drift watch (docs/development.md): the test suite in a venv of the newest releases pyproject allows,
recorded in docs/compatibility.md; with --lock, a passing run's versions become requirements-lock.txt.

    make test-latest      # fresh .venv-latest with the newest releases, the suite, docs/compatibility.md
    make lock             # the same, then requirements-lock.txt from .venv-latest when the suite passed
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from scripts.harness import ROOT, describe, provenance

# The versions that have broken us before, shown first in the record.
WATCHED = ["torch", "transformers", "kernels", "accelerate", "datasets", "peft", "safetensors", "tokenizers"]
WATCHED += ["huggingface-hub", "wandb", "deepspeed", "bitsandbytes", "mergekit"]
SKIP = {"router-tune", "pip", "setuptools", "wheel"}
LOCK_HEADER = """\
# The versions `make setup` installs (pip constraints): the newest releases pyproject.toml allowed on
# {date}, tested together by `make lock` ({result}; {where}). torch is installed first, from
# `pip install torch==2.13.0` (a CPU wheel here). Refresh with `make lock`; see docs/compatibility.md.
"""


def installed(venv: Path) -> dict[str, str]:
    """name -> version of every distribution in the venv (router-tune itself and the venv's installers left out)."""
    cmd = [str(venv / "bin" / "python"), "-m", "pip", "list", "--format", "json", "--exclude-editable"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return {d["name"].lower(): d["version"] for d in json.loads(out) if d["name"].lower() not in SKIP}


def run_suite(venv: Path, pytest_args: list[str]) -> tuple[int, str, float]:
    """pytest in the venv (as `make test` runs it): exit code, its closing line, seconds."""
    start = time.monotonic()
    proc = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"},
    )
    log = venv / "test-latest.log"  # the whole output: the failures' tracebacks are above the tail
    log.write_text(proc.stdout + proc.stderr)
    sys.stdout.write(proc.stdout[-4000:])
    sys.stderr.write(proc.stderr[-2000:])
    print(f"\nfull pytest output: {log}")
    closing = [line for line in proc.stdout.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    return proc.returncode, (closing[-1].strip("= ") if closing else "no result line"), time.monotonic() - start


def write_record(path: Path, versions: dict[str, str], code: int, closing: str, seconds: float, where: str) -> None:
    """Prepend this run to the record (newest first), keeping earlier runs below."""
    today = datetime.date.today().isoformat()
    status = "PASSED" if code == 0 else f"FAILED (exit {code})"
    rows = "\n".join(f"| {name} | {versions[name]} |" for name in WATCHED if name in versions)
    entry = (
        f"## {today}: {status}\n\n"
        f"`make test-latest` ({where}, Python {sys.version.split()[0]}): {closing}, {seconds / 60:.1f} min.\n\n"
        f"| package | newest allowed |\n|---|---|\n{rows}\n"
    )
    title = "# Compatibility: the suite against the newest releases\n\n"
    intro = (
        "`make test-latest` installs the newest releases that pyproject.toml allows in a fresh venv and runs "
        "`make test`'s suite there; `make lock` does the same and, when it passes, writes requirements-lock.txt, "
        "which `make setup` installs. Newest run first.\n\n"
    )
    old = path.read_text() if path.is_file() else ""
    earlier = old.split("\n## ", 1)[1] if "\n## " in old else ""
    path.write_text(title + intro + entry + (f"\n## {earlier}" if earlier else ""))


def write_lock(path: Path, versions: dict[str, str], closing: str, where: str) -> None:
    header = LOCK_HEADER.format(date=datetime.date.today().isoformat(), result=closing, where=where)
    # local labels dropped (torch 2.13.0+cpu -> 2.13.0): the CUDA build of the same release satisfies it too
    pins = sorted((name, version.split("+")[0]) for name, version in versions.items())
    path.write_text(header + "".join(f"{name}=={version}\n" for name, version in pins))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv-latest", help="the venv of the newest releases")
    parser.add_argument("--record", type=Path, default=ROOT / "docs" / "compatibility.md")
    parser.add_argument("--lock", type=Path, help="write this lock file from the venv when the suite passes")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)

    versions = installed(args.venv)
    where = describe(provenance())
    code, closing, seconds = run_suite(args.venv, args.pytest_args)
    write_record(args.record, versions, code, closing, seconds, where)
    print(f"\nrecorded in {args.record}: {closing}")
    if args.lock and code == 0:
        write_lock(args.lock, versions, closing, where)
        print(f"lock written: {args.lock} ({len(versions)} packages)")
    elif args.lock:
        print(f"lock NOT written: the suite failed against the newest releases ({closing})")
    return code


if __name__ == "__main__":
    sys.exit(main())
