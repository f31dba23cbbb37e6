"""The held-out rule: which whole documents are kept out of training, everywhere.

The data pipeline and `scripts/make_demo_model.py` both call `is_heldout`, so a document
used to measure perplexity is never trained on, by the routers or by the demo experts.
"""

from __future__ import annotations

import hashlib
import json


def is_heldout(doc_key: str, fraction: float) -> bool:
    """True when the document belongs to the held-out (evaluation) split.

    Args:
        doc_key: the document's key: its text for text sources, `chat_doc_key(...)` for chats.
        fraction: share of documents held out, in [0, 1].

    The key is the document's content, not its position or id: the split does not change
    when files are reordered, sharded or streamed, and exact duplicates (common in web text
    and in ShareGPT-style dumps, whose ids differ) always land on the same side.
    """
    return int(hashlib.sha256(doc_key.encode("utf-8")).hexdigest()[:12], 16) / 16**12 < fraction


def chat_doc_key(conversation: list) -> str:
    """The held-out key of a chat: the JSON of its turns as `[speaker, text]` pairs, in the order
    and with the speaker names stored in the source record (`record["conversations"]`, turns
    `{"from", "value"}` or `{"role", "content"}`), e.g. `[["human","Hi"],["gpt","Hello!"]]`.

    The record's `id` is deliberately not used: ids are not unique across dumps, while the content
    is what must never be both trained on and evaluated. Other keys of a turn are ignored, so the
    key is the same whether the file is read with `json` or with `datasets` (which fills absent
    keys with None).
    """
    pairs = [
        [t.get("from", t.get("role")), t.get("value", t.get("content"))] if isinstance(t, dict) else t
        for t in conversation
    ]
    return json.dumps(pairs, ensure_ascii=False, separators=(",", ":"))
