"""Preflight: the recipe resolved once into a plan, the checks `run()` shares with `main()`, and --resume
refusing a checkpoint written at another data position."""
from __future__ import annotations

import json
import os

import pytest
import torch

from dpo_accel.outputs.metrics_log import truncate_metrics
from conftest import tiny_overrides
from dpo_accel import train
from dpo_accel.objectives import registry as losses
from dpo_accel.outputs.checkpoints import STATE_FILE
from dpo_accel.outputs.files import atomic_write
from dpo_accel.config.plan import check_resume_data, preflight
from dpo_accel.config.errors import RecipeError, did_you_mean
from dpo_accel.config.load import load_recipe
from dpo_accel.config.schema import dump_recipe


def recipe_for(out, **extra):
    return load_recipe(None, tiny_overrides("unused-model", str(out), **extra))


def fake_checkpoint(out, recipe, step=2, processes=1, **state) -> str:
    """What save_checkpoint leaves: the resolved recipe, the trainer state, one RNG file per process."""
    path = os.path.join(out, "checkpoints", f"checkpoint-{step:07d}")
    os.makedirs(path)
    dump_recipe(recipe, os.path.join(path, "recipe.yaml"))
    for rank in range(processes):
        open(os.path.join(path, f"random_states_{rank}.pkl"), "wb").close()
    with open(os.path.join(path, STATE_FILE), "w") as f:
        json.dump({"global_step": step, "epoch": 0, "steps_per_epoch": 6, **state}, f)
    return path


def test_the_plan_is_resolved_once_and_read_after(tmp_path, monkeypatch):
    plan = preflight(recipe_for(tmp_path / "a", **{"loss.rpo_alpha": 1.0, "lora.use_peft": True}), processes=2)
    assert plan.reference_mode == "adapter_off" and plan.pairs and not plan.objective.wpo
    assert (plan.geometry.per_device, plan.geometry.accumulation, plan.geometry.global_batch) == (4, 1, 8)
    assert plan.resume_from is None and plan.layout is None
    assert preflight(recipe_for(tmp_path / "b", **{"loss.loss_type": "simpo"})).reference_mode == "none"
    assert not preflight(recipe_for(tmp_path / "c", **{"loss.loss_type": "sft"})).pairs

    def derived(*args):
        raise AssertionError("the loss plan was derived again")

    monkeypatch.setattr(losses, "_plan", derived)  # the loop's calls must read the plan only
    policy = {"chosen_logps": -torch.rand(3) * 10, "rejected_logps": -torch.rand(3) * 10,
              "chosen_tokens": torch.full((3,), 5.0), "rejected_tokens": torch.full((3,), 6.0)}
    reference = {"chosen_logps": -torch.rand(3) * 10, "rejected_logps": -torch.rand(3) * 10}
    out = losses.compute_objective(plan.objective, policy, reference)
    assert out.losses.shape == (3,) and "nll" in out.metrics
    assert losses.needs_reference(plan.objective) and losses.needs_rejected(plan.objective)
    assert not losses.uses_wpo(plan.objective)


