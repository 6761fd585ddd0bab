"""The step engine (dpo_accel/loops/engine.py) serves every way of training: each loop kind honours the
``train.*`` keys the engine owns, and a combination a loop kind cannot honour is refused before any compute."""
from __future__ import annotations

import json
import os

import pytest

from conftest import build_small_vocab_model, tiny_overrides
from dpo_accel import train
from dpo_accel.config.load import load_recipe
from dpo_accel.config.plan import preflight

SCORER = '''
def by_length(prompts, answers):
    return [float(len(a)) for a in answers]
'''


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> str:
    return build_small_vocab_model(str(tmp_path_factory.mktemp("small") / "model"))


def kind_overrides(kind: str, model_dir: str, out: str, folder) -> list[str]:
    extra = {"train.max_steps": 4, "train.eval_steps": 2, "train.logging_steps": 2, "train.save_steps": 2,
             "train.save_total_limit": 5, "train.report_to": [], "train.export_merged": False}
    if kind == "reward":
        extra.update({"loss.loss_type": "bradley_terry", "lora.use_peft": True, "train.per_device_train_batch_size": 2})
    if kind == "online":
        (folder / "scorer.py").write_text(SCORER)
        extra.update({"train.online_generations": 2, "train.online_verifier": f"{folder / 'scorer.py'}:by_length",
                      "train.online_max_new_tokens": 6, "train.per_device_train_batch_size": 2,
                      "train.online_missing_eos_penalty": 0.0})
    return tiny_overrides(model_dir, out, **extra)


@pytest.mark.parametrize("kind", ["offline", "reward", "online"])
def test_every_loop_kind_logs_evaluates_and_checkpoints_on_the_engines_intervals(kind, small_model, tmp_path):
    out = str(tmp_path / "run")
    summary = train.run(load_recipe(None, kind_overrides(kind, small_model, out, tmp_path)))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows if "grad_norm" in r] == [2, 4]  # logging_steps 2
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["checkpoint-0000002", "checkpoint-0000004"]
    evaluated = [r["step"] for r in rows if "eval/loss" in r]
    assert evaluated[-2:] == [2, 4]  # every 2 steps, then the final evaluation at the last step
    assert summary["global_step"] == 4 and summary["eval"]["eval/loss"] > 0


