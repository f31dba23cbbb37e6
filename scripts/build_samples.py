"""python -m scripts.build_samples  [--out router_tune/assets/samples]

Rebuild the bundled data samples byte for byte from openly licensed text that installs on Debian 12 (`apt-get
install python3.11 python3.11-doc bible-kjv`, `pip install chitchat-dataset==0.9.0`), in the upstream schemas
(docs/data.md). Files, sources, licences, transformations and how documents are picked: the NOTICE below.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "router_tune" / "assets" / "samples"

# Debian's interpreter, not whatever Python runs this script: its version (3.11.2) is the
# one python3.11-doc documents, and it pins the input so the output does not change with
# the virtualenv's Python.
STDLIB_DIR = Path("/usr/lib/python3.11")
DOCS_DIR = Path("/usr/share/doc/python3.11/html/_sources")
KJV_RANGE = "gen1:1-rev22:21"

# ~0.9 MB per domain on disk: four domains stay under the 4 MB asset budget and each is
# enough text (~250k tokens) to fine-tune a tiny expert on it.
DOMAIN_BUDGET = 900_000
TOTAL_BUDGET = 4_000_000
# Whole files between these sizes: small ones are boilerplate, big ones would eat the budget.
CODE_SIZE = (1_500, 40_000)
DOCS_SIZE = (2_000, 60_000)
SKIP_CODE_PARTS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
# Changelogs are lists of issue numbers, not prose.
SKIP_DOCS_PARTS = {"whatsnew"}

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions."
)


def _pick(candidates: dict[str, str], extra: int = 0) -> dict[str, str]:
    """The records taken in sha256(key) order while they fit DOMAIN_BUDGET (a record costs its UTF-8 bytes +
    `extra`), sorted by key."""
    taken, used = [], 0
    for key in sorted(candidates, key=lambda k: hashlib.sha256(k.encode("utf-8")).hexdigest()):
        size = len(candidates[key].encode()) + extra
        if used + size <= DOMAIN_BUDGET:
            taken.append(key)
            used += size
    return {k: candidates[k] for k in sorted(taken)}


def _jsonl_line(text: str, meta: dict) -> str:
    # Upstream stores meta as a JSON string inside the record, not as a nested object.
    return json.dumps({"text": text, "meta": json.dumps(meta, ensure_ascii=False)}, ensure_ascii=False) + "\n"


def _read_utf8(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return None


def code_records() -> dict[str, str]:
    candidates = {}
    for path in sorted(STDLIB_DIR.rglob("*.py")):
        rel = path.relative_to(STDLIB_DIR)
        if SKIP_CODE_PARTS & set(rel.parts) or path.is_symlink():
            continue
        text = _read_utf8(path)
        if text is None or not CODE_SIZE[0] <= len(text.encode()) <= CODE_SIZE[1]:
            continue
        lines = text.splitlines() or [""]
        size = len(text.encode())
        meta = {
            "redpajama_set_name": "RedPajamaGithub",
            "source": "github",
            "content_hash": hashlib.sha256(text.encode()).hexdigest(),
            "timestamp": "",
            "line_count": len(lines),
            "max_line_length": max(len(line) for line in lines),
            "avg_line_length": round(sum(len(line) for line in lines) / len(lines), 4),
            "alnum_prop": round(sum(c.isalnum() for c in text) / max(1, len(text)), 4),
            "repo_name": "python/cpython",
            "ref": "refs/tags/v3.11.2",
            "path": f"Lib/{rel.as_posix()}",
            "size": str(size),
            "binary": False,
            "copies": "1",
            "mode": "33188",
            "license": "psf-2.0",
            "language": [{"name": "Python", "bytes": str(size)}],
        }
        candidates[meta["path"]] = _jsonl_line(text, meta)
    return _pick(candidates)


def _rst_title(text: str, fallback: str) -> str:
    # reST titles are a text line followed by a line of one repeated punctuation character.
    lines = text.splitlines()
    for line, under in zip(lines, lines[1:]):
        if (
            line.strip()
            and re.fullmatch(r"([=\-~*#^\"'`+])\1{2,}", under.strip())
            and not re.fullmatch(r"[=\-~*#^\"'`+]+", line.strip())
        ):
            return line.strip().strip("*").strip()
    return fallback


def docs_records() -> dict[str, str]:
    candidates = {}
    for path in sorted(DOCS_DIR.rglob("*.rst.txt")):
        rel = path.relative_to(DOCS_DIR)
        if SKIP_DOCS_PARTS & set(rel.parts):
            continue
        text = _read_utf8(path)
        if text is None or not DOCS_SIZE[0] <= len(text.encode()) <= DOCS_SIZE[1]:
            continue
        page = rel.as_posix()[: -len(".rst.txt")]
        meta = {
            "redpajama_set_name": "RedPajamaPythonDocs",
            "source": "python_docs",
            "path": rel.as_posix(),
            "url": f"https://docs.python.org/3.11/{page}.html",
            "title": _rst_title(text, page),
            "license": "PSF-2.0",
        }
        candidates[rel.as_posix()] = _jsonl_line(text, meta)
    return _pick(candidates)


def kjv_chapters() -> list[tuple[str, int, str]]:
    """(book, chapter, text) for all 1189 chapters; verses unwrapped to one line each."""
    if shutil.which("bible") is None:
        sys.exit("`bible` not found: apt-get install bible-kjv")
    raw = subprocess.run(["bible", KJV_RANGE], check=True, capture_output=True, text=True).stdout
    lines = raw.split("\n")
    header = re.compile(r"^(\S.*) (\d+)$")
    chapters: list[tuple[str, int, list[str]]] = []
    for i, line in enumerate(lines):
        match = header.match(line)
        # A chapter header stands alone between blank lines; wrapped verse text never does.
        if match and (i == 0 or lines[i - 1] == "") and i + 1 < len(lines) and lines[i + 1] == "":
            chapters.append((match.group(1), int(match.group(2)), []))
        elif line.startswith("  ") and chapters:
            chapters[-1][2].append(line.strip())
        elif line.strip() and chapters:
            chapters[-1][2][-1] += " " + line.strip()
    if len(chapters) != 1189:
        sys.exit(f"expected 1189 KJV chapters from `bible {KJV_RANGE}`, parsed {len(chapters)}")
    return [(book, num, f"{book} {num}\n\n" + "\n".join(verses) + "\n") for book, num, verses in chapters]


def book_records() -> dict[str, str]:
    candidates = {}
    for order, (book, num, text) in enumerate(kjv_chapters()):
        meta = {
            "redpajama_set_name": "RedPajamaBook",
            "short_book_title": f"The King James Bible: {book} {num}",
            "publication_date": 1611,
            "url": "https://packages.debian.org/bookworm/bible-kjv-text",
            "license": "public domain",
        }
        # Canonical order as the key, so output follows the Bible, not the alphabet.
        candidates[f"{order:04d} {book} {num}"] = _jsonl_line(text, meta)
    return _pick(candidates)


def chitchat_path() -> Path:
    try:
        import chitchat_dataset
    except ImportError:
        sys.exit("chitchat-dataset not installed: pip install chitchat-dataset==0.9.0")
    return Path(chitchat_dataset.__file__).parent / "dataset.json"


def to_wizard_vicuna(conv_id: str, record: dict) -> dict | None:
    """chitchat messages -> alternating human/gpt turns; None if not a real exchange.

    chitchat groups messages into runs by sender already; a run can still be followed by
    another run of the same sender once empty messages are dropped, hence the merge.
    """
    turns: list[tuple[str, str]] = []
    for run in record["messages"]:
        for msg in run:
            text = msg["text"].strip()
            if not text:
                continue
            if turns and turns[-1][0] == msg["sender"]:
                turns[-1] = (msg["sender"], turns[-1][1] + "\n" + text)
            else:
                turns.append((msg["sender"], text))
    # Whoever speaks first is the user; a trailing user turn has no answer to learn from.
    if len(turns) % 2:
        turns.pop()
    if len(turns) < 2:
        return None
    roles = ("human", "gpt")
    return {"id": conv_id, "conversations": [{"from": roles[i % 2], "value": t} for i, (_, t) in enumerate(turns)]}


def chat_records() -> dict[str, str]:
    data = json.loads(chitchat_path().read_text(encoding="utf-8"))
    candidates = {}
    for conv_id in sorted(data):
        conv = to_wizard_vicuna(conv_id, data[conv_id])
        if conv is not None:
            candidates[conv_id] = json.dumps(conv, ensure_ascii=False)
    return _pick(candidates, extra=2)  # each record is followed by ",\n" in the JSON list


def _excerpt(text: str, limit: int = 900) -> str:
    """The first lines of a document that fit in `limit` characters."""
    out, used = [], 0
    for line in text.splitlines():
        if used + len(line) + 1 > limit:
            break
        out.append(line)
        used += len(line) + 1
    return "\n".join(out).strip()


def inspect_text(code: dict, docs: dict, book: dict, chats: dict) -> str:
    def first_text(records: dict) -> str:
        return json.loads(records[sorted(records)[0]])["text"]

    conv = json.loads(chats[sorted(chats)[0]])["conversations"][:6]
    roles = {"human": "USER", "gpt": "ASSISTANT"}
    chat = VICUNA_SYSTEM + " " + " ".join(f"{roles[t['from']]}: {t['value']}" for t in conv)
    parts = [_excerpt(first_text(code)), _excerpt(first_text(docs)), _excerpt(first_text(book)), chat]
    return "\n\n".join(parts) + "\n"


NOTICE = """\
router_tune bundled samples: sources, licences and transformations.
Rebuilt byte for byte by `python scripts/build_samples.py` (Debian 12 packages
python3.11 3.11.2-6+deb12u9, python3.11-doc, bible-kjv 4.38; PyPI chitchat-dataset 0.9.0).
Documents are chosen whole, in sha256(key) order, until a per-domain budget of
{budget} bytes is full; files list them sorted by key.

