"""Data sources from a recipe's `datasets:` list: validated specs, data files, streamed records.

Each file is read with `datasets.load_dataset("json"|"parquet", data_files=[file], streaming=True)`
on its own, so every record keeps its file name and record number (1-based, the JSONL line
number) for error messages.
"""

from __future__ import annotations

import codecs
import dataclasses
import difflib
import math
from dataclasses import dataclass
from pathlib import Path

import datasets
from huggingface_hub import HfFileSystem

from router_tune.errors import RouterTuneError

SOURCE_TYPES = ("redpajama", "wizard_vicuna", "text", "sharegpt")
CHAT_SOURCES = ("wizard_vicuna", "sharegpt")
TEMPLATES = ("vicuna_v1.1", "tokenizer")
CHAT_ROLES = ("user", "assistant", "system")
WIZARD_VICUNA_ROLES = {"human": "user", "gpt": "assistant"}
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
# RedPajama's meta["redpajama_set_name"] -> subset name (the file-name prefix of the Sample).
REDPAJAMA_SETS = {
    "RedPajamaArXiv": "arxiv",
    "RedPajamaBook": "book",
    "RedPajamaC4": "c4",
    "RedPajamaCommonCrawl": "cc",
    "RedPajamaGithub": "github",
    "RedPajamaStackExchange": "stackexchange",
    "RedPajamaWikipedia": "wikipedia",
}
REDPAJAMA_SUBSETS = tuple(REDPAJAMA_SETS.values())
# Hub files per source type (patterns relative to the dataset repository).
HUB_PATTERNS = {
    "redpajama": ("*.jsonl",),
    "wizard_vicuna": ("*.json",),
    "text": ("**/*.jsonl", "**/*.json", "**/*.parquet"),
    "sharegpt": ("**/*.jsonl", "**/*.json", "**/*.parquet"),
}
COMPRESSIONS = ("", ".gz", ".bz2", ".xz", ".zst", ".lz4")
SUFFIXES = tuple(f"{ext}{c}" for ext in (".jsonl", ".json") for c in COMPRESSIONS) + (".parquet",)
SPEC_KEYS = (
    "source",
    "path",
    "weight",
    "name",
    "template",
    "subsets",
    "field",
    "roles",
    "assistant_only_loss",
    "max_documents",
)


@dataclass(frozen=True)
class SourceSpec:
    """One validated entry of a recipe's `datasets:` list (see `parse_sources`)."""

    source: str
    path: str
    weight: float = 1.0
    name: str = ""
    template: str = "vicuna_v1.1"
    subsets: tuple[str, ...] = ()
    field: str = "text"
    roles: dict = dataclasses.field(default_factory=dict)
    assistant_only_loss: bool = True
    max_documents: int | None = None

    @property
    def is_chat(self) -> bool:
        return self.source in CHAT_SOURCES


def _closest(word: str, valid) -> str:
    match = difflib.get_close_matches(str(word), list(valid), n=1, cutoff=0.0)
    return f" Did you mean {match[0]!r}?" if match else ""


