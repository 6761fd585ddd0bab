"""End-to-end runs of the training loop on a tiny model: outputs, resume, references, CLI errors."""
from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from dpo_accel.config.plan import check_output_dir
from conftest import REPO, paired_steps, poison_objective, reset_accelerate, tiny_overrides
from dpo_accel import train
from dpo_accel.config.load import load_recipe


def read_metrics(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_lora_run_writes_metrics_checkpoints_and_loadable_models(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = str(tmp_path / "run")
    recipe = load_recipe(None, tiny_overrides(tiny_model_dir, out, **{
        "lora.use_peft": True, "lora.lora_r": 4, "lora.lora_alpha": 8, "lora.lora_dropout": 0.0,
        "train.save_steps": 1, "train.save_total_limit": 2, "train.eval_steps": 2,
        "eval.generation_prompts": 2, "eval.max_new_tokens": 4, "eval.behaviour": "arith"}))
    summary = train.run(recipe)

    rows = read_metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "grad_norm", "learning_rate", "tokens_per_second",
                "pairs_per_second"):
        assert all(key in r for r in train_rows), key
    assert train_rows[0]["pairs_per_second"] > 0
    assert abs(train_rows[0]["loss"] - 0.6931) < 1e-3  # LoRA B = 0: policy == reference at step 1
    eval_rows = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in eval_rows] == [2, 4]
    assert glob.glob(os.path.join(out, "logs", "**", "events.out.tfevents.*"), recursive=True)
    ckpts = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert ckpts == ["checkpoint-0000003", "checkpoint-0000004"]  # save_total_limit 2
    assert os.path.isfile(os.path.join(out, "recipe.yaml"))
    assert summary["behaviour"]["before"].keys() == summary["behaviour"]["after"].keys()
    assert "| held-out measure (2 generations) | before | after |" in summary["table"]

    # The merged model and base + adapter give the same log-probs; both load with from_pretrained.
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(out, "model")).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    adapted = PeftModel.from_pretrained(base, os.path.join(out, "adapter")).eval()
    tok = AutoTokenizer.from_pretrained(os.path.join(out, "model"))
    ids = tok("What is 12 + 30?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = merged(ids).logits, adapted(ids).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        untrained = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits
    assert not torch.allclose(a, untrained, atol=1e-4)  # training changed the model


def test_resume_continues_exactly(tiny_model_dir, tmp_path):
    """4 steps straight == the same run resumed from its step-2 checkpoint: metrics and weights."""
    from safetensors.torch import load_file

    out = str(tmp_path / "run")
    overrides = tiny_overrides(tiny_model_dir, out, **{"train.save_steps": 2, "train.save_total_limit": 3,
                                                       "data.max_train_samples": 12})  # 3 steps/epoch: crosses an epoch
    train.run(load_recipe(None, overrides))
    straight = read_metrics(out)
    straight_weights = load_file(os.path.join(out, "model", "model.safetensors"))
    shutil.rmtree(os.path.join(out, "checkpoints", "checkpoint-0000004"))
    reset_accelerate()

    recipe = load_recipe(None, overrides)
    check_output_dir(recipe, resume=True)
    train.run(recipe, resume=True)
    resumed = read_metrics(out)
    assert [r["step"] for r in resumed if "loss" in r] == [1, 2, 3, 4]  # log truncated to the checkpoint
    for a, b in paired_steps(straight, resumed):
        for key in ("loss", "rewards/margins", "grad_norm", "learning_rate"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
    resumed_weights = load_file(os.path.join(out, "model", "model.safetensors"))
    for name, tensor in straight_weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, atol=1e-6, rtol=1e-5)


def test_adapter_off_reference_equals_frozen_copy_at_init(tiny_model_dir):
    from dpo_accel.data.collate import PreferenceCollator
    from dpo_accel.model.logps import PreferenceLogpsModel
    from dpo_accel.model.loading import load_frozen_copy, load_policy
    from dpo_accel.model.reference import AdapterOffReference, CopyReference

    recipe = load_recipe(None, tiny_overrides(tiny_model_dir, "unused", **{"lora.use_peft": True}))
    policy = load_policy(recipe.model, recipe.lora, tiny_model_dir)
    # Nudge LoRA B away from 0 so the adapter really changes the outputs; switched off it must not.
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    adapter_off = AdapterOffReference(PreferenceLogpsModel(policy, chunk_size=16))
    copy = CopyReference(PreferenceLogpsModel(load_frozen_copy(tiny_model_dir, recipe.model, None, torch.device("cpu"))),
                         contextlib.nullcontext)
    rows = [{"chosen_input_ids": [5, 6, 7, 2], "chosen_labels": [-100, 6, 7, 2],
             "rejected_input_ids": [5, 6, 9, 9, 2], "rejected_labels": [-100, 6, 9, 9, 2], "idx": 0},
            {"chosen_input_ids": [8, 8, 3, 2], "chosen_labels": [-100, -100, 3, 2],
             "rejected_input_ids": [8, 4, 2], "rejected_labels": [-100, 4, 2], "idx": 1}]
    batch = PreferenceCollator(2)(rows)
    a, b = adapter_off.logps(batch), copy.logps(batch)
    for key in ("chosen_logps", "rejected_logps"):
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        on = adapter_off.module(**batch)["chosen_logps"]
    assert not torch.allclose(on, a["chosen_logps"], atol=1e-3)


@pytest.mark.slow
def test_precomputed_reference_matches_copy_and_is_cached(tiny_model_dir, tmp_path, capsys):
    def first_loss(mode, name):
        reset_accelerate()
        out = str(tmp_path / name)
        train.run(load_recipe(None, tiny_overrides(tiny_model_dir, out, **{
            "reference.mode": mode, "train.max_steps": 2, "reference.cache_dir": str(tmp_path / "cache")})))
        return read_metrics(out)

    copy_rows = first_loss("copy", "copy")
    pre_rows = first_loss("precomputed", "pre")
    assert "computing" in capsys.readouterr().out
    for a, b in zip(copy_rows, pre_rows):
        for key in ("loss", "rewards/chosen", "rewards/rejected"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6)
    first_loss("precomputed", "pre2")
    assert "cached" in capsys.readouterr().out
    assert len(os.listdir(tmp_path / "cache")) == 2  # train and eval tables, reused


def test_bad_recipe_key_fails_in_one_line_before_compute(tmp_path, capsys):
    assert train.main(["--set", "train.learnin_rate=1e-5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean 'train.learning_rate'" in err
    assert train.main(["--recipe", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert train.main(["--set", f"train.output_dir={tmp_path}", "--resume"]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert not os.listdir(tmp_path)  # nothing was written


def test_existing_run_is_not_overwritten(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    assert train.main(tiny_overrides_args(tiny_model_dir, str(out))) == 2
    assert (out / "metrics.jsonl").read_text() == "{}\n"


def tiny_overrides_args(model_dir, out):
    args = []
    for o in tiny_overrides(model_dir, out):
        args += ["--set", o]
    return args


@pytest.mark.slow
def test_two_gloo_ranks_gather_the_same_step_metrics_as_one_process(tiny_model_dir, tmp_path):
    """2 processes x 2 pairs == 1 process x 4 pairs on the same global batch (step-1 metrics)."""
    def launch(config, n, per_device, name):
        out = str(tmp_path / name)
        sets = tiny_overrides(tiny_model_dir, out, **{"train.per_device_train_batch_size": per_device,
                                                      "train.max_steps": 2, "data.max_eval_samples": 6})
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               os.path.join(REPO, "accelerate_configs", config), os.path.join(REPO, "dpo_accel", "train.py")]
        for s in sets:
            cmd += ["--set", s]
        env = {**os.environ, "PYTHONPATH": REPO}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"{n} process(es)" in proc.stdout, proc.stdout[-2000:]
        return read_metrics(out)

    single = launch("cpu_single.yaml", 1, 4, "single")
    double = launch("cpu_two_process.yaml", 2, 2, "double")
    for a, b in zip(single, double):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen",
                    "logps/rejected", "grad_norm", "eval/loss", "eval/rewards/margins"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key)


@pytest.mark.slow
def test_main_job_command_runs_on_the_real_smollm2(smol_dir, tmp_path):
    """The README's main command, shortened: real SmolLM2 + LoRA + shipped data, through `accelerate launch`."""
    out = str(tmp_path / "main_job")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(REPO, "accelerate_configs", "cpu_single.yaml"), os.path.join(REPO, "dpo_accel", "train.py"),
           "--recipe", os.path.join(REPO, "recipes", "smollm2_arith_lora.yaml"),
           "--set", "train.max_steps=2", "--set", "train.save_steps=1", "--set", f"train.output_dir={out}",
           "--set", "data.max_eval_samples=8", "--set", "eval.generation_prompts=2", "--set", "eval.max_new_tokens=8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=str(tmp_path),
                          env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| held-out measure (2 generations) | before | after |" in proc.stdout
    assert "correct_rate" in proc.stdout and "LoRA base (adapters disabled)" in proc.stdout
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["global_step"] == 2 and set(summary["exported"]) == {"adapter", "model"}
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [2]  # logging_steps 5: the last step is logged


def poison_steps(monkeypatch, steps: set):
    """Make the loss NaN on the micro-batches of the given optimizer steps (1-based, one micro-batch each)."""
    from dpo_accel.loops import offline

    poison_objective(monkeypatch, offline, steps)


@pytest.mark.slow
def test_a_non_finite_step_is_skipped_and_logged_as_strict_json(tiny_model_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    poison_steps(monkeypatch, {2})
    out = str(tmp_path / "run")
    summary = train.run(load_recipe(None, tiny_overrides(tiny_model_dir, out, **{
        "train.save_steps": 2, "train.lr_scheduler_type": "linear", "eval.do_eval": False})))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        text = f.read()
    assert "NaN" not in text and "Infinity" not in text
    rows = [json.loads(line) for line in text.splitlines()]
    skipped = [r for r in rows if r.get("skipped")]
    assert [r["step"] for r in skipped] == [2] and skipped[0]["loss"] is None
    assert {"loss", "grad_norm"} <= set(skipped[0]["nonfinite"])
    lrs = {r["step"]: r["learning_rate"] for r in rows if "learning_rate" in r and not r.get("skipped")}
    assert skipped[0]["learning_rate"] == lrs[3]  # the scheduler did not move over the skipped step
    assert summary["global_step"] == 4
    for name, tensor in load_file(os.path.join(out, "model", "model.safetensors")).items():
        assert torch.isfinite(tensor).all(), name


def test_non_finite_steps_in_a_row_stop_the_run_in_one_line(tiny_model_dir, tmp_path, monkeypatch, capsys):
    poison_steps(monkeypatch, {2, 3, 4})
    out = str(tmp_path / "run")
    args = tiny_overrides_args(tiny_model_dir, out) + ["--set", "train.max_nonfinite_steps=2",
                                                       "--set", "train.save_steps=1", "--set", "eval.do_eval=false"]
    assert train.main(args) == 3
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("error: 2 optimizer steps in a row (to step 3)"), err
    assert not os.path.exists(os.path.join(out, "model"))
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["checkpoint-0000001", "checkpoint-0000002"]


def test_weights_with_a_nan_are_never_saved(tiny_model_dir, tmp_path):
    from accelerate import Accelerator

    from dpo_accel.outputs.checkpoints import NonFiniteError, check_finite

    model = torch.nn.Linear(2, 2)
    accelerator = Accelerator(cpu=True)
    check_finite(accelerator, model, "the export")
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="1 trainable weights are NaN or infinite; the export not written"):
        check_finite(accelerator, model, "the export")


def error_lines(stderr: str) -> list[str]:
    """The `error:` lines of stderr (progress bars share it)."""
    return [line.split("\r")[-1] for line in stderr.splitlines() if line.split("\r")[-1].startswith("error:")]
