"""Reward-model judging: batched scores equal one-at-a-time scores, win rates and intervals by hand; the
interval resamples prompts, so k identical answers per prompt leave it as wide as one answer does."""
from __future__ import annotations

import pytest
import torch

from conftest import make_reward_model
from dpo_accel.evaluation import judge
from dpo_accel.config.errors import RecipeError


@pytest.fixture(scope="module")
def reward_dir(smol_dir, tmp_path_factory) -> str:
    return make_reward_model(smol_dir, str(tmp_path_factory.mktemp("tiny_rm")))


PROMPTS = ["Capital of Kenya?", "What is 17 + 25?", "Name the capital of Peru.", "Capital of Mali?", "Hi"]
BEFORE = ["The capital of Kenya is Nairobi.", "17 + 25 = 32.", "Lima is the capital.", "Bamako", "Hello! How are you?"]
AFTER = ["Nairobi", "17 + 25 = 42.", "Lima", "Bamako", "Hello"]
CHOSEN = ["Nairobi", "17 + 25 = 42.", "Lima", [{"role": "assistant", "content": "Bamako"}], "Hello"]


def test_judging_matches_scores_and_win_rates_by_hand(reward_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    result = judge.judge_answers(reward_dir, PROMPTS, BEFORE, AFTER, CHOSEN, torch.device("cpu"), batch_size=2)
    # Each (prompt, answer) alone, unpadded, through the chat template: the batched rewards must match.
    model = AutoModelForSequenceClassification.from_pretrained(reward_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    assert tokenizer.chat_template

    def alone(prompt, answer):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": answer}], tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            return float(model(ids).logits[0, 0])

    chosen_text = [c if isinstance(c, str) else c[-1]["content"] for c in CHOSEN]
    for name, answers in (("before", BEFORE), ("after", AFTER), ("chosen", chosen_text)):
        expected = [alone(p, a) for p, a in zip(PROMPTS, answers)]
        assert result["rewards"][name] == pytest.approx(expected, abs=1e-5), name
    rewards = result["rewards"]
    a, b, c = rewards["after"], rewards["before"], rewards["chosen"]
    by_hand = sum((x > y) + 0.5 * (x == y) for x, y in zip(a, b)) / 5
    scores = result["scores"]
    assert scores["win_rate_vs_before"] == pytest.approx(by_hand)
    # After and chosen are the same text on every row but the 4th (same text too): all ties.
    assert a == pytest.approx(c, abs=1e-6) and scores["win_rate_vs_chosen"] == 0.5
    assert scores["reward_after"] == pytest.approx(sum(a) / 5) and scores["reward_before"] == pytest.approx(sum(b) / 5)
    assert scores["win_rate_vs_before_low"] <= scores["win_rate_vs_before"] <= scores["win_rate_vs_before_high"]
    assert "| win rate after vs before |" in judge.judge_table(scores)


def test_win_rate_and_bootstrap_by_hand():
    assert judge.win_rate([2, 1, 3, 0], [1, 1, 4, 0]) == (1 + 0.5 + 0 + 0.5) / 4
    assert judge.bootstrap_interval([1.0] * 8, [0.0] * 8) == (1.0, 1.0)  # every resample wins every row
    # Half wins, half losses over 200 rows: the interval is about 0.5 +- 1.96 * sqrt(0.25 / 200) = +-0.069.
    low, high = judge.bootstrap_interval([1.0, 0.0] * 100, [0.0, 1.0] * 100, n_resamples=2000)
    assert 0.41 < low < 0.46 and 0.54 < high < 0.59
    with pytest.raises(ValueError, match="equal, non-empty"):
        judge.win_rate([1.0], [])


def test_reward_model_errors_are_one_line(tiny_model_dir, tmp_path):
    with pytest.raises(RecipeError, match="does not load as AutoModelForSequenceClassification"):
        judge.load_reward_model(str(tmp_path / "missing"), torch.device("cpu"))
    with pytest.raises(ValueError, match="aligned lists"):
        judge.judge_answers(tiny_model_dir, ["p"], ["a", "b"], ["a"], ["a"], torch.device("cpu"))


def test_interval_resamples_prompts_not_their_k_answers(monkeypatch):
    # 40 prompts; the after answer beats, ties or loses to the before / chosen ones by its reward (i % 5).
    reward = {**{f"after {i}": float(i % 5) for i in range(40)}, **{f"before {i}": 2.0 for i in range(40)},
              **{f"chosen {i}": 3.0 for i in range(40)}}
    monkeypatch.setattr(judge, "load_reward_model", lambda path, device, dtype=None: (torch.nn.Linear(1, 1), None))
    monkeypatch.setattr(judge, "reward_scores", lambda model, tok, prompts, answers, *a, **k: [reward[x] for x in answers])

    def verdict(k: int) -> dict:  # the generation reports with k identical answers per prompt, consecutive
        before = {"samples": [{"prompt": f"q {i}", "answer": f"before {i}"} for i in range(40) for _ in range(k)]}
        after = {"samples": [{"prompt": f"q {i}", "answer": f"after {i}", "chosen": f"chosen {i}"}
                             for i in range(40) for _ in range(k)]}
        return judge.judge_reports("rm", before, after, torch.device("cpu"))["scores"]

    one, four = verdict(1), verdict(4)
    for name in ("before", "chosen"):
        key = f"win_rate_vs_{name}"
        assert four[key] == one[key]  # the point estimate is the same
        width_one, width_four = one[key + "_high"] - one[key + "_low"], four[key + "_high"] - four[key + "_low"]
        assert width_one > 0.1
        # Copies of a prompt's answer add no information: the interval is that of k = 1, not narrower.
        assert width_four >= width_one and (four[key + "_low"], four[key + "_high"]) == pytest.approx(
            (one[key + "_low"], one[key + "_high"]))
    # Resampling the 160 answers one by one (no groups) is what narrowed it, by about sqrt(4) = 2.
    after = [float(i % 5) for i in range(40) for _ in range(4)]
    low, high = judge.bootstrap_interval(after, [2.0] * 160)
    assert high - low < 0.7 * (one["win_rate_vs_before_high"] - one["win_rate_vs_before_low"])
    # Grouping by the prompt does not need the answers to be consecutive.
    prompts = [f"q {i}" for _ in range(4) for i in range(40)]
    spread = [float(i % 5) for _ in range(4) for i in range(40)]
    assert judge.bootstrap_interval(spread, [2.0] * 160, groups=prompts) == pytest.approx(
        (one["win_rate_vs_before_low"], one["win_rate_vs_before_high"]))
