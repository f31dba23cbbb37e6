"""The private transformers.Trainer API that RouterTrainer overrides still exists as overridden."""

from __future__ import annotations

import inspect

import pytest
from transformers import Trainer, TrainingArguments

from router_tune.training import trainer_overrides
from router_tune.training.trainer import RouterTrainer
from router_tune.training.trainer_overrides import OVERRIDDEN, TrainerOverrides, private_api_problems


def test_installed_transformers_matches_every_override():
    assert private_api_problems() == []


def test_every_private_override_is_listed_and_reached():
    """Each private Trainer method RouterTrainer defines is in OVERRIDDEN, defined in TrainerOverrides
    (one module), and is what a RouterTrainer calls."""
    own = {
        name
        for klass in RouterTrainer.__mro__
        if klass not in Trainer.__mro__
        for name, value in vars(klass).items()
        if name.startswith("_") and not name.startswith("__") and callable(value) and hasattr(Trainer, name)
    }
    assert own == set(OVERRIDDEN)
    for name in OVERRIDDEN:
        assert getattr(RouterTrainer, name) is vars(TrainerOverrides)[name], name


def _renamed(name: str) -> type:
    """A Trainer as a release that renamed `name` would ship it."""
    namespace = {n: v for n, v in vars(Trainer).items() if n != name}
    namespace[f"{name}_v2"] = vars(Trainer)[name]
    return type("Trainer", (), namespace)


@pytest.mark.parametrize("name", sorted(OVERRIDDEN))
def test_a_renamed_method_fails_loudly_naming_it(name):
    problems = private_api_problems(_renamed(name))
    assert problems == [f"transformers.Trainer.{name} no longer exists (RouterTrainer overrides or calls it)"]


@pytest.mark.parametrize("name", sorted(OVERRIDDEN))
def test_a_new_signature_fails_naming_the_method(name):
    def changed(self, *args, extra=None, **kwargs):
        pass

    cls = type("Trainer", (), {**vars(Trainer), name: changed})
    problems = private_api_problems(cls)
    assert len(problems) == 1 and f"Trainer.{name} now takes" in problems[0]


def test_a_removed_attribute_or_argument_is_named():
    cls = type("Trainer", (), {**vars(Trainer), "_get_output_dir": None})
    assert any("_get_output_dir" in p for p in private_api_problems(cls))
    args = type("TrainingArguments", (), {"__dataclass_fields__": {}})
    assert private_api_problems(Trainer, args) == [
        "TrainingArguments.save_only_model no longer exists (RouterTrainer flips it)"
    ]
    assert "save_only_model" in inspect.signature(TrainingArguments).parameters


def test_deepspeed_engine_takes_the_keywords_we_pass():
    engine = pytest.importorskip("deepspeed.runtime.engine").DeepSpeedEngine
    assert trainer_overrides.deepspeed_api_problems(engine) == []

    class Renamed:
        def load_checkpoint(self, load_dir, strict=True):
            pass

        save_checkpoint = engine.save_checkpoint

    assert trainer_overrides.deepspeed_api_problems(Renamed) == [
        "DeepSpeedEngine.load_checkpoint no longer takes `load_module_strict` (RouterTrainer passes it)"
    ]
