"""router_tune.data: sources, Vicuna template, packing, mixture, held-out split, errors."""

from __future__ import annotations

import copy
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig

from router_tune.data import (
    IGNORE_INDEX,
    build_eval_blocks,
    build_train_dataset,
    chat_doc_key,
    check_block_size,
    collate_blocks,
    is_heldout,
    parse_sources,
    pipeline_throughput,
    source_names,
)
from router_tune.data.pipeline import source_blocks
from router_tune.errors import RouterTuneError
from tests import factories

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
)
SAMPLES = Path(__file__).parent.parent / "router_tune" / "assets" / "samples"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return factories.make_tokenizer(tmp_path_factory.mktemp("tok"))


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def redpajama_file(d: Path, n=120, subset="github") -> Path:
    sets = {"github": "RedPajamaGithub", "book": "RedPajamaBook"}
    return write_jsonl(
        d / f"{subset}_sample.jsonl",
        [
            {
                "text": f"{subset} document {i}: " + "word " * (i % 13 + 1),
                "meta": json.dumps({"redpajama_set_name": sets[subset]})
                if i % 2
                else {"redpajama_set_name": sets[subset]},
            }
            for i in range(n)
        ],
    )


def wizard_file(d: Path, n=150) -> Path:
    path = d / "wizard_vicuna_dataset_unfiltered.json"
    path.write_text(
        json.dumps(
            [
                {
                    "id": f"id{i}",
                    "conversations": [
                        {"from": "human", "value": f"What is {i} plus one?"},
                        {"from": "gpt", "value": f"It is {i + 1}."},
                    ],
                }
                for i in range(n)
            ]
        )
    )
    return path


def specs_for(*entries):
    return parse_sources(list(entries))


def train_blocks(specs, tok, block_size=64, **kw):
    return list(build_train_dataset(specs, tok, block_size, **kw))


def test_vicuna_renders_fastchat_format_exactly(tok):
    chat = [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi, how can I help?"},
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
    ]
    from router_tune.data import vicuna_template

    rendered = tok.apply_chat_template(chat, chat_template=vicuna_template(), tokenize=False)
    assert rendered == (
        "<s>" + SYSTEM + " USER: Hello! ASSISTANT: Hi, how can I help?</s>USER: Name a color. ASSISTANT: Blue.</s>"
    )
    prompt = tok.apply_chat_template(
        chat[:1], chat_template=vicuna_template(), tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<s>" + SYSTEM + " USER: Hello! ASSISTANT:"


def test_assistant_only_labels(tmp_path, tok):
    (spec,) = specs_for({"source": "wizard_vicuna", "path": str(wizard_file(tmp_path, 3))})
    blocks = list(source_blocks(spec, 0, tok, 4096, heldout=False, eval_fraction=0.0))
    targets = [t for t, lab in zip(blocks[0]["input_ids"], blocks[0]["labels"]) if lab != IGNORE_INDEX]
    assert tok.decode(targets) == "It is 1.</s>It is 2.</s>It is 3.</s>"
    (full,) = specs_for(
        {
            "source": "wizard_vicuna",
            "path": str(tmp_path / "wizard_vicuna_dataset_unfiltered.json"),
            "assistant_only_loss": False,
        }
    )
    block = next(iter(source_blocks(full, 0, tok, 4096, heldout=False, eval_fraction=0.0)))
    n_docs = block["position_ids"].count(0) - (0 if block["token_mask"][-1] else 1)
    assert sum(lab != IGNORE_INDEX for lab in block["labels"]) == sum(block["token_mask"]) - n_docs


def test_assistant_only_loss_with_a_template_without_generation_markers(tmp_path, tok):
    """`template: tokenizer` with ChatML: answers found by rendering turn by turn, the same labels as
    transformers' mask from {% generation %} markers, and the chat trains (it was refused)."""
    from router_tune.data import chat

    chats = [
        [
            {"role": "user", "content": "What is 1 + 1?"},
            {"role": "assistant", "content": "It is 2."},
            {"role": "user", "content": "And 2 + 2?\nThink."},
            {"role": "assistant", "content": "It is 4,\n  certainly."},
        ],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
        ],
    ]
    ids, labels = chat.tokenize_chats(tok, chats, factories.CHATML, assistant_only=True)
    ref_ids, ref_labels = chat.tokenize_chats(tok, chats, factories.CHATML_MARKED, assistant_only=True)
    assert ids == ref_ids and labels == ref_labels
    targets = tok.decode([t for t, lab in zip(ids[0], labels[0]) if lab != IGNORE_INDEX])
    assert targets == "It is 2.<|im_end|>It is 4,\n  certainly.<|im_end|>"

    tok = copy.deepcopy(tok)  # the fixture is shared: its own template stays unset for the other tests
    tok.chat_template = factories.CHATML
    records = [
        {"id": str(i), "conversations": [{"from": "human", "value": f"Q{i}?"}, {"from": "gpt", "value": f"A{i}."}]}
        for i in range(3)
    ]
    path = tmp_path / "chatml.json"
    path.write_text(json.dumps(records))
    (spec,) = specs_for({"source": "wizard_vicuna", "path": str(path), "template": "tokenizer"})
    block = next(iter(source_blocks(spec, 0, tok, 4096, heldout=False, eval_fraction=0.0)))
    predicted = tok.decode([t for t, lab in zip(block["input_ids"], block["labels"]) if lab != IGNORE_INDEX])
    assert predicted == "A0.<|im_end|>A1.<|im_end|>A2.<|im_end|>"


