"""`python -m dpo_accel.inspect_recipe`: the plan, the data and the estimate of a recipe without its weights.

Proves: inspect on the shipped recipes finishes without opening a weight file (open, safetensors and
torch.load are made to fail) and prints the plan, the per-source data summary and an estimate per
GPU; a 7B-class config at 24 GB does not fit in full fine-tuning and inspect names the setting that
makes it fit, which then fits; its FLOPs per step equal what torch's FLOP counter counts in a real
training step of a tiny model (within 10%); and (slow) its memory estimate for the shipped LoRA recipe
on CPU is within 25% of the peak RSS growth of a real 3-step run.
"""
from __future__ import annotations

import builtins
import io
import json
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import REPO
from dpo_accel import inspect_recipe as dinspect
from dpo_accel.config.load import load_recipe

MAIN = os.path.join(REPO, "recipes", "smollm2_arith_lora.yaml")
SEVEN_B = os.path.join(REPO, "model_configs", "llama-2-7b.json")
WEIGHT_FILES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


@pytest.fixture
def no_weights(monkeypatch, smol_dir):
    """Opening any weight file, or loading one through safetensors / torch, fails the test."""
    import importlib

    import safetensors
    import safetensors.torch
    import torch

    for name in ("peft", "transformers.modeling_utils"):  # imported under the patches, they would keep them
        importlib.import_module(name)

    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and str(file).endswith(WEIGHT_FILES):
            raise AssertionError(f"inspect opened a weight file: {file}")
        return real_open(file, *args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("inspect loaded weights")

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(io, "open", guarded_open)
    for module, name in ((safetensors, "safe_open"), (safetensors.torch, "safe_open"),
                         (safetensors.torch, "load_file"), (safetensors.torch, "load"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)


def run_inspect(recipe_path: str, *flags: str, sets=()):
    args = dinspect.parse_args(["--recipe", recipe_path, *flags] + [x for s in sets for x in ("--set", s)])
    return dinspect.report(load_recipe(args.recipe, args.set), args)


def test_inspect_reads_no_weight_file_and_reports_plan_data_and_fit(no_weights):
    start = time.perf_counter()
    text, numbers = run_inspect(MAIN, "--gpu", "24GB", "--gpu", "80GB")
    assert time.perf_counter() - start < 120  # seconds on a quiet machine; CI shares its cores
    assert numbers["plan"].reference_mode == "adapter_off" and numbers["layout"] == "shared"
    assert numbers["steps"] == 60 and numbers["facts"].params == 134_515_008
    assert numbers["facts"].trainable == 4_884_480  # LoRA r16 on all 7 linear layers of 30 blocks
    for needle in ("== plan", "objective      sigmoid + 1 x NLL (rpo_alpha) | reference: adapter_off",
                   "8 pairs x 1 accumulation", "== data", "prefix sharing runs", "-- 24GB (L4-class",
                   "-- 80GB (A100 80GB-class", "fits: yes", "FLOPs per optimizer step", "no weights loaded"):
        assert needle in text, needle
    b = numbers["batches"]
    assert b.per_layout["shared"] < b.real < b.per_layout["concat"]  # the arithmetic prompts are shared
    # A mixture: the data summary has a line per source with its share.
    text, _ = run_inspect(os.path.join(REPO, "recipes", "smollm2_arith_mixture.yaml"))
    assert "75.0% of train  data/arith_prefs (weight 0.75)" in text and "25.0% of train  data/arith_chat" in text
    assert "-- cpu (this machine)" in text
    # Generated pairs: the plan says so, and that the data below is the fixed pairs'.
    text, _ = run_inspect(os.path.join(REPO, "recipes", "smollm2_arith_iterative.yaml"))
    assert "rounds         3 iterative rounds: each samples 4 answers to 128 training prompts" in text
    text, _ = run_inspect(os.path.join(REPO, "recipes", "smollm2_arith_online.yaml"))
    assert "online         each micro-step samples 4 answers to each of 8 prompts per process" in text


def test_seven_b_at_24gb_names_the_setting_that_fits(no_weights):
    full = ["lora.use_peft=false", "reference.mode=auto"]
    text, numbers = run_inspect(MAIN, "--gpu", "24GB", "--model-config", SEVEN_B, sets=full)
    est = numbers["estimates"]["24GB"]
    assert numbers["facts"].params == 6_738_415_616  # Llama-2-7B's parameter count
    assert numbers["plan"].reference_mode == "copy" and est.reference == est.weights  # a frozen fp32 copy
    assert "fits: NO" in text
    fix = text.split("; set ")[1].split("\n")[0]
    assert "lora.use_peft=true" in fix  # full fine-tuning of 7B cannot fit 24 GB
    text, _ = run_inspect(MAIN, "--gpu", "24GB", "--model-config", SEVEN_B, sets=full + fix.split())
    assert "fits: yes" in text  # and the named settings do
    text, numbers = run_inspect(MAIN, "--gpu", "24GB", "--model-config", SEVEN_B,
                                sets=["model.dtype=bfloat16"])
    assert "fits: yes" in text  # LoRA on bf16 weights: 12.6 GiB of weights, the rest activations
    est = numbers["estimates"]["24GB"]
    assert abs(est.weights - 6_738_415_616 * 2) < 1e6 and est.total < 24 * dinspect.GiB


def test_flops_per_step_match_torchs_flop_counter(tiny_model_dir):
    """One optimizer step of LoRA DPO (policy forward + backward, adapter-off reference forward) on a tiny
    model, counted by torch.utils.flop_counter, against inspect's formula for the same batch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from conftest import tiny_overrides
    from dpo_accel.data.collate import PreferenceCollator
    from dpo_accel.data.formats import load_preference_splits
    from dpo_accel.data.tokenize import tokenize_splits
    from dpo_accel.model.logps import PreferenceLogpsModel, settle_logps_path
    from dpo_accel.model.loading import load_policy, load_tokenizer

    overrides = tiny_overrides(tiny_model_dir, "/tmp/unused", **{
        "lora.use_peft": True, "lora.lora_r": 4, "data.max_train_samples": 8, "train.per_device_train_batch_size": 8,
        "data.group_by_length": False, "train.prefix_sharing": False, "train.mixed_precision": "no"})
    recipe = load_recipe(None, overrides)
    tokenizer = load_tokenizer(recipe.model, tiny_model_dir)
    tokenized, _ = tokenize_splits(load_preference_splits(recipe.data, 0), tokenizer, recipe.data)
    batch = PreferenceCollator(tokenizer.pad_token_id)([tokenized["train"][i] for i in range(8)])
    policy = PreferenceLogpsModel(load_policy(recipe.model, recipe.lora, tiny_model_dir),
                                  chunk_size=recipe.train.logps_chunk_size, prefix_sharing=False)
    settle_logps_path(policy, batch)  # the start-up self-check, outside the count as in train.setup
    with FlopCounterMode(display=False) as counter:
        out = policy(**batch)
        (out["chosen_logps"].sum() + out["rejected_logps"].sum()).backward()
        with torch.no_grad(), policy.model.disable_adapter():
            policy(**batch)
    counted = counter.get_total_flops()

    args = dinspect.parse_args(["--recipe", "unused", "--model-config", tiny_model_dir])
    config = dinspect.with_attention(dinspect.model_config(recipe, args.model_config), recipe)
    facts = dinspect.model_facts(config, recipe)
    batches = dinspect.batch_tokens(tokenized, recipe)
    estimated = dinspect.flops_per_step(recipe, facts, "adapter_off", batches, "concat", config)
    print(f"FLOPs estimated {estimated / 1e9:.3f} G, counted {counted / 1e9:.3f} G")
    assert abs(estimated - counted) / counted < 0.10, (estimated, counted)


MEASURE = textwrap.dedent("""
    import json, os, sys
    import accelerate, datasets, peft, torch, transformers  # imported before the baseline
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from dpo_accel import train
    from dpo_accel.config.load import load_recipe

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    recipe = load_recipe(sys.argv[1], sys.argv[2:])
    base = rss()
    train.run(recipe)
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec (a child of a large pytest reports pytest's peak).
    peak = [int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM")][0]
    print("MEASURED " + json.dumps({"baseline": base, "peak": peak}))
""")


@pytest.mark.slow
def test_cpu_memory_estimate_within_25_percent_of_a_real_run(smol_dir, tmp_path):
    """The shipped LoRA recipe, 3 steps on the real SmolLM2 in a fresh process: peak RSS minus the RSS
    after imports, against inspect's CPU estimate of the same recipe."""
    script = tmp_path / "measure.py"
    script.write_text(MEASURE)
    sets = [f"train.output_dir={tmp_path / 'run'}", "train.max_steps=3", "train.save_steps=0",
            "train.export_merged=false", "eval.do_eval=false", "eval.generation_prompts=0", "train.report_to=[]"]
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, str(script), MAIN, *sets], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads(proc.stdout.split("MEASURED ")[-1])
    growth = measured["peak"] - measured["baseline"]
    _, numbers = run_inspect(MAIN, sets=sets)
    estimated = numbers["estimates"]["cpu (this machine)"].total
    print(f"estimated {estimated / 2**30:.2f} GiB, measured growth {growth / 2**30:.2f} GiB")
    assert abs(estimated - growth) / growth < 0.25, (estimated, growth)


def test_longest_pair_that_fits_a_gpu(no_weights):
    """For a named model and GPU the estimate says the longest pair that fits at one pair per micro-batch:
    Llama-3-8B with QLoRA on 24 GB; the estimate at that length is within the GPU, a little longer is not,
    and 80 GB fits a longer one."""
    import dataclasses

    llama3 = os.path.join(REPO, "model_configs", "llama-3-8b.json")
    qlora = ["model.load_in_4bit=true", "model.gradient_checkpointing=true"]
    text, numbers = run_inspect(MAIN, "--gpu", "24GB", "--gpu", "80GB", "--model-config", llama3, sets=qlora)
    assert numbers["facts"].params == 8_030_261_248  # Llama-3-8B's parameter count
    found = [int(x.replace(",", "")) for x in re.findall(r"longest pair at 1 pair per micro-batch: ([\d,]+) tokens",
                                                          text)]
    assert len(found) == 2 and 4096 < found[0] < found[1], text
    ins = dinspect.gather_inspection(load_recipe(MAIN, qlora), dinspect.parse_args(
        ["--recipe", MAIN, "--model-config", llama3]))
    gpu = dinspect.parse_gpu("24GB")
    recipe = dinspect.device_recipe(ins, gpu)

    def total(width):
        one = dataclasses.replace(ins.batches, longest={**ins.batches.longest, ins.lay: (1, width)})
        return dinspect.estimate(recipe, ins.facts, ins.config, ins.plan.reference_mode, ins.lay, one, gpu).total

    assert total(found[0]) <= gpu.memory < total(int(found[0] * 1.02) + 1)