def test_run_from_python_makes_the_checks_of_main(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(RecipeError, match="already holds a run"):
        train.run(recipe_for(out))
    with pytest.raises(ValueError, match="has no effect on loss_type sigmoid"):
        train.run(recipe_for(tmp_path / "new", **{"loss.simpo_gamma": 2.0}))
    assert not (tmp_path / "new").exists()


def one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


def test_resume_refuses_a_moved_data_position_naming_key_and_values(tmp_path):
    out = tmp_path / "run"
    fake_checkpoint(out, recipe_for(out))
    for key, value, shown in (("train.per_device_train_batch_size", 2, "is 2 but the checkpoint checkpoint-0000002 "
                                                                        "was written with 4"),
                              ("train.gradient_accumulation_steps", 2, "is 2 but"), ("train.seed", 7, "is 7 but"),
                              ("data.max_length", 80, "is 80 but"), ("data.truncation_mode", "keep_start", "keep_end"),
                              ("data.dataset_name", "other", "'other' but")):
        with pytest.raises(RecipeError) as e:
            preflight(recipe_for(out, **{key: value}), resume=True)
        assert f"--resume: {key} " in one_line(e) and shown in one_line(e), one_line(e)
    with pytest.raises(RecipeError) as e:
        preflight(recipe_for(out), resume=True, processes=2)
    assert "written by 1 process(es), this launch has 2" in one_line(e)
    with pytest.raises(RecipeError) as e:
        preflight(recipe_for(out, **{"train.max_steps": 1}), resume=True)
    assert "train.max_steps 1 is below" in one_line(e)


def test_resume_allows_and_notes_what_keeps_the_data_position(tmp_path, capsys):
    out = tmp_path / "run"
    checkpoint = fake_checkpoint(out, recipe_for(out))
    plan = preflight(recipe_for(out, **{"train.logging_steps": 2, "train.max_steps": 8, "train.save_steps": 3,
                                        "train.eval_steps": 2, "data.max_eval_samples": 4}), resume=True)
    assert plan.resume_from == checkpoint
    note = capsys.readouterr().out
    for change in ("train.logging_steps 1 -> 2", "train.max_steps 4 -> 8", "train.save_steps 0 -> 3",
                   "data.max_eval_samples 8 -> 4"):
        assert change in note, note
    preflight(recipe_for(out), resume=True)
    assert "changed since the checkpoint" not in capsys.readouterr().out


def test_resume_keeps_the_auto_micro_batch_of_its_checkpoint(tmp_path):
    out = tmp_path / "run"
    saved = recipe_for(out, **{"train.auto_find_batch_size": True, "train.per_device_train_batch_size": 2,
                               "train.gradient_accumulation_steps": 2})
    fake_checkpoint(out, saved)
    plan = preflight(recipe_for(out, **{"train.auto_find_batch_size": True}), resume=True)  # asks 4 x 1 again
    assert (plan.geometry.per_device, plan.geometry.accumulation, plan.search_micro_batch) == (2, 2, False)
    assert plan.recipe.train.per_device_train_batch_size == 2  # what setup builds and saves


def test_resume_checks_the_tokenised_data_after_they_are_built(tmp_path):
    out = tmp_path / "run"
    fake_checkpoint(out, recipe_for(out), train_fingerprint="abc")
    plan = preflight(recipe_for(out), resume=True)
    check_resume_data(plan, "abc", 6)
    with pytest.raises(RecipeError, match="tokenised training data .fingerprint xyz. are not the ones"):
        check_resume_data(plan, "xyz", 6)
    with pytest.raises(RecipeError, match="an epoch is 5 steps but 6 in the checkpoint"):
        check_resume_data(plan, "abc", 5)


def test_resume_with_another_seed_stops_main_in_one_line(tiny_model_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    sets = tiny_overrides(tiny_model_dir, out, **{"train.max_steps": 2, "train.save_steps": 2, "eval.do_eval": False,
                                                  "data.max_train_samples": 8, "train.export_merged": False})
    train.run(load_recipe(None, sets))
    args = [a for s in sets for a in ("--set", s)]
    capsys.readouterr()
    assert train.main(args + ["--set", "train.seed=1", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --resume: train.seed is 1 but the checkpoint checkpoint-0000002 was written with 42, which "
                   "would continue at another data position; set it back or start a new train.output_dir")


def test_atomic_write_leaves_the_old_entry_or_the_new_one(tmp_path):
    final = tmp_path / "model"
    with atomic_write(str(final)) as tmp:
        os.makedirs(tmp)
        (tmp_path / os.path.basename(tmp) / "a").write_text("1")
    assert (final / "a").read_text() == "1"
    with pytest.raises(RuntimeError):
        with atomic_write(str(final)) as tmp:
            os.makedirs(tmp)
            raise RuntimeError("killed mid-save")
    assert (final / "a").read_text() == "1" and sorted(os.listdir(tmp_path)) == ["model"]
    with atomic_write(str(final), unique=True, replace=False) as tmp:  # another process finished first
        os.makedirs(tmp)
    assert (final / "a").read_text() == "1" and sorted(os.listdir(tmp_path)) == ["model"]


def test_one_spelling_helper_for_keys_and_names():
    assert did_you_mean("train.learnin_rate", ["train.learning_rate", "loss.beta"]) == "; did you mean 'train.learning_rate'?"
    assert did_you_mean("learning_rate", ["train.learning_rate", "loss.beta"]) == "; did you mean 'train.learning_rate'?"
    assert did_you_mean("sigmod", ["sigmoid", "ipo"], cutoff=0.6, list_choices=True) == "; did you mean 'sigmoid'?"
    assert did_you_mean("zzz", ["sigmoid", "ipo"], list_choices=True) == "; choose one of: sigmoid, ipo"
    assert did_you_mean("zzz", ["train.seed"]) == ""


def test_the_package_exposes_what_a_python_user_needs():
    import dpo_accel

    assert dpo_accel.run is train.run and dpo_accel.LOSSES is losses.LOSSES
    for name in ("load_recipe", "PreferenceLogpsModel", "compute_objective", "concatenated_forward",
                 "preference_loss", "preflight"):
        assert name in dpo_accel.__all__ and hasattr(dpo_accel, name)


def test_resume_refuses_changed_optimizer_keys_with_the_batch_in_one_line(tmp_path):
    """The scheduler's base learning rates come back from the checkpoint: a new one would be ignored."""
    out = tmp_path / "run"
    fake_checkpoint(out, recipe_for(out))
    with pytest.raises(RecipeError) as e:
        preflight(recipe_for(out, **{"train.per_device_train_batch_size": 8, "train.learning_rate": 1e-2}), resume=True)
    assert one_line(e) == ("--resume: train.per_device_train_batch_size is 8, train.learning_rate is 0.01 but the "
                           "checkpoint checkpoint-0000002 was written with 4, 0.001, which would continue at another "
                           "data position and be ignored by the restored optimizer and scheduler state; set them back "
                           "or start a new train.output_dir")


def test_resume_before_the_first_checkpoint_starts_over_and_a_damaged_one_is_named(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 0.7}\n{"step": 2, "lo')  # killed mid-line
    with pytest.raises(RecipeError, match="already holds a run; pass --resume"):
        preflight(recipe_for(out))
    assert preflight(recipe_for(out), resume=True).resume_from is None
    assert "no complete checkpoint yet; starting the run from scratch there" in capsys.readouterr().out
    truncate_metrics(str(out), 0)
    assert (out / "metrics.jsonl").read_text() == ""
    with pytest.raises(RecipeError, match="no run started there; drop --resume"):
        preflight(recipe_for(tmp_path / "empty"), resume=True)
    path = fake_checkpoint(out, recipe_for(out), files={"model.safetensors": 10})
    with pytest.raises(RecipeError) as e:
        preflight(recipe_for(out), resume=True)
    assert "checkpoint-0000002 is damaged: model.safetensors is missing" in one_line(e)
    with open(os.path.join(path, STATE_FILE), "w") as f:
        f.write('{"global_step": ')
    with pytest.raises(RecipeError, match="is damaged .JSONDecodeError"):
        preflight(recipe_for(out), resume=True)
