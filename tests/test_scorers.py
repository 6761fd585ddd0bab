"""Behaviour scorers: built-ins, a user's `module:function`, one-line errors, and the geo task's data."""
from __future__ import annotations

import filecmp
import json
import os

import pytest

from conftest import REPO
from dpo_accel.data.tasks import geo as geo_task
from dpo_accel.evaluation.generation import behaviour_scores as evaluate_behaviour_scores
from dpo_accel.evaluation.scorers import ScorerError, behaviour_scores, resolve_scorer

ROWS = [{"prompt": "Capital of Kenya?", "chosen": "Nairobi", "rejected": "Kampala"},
        {"prompt": "Capital of Peru?", "chosen": [{"role": "assistant", "content": "Lima"}], "rejected": "x"}]
PROMPTS = [r["prompt"] for r in ROWS]


def test_builtin_scorers():
    answers = ["Nairobi", "The capital of Peru is Lima."]
    assert behaviour_scores("exact_match", PROMPTS, [" Nairobi ", "lima"], ROWS)["exact_match_rate"] == 0.5
    assert behaviour_scores("exact_match", PROMPTS, ["Nairobi", "Lima"], ROWS)["exact_match_rate"] == 1.0
    got = behaviour_scores("regex", PROMPTS, answers, regex=r"[A-Z][a-z]+\.?")
    assert got == {"regex_match_rate": 0.5, "mean_answer_words": 3.5, "n": 2.0}
    assert behaviour_scores("length", PROMPTS, answers) == {"mean_answer_words": 3.5, "mean_answer_chars": 17.5,
                                                            "n": 2.0}
    assert behaviour_scores(None, PROMPTS, answers) == behaviour_scores("length", PROMPTS, answers)
    geo = behaviour_scores("geo", PROMPTS, answers)
    assert (geo["format_rate"], geo["correct_rate"]) == (0.5, 1.0)
    arith = behaviour_scores("arith", ["What is 17 + 25?"], ["17 + 25 = 42."])
    assert (arith["format_rate"], arith["correct_rate"]) == (1.0, 1.0)
    # evaluate.behaviour_scores, the loop's entry point, is the same thing
    assert evaluate_behaviour_scores("geo", PROMPTS, answers) == geo


def test_module_function_scorer_from_a_file(tmp_path):
    path = tmp_path / "my_scorer.py"
    path.write_text("def polite(prompts, answers, rows):\n"
                    "    return {'please_rate': sum('please' in a for a in answers) / len(answers),\n"
                    "            'chosen_chars': sum(len(r['chosen']) for r in rows if isinstance(r['chosen'], str))}\n"
                    "def two_args(prompts, answers):\n    return {'count': len(answers)}\n"
                    "def broken(prompts, answers):\n    return {'x': 1 / 0}\n"
                    "def not_a_number(prompts, answers):\n    return {'x': 'high'}\n")
    got = behaviour_scores(f"{path}:polite", PROMPTS, ["yes please", "no"], ROWS)
    assert got == {"please_rate": 0.5, "chosen_chars": 7.0, "mean_answer_words": 1.5, "n": 2.0}
    assert behaviour_scores(f"{path}:two_args", PROMPTS, ["a", "b"])["count"] == 2.0
    with pytest.raises(ScorerError, match=r"behaviour scorer '.*:broken' failed: ZeroDivisionError"):
        behaviour_scores(f"{path}:broken", PROMPTS, ["a", "b"])
    with pytest.raises(ScorerError, match=r"returned x='high'; every value must be a finite number"):
        behaviour_scores(f"{path}:not_a_number", PROMPTS, ["a", "b"])
    with pytest.raises(ScorerError, match=r"has no function 'missing'"):
        resolve_scorer(f"{path}:missing")


def test_scorer_errors_are_one_line_naming_the_scorer():
    cases = [("arithmetic", "eval.behaviour 'arithmetic' is not a scorer; choose one of: arith, geo"),
             ("no_such_module_xyz:f", "behaviour scorer 'no_such_module_xyz:f': cannot import"),
             ("/nowhere/s.py:f", "file '/nowhere/s.py' does not exist"),
             ("regex", "behaviour scorer 'regex' needs eval.behaviour_regex")]
    for name, message in cases:
        with pytest.raises(ScorerError) as e:
            resolve_scorer(name)
        assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ScorerError, match="not a valid regular expression"):
        resolve_scorer("regex", "[unclosed")
    with pytest.raises(ScorerError, match="'exact_match' needs the held-out rows"):
        behaviour_scores("exact_match", PROMPTS, ["a", "b"])


def test_geo_scorer_cases():
    s = geo_task.score_answer
    assert s("What is the capital of Colombia?", "Bogota") == {"format": True, "correct": True}
    assert s("Capital of Colombia?", "The capital is Bogotá.") == {"format": False, "correct": True}
    assert s("The Netherlands's capital is which city?", "Amsterdam.") == {"format": True, "correct": True}
    assert s("Capital of Kenya?", "Kampala, not Nairobi") == {"format": False, "correct": False}
    assert s("Capital of Kenya?", "nairobi") == {"format": False, "correct": True}
    assert s("Capital of Kenya?", "Mombasa") == {"format": True, "correct": False}
    with pytest.raises(ValueError, match="not a capital question"):
        geo_task.capital_asked("What is 2 + 2?")


def test_geo_dataset_is_reproducible_and_holds_countries_out(tmp_path):
    geo_task.write_dataset(str(tmp_path))
    for name in ("train.jsonl", "eval.jsonl"):
        assert filecmp.cmp(tmp_path / name, os.path.join(REPO, "data", "geo_prefs", name), shallow=False), name
    rows = {split: [json.loads(line) for line in open(tmp_path / f"{split}.jsonl")] for split in ("train", "eval")}
    assert (len(rows["train"]), len(rows["eval"])) == (2000, 192)
    eval_cities = {r["chosen"] for r in rows["eval"]}
    assert len(eval_cities) == geo_task.N_EVAL_COUNTRIES
    train_text = " ".join(r["prompt"] + " " + r["chosen"] + " " + r["rejected"] for r in rows["train"])
    assert not [c for c in eval_cities if c in train_text]  # no held-out city appears in training
    chosen = geo_task.behaviour_summary([r["prompt"] for r in rows["eval"]], [r["chosen"] for r in rows["eval"]])
    assert (chosen["format_rate"], chosen["correct_rate"]) == (1.0, 1.0)
