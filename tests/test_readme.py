"""Every `router-tune` command that README.md and docs/*.md show is one the CLI accepts: the sub-command,
every flag, and every `--key value` recipe override; every relative link in them points to a file that
exists. (Running them is `make demo`'s job for the demo flow, and the CLI tests'; commands on hub models
cannot run offline, so they are parsed here.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from router_tune.cli import build_parser, command_module
from router_tune.training.config import config_field_names

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def shown_commands(page: Path) -> list[str]:
    """`router-tune ...` and `... -m router_tune ...` lines of a page's shell code blocks."""
    commands, fence = [], None
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
            continue
        if fence not in ("bash", "sh", "") or fence is None:
            continue
        line = line.split("  #")[0].strip()
        if line.startswith("router-tune ") or " -m router_tune " in line:
            commands.append(
                "router-tune "
                + line.split("router-tune " if line.startswith("router-tune") else "-m router_tune ", 1)[1]
            )
    return commands


def readme_commands() -> list[str]:
    return shown_commands(README)


def all_commands() -> list[tuple[str, str]]:
    return [(str(page.relative_to(ROOT)), line) for page in PAGES for line in shown_commands(page)]


def test_the_readme_shows_commands():
    assert len(readme_commands()) >= 10


def test_the_docs_show_commands():
    assert len(all_commands()) - len(readme_commands()) >= 20


@pytest.mark.parametrize("page, line", all_commands())
def test_shown_command_parses(page, line):
    argv = [a for a in shlex.split(line)[1:] if not (a.startswith("[") or a.endswith("]"))]
    if not argv or argv[0] not in ("inspect", "train", "eval", "export", "apply"):
        pytest.skip(f"not a sub-command line: {line}")
    parser = build_parser(argv[0])
    args, extra = parser.parse_known_args(argv)
    if extra:
        assert getattr(command_module(argv[0]), "ACCEPTS_OVERRIDES", False), f"{page}: unknown flags {extra} in: {line}"
        keys = [a[2:].split("=")[0] for a in extra if a.startswith("--")]
        unknown = set(keys) - set(config_field_names())
        assert not unknown, f"{page}: {line}: {unknown} are not recipe keys"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
    missing = [link for link in links if "://" not in link and not (page.parent / link).exists()]
    assert not missing, f"{page.name} links to missing files: {missing}"
