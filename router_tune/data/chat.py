"""Documents -> token ids and labels: texts as <s> text </s>, chats through a chat template.

Labels follow transformers' convention (aligned with input_ids, shifted inside the loss); -100
marks tokens that are not predicted. With `assistant_only_loss`, only the assistant answers (and
their closing "</s>") are predicted, found by the template's {% generation %} markers.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

from router_tune.data.sources import SourceSpec
from router_tune.errors import RouterTuneError

IGNORE_INDEX = -100
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


@cache
def vicuna_template() -> str:
    """The shipped Vicuna v1.1 chat template (FastChat's format), as Jinja text."""
    return resources.files("router_tune").joinpath("templates/vicuna_v1.1.jinja").read_text(encoding="utf-8")


def chat_template_for(spec: SourceSpec, tokenizer) -> str:
    """The Jinja template a chat source renders with.

    Raises:
        RouterTuneError: `template: tokenizer` with a tokenizer that has none, or assistant-only
            loss with a template that does not mark assistant turns with {% generation %}.
    """
    if spec.template == "vicuna_v1.1":
        return vicuna_template()
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise RouterTuneError(
            f"Dataset {spec.name!r}: `template: tokenizer` but the tokenizer has no chat "
            "template. Use `template: vicuna_v1.1` or a tokenizer that ships one."
        )
    if spec.assistant_only_loss and not _GENERATION_TAG.search(template):
        raise RouterTuneError(
            f"Dataset {spec.name!r}: the tokenizer's chat template has no {{% generation %}} "
            "markers, so assistant turns cannot be found. Set `assistant_only_loss: false` "
            "or use `template: vicuna_v1.1`."
        )
    return template


def tokenize_texts(tokenizer, texts: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    """Each text as [bos] + tokens + [eos] (each where the tokenizer has one); every token a target."""
    if not texts:  # every document of the batch held out or malformed (the tokenizer refuses [])
        return [], []
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    head = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    tail = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = [head + e + tail for e in encoded]
    return ids, [list(i) for i in ids]


def tokenize_chats(
    tokenizer, chats: list[list[dict]], template: str, assistant_only: bool
) -> tuple[list[list[int]], list[list[int]]]:
    """Render and tokenize chats with `apply_chat_template` in one batch."""
    if not chats:
        return [], []
    out = tokenizer.apply_chat_template(
        chats, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=assistant_only
    )
    ids = [list(i) for i in out["input_ids"]]
    if not assistant_only:
        return ids, [list(i) for i in ids]
    labels = [[t if m else IGNORE_INDEX for t, m in zip(i, mask)] for i, mask in zip(ids, out["assistant_masks"])]
    return ids, labels