redpajama/github_sample.jsonl  ({n_code} files, {b_code} bytes)
  Source: the CPython 3.11.2 standard library as installed by Debian at
  /usr/lib/python3.11 (*.py, 1.5-40 KB; test, tests, idle_test, site-packages left out).
  Licence: Python Software Foundation License Version 2 (PSF-2.0); full text in
  LICENSE-PSF.txt (copied from /usr/lib/python3.11/LICENSE.txt). Copyright (c)
  2001-2023 Python Software Foundation; all rights reserved.
  Transformation: file text unchanged; meta in the RedPajama github schema
  (redpajama_set_name RedPajamaGithub, repo_name python/cpython, path Lib/..., line
  statistics computed here, license psf-2.0).

redpajama/python_docs_sample.jsonl  ({n_docs} pages, {b_docs} bytes)
  Source: Python 3.11 documentation sources, Debian python3.11-doc,
  /usr/share/doc/python3.11/html/_sources/**/*.rst.txt (2-60 KB, whatsnew excluded).
  Licence: PSF-2.0 (as above); the documentation is Copyright (c) 2001-2023 Python
  Software Foundation.
  Transformation: reStructuredText unchanged; meta redpajama_set_name
  RedPajamaPythonDocs (subset "python_docs"), path, docs.python.org url, first title.

