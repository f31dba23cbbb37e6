"""Where a results file came from: the commit and whether the tree was clean, recorded in every
benchmark's JSON and markdown (`import provenance` from a script in this folder)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def provenance() -> dict:
    """{"commit": full sha, "clean": no uncommitted change to tracked or untracked files}."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()

    return {"commit": git("rev-parse", "HEAD") or "unknown", "clean": git("status", "--porcelain") == ""}


def describe(p: dict) -> str:
    """One line for a markdown header."""
    return f"commit {p['commit'][:12]}, {'clean tree' if p['clean'] else 'DIRTY tree (uncommitted changes)'}"
