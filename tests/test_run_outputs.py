"""A run of the main job's shape on a tiny model: what it leaves behind for a person to read.

Curves as PNGs, model cards with the run's own numbers, a user's scorer in the table, sampled
generations, the reward model's verdict (equal to the one computed by hand from judge.json).
"""
from __future__ import annotations

import json
import os
import re

import pytest

from conftest import curves_of, make_reward_model, tiny_overrides
from dpo_accel import train
from dpo_accel.evaluation.judge import win_rate
from dpo_accel.config.load import load_recipe


def test_lora_run_writes_plots_cards_scores_and_verdict(tiny_model_dir, smol_dir, tmp_path):
    pytest.importorskip("matplotlib")
    scorer = tmp_path / "my_scorer.py"
    scorer.write_text("def short_rate(prompts, answers, rows):\n"
                      "    assert len(rows) == len(answers)\n"
                      "    return {'short_rate': sum(len(a.split()) <= 3 for a in answers) / len(answers)}\n")
    reward = make_reward_model(smol_dir, str(tmp_path / "rm"))
    out = str(tmp_path / "run")
    recipe = load_recipe(None, tiny_overrides(tiny_model_dir, out, **{
        "lora.use_peft": True, "lora.lora_r": 4, "lora.lora_alpha": 8, "lora.lora_dropout": 0.0,
        "train.eval_steps": 2, "eval.generation_prompts": 3, "eval.max_new_tokens": 4,
        "eval.behaviour": f"{scorer}:short_rate", "eval.temperature": 0.7, "eval.num_return_sequences": 2,
        "eval.reward_model": reward, "eval.reward_batch_size": 4}))
    summary = train.run(recipe)

    # The user's scorer ran on every sample and its value reached the table.
    assert set(summary["behaviour"]["after"]) == {"short_rate", "mean_answer_words", "n"}
    assert summary["behaviour"]["after"]["n"] == 6.0  # 3 prompts x 2 samples
    assert f"| short_rate | {summary['behaviour']['before']['short_rate']:.3f} |" in summary["table"]
    before, after = (json.load(open(os.path.join(out, f"generations_{w}.json"))) for w in ("before", "after"))
    assert [s["prompt"] for s in before["samples"]] == [s["prompt"] for s in after["samples"]]
    assert all(s["chosen"] for s in after["samples"])

    # The verdict is the one computed by hand from the saved rewards.
    rewards = json.load(open(os.path.join(out, "judge.json")))["rewards"]
    assert len(rewards["after"]) == 6
    assert summary["judge"]["win_rate_vs_before"] == win_rate(rewards["after"], rewards["before"])
    assert summary["judge"]["win_rate_vs_chosen"] == win_rate(rewards["after"], rewards["chosen"])
    assert summary["judge"]["reward_after"] == pytest.approx(sum(rewards["after"]) / 6)
    assert "| reward_model/mean_reward |" in summary["table"]

    # Plots: valid PNGs, every curve the run logged (train and eval at steps 2 and 4).
    assert summary["plots"] == [os.path.join(out, "curves.png"), os.path.join(out, "loss_accuracy.png")]
    assert curves_of(os.path.join(out, "loss_accuracy.png")) == [
        "loss: train", "loss: eval", "reward accuracy: train", "reward accuracy: eval"]
    curves = curves_of(os.path.join(out, "curves.png"))
    assert len(curves) == 18, curves  # 11 train curves + 7 eval ones (loss, accuracy, margin, 2 log-probs, 2 rewards)

    # Model cards: the run's real numbers.
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    tokens = sum(r.get("num_tokens", 0) for r in metrics)
    assert tokens > 0 and summary["tokens_seen"] == tokens and summary["pairs_seen"] == 16  # 4 steps x 4 pairs
    for kind in ("model", "adapter"):
        card = open(os.path.join(out, kind, "README.md")).read()
        for expected in ("- Optimizer steps: 4", f"- Tokens seen: {int(tokens)}", "- Pairs seen: 16",
                         "- `train`: 24 rows read, 24 kept", "`lora_r`: 4, `lora_alpha`: 8", "- Reference: `adapter_off`",
                         summary["table"], f"{summary['judge']['win_rate_vs_before']:.3f}",
                         f'"{os.path.join(out, kind)}"', "- transformers "):
            assert expected in card, (kind, expected)


def test_sampled_generations_are_seeded_and_leave_the_rng_alone(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_accel.evaluation.generation import generate_answers

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = ["What is 12 + 30?", "Capital of Kenya?"]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = generate_answers(model, tokenizer, prompts, 6, temperature=1.0, num_return_sequences=3, seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # the run's own stream is untouched
    assert len(first) == 6 and len(set(first)) > 1  # 3 samples per prompt, not all the same
    assert generate_answers(model, tokenizer, prompts, 6, temperature=1.0, num_return_sequences=3, seed=7) == first
    assert generate_answers(model, tokenizer, prompts, 6, temperature=1.0, num_return_sequences=3, seed=8) != first
    greedy = generate_answers(model, tokenizer, prompts, 6)
    assert len(greedy) == 2 and generate_answers(model, tokenizer, prompts, 6, seed=99) == greedy


@pytest.mark.parametrize("override, message", [
    ("eval.num_return_sequences=2", "use 1, or more with eval.temperature > 0"),
    ("eval.top_p=0", "eval.top_p in (0, 1]"),
    ("train.push_to_hub=true", "train.push_to_hub needs train.hub_model_id"),
    ("eval.behaviour=arithmetic", "eval.behaviour 'arithmetic' is not a scorer"),
])
def test_eval_and_hub_keys_are_checked_before_any_compute(override, message):
    from dpo_accel.config.errors import RecipeError

    with pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe(None, [override])