redpajama/book_sample.jsonl  ({n_book} chapters, {b_book} bytes)
  Source: King James Version of the Bible (1611/1769 text), Debian bible-kjv-text,
  printed by `bible "{kjv_range}"`.
  Licence: public domain.
  Transformation: one document per chapter: "Book N", a blank line, then one verse
  per line ("V text"), wrapped lines joined; meta in the RedPajama book schema
  (redpajama_set_name RedPajamaBook, short_book_title, publication_date 1611).

wizard_vicuna/wizard_vicuna_sample.json  ({n_chat} conversations, {b_chat} bytes)
  Source: chitchat-dataset 0.9.0 (BYU PCC lab Chit-Chat Challenge),
  chitchat_dataset/dataset.json, https://github.com/BYU-PCCL/chitchat-dataset.
  Licence: MIT, Copyright (c) 2019 Perception, Control and Cognition Lab; full text
  in LICENSE-chitchat.txt (copied from the package's dist-info).
  Transformation: human-human chats rewritten in the wizard_vicuna_70k_unfiltered
  schema: id = chitchat conversation id; empty messages dropped; consecutive messages
  of one sender joined with a newline into one turn; the first speaker becomes
  "human", turns alternate human/gpt; a final unanswered human turn is dropped;
  chats with fewer than two turns are left out.

inspect_sample.txt  ({b_inspect} bytes)
  The opening lines of the first document of each file above, and the first turns of
  the first conversation rendered in the Vicuna v1.1 format, separated by blank lines.
"""


def licence_texts() -> dict[str, str]:
    # PSF-2.0 and MIT both ask that the licence text travel with the copies.
    dist = next(chitchat_path().parent.parent.glob("chitchat_dataset-*.dist-info"))
    return {
        "LICENSE-PSF.txt": (STDLIB_DIR / "LICENSE.txt").read_text(encoding="utf-8"),
        "LICENSE-chitchat.txt": (dist / "LICENSE").read_text(encoding="utf-8"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    out = parser.parse_args().out
    for needed, how in ((STDLIB_DIR, "apt-get install python3.11"), (DOCS_DIR, "apt-get install python3.11-doc")):
        if not needed.is_dir():
            sys.exit(f"{needed} not found: {how}")

    code, docs, book, chats = code_records(), docs_records(), book_records(), chat_records()
    (out / "redpajama").mkdir(parents=True, exist_ok=True)
    (out / "wizard_vicuna").mkdir(parents=True, exist_ok=True)
    samples = {  # NOTICE's name: (file, its records, its text)
        "code": ("redpajama/github_sample.jsonl", code, "".join(code.values())),
        "docs": ("redpajama/python_docs_sample.jsonl", docs, "".join(docs.values())),
        "book": ("redpajama/book_sample.jsonl", book, "".join(book.values())),
        "chat": ("wizard_vicuna/wizard_vicuna_sample.json", chats, "[\n" + ",\n".join(chats.values()) + "\n]\n"),
    }
    files = {name: text for name, _, text in samples.values()}
    files.update({"inspect_sample.txt": inspect_text(code, docs, book, chats), **licence_texts()})
    sizes = {name: len(text.encode()) for name, text in files.items()}
    counts = {f"n_{key}": len(records) for key, (_, records, _) in samples.items()}
    counts.update({f"b_{key}": sizes[name] for key, (name, _, _) in samples.items()})
    files["NOTICE"] = NOTICE.format(
        budget=DOMAIN_BUDGET, kjv_range=KJV_RANGE, b_inspect=sizes["inspect_sample.txt"], **counts
    )
    sizes["NOTICE"] = len(files["NOTICE"].encode())
    total = sum(sizes.values())
    if total > TOTAL_BUDGET:
        sys.exit(f"samples total {total} bytes, over the {TOTAL_BUDGET} byte budget")
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8", newline="\n")
        print(f"{sizes[name]:>10,d}  {out / name}")
    print(f"{total:>10,d}  total (budget {TOTAL_BUDGET:,d})")


if __name__ == "__main__":
    main()
