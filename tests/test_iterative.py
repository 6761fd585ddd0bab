"""Iterative DPO (train.iterative_rounds, dpo_accel/iterative.py) on a tiny model with a scripted verifier:
each round's pairs are best vs worst of the sampled answers and its data/ is a preference dataset that
load_preference_splits reads; two rounds chain (round 2 trains on round 1's merged export, its reference is
round 1's policy with ``previous`` and the first model with ``initial``); --resume inside a round equals the
straight run and never regenerates a round's pairs; bad keys stop in one line before any weight is loaded.

One straight 2-round run (module fixture, ~20 s on two cores) serves the pair, chaining and resume tests.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, drop_chat_template, paired_steps, reset_accelerate, tiny_overrides
from dpo_accel import train
from dpo_accel.loops import iterative
from dpo_accel.config.errors import RecipeError
from dpo_accel.config.load import load_recipe

SCORER = '''
def by_length(prompts, answers):
    """Scripted verifier: longer answers score higher."""
    return [float(len(a)) for a in answers]
'''
K = 3
STEP_KEYS = ("loss", "grad_norm", "learning_rate", "rewards/margins")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from conftest import build_small_vocab_model

    root = tmp_path_factory.mktemp("iterative")
    (root / "scripted.py").write_text(SCORER)
    return {"root": root, "model": build_small_vocab_model(str(root / "model")),
            "scorer": f"{root / 'scripted.py'}:by_length"}


def sets_for(world, out, **extra) -> list[str]:
    """2 rounds of LoRA DPO: 20 prompts (2 generation chunks) x K answers, 4 steps of 4 pairs per round."""
    return tiny_overrides(world["model"], out, **{
        "lora.use_peft": True, "lora.lora_r": 4, "lora.lora_alpha": 8, "lora.lora_dropout": 0.0,
        "data.max_train_samples": 20, "data.max_eval_samples": 4,
        "train.iterative_rounds": 2, "train.online_generations": K, "train.online_verifier": world["scorer"],
        "train.online_max_new_tokens": 8, "train.max_steps": 4, "train.save_steps": 2, "train.save_total_limit": 10,
        "train.online_missing_eos_penalty": 0.0, "train.report_to": [], "eval.generation_prompts": 2, **extra})


def steps(folder: str) -> list[dict]:
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def tensors(path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def straight(world):
    """The straight run, and what the resume test compares with (taken before anything is touched)."""
    out = str(world["root"] / "straight")
    summary = train.run(load_recipe(None, sets_for(world, out)))
    reset_accelerate()
    rounds = [os.path.join(out, f"round_{r}") for r in (1, 2)]
    return {"out": out, "summary": summary, "rounds": rounds, "steps": [steps(r) for r in rounds],
            "adapter": tensors(os.path.join(rounds[1], "adapter", "adapter_model.safetensors")),
            "data": read(os.path.join(rounds[1], "data", "train.jsonl"))}


def test_round_recipe_chains_models_and_sets_the_reference(world, tmp_path):
    """No compute: round r's run reads round r's data/, starts from round r-1's model/, and its reference
    follows train.iterative_reference; rounds prompts are a seeded endless order."""
    out = str(tmp_path / "run")
    recipe = load_recipe(None, sets_for(world, out, **{"train.push_to_hub": True, "train.hub_model_id": "me/x"}))
    first, second = iterative.round_recipe(recipe, 1), iterative.round_recipe(recipe, 2)
    assert first.model.model_name_or_path == world["model"] and first.train.output_dir == f"{out}/round_1"
    assert second.model.model_name_or_path == f"{out}/round_1/model"
    assert second.data.dataset_name == f"{out}/round_2/data" and second.data.max_train_samples is None
    assert second.train.iterative_rounds == 0 and second.train.online_generations == 0
    assert second.train.max_steps == 4  # per round
    assert not first.train.push_to_hub and second.train.push_to_hub  # only the last round's model
    assert second.reference.mode == "auto" and second.reference.ref_model_name_or_path is None  # previous
    initial = load_recipe(None, sets_for(world, out, **{"train.iterative_reference": "initial"}))
    assert iterative.round_recipe(initial, 1).reference.ref_model_name_or_path is None  # round 1 starts there
    ref = iterative.round_recipe(initial, 2, world["model"]).reference
    assert (ref.mode, ref.ref_model_name_or_path) == ("copy", world["model"])
    t = recipe.train
    t.iterative_prompts = 8
    one, two, three = (iterative.round_prompts(list(range(20)), t, r) for r in (1, 2, 3))
    assert len(set(one + two)) == 16 and len(three) == 8  # rounds 1-2 differ; round 3 starts the next pass
    assert one == iterative.round_prompts(list(range(20)), t, 1)


def test_rounds_table_lines_up():
    rounds = [{"round": 1, "pairs": 5, "prompts": 8, "score_mean": 0.5, "eval": {"eval/rewards/accuracies": 0.75},
               "behaviour": {"format_rate": 0.5, "n": 8}, "behaviour_before": {"format_rate": 0.0, "n": 8}},
              {"round": 2, "pairs": 7, "prompts": 8, "score_mean": None}]
    lines = iterative.rounds_table(rounds).splitlines()
    assert lines[0] == ("| round | pairs / prompts | sampled score mean | held-out reward accuracy | "
                        "held-out format_rate |")
    assert lines[2:] == ["| start |  |  |  | 0.000 |", "| 1 | 5 / 8 | 0.500 | 0.750 | 0.500 |", "| 2 | 7 / 8 |  |  |  |"]
    assert all(line.count("|") == 6 for line in lines)


@pytest.mark.slow
def test_pairs_are_best_versus_worst_and_round_data_is_a_preference_dataset(world, straight):
    from dpo_accel.data.formats import load_preference_splits
    from dpo_accel.config.schema import DataConfig

    folder = straight["rounds"][0]
    with open(os.path.join(folder, "answers.jsonl")) as f:
        groups = [json.loads(line) for line in f]
    with open(os.path.join(folder, "data", "train.jsonl")) as f:
        pairs = [json.loads(line) for line in f]
    with open(os.path.join(folder, "generation.json")) as f:
        info = json.load(f)
    assert len(groups) == info["prompts"] == 20 and info["pairs"] == len(pairs) > 0
    assert info["pairs"] + info["skipped"] == 20 and info["generations"] == K
    expected = []
    for g in groups:
        assert len(g["answers"]) == K and g["scores"] == [float(len(a)) for a in g["answers"]]
        best, worst = max(g["scores"]), min(g["scores"])
        if best != worst:
            chosen = g["answers"][g["scores"].index(best)]
            rejected = g["answers"][g["scores"].index(worst)]
            if chosen.strip() != rejected.strip():
                expected.append({"prompt": g["prompt"], "chosen": chosen, "rejected": rejected,
                                 "score_chosen": best, "score_rejected": worst})
    sampled = ("prompt_ids", "chosen_ids", "rejected_ids")
    assert [{k: v for k, v in p.items() if k not in sampled} for p in pairs] == expected
    splits = load_preference_splits(DataConfig(dataset_name=os.path.join(folder, "data")), seed=0)
    assert splits["train"]["chosen"] == [p["chosen"] for p in pairs]
    original = load_preference_splits(DataConfig(dataset_name=os.path.join(REPO, "data", "arith_prefs"),
                                                 max_train_samples=20, max_eval_samples=4), seed=42)
    assert splits["eval"].to_list() == original["eval"].to_list()  # the held-out split, as the recipe loads it
    assert [g["prompt"] for g in groups] == list(original["train"]["prompt"])  # iterative_prompts 0: every prompt


def test_a_rounds_pairs_train_on_the_token_ids_the_policy_sampled(world, straight):
    """Each pair of round data keeps the ids the policy sampled (the prompt as generation saw it, each answer up
    to its stop token) and tokenisation takes them as they are: no re-encoding of the decoded text, no EOS added
    to an answer max_new_tokens cut off (these runs keep cut answers: train.online_missing_eos_penalty 0)."""
    from transformers import AutoTokenizer

    from dpo_accel.config.schema import DataConfig
    from dpo_accel.data.formats import load_preference_splits
    from dpo_accel.data.tokenize import tokenize_splits

    folder = straight["rounds"][0]
    with open(os.path.join(folder, "data", "train.jsonl")) as f:
        pairs = [json.loads(line) for line in f]
    tok = AutoTokenizer.from_pretrained(world["model"])
    for p in pairs:
        assert tok.decode(p["chosen_ids"], skip_special_tokens=True).strip() == p["chosen"]
        assert p["chosen_ids"][-1] == tok.eos_token_id or len(p["chosen_ids"]) == 8  # ended, or cut (no EOS added)
    assert any(p["chosen_ids"][-1] != tok.eos_token_id for p in pairs)  # penalty 0.0 here: cut answers are in
    d = DataConfig(dataset_name=os.path.join(folder, "data"), max_length=512, max_prompt_length=256)
    tokenized, _ = tokenize_splits(load_preference_splits(d, seed=0), tok, d)
    rows = tokenized["train"]
    assert [r["chosen_input_ids"] for r in rows] == [p["prompt_ids"] + p["chosen_ids"] for p in pairs]
    assert [r["rejected_input_ids"] for r in rows] == [p["prompt_ids"] + p["rejected_ids"] for p in pairs]


@pytest.mark.slow
def test_two_rounds_chain_the_models_with_the_previous_policy_as_reference(world, straight):
    summary, (one, two) = straight["summary"], straight["rounds"]
    assert [e["round"] for e in summary["rounds"]] == [1, 2]
    assert summary["model"] == os.path.join(two, "model")
    for entry in summary["rounds"]:
        assert entry["pairs"] > 0 and entry["global_step"] == 4 and "eval/rewards/accuracies" in entry["eval"]
        assert "mean_answer_words" in entry["behaviour"]  # eval.behaviour null: answer length, 2 held-out prompts
    table = summary["table"].splitlines()
    assert len(table) == 5 and table[2].startswith("| start |") and "held-out mean_answer_words" in table[0]
    with open(os.path.join(straight["out"], "summary.json")) as f:
        assert [e["pairs"] for e in json.load(f)["rounds"]] == [e["pairs"] for e in summary["rounds"]]
    with open(os.path.join(two, "generation.json")) as f:
        assert json.load(f)["model"] == os.path.join(one, "model")  # round 2 sampled with round 1's policy
    # Round 2 trained a fresh adapter on round 1's merged export: its own export is that plus the adapter.
    start, first, merged = (tensors(os.path.join(p, "model.safetensors"))
                            for p in (world["model"], os.path.join(one, "model"), os.path.join(two, "model")))
    adapter = tensors(os.path.join(two, "adapter", "adapter_model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    prefix = "base_model.model." + name[:-len(".weight")]
    delta = adapter[prefix + ".lora_B.weight"] @ adapter[prefix + ".lora_A.weight"] * (8 / 4)
    assert not torch.equal(first[name], start[name])  # round 1 trained
    torch.testing.assert_close(merged[name], first[name] + delta, rtol=0, atol=1e-6)
    assert torch.equal(merged["model.embed_tokens.weight"], first["model.embed_tokens.weight"])
    # previous: round 2's reference is round 1's policy, so its first step starts at policy == reference.
    for rows in straight["steps"]:
        assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-5) and rows[0]["rewards/chosen"] == 0.0


@pytest.mark.slow
def test_initial_reference_is_the_first_model_also_precomputed(world, tmp_path):
    """reference.mode precomputed is allowed (each round's pairs are fixed): round 2's log-probs come from a
    copy of the first model, so its first step is not at policy == reference."""
    out = str(tmp_path / "initial")
    train.run(load_recipe(None, sets_for(world, out, **{
        "train.iterative_reference": "initial", "reference.mode": "precomputed", "train.max_steps": 2,
        "train.save_steps": 0, "reference.cache_dir": str(tmp_path / "cache")})))
    one, two = (steps(os.path.join(out, f"round_{r}")) for r in (1, 2))
    assert one[0]["loss"] == pytest.approx(0.693147, abs=1e-5) and one[0]["rewards/chosen"] == 0.0
    assert abs(two[0]["rewards/chosen"]) > 1e-4 and abs(two[0]["loss"] - 0.693147) > 1e-5
    import yaml

    with open(os.path.join(out, "round_2", "recipe.yaml")) as f:
        ref = yaml.safe_load(f)["reference"]
    assert (ref["mode"], ref["ref_model_name_or_path"]) == ("precomputed", world["model"])
    assert len(os.listdir(tmp_path / "cache")) == 4  # train + eval, per round


@pytest.mark.slow
def test_resume_inside_a_round_equals_the_straight_run_and_reuses_its_pairs(world, straight, monkeypatch):
    """Killed after round 2's checkpoint 2, then killed before round 2 trained at all: --resume skips round 1,
    trains on round 2's existing pairs (generation would fail here) and ends with the straight run's steps
    and adapter. Leaves the straight folder as it was."""
    out, (one, two) = straight["out"], straight["rounds"]
    round_one = read(os.path.join(one, "summary.json"))

    def no_generation(*args, **kwargs):
        raise AssertionError("a round with data/ was generated again")

    monkeypatch.setattr(iterative, "generate_round", no_generation)
    sets = sets_for(world, out)
    for keep in ("checkpoint 2", "data only"):
        for name in os.listdir(two):
            path = os.path.join(two, name)
            if name in ("data", "generation.json", "answers.jsonl"):
                continue
            if keep == "checkpoint 2" and name == "checkpoints":
                shutil.rmtree(os.path.join(path, "checkpoint-0000004"))
            elif keep == "checkpoint 2" and name in ("metrics.jsonl", "recipe.yaml", "generations_before.json"):
                continue
            elif os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        os.remove(os.path.join(out, "summary.json"))
        summary = train.run(load_recipe(None, sets), resume=True)
        reset_accelerate()
        resumed = steps(two)
        assert [r["step"] for r in resumed] == [1, 2, 3, 4], keep
        for a, b in paired_steps(straight["steps"][1], resumed):
            for key in STEP_KEYS:
                assert a[key] == b[key], (keep, a["step"], key)
        adapter = tensors(os.path.join(two, "adapter", "adapter_model.safetensors"))
        assert adapter.keys() == straight["adapter"].keys()
        for name, tensor in straight["adapter"].items():
            assert torch.equal(adapter[name], tensor), (keep, name)
        assert read(os.path.join(two, "data", "train.jsonl")) == straight["data"]
        assert read(os.path.join(one, "summary.json")) == round_one  # round 1 was skipped
        assert [e["pairs"] for e in summary["rounds"]] == [e["pairs"] for e in straight["summary"]["rounds"]]


@pytest.mark.slow
def test_two_gloo_ranks_write_the_same_pairs_and_chain_two_rounds(world, straight, tmp_path):
    """2 processes x 2 pairs: each samples its own prompt chunks, the main one writes the round; round 1's
    pairs equal the 1-process run's byte for byte, and the second round runs in the same processes."""
    out = str(tmp_path / "two")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(REPO, "accelerate_configs", "cpu_two_process.yaml"), os.path.join(REPO, "dpo_accel", "train.py")]
    for s in sets_for(world, out, **{"train.per_device_train_batch_size": 2, "train.save_steps": 0,
                                     "eval.do_eval": False}):
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("| 2 process(es)") == 2, proc.stdout[-2000:]
    for name in ("train.jsonl", "eval.jsonl"):
        assert read(os.path.join(out, "round_1", "data", name)) == read(os.path.join(straight["rounds"][0], "data", name))
    with open(os.path.join(out, "summary.json")) as f:
        assert [e["global_step"] for e in json.load(f)["rounds"]] == [4, 4]


