"""Online DPO (train.online_generations, dpo_accel/loops/online.py): pairs built from scored answers as specified
(best vs worst, ties and all-equal groups skipped and counted), a run on a tiny model with a scripted
verifier that takes real DPO steps on the pairs it generated, a resumed run equal to the straight one, and
two gloo ranks."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import (REPO, build_small_vocab_model, drop_chat_template, paired_steps, poison_objective,
                     reset_accelerate, tiny_overrides)
from dpo_accel.config.loop_checks import check_online
from dpo_accel.data.generated import build_pairs, prompt_order
from dpo_accel.config.errors import RecipeError
from dpo_accel.config.load import load_recipe


def test_best_versus_worst_ties_and_equal_groups_skipped():
    prompts = ["p0", "p1", "p2", "p3"]
    answers = [["a", "b", "c"], ["d", "e", "f"], ["g", "h", "i"], ["same", "same ", "x"]]
    scores = [[0.5, 2.0, -1.0], [1.0, 1.0, 1.0], [3.0, 3.0, 0.0], [1.0, 0.0, 1.0]]
    pairs, skipped = build_pairs(prompts, answers, scores)
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [("p0", "b", "c"), ("p2", "g", "i")]
    assert skipped == 2  # p1: all equal; p3: best and worst read the same
    assert pairs[0]["score_chosen"] == 2.0 and pairs[0]["score_rejected"] == -1.0


def test_prompt_order_is_seeded_and_covers_each_epoch():
    first = prompt_order(5, 0, 0, 5)
    assert sorted(first) == list(range(5)) and first == prompt_order(5, 0, 0, 5)
    assert prompt_order(5, 0, 3, 4)[:2] == first[3:]
    assert sorted(prompt_order(5, 0, 5, 5)) == list(range(5))


@pytest.mark.parametrize("sets,expected", [
    (["train.online_generations=1", "train.online_verifier=arith"], "use 0 (offline) or 2 or more"),
    (["train.online_generations=4"], "exactly one of train.online_verifier"),
    (["train.online_generations=4", "train.online_verifier=arith", "train.online_temperature=0"], "must be > 0"),
    (["train.online_generations=4", "train.online_verifier=nope"], "neither a built-in"),
])
def test_online_settings_fail_in_one_line(sets, expected):
    with pytest.raises(RecipeError) as err:
        load_recipe(None, sets)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)
    assert check_online(load_recipe(None, [])) is None


SCORER = '''
def by_length(prompts, answers):
    """Scripted verifier: longer answers score higher (distinct lengths give a pair for every prompt)."""
    return [float(len(a)) for a in answers]
'''


def test_online_run_generates_scores_pairs_and_steps(tmp_path):
    from conftest import build_small_vocab_model

    from dpo_accel import train

    model_dir = build_small_vocab_model(str(tmp_path / "model"))
    (tmp_path / "scripted.py").write_text(SCORER)
    out = str(tmp_path / "run")
    summary = train.run(load_recipe(None, tiny_overrides(model_dir, out, **{
        "train.online_generations": 4, "train.online_verifier": f"{tmp_path / 'scripted.py'}:by_length",
        "train.online_max_new_tokens": 10, "train.max_steps": 2, "train.report_to": [],
        "train.online_missing_eos_penalty": 0.0,
        "train.export_merged": False})))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        steps = [r for r in map(json.loads, f) if "online/pair_share" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["num_pairs"] + r["online/skipped"] == 4 and r["num_pairs"] >= 1  # 4 prompts per step
        assert r["online/score_max"] >= r["online/score_mean"] > 0
        assert r["num_tokens"] > r["num_pairs"]  # real tokens of the pairs trained on (the model card's count)
    assert steps[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at the first step
    assert steps[0]["grad_norm"] > 0 and steps[0]["rewards/chosen"] == 0.0
    assert summary["global_step"] == 2


def online_sets(model_dir: str, out: str, scorer: str, **extra) -> list[str]:
    return tiny_overrides(model_dir, out, **{
        "train.online_generations": 3, "train.online_verifier": f"{scorer}:by_length",
        "train.online_max_new_tokens": 8, "train.max_steps": 4, "train.save_steps": 2, "train.save_total_limit": 5,
        "train.online_missing_eos_penalty": 0.0,
        "train.logging_steps": 1, "train.report_to": [], "eval.do_eval": False, **extra})


def test_online_resume_from_a_checkpoint_equals_the_straight_run(tmp_path):
    """Killed after step 2's checkpoint, resumed: the same prompts, samples, pairs, losses and final weights."""
    from safetensors.torch import load_file
    from conftest import build_small_vocab_model, stop_after

    from dpo_accel import train

    model_dir = build_small_vocab_model(str(tmp_path / "model"))
    (tmp_path / "scripted.py").write_text(SCORER)
    out = str(tmp_path / "run")
    sets = online_sets(model_dir, out, str(tmp_path / "scripted.py"))
    train.run(load_recipe(None, sets))

    def read():
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rows = [r for r in map(json.loads, f) if "online/pair_share" in r]
        return rows, load_file(os.path.join(out, "model", "model.safetensors"))

    straight, straight_weights = read()
    assert [r["step"] for r in straight] == [1, 2, 3, 4]
    stop_after(out, 2)
    reset_accelerate()
    train.run(load_recipe(None, sets), resume=True)
    resumed, weights = read()
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in paired_steps(straight, resumed):
        for key in ("loss", "grad_norm", "online/score_mean", "num_pairs", "online/skipped"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
    for name, tensor in straight_weights.items():
        assert torch.equal(weights[name], tensor), name


@pytest.mark.slow
def test_online_on_two_gloo_ranks_counts_every_prompt(tmp_path):
    """2 processes x 2 prompts: each answers its own prompts; a process that never has a pair still joins
    each step (no hang); the logged counts are the sums over both (4 prompts a step, rank 1's 2 skipped)."""
    from conftest import build_small_vocab_model

    model_dir = build_small_vocab_model(str(tmp_path / "model"))
    # Rank 1's answers all tie: it never has a pair and must still join every step's all-reduce.
    (tmp_path / "scripted.py").write_text("import os\n" + SCORER.replace(
        "float(len(a))", "float(len(a)) * (os.environ.get('RANK', '0') == '0')"))
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(REPO, "accelerate_configs", "cpu_two_process.yaml"), os.path.join(REPO, "dpo_accel", "train.py")]
    for s in online_sets(model_dir, out, str(tmp_path / "scripted.py"), **{"train.per_device_train_batch_size": 2,
                                                                          "train.save_steps": 0}):
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| 2 process(es)" in proc.stdout, proc.stdout[-2000:]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        steps = [r for r in map(json.loads, f) if "online/pair_share" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert r["online/prompts"] == 4 and r["num_pairs"] + r["online/skipped"] == 4
        assert r["online/skipped"] >= 2 and r["num_pairs"] >= 1 and r["grad_norm"] > 0