def test_a_template_that_rewrites_earlier_turns_is_refused_for_assistant_only_loss(tok):
    from router_tune.data import chat

    # Shows only the last answer's text in full: earlier turns render differently once a later one exists.
    rewriting = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}{{ '[...]' }}"
        "{% else %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
    )
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    with pytest.raises(RouterTuneError, match="assistant_only_loss: false"):
        chat.tokenize_chats(tok, [turns], rewriting, assistant_only=True)


def test_schema_round_trips_each_source(tmp_path, tok):
    rp = redpajama_file(tmp_path, 4)
    text = write_jsonl(tmp_path / "plain.jsonl", [{"body": "alpha beta"}, {"body": "gamma"}])
    share = write_jsonl(
        tmp_path / "share.jsonl",
        [
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "bot", "content": "Yo"},
                ]
            }
        ],
    )
    specs = specs_for(
        {"source": "redpajama", "path": str(rp)},
        {"source": "text", "path": str(text), "field": "body"},
        {
            "source": "sharegpt",
            "path": str(share),
            "field": "messages",
            "roles": {"user": "user", "bot": "assistant", "system": "system"},
        },
        {"source": "wizard_vicuna", "path": str(wizard_file(tmp_path, 1))},
    )
    assert source_names(specs) == ["redpajama", "text", "sharegpt", "wizard_vicuna"]
    decoded = []
    for i, spec in enumerate(specs):
        (block,) = source_blocks(spec, i, tok, 4096, heldout=False, eval_fraction=0.0)
        assert block["source_id"] == i
        decoded.append(tok.decode([t for t, m in zip(block["input_ids"], block["token_mask"]) if m]))
    assert decoded[0] == "".join(f"<s>github document {i}: " + "word " * (i + 1) + "</s>" for i in range(4))
    assert decoded[1] == "<s>alpha beta</s><s>gamma</s>"
    assert decoded[2] == "<s>Be brief. USER: Hi ASSISTANT: Yo</s>"
    assert decoded[3] == "<s>" + SYSTEM + " USER: What is 0 plus one? ASSISTANT: It is 1.</s>"


def test_redpajama_subset_filter(tmp_path, tok):
    redpajama_file(tmp_path, 6, "github")
    mixed = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"text": "a book", "meta": {"redpajama_set_name": "RedPajamaBook"}},
            {"text": "code", "meta": '{"redpajama_set_name": "RedPajamaGithub"}'},
        ],
    )
    (spec,) = specs_for({"source": "redpajama", "path": str(tmp_path), "subsets": ["book"]})
    (block,) = source_blocks(spec, 0, tok, 4096, heldout=False, eval_fraction=0.0)
    assert tok.decode([t for t, m in zip(block["input_ids"], block["token_mask"]) if m]) == "<s>a book</s>"
    assert mixed.exists()