# (id, sets, what the one line must say); every case must load no weights.
BAD = [
    ("rounds negative", ["train.iterative_rounds=-1"], "train.iterative_rounds must be >= 0"),
    ("one answer", ["train.online_generations=1"], "needs train.online_generations >= 2"),
    ("no scorer", ["train.online_verifier=null"], "exactly one of train.online_verifier"),
    ("two scorers", ["train.online_reward_model=somewhere"], "exactly one of train.online_verifier"),
    ("greedy", ["train.online_temperature=0"], "train.online_temperature must be > 0"),
    ("unknown verifier", ["train.online_verifier=nope"], "neither a built-in"),
    ("missing verifier file", ["train.online_verifier=/nowhere/v.py:f"], "does not exist"),
    ("prompts negative", ["train.iterative_prompts=-3"], "train.iterative_prompts must be >= 0"),
    ("reference typo", ["train.iterative_reference=first"], "choose one of: previous, initial"),
    ("lora without merged export", ["train.export_merged=false"], "needs train.export_merged: true"),
    ("reward model objective", ["loss.loss_type=bradley_terry"], "trains a reward model"),
    ("sft data", ["data.format=sft"], "data.format 'sft'"),
    ("fixed reference path", ["reference.mode=copy", "reference.ref_model_name_or_path=/x"],
     "sets each round's reference itself"),
    ("initial with init adapter", ["train.iterative_reference=initial", "lora.init_adapter=/x"], "lora.init_adapter"),
    ("existing run", ["train.output_dir={existing}"], "already holds a run; pass --resume"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_iterative_keys_fail_in_one_line_before_any_weight(case, world, tmp_path, capsys, monkeypatch):
    from dpo_accel.model import loading as modeling

    name, sets, expected = case
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "recipe.yaml").write_text("{}\n")
    loads = []
    for fn in ("load_causal_lm", "convert_gguf"):
        monkeypatch.setattr(modeling, fn, lambda *a, _fn=fn, **k: loads.append(_fn))
    args = sets_for(world, str(tmp_path / "new")) + [s.format(existing=existing) for s in sets]
    capsys.readouterr()
    rc = train.main([a for s in args for a in ("--set", s)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(lines) == 1, (rc, err[-2000:])
    assert expected in lines[0], lines[0]
    assert not loads and "Traceback" not in err
    assert not os.path.exists(tmp_path / "new")


def test_allowed_settings_pass_the_checks(world, tmp_path):
    """precomputed reference (each round's pairs are fixed), checkpoints inside a round, a reward model as the
    scorer, full fine-tuning without a merged export (model/ is the whole model)."""
    base = sets_for(world, str(tmp_path / "run"))
    for extra in (["reference.mode=precomputed"], ["train.save_steps=1"], ["lora.use_peft=false",
                  "train.export_merged=false"], ["train.online_verifier=null", "train.online_reward_model=/rm"]):
        load_recipe(None, base + extra)
    with pytest.raises(RecipeError, match="precomputed"):  # without rounds the online loop's checks apply
        load_recipe(None, base + ["train.iterative_rounds=0", "reference.mode=precomputed"])


def test_a_raw_text_models_round_trains_on_its_sampled_ids(world, tmp_path):
    """A tokenizer without a chat template (raw text, as the Pythia HH recipe): a round's training rows are the
    prompt's and answers' sampled ids as they are, leading spaces and all, never the decoded text encoded again."""
    import shutil

    from transformers import AutoTokenizer

    from dpo_accel.data.tokenize import prompt_input_ids

    model_dir = str(tmp_path / "raw_model")
    shutil.copytree(world["model"], model_dir)
    drop_chat_template(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    out = str(tmp_path / "run")
    train.run(load_recipe(None, sets_for({**world, "model": model_dir}, out, **{
        "train.iterative_rounds": 1, "train.max_steps": 1, "train.save_steps": 0, "eval.generation_prompts": 0})))
    reset_accelerate()
    with open(os.path.join(out, "round_1", "data", "train.jsonl")) as f:
        pairs = [json.loads(line) for line in f]
    assert pairs
    for p in pairs:
        assert p["prompt_ids"] == prompt_input_ids(tok, p["prompt"])  # the prompt as generation saw it
        for side in ("chosen", "rejected"):
            assert tok.decode(p[f"{side}_ids"], skip_special_tokens=True).strip() == p[side]
    spaced = [p for p in pairs if tok.decode(p["chosen_ids"][:1]).startswith(" ")]
    assert spaced  # answers the model began with a space: kept as sampled, which re-encoding the text would lose
    assert any(tok(p["chosen"], add_special_tokens=False)["input_ids"] != p["chosen_ids"] for p in spaced)