def _parse_one(i: int, entry: dict) -> SourceSpec:
    where = f"datasets[{i}]"
    if not isinstance(entry, dict):
        raise RouterTuneError(f"{where} must be a mapping like {{source: redpajama, path: ..., weight: 1.0}}.")
    for key in entry:
        if key not in SPEC_KEYS:
            raise RouterTuneError(
                f"{where}: unknown key {key!r}.{_closest(key, SPEC_KEYS)} Valid keys: {', '.join(SPEC_KEYS)}."
            )
    source = entry.get("source")
    if source not in SOURCE_TYPES:
        raise RouterTuneError(
            f"{where}: unknown source type {source!r}.{_closest(source, SOURCE_TYPES)} "
            f"Valid types: {', '.join(SOURCE_TYPES)}."
        )
    if not entry.get("path"):
        raise RouterTuneError(f"{where}: `path` is missing: give a hub dataset id or a local file or directory.")
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        raise RouterTuneError(
            f"{where}: weight must be a positive number, got {weight!r}. "
            "Weights are relative shares of training tokens, e.g. 0.7 and 0.3."
        )
    for key, allowed in (
        ("subsets", ("redpajama",)),
        ("roles", ("sharegpt",)),
        ("field", ("text", "sharegpt")),
        ("template", CHAT_SOURCES),
        ("assistant_only_loss", CHAT_SOURCES),
    ):
        if key in entry and source not in allowed:
            raise RouterTuneError(f"{where}: `{key}` applies to source {' or '.join(allowed)}, not {source!r}.")
    template = entry.get("template", "vicuna_v1.1")
    if template not in TEMPLATES:
        raise RouterTuneError(
            f"{where}: unknown template {template!r}.{_closest(template, TEMPLATES)} "
            "Use vicuna_v1.1 (shipped, FastChat's format) or tokenizer (the model's own)."
        )
    subsets = tuple(entry.get("subsets") or ())
    for s in subsets:
        if s not in REDPAJAMA_SUBSETS:
            raise RouterTuneError(
                f"{where}: unknown RedPajama subset {s!r}.{_closest(s, REDPAJAMA_SUBSETS)} "
                f"Valid subsets: {', '.join(REDPAJAMA_SUBSETS)}."
            )
    roles = dict(entry.get("roles") or (SHAREGPT_ROLES if source == "sharegpt" else WIZARD_VICUNA_ROLES))
    for speaker, role in roles.items():
        if role not in CHAT_ROLES:
            raise RouterTuneError(
                f"{where}: roles maps {speaker!r} to {role!r}; map each speaker to one of "
                f"{', '.join(CHAT_ROLES)}.{_closest(role, CHAT_ROLES)}"
            )
    max_docs = entry.get("max_documents")
    if max_docs is not None and (isinstance(max_docs, bool) or not isinstance(max_docs, int) or max_docs <= 0):
        raise RouterTuneError(f"{where}: max_documents must be a positive integer or absent, got {max_docs!r}.")
    default_field = "conversations" if source == "sharegpt" else "text"
    return SourceSpec(
        source=source,
        path=str(entry["path"]),
        weight=float(weight),
        name=str(entry.get("name") or ""),
        template=template,
        subsets=subsets,
        field=str(entry.get("field", default_field)),
        roles=roles,
        assistant_only_loss=bool(entry.get("assistant_only_loss", True)),
        max_documents=max_docs,
    )


def parse_sources(entries: list[dict]) -> list[SourceSpec]:
    """Validate a recipe's `datasets:` list up front and give each source a unique name.

    Raises:
        RouterTuneError: unknown key or source type (naming the closest valid one), missing path,
            non-positive weight, options that do not apply to the source type, duplicate names.
    """
    if not entries:
        raise RouterTuneError(
            "`datasets` is empty: list at least one source, e.g. "
            "{source: redpajama, path: togethercomputer/RedPajama-Data-1T-Sample, weight: 1.0}."
        )
    specs = [_parse_one(i, e) for i, e in enumerate(entries)]
    named: list[SourceSpec] = []
    for spec in specs:
        name = spec.name or spec.source
        if not spec.name and any(s.name == name for s in named):
            name = f"{spec.source}_{len(named)}"
        if any(s.name == name for s in named):
            raise RouterTuneError(f"Two datasets are named {name!r}: give each a distinct `name`.")
        named.append(SourceSpec(**{**spec.__dict__, "name": name}))
    return named


def source_names(specs: list[SourceSpec]) -> list[str]:
    """Source names in recipe order; a block's `source_id` indexes this list."""
    return [s.name for s in specs]


def redpajama_subset_of_file(path: str) -> str | None:
    """`github_sample.jsonl` -> "github", `cc_2019-30_sample.jsonl` -> "cc"; None when unknown."""
    stem = Path(path).name.split(".")[0].lower()
    for subset in sorted(REDPAJAMA_SUBSETS, key=len, reverse=True):
        if stem == subset or stem.startswith(subset + "_") or stem.startswith(subset + "-"):
            return subset
    return None