def test_online_non_finite_step_is_skipped_and_weights_stay_finite(tmp_path, monkeypatch):
    """A NaN loss at step 2 (a poisoned objective): the step is skipped, the run goes on, no NaN weight."""
    from safetensors.torch import load_file
    from conftest import build_small_vocab_model

    from dpo_accel import train
    from dpo_accel.loops import online

    poison_objective(monkeypatch, online, {2})
    model_dir = build_small_vocab_model(str(tmp_path / "model"))
    (tmp_path / "scripted.py").write_text(SCORER)
    out = str(tmp_path / "run")
    summary = train.run(load_recipe(None, online_sets(model_dir, out, str(tmp_path / "scripted.py"),
                                                       **{"train.save_steps": 0})))
    assert summary["global_step"] == 4
    with open(os.path.join(out, "metrics.jsonl")) as f:
        steps = [r for r in map(json.loads, f) if "online/pair_share" in r]
    assert steps[1]["loss"] is None and all(r["loss"] is not None for r in steps[2:])
    assert steps[1]["learning_rate"] == steps[2]["learning_rate"]  # the scheduler did not move
    for name, tensor in load_file(os.path.join(out, "model", "model.safetensors")).items():
        assert torch.isfinite(tensor).all(), name


def test_an_answer_that_did_not_end_is_left_out_or_scored_down():
    """train.online_missing_eos_penalty: null leaves a cut answer out of the pick; a number takes it off the score
    (TRL's missing_eos_penalty), so a finished answer wins over a cut one of the same score."""
    from dpo_accel.data.generated import best_and_worst, missing_eos_scores

    scores, ended = [3.0, 1.0, 2.0], [False, True, True]
    assert missing_eos_scores(scores, ended, None) == [None, 1.0, 2.0]
    assert best_and_worst(["a", "b", "c"], missing_eos_scores(scores, ended, None)) == (2, 1)  # the cut 3.0 is out
    assert best_and_worst(["a", "b", "c"], missing_eos_scores(scores, ended, 1.5)) == (2, 1)  # 3.0 - 1.5 = 1.5
    assert best_and_worst(["a", "b", "c"], missing_eos_scores(scores, ended, 0.5)) == (0, 1)
    assert best_and_worst(["a", "b"], missing_eos_scores([1.0, 2.0], [False, True], None)) is None  # one left
    assert check_online(load_recipe(None, ["train.online_generations=2", "train.online_verifier=arith",
                                           "train.online_missing_eos_penalty=1.0"])) is None
    with pytest.raises(RecipeError, match="online_missing_eos_penalty must be >= 0"):
        load_recipe(None, ["train.online_generations=2", "train.online_verifier=arith",
                           "train.online_missing_eos_penalty=-1"])


