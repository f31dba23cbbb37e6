"""One raw record of a source -> one document (a text, or a chat as role/content messages).

The upstream schemas, as the published datasets store them:
- redpajama: `{"text", "meta"}`, meta a JSON string or a dict, its `redpajama_set_name` naming
  the subset (else the file name does: `github_sample.jsonl`).
- wizard_vicuna: `{"id", "conversations": [{"from": "human"|"gpt", "value"}]}`.
- text: any record with a string field (`field`, default "text").
- sharegpt: `{field: [{"from", "value"} or {"role", "content"}]}` with speakers mapped by `roles`.
"""

from __future__ import annotations

import json

from router_tune.data.sources import REDPAJAMA_SETS, SourceSpec, redpajama_subset_of_file
from router_tune.data.split import chat_doc_key


class BadRecord(ValueError):
    """A malformed record; the message says what is wrong and how to fix it (no location)."""


def _text(record: dict, key: str) -> str:
    value = record.get(key)
    if value is None:
        present = ", ".join(sorted(k for k, v in record.items() if v is not None)) or "none"
        raise BadRecord(
            f"the record has no {key!r} field (fields present: {present}); "
            f"set `field` to the field that holds the text or fix the record"
        )
    if not isinstance(value, str):
        raise BadRecord(f"field {key!r} is a {type(value).__name__}, not a string")
    return value


def redpajama_subset(record: dict, path: str) -> str | None:
    meta = record.get("meta")
    if isinstance(meta, str):
        try:
            meta = json.loads(meta) if meta.strip() else {}
        except json.JSONDecodeError as exc:
            raise BadRecord(f"`meta` is not valid JSON ({exc})") from None
    name = meta.get("redpajama_set_name") if isinstance(meta, dict) else None
    return REDPAJAMA_SETS.get(name, redpajama_subset_of_file(path)) if name else redpajama_subset_of_file(path)


def _messages(spec: SourceSpec, turns) -> list[dict]:
    if turns is None:
        raise BadRecord(
            f"the record has no {spec.field if spec.source == 'sharegpt' else 'conversations'!r} "
            "field holding the conversation"
        )
    if not isinstance(turns, list) or not turns:
        raise BadRecord("empty conversation: it needs at least one user turn and one assistant turn")
    messages = []
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRecord(f"turn {t} is a {type(turn).__name__}, not a mapping")
        speaker = turn.get("from", turn.get("role"))
        content = turn.get("value", turn.get("content"))
        if speaker not in spec.roles:
            raise BadRecord(
                f"turn {t} has unknown role {speaker!r}; known roles: {sorted(spec.roles)}. "
                + (
                    "Use source: sharegpt with `roles: {...}` mapping every speaker to user/assistant/system"
                    if spec.source == "wizard_vicuna"
                    else f"Add it to `roles`, e.g. roles: {{{speaker}: user}}"
                )
            )
        if not isinstance(content, str):
            raise BadRecord(f"turn {t} has no text (`value` or `content`)")
        messages.append({"role": spec.roles[speaker], "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("the conversation has no assistant turn: nothing to learn from")
    return messages


def normalise(spec: SourceSpec, record: dict, path: str) -> tuple[str, str | list[dict]] | None:
    """(held-out key, document) for a record, or None when a subset filter excludes it.

    Raises:
        BadRecord: the record does not follow the source's schema.
    """
    if spec.source == "redpajama":
        text = _text(record, "text")
        if spec.subsets and redpajama_subset(record, path) not in spec.subsets:
            return None
        return text, text
    if spec.source == "text":
        text = _text(record, spec.field)
        return text, text
    turns = record.get("conversations" if spec.source == "wizard_vicuna" else spec.field)
    messages = _messages(spec, turns)
    return chat_doc_key(turns), messages