def test_packing_keeps_every_token_once_and_cuts_attention(tmp_path, tok):
    (spec,) = specs_for({"source": "redpajama", "path": str(redpajama_file(tmp_path, 40))})
    docs = [
        tok(f"github document {i}: " + "word " * (i % 13 + 1), add_special_tokens=False)["input_ids"] for i in range(40)
    ]
    stream = [t for d in docs for t in [tok.bos_token_id, *d, tok.eos_token_id]]
    blocks = list(source_blocks(spec, 0, tok, 32, heldout=False, eval_fraction=0.0))
    assert all(len(b["input_ids"]) == 32 for b in blocks)
    packed = [t for b in blocks for t, m in zip(b["input_ids"], b["token_mask"]) if m]
    assert packed == stream
    assert sum(1 - m for b in blocks for m in b["token_mask"]) < 32  # only the last block is padded
    for b in blocks:  # each segment restarts at position 0 and its first token is never a target
        for i, p in enumerate(b["position_ids"]):
            assert p == 0 or b["position_ids"][i - 1] == p - 1
            if p == 0:
                assert b["labels"][i] == IGNORE_INDEX
            elif b["token_mask"][i]:
                assert b["labels"][i] == b["input_ids"][i]


def test_packed_block_logits_equal_documents_alone(tmp_path, tok):
    model = AutoModelForCausalLM.from_pretrained(factories.mixtral(tmp_path / "m")).eval()
    a, b = [1, 40, 41, 42, 43, 2], [1, 50, 51, 52, 2]  # use_cache=False: a cache turns packing detection off
    with torch.no_grad():
        packed = model(
            input_ids=torch.tensor([a + b]), position_ids=torch.tensor([[*range(6), *range(5)]]), use_cache=False
        ).logits[0]
        alone_b = model(input_ids=torch.tensor([b]), use_cache=False).logits[0]
        alone_a = model(input_ids=torch.tensor([a]), use_cache=False).logits[0]
        leaky = model(input_ids=torch.tensor([a + b]), use_cache=False).logits[0]
    torch.testing.assert_close(packed[:6], alone_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[6:], alone_b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(leaky[6:], alone_b, atol=1e-3)


def test_mixture_proportions_seed_and_resume(tmp_path, tok):
    specs = specs_for(
        {"source": "redpajama", "path": str(redpajama_file(tmp_path, 400)), "weight": 0.75},
        {"source": "wizard_vicuna", "path": str(wizard_file(tmp_path, 400)), "weight": 0.25},
    )
    blocks = train_blocks(specs, tok, 16, seed=3)
    counts = Counter(b["source_id"] for b in blocks[:1500])
    assert abs(counts[0] / 1500 - 0.75) < 0.04
    again = build_train_dataset(specs, tok, 16, seed=3, check=False)
    assert list(again.take(50)) == blocks[:50]
    assert [b["source_id"] for b in build_train_dataset(specs, tok, 16, seed=4).take(50)] != [
        b["source_id"] for b in blocks[:50]
    ]
    assert list(again.skip(777).take(3)) == blocks[777:780]
    batch = collate_blocks(blocks[:4])
    assert batch["input_ids"].shape == (4, 16) and batch["source_id"].tolist() == [b["source_id"] for b in blocks[:4]]


def test_heldout_documents_never_in_training(tmp_path, tok):
    texts = [f"github document {i}: " + "word " * (i % 13 + 1) for i in range(120)]
    held = {t for t in texts if is_heldout(t, 0.2)}
    assert 5 < len(held) < 50
    specs = specs_for({"source": "redpajama", "path": str(redpajama_file(tmp_path, 120))})
    seen = tok.decode(
        [
            t
            for b in train_blocks(specs, tok, 4096, eval_fraction=0.2)
            for t, m in zip(b["input_ids"], b["token_mask"])
            if m
        ]
    )
    evald = tok.decode(
        [
            t
            for b in build_eval_blocks(specs, tok, 4096, eval_fraction=0.2)["redpajama"]
            for t, m in zip(b["input_ids"], b["token_mask"])
            if m
        ]
    )
    assert sorted(seen.split("</s>")[:-1] + evald.split("</s>")[:-1]) == sorted("<s>" + t for t in texts)
    assert all(("<s>" + t + "</s>") in evald and ("<s>" + t + "</s>") not in seen for t in held)
    chat = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]
    assert chat_doc_key(chat) == '[["human","hi"],["gpt","yo"]]'


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"source": "redpajama", "path": "x.jsonl", "wieght": 1}, "Did you mean 'weight'"),
        ({"source": "redpajamas", "path": "x.jsonl"}, "Did you mean 'redpajama'"),
        ({"source": "text", "path": "x.jsonl", "weight": 0}, "weight must be a positive number"),
        ({"source": "text", "path": "x.jsonl", "weight": -1.5}, "weight must be a positive number"),
        ({"source": "redpajama", "path": "x", "subsets": ["githab"]}, "Did you mean 'github'"),
        ({"source": "sharegpt", "path": "x", "roles": {"human": "usr"}}, "Did you mean 'user'"),
    ],
)
def test_spec_errors(entry, message):
    with pytest.raises(RouterTuneError, match=message):
        parse_sources([entry])


