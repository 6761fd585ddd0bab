"""The two GPU recipes for a 7B model on UltraFeedback (recipes/qlora_8b_ultrafeedback.yaml: QLoRA on one 24 GB GPU;
recipes/zero3_8b_ultrafeedback.yaml: full DPO on 8 x 80 GB with DeepSpeed ZeRO-3), checked without a GPU or a network.

Proves: both recipes load unchanged, their headers carry the launch command and the batch arithmetic of their
keys; the dry run (no weights, model_configs/qwen2.5-7b-instruct.json for the model, local pairs long enough
that every sequence is cut to the recipe's max_length) says each fits its GPUs; and each recipe trains 2
optimizer steps on the CPU with the model swapped for a tiny random Qwen2 and the data for data/arith_prefs.
"""
from __future__ import annotations

import json
import os
import re

import pytest

from conftest import REPO, reset_accelerate
from dpo_accel import inspect_recipe as dinspect
from dpo_accel.config.load import load_recipe

QLORA = os.path.join(REPO, "recipes", "qlora_8b_ultrafeedback.yaml")
ZERO3 = os.path.join(REPO, "recipes", "zero3_8b_ultrafeedback.yaml")
QWEN_7B = os.path.join(REPO, "model_configs", "qwen2.5-7b-instruct.json")
GiB = 1024 ** 3


def _header(path: str) -> str:
    with open(path) as f:
        return "".join(line for line in f if line.startswith("#"))


@pytest.mark.parametrize("path,processes,config", [(QLORA, 1, "gpu_single.yaml"), (ZERO3, 8, "deepspeed_zero3.yaml")],
                         ids=["qlora", "zero3"])
def test_recipes_load_unchanged_and_headers_match_their_keys(path, processes, config):
    recipe = load_recipe(path)
    assert recipe.model.model_name_or_path == "Qwen/Qwen2.5-7B-Instruct"
    assert recipe.data.dataset_name == "HuggingFaceH4/ultrafeedback_binarized"
    assert (recipe.data.train_split, recipe.data.eval_split) == ("train_prefs", "test_prefs")
    assert recipe.train.mixed_precision == "bf16" and recipe.model.gradient_checkpointing
    header = _header(path)
    assert f"accelerate launch --config_file accelerate_configs/{config}" in header
    assert os.path.isfile(os.path.join(REPO, "accelerate_configs", config))
    assert "dpo_accel.inspect_recipe" in header and "model_configs/qwen2.5-7b-instruct.json" in header
    t = recipe.train
    pairs = t.per_device_train_batch_size * t.gradient_accumulation_steps * processes
    assert (f"{t.per_device_train_batch_size} pairs x {t.gradient_accumulation_steps} accumulation x {processes} "
            f"process{'es' if processes > 1 else ''} = {pairs} pairs per optimizer step") in header


def test_qlora_recipe_is_qlora_and_zero3_recipe_names_its_deepspeed():
    q = load_recipe(QLORA)
    assert q.model.load_in_4bit and q.lora.use_peft and q.reference.mode == "adapter_off"
    z = load_recipe(ZERO3)
    assert not z.lora.use_peft and z.reference.mode == "copy"
    with open(os.path.join(REPO, "setup.cfg")) as f:
        pin = re.search(r"deepspeed==([\w.]+)", f.read()).group(1)
    header = _header(ZERO3)
    assert f"deepspeed=={pin}" in header and "--num_processes 8" in header
    with open(QWEN_7B) as f:
        config = json.load(f)
    assert (config["model_type"], config["hidden_size"], config["num_hidden_layers"]) == ("qwen2", 3584, 28)


# ------------------------------------------------------------------------------------------ dry run

def _long_pairs(folder) -> str:
    """Local pairs whose prompt and answers each run past the recipes' limits, so the dry run's longest
    micro-batch is the worst case the recipe allows (every prompt cut to max_prompt_length, every answer to
    max_length - max_prompt_length), not the short arithmetic pairs."""
    def words(tag: str) -> str:  # 900 distinct words: well over 1024 tokens
        return " ".join(f"{tag}x{j}" for j in range(900))

    os.makedirs(folder, exist_ok=True)
    for split, rows in (("train", 16), ("eval", 4)):
        with open(os.path.join(folder, f"{split}.jsonl"), "w") as f:
            for i in range(rows):
                row = {"prompt": words(f"q{i}"), "chosen": words(f"good{i}"), "rejected": words(f"bad{i}")}
                f.write(json.dumps(row) + "\n")
    return str(folder)


def _dry_run(path: str, data: str, tokenizer: str, *flags: str):
    sets = [f"data.dataset_name={data}", "data.train_split=train", "data.eval_split=eval",
            f"model.tokenizer_name_or_path={tokenizer}"]
    args = dinspect.parse_args(["--recipe", path, "--model-config", QWEN_7B, *flags]
                               + [x for s in sets for x in ("--set", s)])
    return dinspect.report(load_recipe(args.recipe, args.set), args)


