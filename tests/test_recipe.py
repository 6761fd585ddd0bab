"""Recipe schema: strict keys with suggestions, types, overrides, validation, round trip, shipped recipes."""
from __future__ import annotations

import glob
import importlib
import os
import pkgutil

import pytest
import yaml

import dpo_accel
from conftest import REPO
from dpo_accel.config.errors import RecipeError
from dpo_accel.config.load import load_recipe, parse_override, recipe_from_dict
from dpo_accel.config.schema import all_keys, dump_recipe


def test_defaults_load():
    recipe = load_recipe()
    assert recipe.loss.loss_type == "sigmoid" and recipe.train.optimizer == "adamw"
    assert "train.learning_rate" in all_keys() and "lora.lora_r" in all_keys()


@pytest.mark.parametrize("raw, message", [
    ({"train": {"learnin_rate": 1e-5}}, "unknown recipe key 'train.learnin_rate'; did you mean 'train.learning_rate'?"),
    ({"learning_rate": 1e-5}, "unknown recipe key 'learning_rate'; did you mean 'train.learning_rate'?"),
    ({"train": {"lora_r": 8}}, "did you mean 'lora.lora_r'?"),
    ({"train": {"per_device_train_batch_size": "four"}}, "must be int, got str 'four'"),
    ({"train": {"per_device_train_batch_size": True}}, "must be int"),
    ({"lora": {"use_peft": "yes"}}, "must be bool"),
    ({"train": "fast"}, "recipe section 'train' must be a mapping"),
    ({"train": {"lr_scheduler_type": "cosin"}}, "choose one of: linear, cosine, constant"),
    ({"data": {"max_length": 128, "max_prompt_length": 128}}, "must be smaller than data.max_length"),
    ({"loss": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}}, "give one weight per type"),
    ({"reference": {"mode": "adapter_off"}}, "needs lora.use_peft: true"),
    ({"train": {"max_steps": 0, "num_train_epochs": 0}}, "set train.max_steps > 0"),
])
def test_bad_recipes_fail_with_one_clear_line(raw, message):
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(raw)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_overrides_are_parsed_as_yaml_and_validated():
    assert parse_override("train.max_steps=12") == ("train.max_steps", 12)
    assert load_recipe(None, ["train.learning_rate=1e-5"]).train.learning_rate == 1e-5  # YAML 1.1 reads a string
    assert parse_override("lora.lora_target_modules=[q_proj, v_proj]")[1] == ["q_proj", "v_proj"]
    assert parse_override("train.mixed_precision=null")[1] is None
    assert load_recipe(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"  # YAML 1.1: no -> False
    recipe = load_recipe(None, ["train.learning_rate=3e-4", "lora.use_peft=true", "loss.beta=1"])
    assert recipe.train.learning_rate == 3e-4 and recipe.lora.use_peft is True
    assert isinstance(recipe.loss.beta, float)  # ints are accepted where a float is expected
    with pytest.raises(RecipeError, match="did you mean 'loss.beta'"):
        load_recipe(None, ["loss.betta=0.2"])
    with pytest.raises(RecipeError, match="must look like section.key=value"):
        load_recipe(None, ["train.learning_rate"])


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe(None, ["train.max_steps=7", "loss.loss_type=[sigmoid, sft]", "loss.loss_weights=[1, 0.5]"])
    path = tmp_path / "recipe.yaml"
    dump_recipe(recipe, str(path))
    again = recipe_from_dict(yaml.safe_load(path.read_text()))
    assert again == recipe


def test_yaml_errors_and_missing_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(str(bad))
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(str(tmp_path / "nope.yaml"))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "recipes", "*.yaml"))))
def test_shipped_recipes_validate(path):
    from dpo_accel.objectives.registry import validate_loss_config

    recipe = load_recipe(path)
    validate_loss_config(recipe.loss)
    assert "accelerate launch" in open(path).read()  # the documented command lives in the header


def test_every_module_imports():
    for info in pkgutil.iter_modules(dpo_accel.__path__):
        importlib.import_module(f"dpo_accel.{info.name}")
    from dpo_accel import concatenated_forward, preference_loss  # the seed's public contract
    assert callable(concatenated_forward) and callable(preference_loss)