@pytest.mark.parametrize("sets,expected", [
    (["train.online_generations=2", "train.online_verifier=arith", "loss.loss_type=kto", "data.format=unpaired"],
     "loss_type kto trains on unpaired rows"),
    (["train.online_generations=2", "train.online_verifier=arith", "loss.loss_type=bradley_terry"],
     "loss_type bradley_terry trains a reward model"),
    (["loss.loss_type=bradley_terry", "train.padding_free=true"], "train.padding_free is True, which a reward model"),
    (["loss.loss_type=bradley_terry", "train.prefix_sharing=true"], "train.prefix_sharing is True"),
    (["loss.loss_type=bradley_terry", "train.logps_path=lean"], "train.logps_path is 'lean'"),
    (["loss.loss_type=bradley_terry", "eval.generation_prompts=4"], "does not generate"),
    (["loss.loss_type=bradley_terry", "data.format=sft"], "trains on pairs"),
])
def test_a_combination_a_loop_kind_cannot_honour_is_one_line_and_exit_2(sets, expected, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--set", "model.model_name_or_path=unused", "--set", f"train.output_dir={out}"]
    for s in sets:
        args += ["--set", s]
    assert train.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not out.exists()  # nothing written before the refusal


def test_reward_pairs_follow_the_truncation_settings(small_model):
    """A pair longer than data.max_length is cut as policy pairs are: the prompt to max_prompt_length from the
    side truncation_mode keeps, then the answers; a pair that fits is the text the judge scores, untouched."""
    from transformers import AutoTokenizer

    from dpo_accel.config.schema import DataConfig
    from dpo_accel.evaluation.judge import render, render_prompt
    from dpo_accel.loops.reward import tokenize_pairs

    tok = AutoTokenizer.from_pretrained(small_model)
    long_prompt = " ".join(f"{i} + {i} = ?" for i in range(60))
    rows = [{"prompt": long_prompt, "chosen": "1 + 1 = 2.", "rejected": "no"},
            {"prompt": "What is 2 + 2?", "chosen": "2 + 2 = 4.", "rejected": "5"}]
    whole = tok(render(tok, long_prompt, "1 + 1 = 2."), add_special_tokens=False)["input_ids"]
    for mode in ("keep_end", "keep_start"):
        d = DataConfig(max_length=48, max_prompt_length=32, truncation_mode=mode)
        (cut, short), stats = tokenize_pairs(rows, tok, d)
        assert stats == {"pairs": 2, "kept": 2, "truncated": 1, "dropped": 0, "raw_max": len(whole)}
        assert len(cut["chosen"]) <= 48 and len(cut["rejected"]) <= 48
        answer = len(whole) - len(tok(render_prompt(tok, long_prompt), add_special_tokens=False)["input_ids"])
        assert len(cut["chosen"]) == 32 + answer  # the prompt cut to max_prompt_length, the answer whole
        text = tok.decode(cut["chosen"])
        assert ("59 + 59" in text) == (mode == "keep_end") and ("0 + 0" in text) == (mode == "keep_start")
        assert "1 + 1 = 2." in text  # the answer survives: the prompt is cut first
        judged = tok(render(tok, rows[1]["prompt"], "2 + 2 = 4."), add_special_tokens=False)["input_ids"]
        assert short["chosen"] == judged


def test_reward_pairs_that_truncation_makes_the_same_are_dropped_and_counted(small_model, tmp_path, capsys):
    """A pair whose answers differ only past the room truncation leaves would train as two identical rows (loss
    log 2, counted wrong): it is dropped, counted and said in one line; a training split left with none stops."""
    from transformers import AutoTokenizer

    from dpo_accel.config.errors import RecipeError
    from dpo_accel.config.schema import DataConfig
    from dpo_accel.loops.reward import tokenize_pairs, tokenized_pairs

    tok = AutoTokenizer.from_pretrained(small_model)
    long_prompt = " ".join(f"{i} + {i} = ?" for i in range(30))
    same_start = {"prompt": long_prompt, "chosen": "The sum is 4 " * 8, "rejected": "The sum is 4 " * 7 + "5"}
    fine = {"prompt": "What is 2 + 2?", "chosen": "2 + 2 = 4.", "rejected": "5"}
    d = DataConfig(max_length=48, max_prompt_length=40)
    rows, stats = tokenize_pairs([same_start, fine], tok, d)
    assert [r["idx"] for r in rows] == [1] and stats["dropped"] == 1 and stats["kept"] == 1
    with pytest.raises(RecipeError, match="truncation drops 1 of 1 training pairs"):
        tokenized_pairs({"train": [same_start]}, tok, d)
    assert "1 dropped (chosen and rejected the same after the cut)" in capsys.readouterr().out


@pytest.mark.parametrize("group", [True, False])
def test_reward_batches_follow_group_by_length(group, small_model, tmp_path):
    from dpo_accel.data.collate import EpochRandomSampler, LengthGroupedSampler
    from dpo_accel.loops.reward import reward_loaders

    plan = preflight(load_recipe(None, tiny_overrides(small_model, str(tmp_path / "run"), **{
        "loss.loss_type": "bradley_terry", "data.group_by_length": group})))
    splits = {"train": [{"chosen": [1] * n, "rejected": [2] * (n % 5 + 1), "margin": 0.0, "idx": n}
                        for n in range(1, 41)]}

    class Pad:
        pad_token_id = 0

    _, _, sampler = reward_loaders(plan, splits, Pad())
    assert isinstance(sampler, LengthGroupedSampler if group else EpochRandomSampler)
    if group:
        order = list(sampler)
        first = [max(len(splits["train"][i]["chosen"]), 1) for i in order[:4]]
        assert max(first) == 40  # the longest pair leads, so an out-of-memory error shows at step one


def test_weight_decay_spares_biases_and_norm_weights():
    """As the HF Trainer: AdamW's weight decay hits the weight matrices, never a bias or a norm's scale (a
    decayed norm pulls its layer's output towards zero); without decay the optimizer keeps one group."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from dpo_accel.loops.engine import build_optimizer

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    recipe = load_recipe(None, ["train.weight_decay=0.1", "train.max_steps=4"])
    optimizer, _ = build_optimizer(recipe, model, 4)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {g["weight_decay"]: sorted(names[id(p)] for p in g["params"]) for g in optimizer.param_groups}
    assert set(decay) == {0.1, 0.0}
    assert decay[0.0] and all(n.endswith(".bias") or ".ln_" in n for n in decay[0.0]), decay[0.0]
    assert "transformer.h.0.attn.c_attn.weight" in decay[0.1] and not any(n.endswith(".bias") for n in decay[0.1])
    assert sum(len(v) for v in decay.values()) == len(list(model.parameters()))
    plain, _ = build_optimizer(load_recipe(None, ["train.max_steps=4"]), model, 4)
    assert len(plain.param_groups) == 1 and plain.param_groups[0]["weight_decay"] == 0.0
    assert isinstance(optimizer, torch.optim.AdamW)


def test_generation_stops_at_every_stop_token_of_the_model(small_model):
    """A model whose generation_config lists several end tokens (Llama-3: end of turn and end of text) stops at
    each of them, not only at the tokenizer's EOS."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_accel.data.tokenize import prompt_input_ids
    from dpo_accel.evaluation.generation import generate_answers, stop_tokens

    tok = AutoTokenizer.from_pretrained(small_model)
    model = AutoModelForCausalLM.from_pretrained(small_model).eval()
    prompt = torch.tensor([prompt_input_ids(tok, "What is 2 + 2?")])
    first = int(model.generate(input_ids=prompt, max_new_tokens=1, do_sample=False)[0, -1])
    assert first != tok.eos_token_id
    lengths, real = [], model.generate

    def counted(*args, **kwargs):
        out = real(*args, **kwargs)
        lengths.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    model.generate = counted
    model.generation_config.eos_token_id = tok.eos_token_id
    generate_answers(model, tok, ["What is 2 + 2?"], 6)
    model.generation_config.eos_token_id = [first, tok.eos_token_id]  # its first token is now an end token too
    assert stop_tokens(model, tok) == sorted({first, tok.eos_token_id})
    generate_answers(model, tok, ["What is 2 + 2?"], 6)
    assert lengths == [6, 1]
