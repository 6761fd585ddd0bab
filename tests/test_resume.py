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

from conftest import REPO, reset_accelerate, tiny_overrides
from dpo_accel import train
from dpo_accel.recipe import load_recipe

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


def stop_after(out: str, step: int) -> None:
    """As if killed after the checkpoint of `step`: later checkpoints and the finished outputs gone."""
    root = os.path.join(out, "checkpoints")
    for name in os.listdir(root):
        if int(name.split("-")[1]) > step:
            shutil.rmtree(os.path.join(root, name))
    for name in ("model", "summary.json"):
        path = os.path.join(out, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def assert_bitwise(straight_steps, straight_weights, out):
    resumed = steps(out)
    assert [r["step"] for r in resumed] == list(range(1, 13))
    for a, b in zip(straight_steps, resumed):
        for key in STEP_KEYS:
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
    weights = final_weights(out)
    assert weights.keys() == straight_weights.keys()
    for name, tensor in straight_weights.items():
        assert torch.equal(weights[name], tensor), name


def test_resume_mid_epoch_2_and_3_is_bitwise_the_straight_run(tiny_model_dir, tmp_path):
    out = str(tmp_path / "run")
    overrides = tiny_overrides(tiny_model_dir, out, **EPOCHS)
    train.run(load_recipe(None, overrides))
    straight_steps, straight_weights = steps(out), final_weights(out)
    assert {r["epoch"] for r in straight_steps} == {0, 1, 2}
    for stop in (10, 6):  # mid-epoch 3, then mid-epoch 2 (the later checkpoints are dropped each time)
        stop_after(out, stop)
        reset_accelerate()
        train.run(load_recipe(None, overrides), resume=True)
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
