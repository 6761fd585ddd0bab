"""A vision-language model's DPO on 2 real gloo ranks equals one process: the tiny random LLaVA (conftest's
``llava_dir``), LoRA on its language model with the projector trained beside it (``lora.train_projector``),
the adapter-off reference, the shared (prefix-sharing) layout, on shapes pairs.

One launch of ``accelerate launch --config_file accelerate_configs/cpu_two_process.yaml dpo_accel/train.py``
(2 ranks x 2 pairs a step) against one in-process run (1 rank x 4 pairs), same seed, same data order (the
length-grouped sampler orders by the global batch): the same per-step metrics, token and pair counts, held-out
metrics over 5 pairs (an uneven last batch on 2 ranks), greedy generations before and after, and the same
exported adapter (LoRA and the projector's trained copy) and merged model. Both start-up lines say the layout.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import CONFIGS, REPO, free_port, paired_steps, reset_accelerate, vision_overrides, write_shapes

TRAIN = os.path.join(REPO, "dpo_accel", "train.py")
TRAIN_PAIRS, EVAL_PAIRS = 8, 5  # 2 steps an epoch; 5 held-out pairs: the 2 x 2 eval batch ends uneven
RUN = {"train.max_steps": 4, "train.learning_rate": 5e-3, "lora.train_projector": True,
       "train.mixed_precision": "\"no\"", "eval.generation_prompts": 2, "eval.max_new_tokens": 4,
       "eval.behaviour": "shapes"}
STEP_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected", "grad_norm", "learning_rate")
EVAL_KEYS = ("eval/loss", "eval/rewards/chosen", "eval/rewards/rejected", "eval/rewards/accuracies",
             "eval/rewards/margins", "eval/logps/chosen", "eval/logps/rejected")
# float32 both ways; what differs is summation order only: each rank pads its 2 pairs to their own width (the
# single process pads 4 to the widest), DDP averages two half-batch gradients, one thread per rank. Measured on
# 2 CPU cores: loss and grad norm within 1e-7 relative, the held-out metrics bitwise equal, the rewards within
# 1e-7 absolute. A reward is beta (0.1) x a difference of ~250-nat float32 log-probs (one ulp: 1.5e-5), so a
# few of their ulps make ~1e-5 of it: ABS. REL 1e-5 is a tenth of the text tests' bound and 100x the measured
# one, because little separates right from wrong here: a rank that hands each pair the other pair's image moves
# this random tiny model's step-1 log-probs by only 1e-4. AdamW divides by sqrt(v), so a gradient that is
# rounding noise turns into a fraction of a step (lr 5e-3): WEIGHT_ATOL (measured 1e-7) is the text tests'
# bound, a fiftieth of one step.
REL, ABS, WEIGHT_ATOL = 1e-5, 1e-5, 1e-4
SHARED_LINE = "| layout shared, shared rows (one per pair): each pair's image and prompt run once"


def overrides(model_dir: str, data_dir: str, out: str, per_device: int) -> list:
    return vision_overrides(model_dir, data_dir, out, **{"train.per_device_train_batch_size": per_device,
                                                         "train.per_device_eval_batch_size": per_device, **RUN})


def read_run(out: str, stdout: str) -> dict:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    generations = {}
    for when in ("before", "after"):
        with open(os.path.join(out, f"generations_{when}.json")) as f:
            generations[when] = json.load(f)
    return {"steps": [r for r in rows if "loss" in r], "summary": summary, "generations": generations, "out": out,
            "stdout": stdout}


def weights(out: str, kind: str) -> dict:
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if kind == "adapter" else "model.safetensors"
    return load_file(os.path.join(out, kind, name))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return write_shapes(tmp_path_factory.mktemp("shapes_ddp") / "data", train_rows=TRAIN_PAIRS, test_rows=EVAL_PAIRS)


@pytest.fixture(scope="module")
def one_process(llava_dir, data_dir, tmp_path_factory) -> dict:
    """1 rank x 4 pairs, in this interpreter (its console lines kept)."""
    from dpo_accel import train
    from dpo_accel.config.load import load_recipe

    out, printed = str(tmp_path_factory.mktemp("one") / "run"), io.StringIO()
    reset_accelerate()
    try:
        with contextlib.redirect_stdout(printed):
            train.run(load_recipe(None, overrides(llava_dir, data_dir, out, 4)))
    finally:
        reset_accelerate()
    return read_run(out, printed.getvalue())


@pytest.fixture(scope="module")
def two_processes(llava_dir, data_dir, tmp_path_factory) -> dict:
    """2 gloo ranks x 2 pairs: `accelerate launch` of train.py as a subprocess."""
    out = str(tmp_path_factory.mktemp("two") / "run")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(CONFIGS, "cpu_two_process.yaml"), "--main_process_port", str(free_port()), TRAIN]
    for setting in overrides(llava_dir, data_dir, out, 2):
        cmd += ["--set", setting]
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return read_run(out, proc.stdout)


def differences(a: float, b: float) -> tuple:
    """(absolute, relative) difference of `b` from `a`."""
    return abs(b - a), abs(b - a) / max(abs(a), 1e-12)


@pytest.mark.slow
def test_two_ranks_x2_train_evaluate_and_export_as_one_rank_x4(one_process, two_processes):
    """Every logged step (loss curve, rewards, log-probs, grad norm), the counts, the held-out metrics and both
    exports agree; the baseline learns and its eval split is uneven, so agreement is not trivial."""
    a, b = one_process, two_processes
    losses = [r["loss"] for r in a["steps"]]
    assert losses[0] == pytest.approx(0.6931, abs=1e-3) and losses[-1] < losses[0] - 0.01
    assert a["summary"]["data"]["eval"]["kept"] == b["summary"]["data"]["eval"]["kept"] == EVAL_PAIRS
    assert [r["step"] for r in a["steps"]] == [1, 2, 3, 4]
    worst = []
    for ra, rb in paired_steps(a["steps"], b["steps"]):
        assert (ra["num_pairs"], ra["num_tokens"]) == (rb["num_pairs"], rb["num_tokens"]) and ra["num_pairs"] == 4
        for key in STEP_KEYS:
            assert rb[key] == pytest.approx(ra[key], rel=REL, abs=ABS), (ra["step"], key, ra[key], rb[key])
            worst.append(differences(ra[key], rb[key]))
    for key in EVAL_KEYS:
        assert b["summary"]["eval"][key] == pytest.approx(a["summary"]["eval"][key], rel=REL, abs=ABS), key
        worst.append(differences(a["summary"]["eval"][key], b["summary"]["eval"][key]))
    largest = {}
    for kind in ("adapter", "model"):
        wa, wb = weights(a["out"], kind), weights(b["out"], kind)
        assert wa.keys() == wb.keys() and wa
        for name in wa:
            torch.testing.assert_close(wb[name], wa[name], atol=WEIGHT_ATOL, rtol=1e-4, msg=f"{kind}: {name}")
        largest[kind] = max(float((wb[n] - wa[n]).abs().max()) for n in wa)
    projector = [k for k in weights(a["out"], "adapter") if "multi_modal_projector" in k]
    assert projector, "the trained projector is not in the adapter: it was not compared"
    print(f"\nlargest differences: metrics {max(w[0] for w in worst):.1e} absolute, "
          f"{max(w[1] for w in worst):.1e} relative; adapter {largest['adapter']:.1e}, "
          f"merged model {largest['model']:.1e}")


@pytest.mark.slow
def test_two_ranks_generate_as_one_rank_before_and_after(one_process, two_processes):
    """The main rank's greedy answers to the held-out image prompts, and their shapes scores, are one rank's."""
    for when in ("before", "after"):
        a, b = one_process["generations"][when], two_processes["generations"][when]
        assert len(a["samples"]) == RUN["eval.generation_prompts"]
        assert b["samples"] == a["samples"], when
        assert b["scores"] == a["scores"], when
    assert two_processes["summary"]["behaviour"] == one_process["summary"]["behaviour"]


@pytest.mark.slow
def test_start_up_lines_say_the_shared_layout_on_two_ranks(one_process, two_processes):
    """Each run's self-check kept the shared layout (the default) and said so; the launch ran 2 ranks."""
    for run, pairs, processes in ((one_process, 4, 1), (two_processes, 2, 2)):
        printed = run["stdout"]
        line = next((l for l in printed.splitlines() if "log-probs: vision-language model 'llava'" in l), "")
        assert SHARED_LINE in line and f"self-check on {pairs} pairs: equal to stacked rows within" in line, line
        assert f"| {processes} process(es)" in printed and "| prefix sharing (one row per pair" in printed, \
            printed[-2000:]
        assert "4 steps of 4 pairs" in printed, printed[-2000:]