def _hub_files(spec: SourceSpec) -> list[str]:
    try:
        fs = HfFileSystem()
        found = sorted({p for pat in HUB_PATTERNS[spec.source] for p in fs.glob(f"datasets/{spec.path}/{pat}")})
    except Exception as exc:  # offline, no such repo, gated: all end the same way for the user
        raise RouterTuneError(
            f"Dataset {spec.name!r}: {spec.path!r} is not a local file or directory and the hub could not be "
            f"read ({type(exc).__name__}: {exc}). Download its data files and set `path` to the local "
            "file or directory."
        ) from exc
    return [f"hf://{p}" for p in found]


def resolve_files(spec: SourceSpec) -> list[str]:
    """The data files of a source: a local file, every data file under a local directory (sorted),
    or the hub repository's data files (`hf://datasets/...`). RedPajama subset filters drop files
    whose name names another subset.

    Raises:
        RouterTuneError: the path does not exist (and is not a reachable hub id) or holds no data file.
    """
    local = Path(spec.path).expanduser()
    if local.is_file():
        files = [str(local)]
    elif local.is_dir():
        files = sorted(str(p) for p in local.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES))
    elif spec.path.startswith((".", "/", "~")) or spec.path.count("/") != 1:
        raise RouterTuneError(
            f"Dataset {spec.name!r}: file not found: {spec.path}. Check `path` "
            "(a local .jsonl/.json/.parquet file or directory, or a hub id like owner/name)."
        )
    else:
        files = _hub_files(spec)
    if spec.subsets:
        files = [f for f in files if redpajama_subset_of_file(f) in (None, *spec.subsets)]
    if not files:
        raise RouterTuneError(
            f"Dataset {spec.name!r}: no data files ({', '.join(SUFFIXES)}) under {spec.path}"
            + (f" for subsets {list(spec.subsets)}" if spec.subsets else "")
            + "."
        )
    return files


def check_utf8(path: str) -> None:
    """Raise, naming the line (= JSONL record number), when a local JSON/JSONL file is not UTF-8.

    The JSON readers reject such a file as a whole, so this is always fatal, never a skippable record.
    """
    if path.startswith("hf://") or not path.endswith((".jsonl", ".json")):
        return
    decoder, line, offset = codecs.getincrementaldecoder("utf-8")(), 1, 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                bad = exc.start
                line += chunk[:bad].count(b"\n")
                raise RouterTuneError(
                    f"{path}: record {line} (line {line}, byte {offset + bad}) is not UTF-8 text. "
                    "Re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`) or remove that record."
                ) from None
            line += chunk.count(b"\n")
            offset += len(chunk)


def load_file(path: str) -> datasets.IterableDataset:
    """One data file as a streamed dataset of raw records."""
    builder = "parquet" if path.endswith(".parquet") else "json"
    try:
        return datasets.load_dataset(builder, data_files=[path], split="train", streaming=True)
    except Exception as exc:
        raise RouterTuneError(f"{path}: cannot be read as {builder} ({type(exc).__name__}: {exc}).") from exc


def _source_type(path: Path) -> str:
    """redpajama for .jsonl text, wizard_vicuna for .json chats (a directory: by the files in it)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES)]
    kinds = {"redpajama" if ".jsonl" in p.name else "wizard_vicuna" if ".json" in p.name else "?" for p in files}
    if len(kinds) != 1 or "?" in kinds:
        found = ", ".join(sorted({p.suffix for p in files})) or "no data file"
        raise RouterTuneError(
            f"--data {path}: cannot tell its source type ({found}). Give .jsonl files with a "
            "`text` field (RedPajama) or .json Wizard-Vicuna chats, one kind per directory, "
            "or a recipe YAML whose `datasets` say what each source is."
        )
    return kinds.pop()


def sources_from_files(paths: list[str]) -> list[dict]:
    """`datasets` entries for data files / directories given on the command line (see --help)."""
    entries, names = [], set()
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise RouterTuneError(f"--data {raw}: no such file or directory.")
        kind = _source_type(path)
        name, n = path.name.split(".")[0] or kind, 2
        while name in names:
            name, n = f"{path.name.split('.')[0]}_{n}", n + 1
        names.add(name)
        entries.append(
            {
                "source": kind,
                "path": str(path),
                "name": name,
                **({"template": "vicuna_v1.1"} if kind == "wizard_vicuna" else {}),
            }
        )
    return entries