@pytest.mark.parametrize("penalty", [0.0, None])
def test_online_pairs_are_the_token_ids_the_policy_sampled(penalty, tmp_path, monkeypatch):
    """A raw-text model (no chat template): each trained row is the prompt's ids as generation saw them plus the
    answer's sampled ids, its leading space and all, with no EOS added to an answer max_new_tokens cut off; with
    the penalty null, no cut answer is trained on (the rows left are zero-weight stand-ins)."""
    from transformers import AutoTokenizer

    from dpo_accel import train
    from dpo_accel.loops import online

    model_dir = build_small_vocab_model(str(tmp_path / "model"))
    drop_chat_template(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    (tmp_path / "scripted.py").write_text(SCORER)
    sampled, trained = [], []
    real_generate, real_forward = online.generate_on_every_process, online.OnlineKind.forward

    def generate(*args, **kwargs):
        out = real_generate(*args, **kwargs)
        sampled.extend(out)
        return out

    def forward(self, batch):
        if batch["weight"]:
            for ids, mask in zip(batch["chosen_input_ids"], batch["chosen_attention_mask"]):
                trained.append(ids[mask.bool()].tolist())
        return real_forward(self, batch)

    monkeypatch.setattr(online, "generate_on_every_process", generate)
    monkeypatch.setattr(online.OnlineKind, "forward", forward)
    train.run(load_recipe(None, tiny_overrides(model_dir, str(tmp_path / "run"), **{
        "train.online_generations": 3, "train.online_verifier": f"{tmp_path / 'scripted.py'}:by_length",
        "train.online_max_new_tokens": 6, "train.max_steps": 2, "train.report_to": [], "eval.do_eval": False,
        "train.online_missing_eos_penalty": penalty, "train.export_merged": False})))
    as_sampled = {s.prompt_ids + s.answer_ids: s for s in sampled}
    assert all(tuple(row) in as_sampled for row in trained)  # exactly a sampled sequence, nothing re-encoded
    cut = [as_sampled[tuple(row)] for row in trained if not as_sampled[tuple(row)].ended]
    assert all(s.answer_ids[-1] != tok.eos_token_id for s in cut)  # no EOS added to a cut answer
    if penalty is None:
        assert not cut
    else:
        assert trained and cut  # the random model rarely ends within 6 tokens: cut answers were trained on
        assert any(tok.decode(s.answer_ids[:1]).startswith(" ") for s in sampled)  # leading spaces kept as sampled
