"""Flat alignment-handbook / TRL recipes loaded as they are (dpo_accel/handbook.py).

Proves: every key of both shipped handbook-style recipes maps to the section key and value asserted
here, or is listed as ignored with a reason; the mapping is printed once (main process only); an
unknown flat key gets a did-you-mean; the handbook's own zephyr DPO QLoRA recipe (older
dataset_mixer / dataset_splits keys) loads; an ORPO recipe trains ORPO with beta as its lambda, and
only an explicit loss_type or the handbook's orpo/ layout makes one (never a substring of the file name); keys a
flat file leaves out take TRL's defaults; max_completion_length sets max_length when that is not given;
both shipped recipes run end to end on a tiny model with only the model path (and the output
folder) overridden.
"""
from __future__ import annotations

import math
import os

import pytest
import yaml

from conftest import REPO
from dpo_accel.config import handbook
from dpo_accel.config.errors import RecipeError
from dpo_accel.config.load import load_recipe

RECIPES = {name: os.path.join(REPO, "recipes", f"handbook_{name}.yaml") for name in ("dpo", "orpo")}

# Keys whose value changes on the way (every other mapped key must carry its value unchanged).
CONVERTED_VALUES = {
    "bf16": ("train.mixed_precision", "bf16"),
    "optim": ("train.optimizer", "adamw"),
    "save_strategy": ("train.save_steps", 0),  # the ORPO recipe's "no"
}


def get(recipe, dotted: str):
    section, leaf = dotted.split(".")
    return getattr(getattr(recipe, section), leaf)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_key_of_the_shipped_recipes_maps_or_is_ignored(name):
    path = RECIPES[name]
    with open(path) as f:
        raw = yaml.safe_load(f)
    _, rows = handbook.from_flat(raw, path)
    recipe = load_recipe(path)
    by_key = {key: (target, note) for key, target, note in rows}
    assert set(raw) <= set(by_key)
    for key, value in raw.items():
        target, note = by_key[key]
        if target is None:  # ignored always, or for this value (save_strategy: steps), with the reason
            assert note == handbook.IGNORED[key] if key in handbook.IGNORED else key in handbook.CONVERTED and note
            continue
        got = get(recipe, target)
        if key == "beta" and name == "orpo":
            assert target == "loss.orpo_lambda" and got == value
        elif key in CONVERTED_VALUES:
            assert (target, got) == CONVERTED_VALUES[key], key
        elif key == "dataset_mixture":
            assert got == value  # seed given, so carried over unchanged
        elif isinstance(value, float) or isinstance(got, float):
            assert math.isclose(got, value), key
        else:
            assert got == value, key
    ignored = sorted(k for k, t, _ in rows if t is None)
    if name == "dpo":
        assert ignored == ["eval_strategy", "gradient_checkpointing_kwargs", "hub_strategy", "log_level",
                           "model_revision", "save_strategy"]
        assert recipe.loss.loss_type == "sigmoid" and recipe.loss.rpo_alpha == 1.0
    else:
        assert ignored == ["gradient_checkpointing_kwargs", "log_level"]
        assert recipe.loss.loss_type == "orpo" and recipe.model.gradient_checkpointing
        from dpo_accel.objectives.registry import needs_reference
        from dpo_accel.model.reference import resolve_mode

        assert resolve_mode(recipe, needs_reference(recipe.loss)) == "none"


def test_mapping_is_printed_once_and_only_on_the_main_process(capsys, monkeypatch):
    load_recipe(RECIPES["dpo"])
    out = capsys.readouterr().out
    assert out.count("[dpo_accel] handbook/TRL recipe") == 1
    assert "beta" in out and "-> loss.beta" in out and "hub_strategy" in out and "ignored:" in out
    monkeypatch.setenv("RANK", "1")
    load_recipe(RECIPES["dpo"])
    assert capsys.readouterr().out == ""
    monkeypatch.delenv("RANK")
    load_recipe(os.path.join(REPO, "recipes", "smollm2_arith_lora.yaml"))  # a sectioned recipe: nothing printed
    assert capsys.readouterr().out == ""


def test_unknown_and_conflicting_flat_keys(tmp_path):
    def error(raw: dict, name: str = "r.yaml") -> str:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(raw))
        with pytest.raises(RecipeError) as e:
            load_recipe(str(path))
        assert "\n" not in str(e.value)
        return str(e.value)

    assert error({"beta": 0.1, "learnin_rate": 1e-5}).endswith("did you mean 'learning_rate'?")
    assert "did you mean 'per_device_train_batch_size'" in error({"beta": 0.1, "per_device_train_batchsize": 2})
    assert "keep one" in error({"beta": 0.1, "loss": {"beta": 0.2}})
    assert "lr_scheduler_type" in error({"beta": 0.1, "lr_scheduler_type": "inverse_sqrt"})  # not supported here
    assert "train.optimizer" in error({"beta": 0.1, "optim": "adafactor"})
    # A sectioned recipe with a mistyped section keeps its own message.
    assert error({"trian": {"seed": 1}}).startswith("unknown recipe key 'trian'; did you mean 'train")


