"""SFT in the loop, and the two-stage SFT -> DPO pipeline, on a tiny model.

- ``loss_type: sft`` on single-answer data (``data.format: sft``): no reward metrics (there is nothing to
  compare), the per-token NLL instead, and the held-out NLL falls from the measured start.
- ``lora.init_adapter``: DPO from an SFT LoRA adapter. The adapter is merged into the base weights at
  load, so the reference (the LoRA base with the new adapter switched off, or a frozen copy) is the SFT
  model: its log-probs at step 1 equal the SFT model's, not the bare base's.
- The shipped recipe pair runs as documented in its headers (stage 1 output -> stage 2 input).
"""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil

import pytest
import torch

from dpo_accel.loops.offline import progress_postfix
from conftest import REPO, build_small_vocab_model, reset_accelerate, tiny_overrides
from dpo_accel import train
from dpo_accel.config.errors import RecipeError
from dpo_accel.config.load import load_recipe

SFT_RECIPE = os.path.join(REPO, "recipes", "smollm2_arith_sft.yaml")
DPO_RECIPE = os.path.join(REPO, "recipes", "smollm2_arith_dpo_from_sft.yaml")
LORA = {"lora.use_peft": True, "lora.lora_r": 4, "lora.lora_alpha": 8, "lora.lora_dropout": 0.0}


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory) -> str:
    return build_small_vocab_model(str(tmp_path_factory.mktemp("small_vocab_llama")))