def test_record_errors_name_file_and_record(tmp_path, tok):
    def fails(entry, message, **kw):
        with pytest.raises(RouterTuneError, match=message):
            build_train_dataset(specs_for(entry), tok, 32, **kw)

    fails({"source": "text", "path": str(tmp_path / "missing.jsonl")}, "file not found")
    missing = write_jsonl(tmp_path / "m.jsonl", [{"text": "ok"}, {"txt": "oops"}])
    fails({"source": "text", "path": str(missing)}, r"m\.jsonl: record 2: the record has no 'text' field")
    roles = write_jsonl(tmp_path / "r.jsonl", [{"id": "a", "conversations": [{"from": "bot", "value": "x"}]}])
    fails({"source": "wizard_vicuna", "path": str(roles)}, r"r\.jsonl: record 1: turn 0 has unknown role 'bot'")
    empty = write_jsonl(
        tmp_path / "e.jsonl",
        [
            {"id": "a", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
            {"id": "b", "conversations": []},
        ],
    )
    fails({"source": "wizard_vicuna", "path": str(empty)}, r"e\.jsonl: record 2: empty conversation")
    latin = tmp_path / "l.jsonl"
    latin.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    fails({"source": "text", "path": str(latin)}, r"l\.jsonl: record 2 \(line 2.*not UTF-8")
    with pytest.warns(UserWarning, match="text: 1"):
        blocks = train_blocks(specs_for({"source": "text", "path": str(missing)}), tok, 32, max_bad_records=1)
    assert tok.decode([t for t, m in zip(blocks[0]["input_ids"], blocks[0]["token_mask"]) if m]) == "<s>ok</s>"
    with pytest.raises(RouterTuneError, match="tokenizer has no chat template"):
        build_train_dataset(
            specs_for({"source": "wizard_vicuna", "path": str(empty), "template": "tokenizer"}), tok, 32, check=False
        )
    two = write_jsonl(tmp_path / "two.jsonl", [{"text": "ok"}, {"text": "more"}])
    (capped,) = specs_for({"source": "text", "path": str(two), "max_documents": 1})
    (block,) = source_blocks(capped, 0, tok, 32, heldout=False, eval_fraction=0.0)
    assert tok.decode([t for t, m in zip(block["input_ids"], block["token_mask"]) if m]) == "<s>ok</s>"
    with pytest.raises(RouterTuneError, match="larger than the model takes"):
        check_block_size(4096, MixtralConfig(max_position_embeddings=2048))
    check_block_size(2048, MixtralConfig(max_position_embeddings=2048))


def test_hub_id_unreachable_is_a_clear_error(tok, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RouterTuneError, match="Download its data files"):
        build_train_dataset(
            specs_for({"source": "redpajama", "path": "togethercomputer/RedPajama-Data-1T-Sample"}), tok, 32
        )


@pytest.mark.skipif(
    not (SAMPLES / "redpajama").is_dir() or not (SAMPLES / "wizard_vicuna").is_dir(), reason="bundled samples not built"
)
def test_recipe_sources_over_bundled_samples(tok):
    specs = parse_sources(
        [
            {"source": "redpajama", "path": str(SAMPLES / "redpajama"), "weight": 0.7},
            {
                "source": "wizard_vicuna",
                "path": str(SAMPLES / "wizard_vicuna"),
                "weight": 0.3,
                "template": "vicuna_v1.1",
            },
        ]
    )
    blocks = list(build_train_dataset(specs, tok, 256, check=False).take(40))
    assert len(blocks) == 40 and {b["source_id"] for b in blocks} == {0, 1}
    assert all(len(b["input_ids"]) == 256 and all(b["token_mask"]) for b in blocks)
    assert pipeline_throughput(specs, tok, 256, 20) > 0


def test_shuffle_buffer_breaks_up_long_documents_and_keeps_every_block(tmp_path, tok):
    """Packing cuts a long document into consecutive blocks; the shuffle buffer spreads them over
    the stream, keeps every block exactly once, and is the same order for the same seed (resume)."""
    long_docs = [
        # no trailing space: a document's last block then ends on its digit however the tokenizer cuts it
        {"text": f"doc{i} " + " ".join([f"w{i}"] * 300), "meta": {"redpajama_set_name": "RedPajamaGithub"}}
        for i in range(6)
    ]
    specs = specs_for({"source": "redpajama", "path": str(write_jsonl(tmp_path / "github_sample.jsonl", long_docs))})

    def doc_runs(blocks):
        """Mean length of runs of consecutive blocks that come from one document."""
        docs = [max(re.findall(r"\d", tok.decode(b["input_ids"]))) for b in blocks]  # doc i holds digit i only
        runs = 1 + sum(a != b for a, b in zip(docs, docs[1:]))
        return len(docs) / runs

    ordered = train_blocks(specs, tok, 16, eval_fraction=0.0)
    shuffled = train_blocks(specs, tok, 16, eval_fraction=0.0, seed=5, shuffle_buffer=64)
    # In order, a run is a whole document (~57 blocks here); a 64-block buffer holding about one document
    # at a time still breaks runs to ~2 blocks (1.7-2.2 over seeds 0-7): an order of magnitude shorter.
    assert doc_runs(ordered) > 10 and doc_runs(shuffled) < doc_runs(ordered) / 10
    key = lambda b: (tuple(b["input_ids"]), tuple(b["position_ids"]))  # noqa: E731
    assert sorted(map(key, shuffled)) == sorted(map(key, ordered))
    assert train_blocks(specs, tok, 16, eval_fraction=0.0, seed=5, shuffle_buffer=64) == shuffled


def test_document_shuffle_reads_the_whole_file_early_and_keeps_every_document(tmp_path, tok):
    """Sorted files (one subject after another, like the bundled code sample's codec tables) must not
    mean a run trains on a prefix: with the document buffer, the first documents come from all over
    the file, each document exactly once per pass, same order for the same seed (resume), files in a
    seeded order, and a malformed record is still named by its place in its file."""
    files = []
    for f in range(3):
        docs = [
            {"text": f"f{f} d{i} " + "x " * (i % 5), "meta": {"redpajama_set_name": "RedPajamaGithub"}}
            for i in range(40)
        ]
        files.append(write_jsonl(tmp_path / f"part{f}_sample.jsonl", docs))
    (spec,) = specs_for({"source": "redpajama", "path": str(tmp_path)})

    def documents(**kw):
        blocks = source_blocks(spec, 0, tok, 512, heldout=False, eval_fraction=0.0, **kw)
        text = tok.decode([t for b in blocks for t, m in zip(b["input_ids"], b["token_mask"]) if m])
        return re.findall(r"f(\d) d(\d+)", text)

    ordered = documents()
    assert ordered[:3] == [("0", "0"), ("1", "0"), ("2", "0")]  # files round-robin, each in file order
    shuffled = documents(document_shuffle_buffer=100, seed=3)
    assert sorted(shuffled) == sorted(ordered) and len(set(shuffled)) == 120
    first_half = [int(d) for _, d in shuffled[:60]]
    assert max(first_half) >= 35 and min(first_half) <= 4  # every part of the files, not a prefix
    assert documents(document_shuffle_buffer=100, seed=3) == shuffled
    assert documents(document_shuffle_buffer=100, seed=4) != shuffled
    assert documents(document_shuffle_buffer=1, seed=3) == ordered

    (tmp_path / "bad").mkdir()
    bad = tmp_path / "bad" / "x_sample.jsonl"
    bad.write_text("".join(json.dumps({"text": f"ok {i}"}) + "\n" for i in range(30)) + '{"txt": "no"}\n')
    (spec,) = specs_for({"source": "text", "path": str(bad)})
    with pytest.raises(RouterTuneError, match=r"x_sample\.jsonl: record 31"):
        list(source_blocks(spec, 0, tok, 32, heldout=False, eval_fraction=0.0, document_shuffle_buffer=50, seed=1))
