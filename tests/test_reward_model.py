"""Reward models (loss_type: bradley_terry, dpo_accel/reward.py): a LoRA run on the shipped arithmetic pairs
learns (held-out accuracy before and after), its export loads with from_pretrained and scores the held-out
pairs exactly as training did, and a policy run uses it as eval.reward_model; a run resumed from a mid-run
checkpoint equals the straight run, and a non-finite step is skipped. The full fine-tuning run is the
"bradley_terry" case of tests/test_objectives_e2e.py."""
from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import REPO, paired_steps, poison_objective, reset_accelerate, tiny_overrides
from dpo_accel import train
from dpo_accel.outputs.checkpoints import NonFiniteError
from dpo_accel.config.load import load_recipe


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory) -> str:
    from conftest import build_small_vocab_model

    return build_small_vocab_model(str(tmp_path_factory.mktemp("rm_small_vocab")))


@pytest.fixture(scope="module")
def lora_reward_run(small_model_dir, tmp_path_factory) -> tuple:
    out = str(tmp_path_factory.mktemp("rm") / "run")
    summary = train.run(load_recipe(None, tiny_overrides(small_model_dir, out, **{
        "loss.loss_type": "bradley_terry", "lora.use_peft": True, "lora.lora_r": 8, "lora.lora_alpha": 16,
        "lora.lora_dropout": 0.0, "train.learning_rate": 5e-3, "train.max_steps": 12, "data.max_eval_samples": 16,
        "train.report_to": []})))
    return out, summary