# The handbook's recipes/zephyr-7b-beta/dpo/config_qlora.yaml (values as published; the dataset is a hub id,
# so only the recipe is loaded here, not the data).
ZEPHYR_DPO_QLORA = """
model_name_or_path: alignment-handbook/zephyr-7b-sft-qlora
torch_dtype: float16
use_peft: true
load_in_4bit: true
lora_r: 16
lora_alpha: 16
lora_dropout: 0.05
lora_target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]
dataset_mixer:
  HuggingFaceH4/ultrafeedback_binarized: 1.0
dataset_splits: [train_prefs, test_prefs]
preprocessing_num_workers: 12
bf16: true
beta: 0.01
do_eval: true
evaluation_strategy: steps
eval_steps: 100
gradient_accumulation_steps: 1
gradient_checkpointing: true
gradient_checkpointing_kwargs:
  use_reentrant: false
hub_model_id: zephyr-7b-dpo-qlora
learning_rate: 5.0e-6
log_level: info
logging_steps: 10
lr_scheduler_type: cosine
max_length: 1024
max_prompt_length: 512
num_train_epochs: 1
optim: paged_adamw_32bit
output_dir: data/zephyr-7b-dpo-qlora
per_device_train_batch_size: 4
per_device_eval_batch_size: 8
push_to_hub: true
save_strategy: "steps"
save_steps: 100
save_total_limit: 1
seed: 42
warmup_ratio: 0.1
"""


def test_the_handbooks_zephyr_qlora_recipe_loads_as_published(tmp_path):
    path = tmp_path / "dpo" / "config_qlora.yaml"
    path.parent.mkdir()
    path.write_text(ZEPHYR_DPO_QLORA)
    r = load_recipe(str(path))
    assert (r.model.dtype, r.model.load_in_4bit, r.lora.lora_r, r.loss.beta) == ("float16", True, 16, 0.01)
    assert r.data.dataset_mixture == {"datasets": [{"id": "HuggingFaceH4/ultrafeedback_binarized",
                                                    "split": "train_prefs", "eval_split": "test_prefs"}], "seed": 42,
                                        "form": "dataset_mixer"}
    assert (r.train.optimizer, r.train.mixed_precision, r.train.push_to_hub, r.data.num_proc) == \
        ("adamw", "bf16", True, 12)


def _run(tiny_model_dir, tmp_path, name):
    from dpo_accel import train

    out = str(tmp_path / name)
    recipe = load_recipe(RECIPES[name], [f"model.model_name_or_path={tiny_model_dir}", f"train.output_dir={out}"])
    return train.run(recipe), out


@pytest.mark.slow
def test_handbook_dpo_recipe_runs_end_to_end(tiny_model_dir, tmp_path):
    summary, out = _run(tiny_model_dir, tmp_path, "dpo")
    assert summary["global_step"] == 45  # 360 training rows / (4 x 2)
    sources = summary["data"]["train"]["sources"]
    assert len(sources) == 2 and sum(s["pairs"] for s in sources.values()) == 360  # 300 + 100 mixed, 40 held out
    assert summary["data"]["eval"]["pairs"] == 40
    assert math.isfinite(summary["eval"]["eval/loss"]) and os.path.isdir(os.path.join(out, "adapter"))


@pytest.mark.slow
def test_handbook_orpo_recipe_runs_end_to_end(tiny_model_dir, tmp_path):
    summary, out = _run(tiny_model_dir, tmp_path, "orpo")
    assert summary["global_step"] == 45
    assert "eval_before" in summary  # no reference: the loop measured the start
    assert math.isfinite(summary["eval"]["eval/loss"]) and not os.path.isdir(os.path.join(out, "checkpoints"))


def _load_flat(tmp_path, name: str, raw: dict):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return load_recipe(str(path))