def read_rows(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def logps_of(model, batch) -> dict:
    from dpo_accel.model.logps import PreferenceLogpsModel

    with torch.no_grad():
        return PreferenceLogpsModel(model.eval(), chunk_size=64)(**batch)


def test_sft_on_single_answer_data_reports_nll_not_rewards(small_model_dir, tmp_path, capsys):
    out = str(tmp_path / "sft")
    summary = train.run(load_recipe(None, tiny_overrides(small_model_dir, out, **{
        "loss.loss_type": "sft", "data.format": "sft", "train.max_steps": 12, "data.max_eval_samples": 16,
        "train.report_to": []})))
    rows = read_rows(out)
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    for row in steps:
        assert "nll" in row and row["loss"] == pytest.approx(row["nll"], rel=1e-6)  # sft's loss is its NLL
        assert not any(k.startswith("rewards/") or k == "logps/rejected" for k in row), row
    assert not any(k.startswith("eval/rewards/") for k in summary["eval"])
    before, after = summary["eval_before"], summary["eval"]
    assert [r["step"] for r in rows if "eval/nll" in r] == [0, 12]  # the measured start, then the end
    assert after["eval/nll"] < before["eval/nll"] - 0.05, (before, after)
    assert "| eval/nll |" in summary["table"] and "accuracies" not in summary["table"]
    assert os.path.isdir(os.path.join(out, "model"))  # same export as any run
    startup = next(l for l in capsys.readouterr().out.splitlines() if "trainable of" in l)
    assert startup.endswith("chosen rows only | 12 steps of 4 examples"), startup  # single answers, not pairs


def test_progress_bar_postfix_without_a_rejected_side():
    assert progress_postfix({"loss": 1.5, "nll": 1.5}) == {"loss": "1.5000", "nll": "1.500"}
    assert progress_postfix({"loss": 0.5, "rewards/accuracies": 0.75, "nll": 2.0})["acc"] == "0.75"


@pytest.fixture(scope="module")
def sft_run(small_model_dir, tmp_path_factory) -> str:
    """A LoRA SFT run (high learning rate, so the adapter moves the log-probs well away from the base)."""
    out = str(tmp_path_factory.mktemp("sft") / "run")
    train.run(load_recipe(None, tiny_overrides(small_model_dir, out, **{
        **LORA, "loss.loss_type": "sft", "data.format": "sft", "train.learning_rate": 1e-2,
        "train.max_steps": 6, "train.report_to": [], "eval.do_eval": False})))
    reset_accelerate()
    return out


def record_first_call(monkeypatch, cls) -> list:
    """Keep (batch, reference log-probs) of the first ``cls.logps`` call on the training split (step 1)."""
    seen = []
    original = cls.logps

    def logps(self, batch, split="train"):
        result = original(self, batch, split)
        if split == "train" and not seen:
            seen.append(({k: v.clone() for k, v in batch.items()}, {k: v.clone() for k, v in result.items()}))
        return result
    monkeypatch.setattr(cls, "logps", logps)
    return seen


@pytest.mark.parametrize("mode", ["adapter_off", "copy"])
def test_sft_adapter_as_reference_gives_the_sft_model_at_step_1(mode, small_model_dir, sft_run, tmp_path,
                                                                 monkeypatch):
    """DPO from base + SFT adapter: the reference log-probs at step 1 are the SFT model's (within merge
    rounding), in both LoRA-off mode and as a frozen copy (full fine-tuning); the bare base's differ."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dpo_accel.model import reference as reference_module

    cls = reference_module.AdapterOffReference if mode == "adapter_off" else reference_module.CopyReference
    seen = record_first_call(monkeypatch, cls)
    adapter = os.path.join(sft_run, "adapter")
    out = str(tmp_path / mode)
    extra = {**LORA, "reference.mode": "adapter_off"} if mode == "adapter_off" else {"reference.mode": "copy"}
    summary = train.run(load_recipe(None, tiny_overrides(small_model_dir, out, **{
        **extra, "lora.init_adapter": adapter, "train.max_steps": 2, "train.report_to": []})))
    assert seen, f"{cls.__name__} was not used"
    batch, ref = seen[0]

    sft_unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(small_model_dir), adapter)
    sft_merged = AutoModelForCausalLM.from_pretrained(os.path.join(sft_run, "model"))
    base = AutoModelForCausalLM.from_pretrained(small_model_dir)
    for sft in (sft_unmerged, sft_merged):
        expected = logps_of(sft, batch)
        for key in ("chosen_logps", "rejected_logps"):
            torch.testing.assert_close(ref[key], expected[key], atol=2e-4, rtol=1e-5)
    bare = logps_of(base, batch)
    assert (ref["chosen_logps"] - bare["chosen_logps"]).abs().max() > 0.5  # SFT really moved the model

    step1 = read_rows(out)[0]
    assert step1["step"] == 1 and step1["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference
    assert step1["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert summary["eval"]["eval/rewards/margins"] != 0.0
    if mode == "adapter_off":  # the exported adapter names, and applies to, the merged SFT model it trained on
        with open(os.path.join(out, "adapter", "adapter_config.json")) as f:
            start = json.load(f)["base_model_name_or_path"]
        assert start == os.path.join(os.path.abspath(sft_run), "model")
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(start), os.path.join(out, "adapter"))
        exported = AutoModelForCausalLM.from_pretrained(os.path.join(out, "model"))
        for key in ("chosen_logps", "rejected_logps"):
            torch.testing.assert_close(logps_of(loaded, batch)[key], logps_of(exported, batch)[key], atol=2e-4, rtol=1e-5)


def test_init_adapter_without_its_merged_model_exports_only_the_merged_result(small_model_dir, sft_run, tmp_path,
                                                                             capsys):
    """An init adapter with no merged model next to it: an adapter/ would apply to a model no folder
    holds, so only model/ is written, and the run says why."""
    lonely = str(tmp_path / "elsewhere" / "adapter")
    shutil.copytree(os.path.join(sft_run, "adapter"), lonely)
    out = str(tmp_path / "dpo")
    train.run(load_recipe(None, tiny_overrides(small_model_dir, out, **{
        **LORA, "lora.init_adapter": lonely, "train.max_steps": 1, "train.report_to": []})))
    assert os.path.isfile(os.path.join(out, "model", "config.json")) and not os.path.exists(os.path.join(out, "adapter"))
    assert "adapter/ not written" in capsys.readouterr().out


def test_init_adapter_errors_are_one_line(tmp_path, sft_run):
    with pytest.raises(RecipeError, match="not a peft adapter folder"):
        load_recipe(None, [f"lora.init_adapter={tmp_path}"])
    with pytest.raises(RecipeError, match="needs train.export_merged: true"):
        load_recipe(None, [f"lora.init_adapter={os.path.join(sft_run, 'adapter')}", "lora.use_peft=true",
                           "train.export_merged=false"])


def documented_commands(recipe_path: str) -> list[list[str]]:
    """The `accelerate launch ... dpo_accel/train.py ARGS` commands of a recipe header, as ARGS lists."""
    header = []
    with open(recipe_path) as f:
        for line in f:
            if not line.startswith("#"):
                break
            header.append(line[1:].strip())
    text = re.sub(r"\\\s*\n\s*", " ", "\n".join(header))
    commands = []
    for line in text.splitlines():
        if line.startswith("accelerate launch"):
            args = shlex.split(line)
            commands.append(args[args.index("dpo_accel/train.py") + 1:])
    return commands


def test_recipe_headers_document_the_pipeline():
    sft, dpo = documented_commands(SFT_RECIPE), documented_commands(DPO_RECIPE)
    assert sft == [["--recipe", "recipes/smollm2_arith_sft.yaml"]]
    assert dpo[0] == ["--recipe", "recipes/smollm2_arith_dpo_from_sft.yaml"]
    assert "lora.init_adapter=outputs/smollm2_arith_sft/adapter" in dpo[1]
    sft_recipe, dpo_recipe = load_recipe(SFT_RECIPE), load_recipe(DPO_RECIPE)
    assert sft_recipe.loss.loss_type == "sft" and sft_recipe.data.format == "sft" and sft_recipe.train.export_merged
    assert dpo_recipe.model.model_name_or_path == os.path.join(sft_recipe.train.output_dir, "model")
    assert dpo_recipe.loss.loss_type == "sigmoid" and dpo_recipe.lora.use_peft


@pytest.mark.slow
def test_two_stage_recipes_run_as_documented(small_model_dir, tmp_path, monkeypatch):
    """Stage 1 then stage 2 with the recipe headers' own commands (the tiny model in place of SmolLM2 and
    fewer steps), from a fresh folder: stage 2 reads stage 1's outputs by the recipes' relative paths."""
    os.symlink(os.path.join(REPO, "data"), tmp_path / "data")
    os.symlink(os.path.join(REPO, "recipes"), tmp_path / "recipes")
    monkeypatch.chdir(tmp_path)
    small = ["data.max_train_samples=24", "data.max_eval_samples=8", "data.max_length=96",
             "data.max_prompt_length=64", "train.per_device_train_batch_size=4", "train.max_steps=4",
             "train.save_steps=2", "train.logging_steps=1", "train.report_to=[]", "train.logps_chunk_size=64",
             "train.learning_rate=1e-2", "eval.generation_prompts=2", "eval.max_new_tokens=4"]

    def launch(args, *extra):
        sets = [a for s in list(small) + list(extra) for a in ("--set", s)]
        assert train.main(args + sets) == 0
        reset_accelerate()

    sft_cmd = documented_commands(SFT_RECIPE)[0]
    merged_cmd, adapter_cmd = documented_commands(DPO_RECIPE)
    launch(sft_cmd, f"model.model_name_or_path={small_model_dir}")
    sft_rows = read_rows("outputs/smollm2_arith_sft")
    assert all("nll" in r and "rewards/accuracies" not in r for r in sft_rows if "loss" in r)
    assert os.path.isfile("outputs/smollm2_arith_sft/model/model.safetensors")

    launch(merged_cmd)  # model_name_or_path: outputs/smollm2_arith_sft/model, as shipped
    launch(adapter_cmd, f"model.model_name_or_path={small_model_dir}",
           "train.output_dir=outputs/smollm2_arith_dpo_from_sft_adapter")
    merged = read_rows("outputs/smollm2_arith_dpo_from_sft")
    from_adapter = read_rows("outputs/smollm2_arith_dpo_from_sft_adapter")
    for rows in (merged, from_adapter):
        # policy == reference at step 1: the DPO term is log 2; the recipe adds rpo_alpha (1.0) x NLL
        assert rows[0]["step"] == 1 and rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
        assert rows[0]["loss"] == pytest.approx(math.log(2) + rows[0]["nll"], abs=1e-4)
        assert "eval/rewards/accuracies" in rows[-1]
    # Both variants start from the same SFT model on the same batch: step-1 policy log-probs agree
    # (bf16 autocast, and merge rounding in the adapter variant).
    assert from_adapter[0]["logps/chosen"] == pytest.approx(merged[0]["logps/chosen"], rel=2e-2)
    with open("outputs/smollm2_arith_dpo_from_sft/recipe.yaml") as f:
        assert "outputs/smollm2_arith_sft/model" in f.read()