@pytest.fixture
def offline(monkeypatch):
    """Nothing may come from the hub: the model is a config.json, the tokenizer and data are local."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_qlora_dry_run_fits_one_24gb_gpu(offline, smol_dir, tmp_path):
    recipe = load_recipe(QLORA)
    text, numbers = _dry_run(QLORA, _long_pairs(tmp_path / "long"), smol_dir, "--gpu", "24GB")
    print(text)
    facts = numbers["facts"]
    assert facts.model_type == "qwen2" and facts.params == 7_615_616_512  # Qwen2.5-7B's published count
    assert facts.trainable == 40_370_176  # r 16 on the 7 linear layers of 28 blocks
    assert numbers["layout"] == "shared" and numbers["plan"].reference_mode == "adapter_off"
    rows, width = numbers["batches"].longest["shared"]  # one row per pair: prompt + both answers at the limit
    assert (rows, width) == (recipe.train.per_device_train_batch_size,
                             recipe.data.max_length * 2 - recipe.data.max_prompt_length)
    assert "2 pairs x 16 accumulation x 1 process(es) = 32 pairs per step" in text
    assert "4-bit (QLoRA), gradient checkpointing" in text
    est = numbers["estimates"]["24GB"]
    assert est.checkpointing and est.total <= 24 * GiB and "fits: yes" in text
    print(f"QLoRA on 24GB: {est.total / GiB:.2f} GiB")


def test_zero3_dry_run_fits_eight_80gb_gpus(offline, smol_dir, tmp_path):
    recipe = load_recipe(ZERO3)
    text, numbers = _dry_run(ZERO3, _long_pairs(tmp_path / "long"), smol_dir, "--gpu", "80GB",
                             "--backend", "zero3", "--processes", "8")
    print(text)
    facts = numbers["facts"]
    assert facts.params == facts.trainable == 7_615_616_512
    assert numbers["plan"].reference_mode == "copy"
    rows, width = numbers["batches"].longest[numbers["layout"]]
    assert rows * width >= recipe.train.per_device_train_batch_size * recipe.data.max_length
    assert "4 pairs x 4 accumulation x 8 process(es) = 128 pairs per step" in text
    assert "backend zero3, 8 process(es)" in text
    est = numbers["estimates"]["80GB"]
    # the state really is sharded: the bf16 weights and the reference copy are 1/8 of 2 bytes per parameter
    assert est.weights == pytest.approx(2 * facts.params / 8) and est.reference == pytest.approx(2 * facts.params / 8)
    assert est.total <= 80 * GiB and "fits: yes" in text
    print(f"ZeRO-3 on 8 x 80GB: {est.total / GiB:.2f} GiB per GPU")


# ------------------------------------------------------------------------------------------ 2 CPU steps

@pytest.fixture(scope="module")
def tiny_qwen2(smol_dir, tmp_path_factory) -> str:
    """A 2-layer Qwen2 (the recipes' family: q/k/v biases, GQA) with random weights and the SmolLM2 tokenizer."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smol_dir)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=False, use_sliding_window=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    path = str(tmp_path_factory.mktemp("tiny_qwen2"))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow  # 13-30 s each on 2 CPU cores: the recipes' own accumulation (16 and 4 micro-batches per step)
@pytest.mark.parametrize("path", [QLORA, ZERO3], ids=["qlora", "zero3"])
def test_recipe_trains_two_steps_on_cpu_with_a_tiny_qwen2(path, tiny_qwen2, tmp_path, offline):
    import math

    from dpo_accel.train import run

    reset_accelerate()
    overrides = [f"model.model_name_or_path={tiny_qwen2}", f"model.tokenizer_name_or_path={tiny_qwen2}",
                 "model.load_in_4bit=false", "train.mixed_precision=no",
                 f"data.dataset_name={os.path.join(REPO, 'data', 'arith_prefs')}", "data.train_split=train",
                 "data.eval_split=eval", "data.max_train_samples=64", "data.max_eval_samples=8",
                 "train.max_steps=2", f"train.output_dir={tmp_path / 'run'}", "train.report_to=[]",
                 "eval.generation_prompts=0"]
    recipe = load_recipe(path, overrides)
    kept = load_recipe(path)  # everything else as shipped
    assert (recipe.train.gradient_accumulation_steps, recipe.lora.use_peft, recipe.reference.mode) == \
        (kept.train.gradient_accumulation_steps, kept.lora.use_peft, kept.reference.mode)
    summary = run(recipe)
    assert summary["global_step"] == 2
    assert math.isfinite(summary["eval"]["eval/loss"])
    assert os.path.isdir(tmp_path / "run" / ("adapter" if kept.lora.use_peft else "model"))