def test_lora_reward_model_learns_the_shipped_task(lora_reward_run):
    out, summary = lora_reward_run
    before, after = summary["eval_before"], summary["eval"]
    print(f"\nheld-out accuracy {before['eval/rewards/accuracies']:.3f} -> {after['eval/rewards/accuracies']:.3f}, "
          f"margin {before['eval/rewards/margins']:.3f} -> {after['eval/rewards/margins']:.3f}")
    assert after["eval/rewards/accuracies"] >= 0.75 and after["eval/rewards/accuracies"] > before["eval/rewards/accuracies"]
    assert after["eval/rewards/margins"] > before["eval/rewards/margins"]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        steps = [r for r in map(json.loads, f) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert {"rewards/accuracies", "rewards/margins", "rewards/mean", "grad_norm"} <= set(steps[-1])


def test_export_scores_pairs_as_in_training(lora_reward_run):
    """The merged export, loaded by AutoModelForSequenceClassification through judge.load_reward_model, gives
    the held-out rewards the run measured with the adapter attached (same text, same pooling)."""
    from dpo_accel.data.formats import load_preference_splits
    from dpo_accel.evaluation.judge import load_reward_model, reward_scores

    out, summary = lora_reward_run
    recipe = load_recipe(os.path.join(out, "recipe.yaml"))
    eval_rows = load_preference_splits(recipe.data, recipe.train.seed)["eval"]
    model, tokenizer = load_reward_model(os.path.join(out, "model"), torch.device("cpu"))
    assert not any("lora" in n for n, _ in model.named_parameters())  # merged: a plain classifier
    chosen = reward_scores(model, tokenizer, eval_rows["prompt"], eval_rows["chosen"], batch_size=5)
    rejected = reward_scores(model, tokenizer, eval_rows["prompt"], eval_rows["rejected"], batch_size=3)
    chosen, rejected = torch.tensor(chosen), torch.tensor(rejected)
    after = summary["eval"]
    assert float(chosen.mean()) == pytest.approx(after["eval/rewards/chosen"], abs=1e-4)
    assert float(rejected.mean()) == pytest.approx(after["eval/rewards/rejected"], abs=1e-4)
    assert float((chosen > rejected).float().mean()) == pytest.approx(after["eval/rewards/accuracies"], abs=1e-6)


def test_a_run_uses_the_trained_model_as_eval_reward_model(lora_reward_run, small_model_dir, tmp_path):
    out, _ = lora_reward_run
    policy_out = str(tmp_path / "policy")
    summary = train.run(load_recipe(None, tiny_overrides(small_model_dir, policy_out, **{
        "train.max_steps": 2, "train.report_to": [], "eval.generation_prompts": 4, "eval.max_new_tokens": 8,
        "eval.reward_model": os.path.join(out, "model")})))
    assert {"reward_before", "reward_after"} <= set(summary["judge"])
    with open(os.path.join(policy_out, "judge.json")) as f:
        judged = json.load(f)
    assert judged["scores"]["reward_after"] == pytest.approx(summary["judge"]["reward_after"])


def test_margin_column_reaches_the_loss(small_model_dir, tmp_path):
    """A dataset's margin column (TRL's reward format) is kept by normalisation and subtracted in the loss:
    at step 1 the loss is the mean of -log σ(r_w - r_l - m) over the batch, not of -log σ(r_w - r_l)."""
    from dpo_accel.data.formats import load_preference_splits
    from dpo_accel.config.schema import DataConfig

    folder = tmp_path / "margins"
    folder.mkdir()
    with open(os.path.join(REPO, "data", "arith_prefs", "train.jsonl")) as f:
        rows = [json.loads(line) for line in f][:8]
    with open(folder / "train.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps({**row, "margin": 3.0}) + "\n")
    split = load_preference_splits(DataConfig(dataset_name=str(folder), eval_split=None), 0)["train"]
    assert split["margin"] == [3.0] * 8
    out = str(tmp_path / "run")
    train.run(load_recipe(None, tiny_overrides(small_model_dir, out, **{
        "data.dataset_name": str(folder), "data.eval_split": None, "data.max_eval_samples": None,
        "loss.loss_type": "bradley_terry", "train.max_steps": 1, "train.report_to": [],
        "train.per_device_train_batch_size": 8})))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        step = json.loads(f.readline())
    # Untrained head: rewards near 0, so -log σ(margin - 3) is near -log σ(-3) = 3.049, far from log 2.
    assert step["loss"] > 2.5, step


def rm_sets(model_dir: str, out: str, **extra) -> list[str]:
    """12 pairs, 4 a step: 3 steps an epoch, so a resume at step 2 skips 2 batches of epoch 0 and step 4 is
    in epoch 1 (its own shuffle)."""
    return tiny_overrides(model_dir, out, **{
        "loss.loss_type": "bradley_terry", "lora.use_peft": True, "lora.lora_r": 8, "lora.lora_alpha": 16,
        "lora.lora_dropout": 0.0, "train.learning_rate": 5e-3, "data.max_train_samples": 12, "train.max_steps": 4,
        "train.save_steps": 2, "train.save_total_limit": 5, "train.logging_steps": 1, "train.report_to": [],
        "eval.do_eval": False, **extra})


def reward_steps(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "rewards/accuracies" in r]


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_reward_resume_from_a_checkpoint_equals_the_straight_run(small_model_dir, tmp_path, lora):
    """Killed after step 2's checkpoint, resumed: the same batches (mid-epoch skip, then epoch 1's order), per-step
    losses and accuracies, and bitwise the same exported weights. LoRA checkpoints hold the adapter and head only."""
    from safetensors.torch import load_file
    from conftest import stop_after

    out = str(tmp_path / "run")
    sets = rm_sets(small_model_dir, out, **{"lora.use_peft": lora})
    train.run(load_recipe(None, sets))
    straight = reward_steps(out)
    straight_weights = load_file(os.path.join(out, "model", "model.safetensors"))
    assert [r["step"] for r in straight] == [1, 2, 3, 4] and [r["epoch"] for r in straight] == [0, 0, 0, 1]
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["checkpoint-0000002", "checkpoint-0000004"]
    with open(os.path.join(out, "checkpoints", "checkpoint-0000002", "trainer_state.json")) as f:
        state = json.load(f)
    assert state["global_step"] == 2 and state["steps_per_epoch"] == 3
    assert state["weights"] == ("trainable" if lora else "full")
    stop_after(out, 2)
    reset_accelerate()
    summary = train.run(load_recipe(None, sets), resume=True)
    assert summary["global_step"] == 4
    resumed = reward_steps(out)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in paired_steps(straight, resumed):
        for key in ("loss", "rewards/accuracies", "rewards/margins", "grad_norm", "learning_rate"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
    weights = load_file(os.path.join(out, "model", "model.safetensors"))
    assert weights.keys() == straight_weights.keys()
    for name, tensor in straight_weights.items():
        assert torch.equal(weights[name], tensor), name


def poison(monkeypatch, steps) -> None:
    """The reward loop's objective returns a NaN loss at the given (1-based) calls."""
    from dpo_accel.loops import reward

    poison_objective(monkeypatch, reward, steps)


def test_reward_non_finite_step_is_skipped_and_weights_stay_finite(small_model_dir, tmp_path, monkeypatch):
    """A NaN loss at step 2 (a poisoned objective): the step is skipped and logged, the run goes on and
    checkpoints, no NaN weight is exported."""
    from safetensors.torch import load_file

    poison(monkeypatch, {2})
    out = str(tmp_path / "run")
    summary = train.run(load_recipe(None, rm_sets(small_model_dir, out)))
    assert summary["global_step"] == 4
    steps = reward_steps(out)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert steps[1]["loss"] is None and steps[1]["skipped"] is True and steps[1]["nonfinite_steps"] == 1
    assert all(r["loss"] is not None and "skipped" not in r for r in steps[::2] + steps[3:])
    assert steps[1]["learning_rate"] == steps[2]["learning_rate"]  # the scheduler did not move
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["checkpoint-0000002", "checkpoint-0000004"]
    for name, tensor in load_file(os.path.join(out, "model", "model.safetensors")).items():
        assert torch.isfinite(tensor).all(), name


def test_reward_non_finite_steps_in_a_row_stop_the_run(small_model_dir, tmp_path, monkeypatch):
    poison(monkeypatch, {2, 3})
    out = str(tmp_path / "run")
    with pytest.raises(NonFiniteError, match="2 optimizer steps in a row"):
        train.run(load_recipe(None, rm_sets(small_model_dir, out, **{"train.max_nonfinite_steps": 2})))
    assert [r.get("skipped", False) for r in reward_steps(out)] == [False, True, True]
    # Stopped at step 3: step 2's checkpoint holds step 1's weights (the skip changed nothing), none after it.
    assert os.listdir(os.path.join(out, "checkpoints")) == ["checkpoint-0000002"]