def test_orpo_comes_from_loss_type_or_the_handbook_layout_never_from_a_substring(tmp_path):
    dpo = {"loss_type": "sigmoid", "beta": 0.01}
    for name in ("corporate_dpo.yaml", "dpo_vs_orpo.yaml", "handbook_orpo.yaml", "orpo/config_full.yaml"):
        r = _load_flat(tmp_path / "explicit", name, dpo)  # an explicit loss_type is never overridden
        assert (r.loss.loss_type, r.loss.beta, r.loss.orpo_lambda) == ("sigmoid", 0.01, 0.1), name
    for name in ("corporate.yaml", "dpo_vs_orpo.yaml", "orpo_dpo.yaml"):  # no loss_type: TRL's sigmoid
        r = _load_flat(tmp_path / "plain", name, {"beta": 0.01})
        assert (r.loss.loss_type, r.loss.beta) == ("sigmoid", 0.01), name
    # A DPO-only key makes it a DPO recipe even in the handbook's orpo/ folder.
    r = _load_flat(tmp_path / "rpo", "orpo/config_full.yaml", {"beta": 0.01, "rpo_alpha": 1.0})
    assert (r.loss.loss_type, r.loss.beta, r.loss.rpo_alpha) == ("sigmoid", 0.01, 1.0)
    # ORPO: loss_type orpo, the handbook's orpo/ folder, an `orpo` word in the file name (the shipped recipe).
    for sub, name, raw in (("lt", "dpo.yaml", {"loss_type": "orpo", "beta": 0.05}),
                           ("layout", "orpo/config_full.yaml", {"beta": 0.05}),
                           ("word", "config-orpo.yaml", {"beta": 0.05})):
        r = _load_flat(tmp_path / sub, name, raw)
        assert (r.loss.loss_type, r.loss.orpo_lambda, r.loss.beta) == ("orpo", 0.05, 0.1), name
    _, rows = handbook.from_flat({"beta": 0.1}, RECIPES["orpo"])
    assert ("(file name)", "loss.loss_type", "orpo: an ORPO recipe") in rows
    assert load_recipe(RECIPES["orpo"]).loss.loss_type == "orpo"


TRL_VALUES = {"train.num_train_epochs": 3.0, "train.learning_rate": 1e-6, "data.max_length": 1024,
              "data.max_prompt_length": 512, "train.per_device_train_batch_size": 8, "train.save_steps": 500}


def test_a_flat_recipe_takes_trls_defaults_for_the_keys_it_leaves_out(tmp_path, capsys):
    r = _load_flat(tmp_path, "dpo.yaml", {"beta": 0.1})
    assert {k: get(r, k) for k in TRL_VALUES} == TRL_VALUES
    assert (r.train.logging_steps, r.eval.do_eval) == (1, True)  # left out of the table on purpose
    out = capsys.readouterr().out
    assert "6 TRL defaults" in out and "-> train.num_train_epochs  (TRL default: 3.0, not in the file)" in out
    own = {"num_train_epochs": 1, "learning_rate": 5e-5, "max_length": 256, "max_prompt_length": 64,
           "per_device_train_batch_size": 2, "save_steps": 0}
    r = _load_flat(tmp_path, "own.yaml", {"beta": 0.1, **own})
    assert [get(r, handbook.FLAT[k]) for k in own] == list(own.values())
    assert "TRL default" not in capsys.readouterr().out
    # A section key beside the flat ones counts as set; TRL's 512 is not forced under a shorter max_length.
    r = _load_flat(tmp_path, "mixed.yaml", {"beta": 0.1, "max_length": 384, "train": {"learning_rate": 2e-5}})
    assert (r.train.learning_rate, r.data.max_length, r.data.max_prompt_length, r.train.num_train_epochs) == \
        (2e-5, 384, 256, 3.0)
    # A sectioned recipe keeps dpo_accel's defaults.
    r = load_recipe(os.path.join(REPO, "recipes", "smollm2_arith_lora.yaml"))
    assert r.data.max_length != 1024 and r.train.learning_rate != 1e-6


def test_max_completion_length_sets_max_length_when_it_is_not_given(tmp_path):
    r = _load_flat(tmp_path, "a.yaml", {"beta": 0.1, "max_prompt_length": 128, "max_completion_length": 64})
    assert (r.data.max_prompt_length, r.data.max_length) == (128, 192)
    r = _load_flat(tmp_path, "b.yaml", {"beta": 0.1, "max_completion_length": 256})  # TRL's prompt length, 512
    assert (r.data.max_prompt_length, r.data.max_length) == (512, 768)
    raw = {"beta": 0.1, "max_length": 300, "max_prompt_length": 100, "max_completion_length": 64}
    r = _load_flat(tmp_path, "c.yaml", raw)  # max_length given: it decides
    assert r.data.max_length == 300
    assert ("max_completion_length", None, "answers get max_length minus the kept prompt") in \
        handbook.from_flat(raw)[1]
    with pytest.raises(RecipeError, match="max_completion_length must be a positive number"):
        _load_flat(tmp_path, "d.yaml", {"beta": 0.1, "max_completion_length": "long"})


def test_use_bnb_nested_quant_false_is_reported_as_not_honoured():
    """TRL's default (false) cannot be had here: said so, not passed over as if it were what runs."""
    _, rows = handbook.from_flat({"load_in_4bit": True, "use_bnb_nested_quant": False})
    note = dict((k, n) for k, t, n in rows if t is None)["use_bnb_nested_quant"]
    assert note.startswith("false cannot be honoured") and "always double-quantises" in note
    _, rows = handbook.from_flat({"load_in_4bit": True, "use_bnb_nested_quant": True})
    assert ("use_bnb_nested_quant", None, "QLoRA here always double-quantises (bnb_4bit_use_double_quant)") in rows
