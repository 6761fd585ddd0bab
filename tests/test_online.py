"""Online DPO (train.online_generations, dpo_accel/online.py): pairs built from scored answers as specified
(best vs worst, ties and all-equal groups skipped and counted), and a run on a tiny model with a scripted
verifier that takes real DPO steps on the pairs it generated."""
from __future__ import annotations

import json
import os

import pytest

from conftest import tiny_overrides
from dpo_accel.online import _prompt_order, build_pairs, check_online
from dpo_accel.recipe import RecipeError, load_recipe


def test_best_versus_worst_ties_and_equal_groups_skipped():
    prompts = ["p0", "p1", "p2", "p3"]
    answers = [["a", "b", "c"], ["d", "e", "f"], ["g", "h", "i"], ["same", "same ", "x"]]
    scores = [[0.5, 2.0, -1.0], [1.0, 1.0, 1.0], [3.0, 3.0, 0.0], [1.0, 0.0, 1.0]]
    pairs, skipped = build_pairs(prompts, answers, scores)
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [("p0", "b", "c"), ("p2", "g", "i")]
    assert skipped == 2  # p1: all equal; p3: best and worst read the same
    assert pairs[0]["score_chosen"] == 2.0 and pairs[0]["score_rejected"] == -1.0


def test_prompt_order_is_seeded_and_covers_each_epoch():
    first = _prompt_order(5, 0, 0, 5)
    assert sorted(first) == list(range(5)) and first == _prompt_order(5, 0, 0, 5)
    assert _prompt_order(5, 0, 3, 4)[:2] == first[3:]
    assert sorted(_prompt_order(5, 0, 5, 5)) == list(range(5))


@pytest.mark.parametrize("sets,expected", [
    (["train.online_generations=1", "train.online_verifier=arith"], "use 0 (offline) or 2 or more"),
    (["train.online_generations=4"], "exactly one of train.online_verifier"),
    (["train.online_generations=4", "train.online_verifier=arith", "train.online_temperature=0"], "must be > 0"),
    (["train.online_generations=4", "train.online_verifier=nope"], "neither a built-in"),
    (["train.online_generations=4", "train.online_verifier=arith", "train.save_steps=5"], "no checkpoints yet"),
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
    from test_objectives_e2e import build_small_vocab_model

    from dpo_accel import train

    model_dir = build_small_vocab_model(str(tmp_path / "model"))
    (tmp_path / "scripted.py").write_text(SCORER)
    out = str(tmp_path / "run")
    summary = train.run(load_recipe(None, tiny_overrides(model_dir, out, **{
        "train.online_generations": 4, "train.online_verifier": f"{tmp_path / 'scripted.py'}:by_length",
        "train.online_max_new_tokens": 10, "train.max_steps": 2, "train.report_to": [],
        "train.export_merged": False})))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        steps = [r for r in map(json.loads, f) if "online/pair_share" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["num_pairs"] + r["online/skipped"] == 4 and r["num_pairs"] >= 1  # 4 prompts per step
        assert r["online/score_max"] >= r["online/score_mean"] > 0
    assert steps[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at the first step
    assert steps[0]["grad_norm"] > 0 and steps[0]["rewards/chosen"] == 0.0
    assert summary["global_step"] == 2
