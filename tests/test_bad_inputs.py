"""Bad inputs get a clear RouterTuneError before the weights load, never a raw exception."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from router_tune.cli import main
from router_tune.data import BadRecords, build_train_dataset, collate_blocks, parse_sources
from router_tune.data import pipeline as data_pipeline
from router_tune.data.pipeline import HUB_CHECK_RECORDS, check_sources, source_blocks
from router_tune.errors import RouterTuneError
from router_tune.training import trainer as trainer_module
from router_tune.training.config import load_recipe
from tests import factories
from tests.cli_runs import write_recipe
from tests.trainers import make_trainer

SAMPLES = Path(__file__).parent.parent / "router_tune" / "assets" / "samples"


def jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def no_weights(monkeypatch):
    """Fail the test if the model's weights are loaded: the error must come before."""

    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded before the bad input was reported")

    monkeypatch.setattr(trainer_module, "load_moe", refuse)


def test_no_training_blocks_is_a_clear_error_before_loading(mixtral_legacy, tmp_path, monkeypatch):
    with pytest.raises(RouterTuneError, match="got no blocks"):
        collate_blocks([])
    no_weights(monkeypatch)
    data = jsonl(tmp_path / "tiny.jsonl", ["one short document", "and another one"])
    recipe = write_recipe(
        tmp_path, mixtral_legacy, datasets=[{"source": "text", "path": str(data)}], eval_fraction=0.99
    )
    with pytest.raises(RouterTuneError, match="there are no training blocks: every document .* held out"):
        trainer_module.RouterTrainer(args=load_recipe(recipe))


def test_tokenizer_without_bos_renders_vicuna_with_its_own_special_tokens(tmp_path):
    base = factories.make_tokenizer(tmp_path / "tok")
    qwen_like = PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    qwen_like.add_special_tokens({"eos_token": "<|endoftext|>"})
    assert qwen_like.bos_token is None
    (spec,) = parse_sources([{"source": "wizard_vicuna", "path": str(SAMPLES / "wizard_vicuna"), "max_documents": 3}])
    block = next(iter(source_blocks(spec, 0, qwen_like, 4096, heldout=False, eval_fraction=0.0)))
    ids = [i for i, m in zip(block["input_ids"], block["token_mask"]) if m]
    text = qwen_like.decode(ids)
    assert text.startswith("A chat between") and "<s>" not in text and "</s>" not in text
    targets = [t for t in block["labels"] if t != -100]
    assert qwen_like.convert_tokens_to_ids("<|endoftext|>") in targets  # each answer ends with Qwen's eos


def test_checkpoint_without_tokenizer(mixtral_legacy, tmp_path, capsys, monkeypatch):
    bare = tmp_path / "bare"
    shutil.copytree(mixtral_legacy, bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    recipe = write_recipe(tmp_path, bare)
    assert main(["train", str(recipe), "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "has no tokenizer" in err and "tokenizer_name_or_path" in err and "Traceback" not in err
    assert main(["train", str(recipe), "--dry-run", "--tokenizer_name_or_path", str(mixtral_legacy)]) == 0
    assert "dry run: nothing trained" in capsys.readouterr().out
    assert main(["inspect", str(bare), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sample"] is None and any("--tokenizer" in f for f in report["findings"])
    assert main(["inspect", str(bare), "--json", "--tokenizer", str(mixtral_legacy)]) == 0
    assert json.loads(capsys.readouterr().out)["sample"]["tokens"] > 0


def test_more_experts_per_token_than_experts(mixtral_legacy, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(mixtral_legacy, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "num_experts_per_tok": 9}))
    assert main(["inspect", str(broken)]) == 1
    err = capsys.readouterr().err
    assert "num_experts_per_tok = 9 but the model has 4 experts" in err and "Traceback" not in err


REAL_LOAD_FILE = data_pipeline.load_file


def hub_like(monkeypatch, local: Path) -> None:
    """A source whose file is on the hub (hf://), served from a local copy."""
    real_load = REAL_LOAD_FILE
    monkeypatch.setattr(data_pipeline, "resolve_files", lambda spec: ["hf://datasets/someone/corpus/" + local.name])
    monkeypatch.setattr(data_pipeline, "load_file", lambda path: real_load(str(local)))


def test_hub_sources_are_checked_up_front(tmp_path, monkeypatch):
    texts = [f"document {i}" for i in range(HUB_CHECK_RECORDS + 20)]
    early = tmp_path / "early.jsonl"
    early.write_text("".join(json.dumps({"text": t} if i != 5 else {"txt": t}) + "\n" for i, t in enumerate(texts)))
    hub_like(monkeypatch, early)
    (spec,) = parse_sources([{"source": "redpajama", "path": "someone/corpus"}])
    with pytest.raises(RouterTuneError, match=r"record 6: .*max_bad_records"):
        check_sources([spec])
    late = tmp_path / "late.jsonl"  # a bad record past the checked ones: counted while streaming
    late.write_text("".join(json.dumps({"text": t} if i != 110 else {"txt": t}) + "\n" for i, t in enumerate(texts)))
    hub_like(monkeypatch, late)
    assert check_sources([spec]) == {spec.name: 0}
    bad = BadRecords(0)
    blocks = list(build_train_dataset([spec], factories.make_tokenizer(tmp_path / "tok"), 64, bad_records=bad))
    assert blocks and len(bad.seen) == 1 and bad.over_limit()


@pytest.mark.parametrize("limit, stops", [(0, True), (1, False)])
def test_bad_records_met_while_training_stop_every_rank_or_are_reported(
    mixtral_legacy, tmp_path, monkeypatch, limit, stops
):
    """A malformed record the up-front check could not see (hub files are checked in part) is
    skipped and counted; past max_bad_records the run stops with a clear error at the next step."""
    texts = [f"def f{i}(x):\n    return x * {i}\n" * 3 for i in range(60)]
    data = tmp_path / "code.jsonl"
    data.write_text("".join(json.dumps({"text": t} if i != 3 else {"txt": t}) + "\n" for i, t in enumerate(texts)))
    monkeypatch.setattr(trainer_module.data, "build_train_dataset", _unchecked(trainer_module.data.build_train_dataset))
    trainer = make_trainer(
        mixtral_legacy,
        tmp_path / "run",
        data=None,
        datasets=[{"source": "text", "path": str(data)}],
        block_size=32,
        max_bad_records=limit,
        eval_fraction=0.0,
    )
    if stops:
        with pytest.raises(RouterTuneError, match="more malformed records than max_bad_records"):
            trainer.train()
    else:
        trainer.train()
        assert trainer.run_info()["skipped_records"] == 1


def _unchecked(build):
    def without_up_front_check(*args, **kwargs):
        return build(*args, **{**kwargs, "check": False})

    return without_up_front_check
