"""Exact resume in every epoch: a run stopped mid-epoch 2 or mid-epoch 3 and continued with --resume gives
bitwise the straight run's per-step losses and final weights, in one process and on 2 gloo ranks."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, paired_steps, reset_accelerate, stop_after, tiny_overrides
from dpo_accel import train
from dpo_accel.config.load import load_recipe

STEP_KEYS = ("loss", "grad_norm", "learning_rate", "rewards/margins")
# 16 pairs, 4 per step: 4 steps an epoch, 3 epochs; a checkpoint every 2 steps, all kept.
EPOCHS = {"data.max_train_samples": 16, "train.max_steps": 12, "train.save_steps": 2, "train.save_total_limit": 10,
          "train.logging_steps": 1, "eval.do_eval": False, "train.report_to": []}


def steps(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def final_weights(out: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "model", "model.safetensors"))


def assert_bitwise(straight_steps, straight_weights, out):
    resumed = steps(out)
    assert [r["step"] for r in resumed] == list(range(1, 13))
    for a, b in paired_steps(straight_steps, resumed):
        for key in STEP_KEYS:
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
    weights = final_weights(out)
    assert weights.keys() == straight_weights.keys()
    for name, tensor in straight_weights.items():
        assert torch.equal(weights[name], tensor), name


def test_resume_mid_epoch_2_and_3_is_bitwise_the_straight_run(tiny_model_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    overrides = tiny_overrides(tiny_model_dir, out, **EPOCHS)
    train.run(load_recipe(None, overrides))
    straight_steps, straight_weights = steps(out), final_weights(out)
    assert {r["epoch"] for r in straight_steps} == {0, 1, 2}
    for stop in (10, 6):  # mid-epoch 3, then mid-epoch 2 (the later checkpoints are dropped each time)
        stop_after(out, stop)
        reset_accelerate()
        train.run(load_recipe(None, overrides), resume=True)
        assert "as the run measured it" in capsys.readouterr().out  # each batch in the layout it had
        assert_bitwise(straight_steps, straight_weights, out)


@pytest.mark.slow
def test_two_gloo_ranks_resume_mid_epoch_2_bitwise(tiny_model_dir, tmp_path):
    """One launch pair: 2 ranks x 2 pairs straight through, then resumed from step 6 through epoch 3."""
    out = str(tmp_path / "run")

    def launch(*args):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               os.path.join(REPO, "accelerate_configs", "cpu_two_process.yaml"),
               os.path.join(REPO, "dpo_accel", "train.py"), *args]
        for s in tiny_overrides(tiny_model_dir, out, **{**EPOCHS, "train.per_device_train_batch_size": 2}):
            cmd += ["--set", s]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "| 2 process(es)" in proc.stdout, proc.stdout[-2000:]
        return proc.stdout

    launch()
    straight_steps, straight_weights = steps(out), final_weights(out)
    stop_after(out, 6)
    assert "resumed at step 6" in launch("--resume")
    assert_bitwise(straight_steps, straight_weights, out)


def test_lora_checkpoint_holds_the_adapter_resumes_bitwise_and_names_a_changed_base(tiny_model_dir, tmp_path,
                                                                                    monkeypatch, capsys):
    """A LoRA checkpoint holds what training changes (adapter, optimizer, scheduler, RNG), not the frozen
    base; resumed, it equals the straight run bitwise; on a changed base it stops in one line; a full disk
    leaves the previous checkpoint as it was."""
    import errno

    from safetensors.torch import load_file, save_file

    base = str(tmp_path / "base")
    shutil.copytree(tiny_model_dir, base)
    out = str(tmp_path / "run")
    sets = tiny_overrides(base, out, **{**EPOCHS, "train.max_steps": 6, "lora.use_peft": True, "lora.lora_r": 4,
                                        "lora.lora_alpha": 8, "lora.lora_dropout": 0.0, "train.export_merged": False})
    train.run(load_recipe(None, sets))
    straight_steps = steps(out)
    adapter = load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))
    checkpoint = os.path.join(out, "checkpoints", "checkpoint-0000004")
    saved = load_file(os.path.join(checkpoint, "model.safetensors"))
    assert saved and all("lora_" in k for k in saved), sorted(saved)[:3]
    full = os.path.getsize(os.path.join(base, "model.safetensors"))
    assert os.path.getsize(os.path.join(checkpoint, "model.safetensors")) < full / 10

    stop_after(out, 4)  # mid-epoch 2
    reset_accelerate()
    train.run(load_recipe(None, sets), resume=True)
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in steps(out)] == \
        [(r["step"], r["loss"], r["grad_norm"]) for r in straight_steps]
    for name, tensor in load_file(os.path.join(out, "adapter", "adapter_model.safetensors")).items():
        assert torch.equal(tensor, adapter[name]), name

    # A full disk while writing checkpoint-6: one line, exit 3, checkpoint-4 as it was.
    stop_after(out, 4)
    before = {n: open(os.path.join(checkpoint, n), "rb").read() for n in os.listdir(checkpoint)}
    reset_accelerate()
    import accelerate.utils.other as other

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(other, "safe_save_file", full_disk)
        capsys.readouterr()
        assert train.main([a for s in sets for a in ("--set", s)] + ["--resume"]) == 3
    err = [line.split("\r")[-1] for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and "checkpoint-0000006 not written: No space left on device" in err[0], err
    assert "it needs about" in err[0] and "the previous checkpoint is kept" in err[0]
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["checkpoint-0000002", "checkpoint-0000004"]
    assert {n: open(os.path.join(checkpoint, n), "rb").read() for n in os.listdir(checkpoint)} == before

    # Another base under the same path: named in one line before a step is taken.
    weights = load_file(os.path.join(base, "model.safetensors"))
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3
    save_file(weights, os.path.join(base, "model.safetensors"), metadata={"format": "pt"})
    reset_accelerate()
    capsys.readouterr()
    assert train.main([a for s in sets for a in ("--set", s)] + ["--resume"]) == 2
    err = [line.split("\r")[-1] for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and "the frozen base weights (fingerprint" in err[0], err
