"""Documents -> token ids and labels: texts as <s> text </s>, chats through a chat template.

Labels follow transformers' convention (aligned with input_ids, shifted inside the loss); -100
marks tokens that are not predicted. With `assistant_only_loss`, only the assistant answers (and
their closing end-of-turn token) are predicted: found by the template's {% generation %} markers
where it has them (the shipped Vicuna template), else by rendering the chat turn by turn (ChatML and
most tokenizers' own templates, SmolLM2's and Qwen's included, have no markers).
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
            loss with a template without {% generation %} markers on a slow tokenizer (answers are
            then found from character offsets, which only fast tokenizers give).
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
    if spec.assistant_only_loss and not _GENERATION_TAG.search(template) and not getattr(tokenizer, "is_fast", False):
        raise RouterTuneError(
            f"Dataset {spec.name!r}: the tokenizer's chat template has no {{% generation %}} markers and "
            "the tokenizer is not a fast one, so assistant turns cannot be found from character offsets. "
            "Set `assistant_only_loss: false`, or use `template: vicuna_v1.1`."
        )
    return template


def has_generation_markers(template: str) -> bool:
    return bool(_GENERATION_TAG.search(template))


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
    if assistant_only and not has_generation_markers(template):
        return _tokenize_chats_by_turns(tokenizer, chats, template)
    out = tokenizer.apply_chat_template(
        chats, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=assistant_only
    )
    ids = [list(i) for i in out["input_ids"]]
    if not assistant_only:
        return ids, [list(i) for i in ids]
    labels = [[t if m else IGNORE_INDEX for t, m in zip(i, mask)] for i, mask in zip(ids, out["assistant_masks"])]
    return ids, labels


def assistant_spans(tokenizer, chat: list[dict], template: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character spans of its assistant answers, for templates without
    {% generation %} markers (transformers' `return_assistant_tokens_mask` needs them).

    Each answer is what rendering the chat up to and including it adds to the chat up to it with the
    generation prompt: the answer and its end-of-turn token (e.g. "Paris.<|im_end|>"), without the
    whitespace a template writes after a turn (ChatML's newline, which the model never generates).
    This is the "completion only" rule that TRL applies to chat templates, done on characters.

    Raises:
        RouterTuneError: the template does not render a chat as the concatenation of its turns (e.g.
            it rewrites earlier turns), so the answers cannot be found this way.
    """

    def render(messages: list[dict], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )

    full = render(chat, False)
    spans = []
    for i, message in enumerate(chat):
        if message.get("role") != "assistant":
            continue
        before = render(chat[:i], True)
        through = render(chat[: i + 1], False)
        if not (through.startswith(before) and full.startswith(through)):
            raise RouterTuneError(
                f"The chat template does not render turn {i} of a chat as a continuation of the turns before it "
                "(it has no {% generation %} markers either), so assistant answers cannot be found. Set "
                "`assistant_only_loss: false` for this dataset, or use `template: vicuna_v1.1`."
            )
        spans.append((len(before), len(through.rstrip())))
    return full, spans


def _tokenize_chats_by_turns(tokenizer, chats: list[list[dict]], template: str):
    """Assistant-only labels from `assistant_spans`: a token is predicted when its characters overlap
    an answer (transformers' rule for {% generation %} spans). The ids are those of
    `apply_chat_template(tokenize=True)`: the rendered text tokenized without special tokens added."""
    rendered = [assistant_spans(tokenizer, chat, template) for chat in chats]
    encoded = tokenizer(
        [text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True, verbose=False
    )
    ids, labels = [], []
    for (_, spans), tokens, offsets in zip(rendered, encoded["input_ids"], encoded["offset_mapping"]):
        ids.append(list(tokens))
        labels.append(
            [
                t if any(o[0] < end and o[1] > start for start, end in spans) else IGNORE_INDEX
                for t, o in zip(tokens, offsets)
            ]
        )
    return ids, labels
