"""KTO (dpo_accel/kto.py, losses.kto): TRL's definition in float64, the KL reference point gathered over
processes, the paper's weighting hint, mismatched KL completions, unpaired data end to end, and a
2-rank run equal to 1 rank. The learning run on a preference set split into rows is the "kto" case of
tests/test_objectives_e2e.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, paired_steps, reset_accelerate
from dpo_accel.data.unpaired import kto_inputs, mismatched_sources, weight_hint
from dpo_accel.objectives.registry import compute_objective, validate_loss_config
from dpo_accel.config.schema import LossConfig


def trl_kto_losses(pc, pr, pkl, rc, rr, rkl, beta, wd, wu):
    """TRL KTOTrainer.kto_loss as written there: desirable rows first, then undesirable, KL clamped at 0."""
    kl = (pkl - rkl).mean().clamp(min=0)
    chosen = 1 - torch.sigmoid(beta * ((pc - rc) - kl))
    rejected = 1 - torch.sigmoid(beta * (kl - (pr - rr)))
    return torch.cat((wd * chosen, wu * rejected))


def test_kto_equals_trls_definition_float64():
    g = torch.Generator().manual_seed(0)
    n = 10
    policy = -torch.rand(n, generator=g, dtype=torch.float64) * 40
    reference = policy + torch.randn(n, generator=g, dtype=torch.float64) * 3
    kl_policy = -torch.rand(n, generator=g, dtype=torch.float64) * 40
    kl_reference = kl_policy - torch.rand(n, generator=g, dtype=torch.float64) * 2  # mean KL > 0: not clamped
    desirable = torch.tensor([True, False, True, True, False, True, False, True, True, False])
    cfg = LossConfig(loss_type="kto", beta=0.3, desirable_weight=1.2, undesirable_weight=0.8)
    out = compute_objective(cfg, {"chosen_logps": policy, "rejected_logps": kl_policy, "desirable": desirable},
                            {"chosen_logps": reference, "rejected_logps": kl_reference})
    d, u = desirable, ~desirable
    expected = trl_kto_losses(policy[d], policy[u], kl_policy, reference[d], reference[u], kl_reference, 0.3, 1.2, 0.8)
    torch.testing.assert_close(torch.cat((out.losses[d], out.losses[u])), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(out.loss, expected.mean(), rtol=1e-12, atol=0)
    assert float(out.metrics["kl"][0]) == pytest.approx(float((kl_policy - kl_reference).mean()), rel=1e-12)
    torch.testing.assert_close(out.chosen_rewards, 0.3 * (policy - reference))


def test_kto_hand_case():
    # c = 2 (desirable) and c = -1 (undesirable), mismatched log-ratios 0.5 and 1.5: z = 1, β = 1.
    # desirable: 1 - σ(2 - 1) = 0.2689414213699951; undesirable: 1 - σ(1 - (-1)) = 0.11920292202211755.
    out = compute_objective(LossConfig(loss_type="kto", beta=1.0),
                            {"chosen_logps": torch.tensor([2.0, -1.0], dtype=torch.float64),
                             "rejected_logps": torch.tensor([0.5, 1.5], dtype=torch.float64),
                             "desirable": torch.tensor([True, False])},
                            {"chosen_logps": torch.zeros(2, dtype=torch.float64),
                             "rejected_logps": torch.zeros(2, dtype=torch.float64)})
    torch.testing.assert_close(out.losses, torch.tensor([0.2689414213699951, 0.11920292202211755],
                                                        dtype=torch.float64))


class TwoRanks:
    """An accelerator stand-in for 2 processes: the other rank's batch KL estimate is `other`."""

    num_processes = 2

    def __init__(self, other: float):
        self.other = other

    def gather(self, t):
        return torch.cat([t, torch.tensor([self.other], dtype=t.dtype)])


def test_reference_point_is_averaged_over_processes_and_passes_no_gradient():
    policy = {"chosen_logps": torch.tensor([-3.0, -4.0], requires_grad=True),
              "rejected_logps": torch.tensor([-5.0, -6.0], requires_grad=True)}
    reference = {"chosen_logps": torch.tensor([-3.0, -4.0]), "rejected_logps": torch.tensor([-5.5, -6.5])}
    batch = {"desirable": torch.tensor([True, False])}
    alone = kto_inputs(None, batch, policy, reference)
    assert float(alone["kl"]) == pytest.approx(0.5) and not alone["kl"].requires_grad
    gathered = kto_inputs(TwoRanks(1.5), batch, policy, reference)
    assert float(gathered["kl"]) == pytest.approx(1.0)  # (0.5 + 1.5) / 2
    assert float(kto_inputs(TwoRanks(-3.0), batch, policy, reference)["kl"]) == 0.0  # clamped after the mean
    # A negative estimate on one process still counts: clamping each process first would give (0 + 0.5) / 2.
    negative = {**reference, "rejected_logps": torch.tensor([-4.5, -5.5])}  # this process: -0.5
    assert float(kto_inputs(TwoRanks(1.5), batch, policy, negative)["kl"]) == pytest.approx(0.5)
    out = compute_objective(LossConfig(loss_type="kto"), gathered, reference)
    assert float(out.metrics["kl"][0]) == pytest.approx(1.0)
    out.loss.backward()  # the mismatched completions only set the reference point: no gradient through them
    assert policy["chosen_logps"].grad.abs().min() > 0
    assert policy["rejected_logps"].grad is None or not policy["rejected_logps"].grad.any()


@pytest.mark.parametrize("desirable,undesirable,wd,wu,ok", [
    (100, 100, 1.0, 1.0, True), (100, 100, 1.3, 1.0, True), (100, 100, 1.4, 1.0, False),
    (100, 100, 1.0, 1.1, False), (800, 200, 1.0, 1.0, False), (800, 200, 0.3, 1.0, True),
    (800, 200, 1.0, 3.5, True),
])
def test_weight_hint_follows_the_papers_range(desirable, undesirable, wd, wu, ok):
    hint = weight_hint(desirable, undesirable, wd, wu)
    assert (hint is None) == ok, hint
    if hint:
        assert "\n" not in hint and "loss.desirable_weight in [" in hint
    if (desirable, undesirable) == (800, 200) and not ok:  # the ranges it names do satisfy the rule
        assert "[0.25, 0.33]" in hint and "[3.00, 4.00]" in hint
        assert weight_hint(800, 200, 0.25, 1.0) is None and weight_hint(800, 200, 1.0, 4.0) is None


def test_mismatched_completions_come_from_other_prompts_and_are_seeded():
    prompts = ["p0", "p0", "p1", "p1", "p2", "p2", [{"role": "user", "content": "p3"}]]
    completions = ["a", "b", "c", "a", "e", "f", "g"]
    source = mismatched_sources(prompts, completions, seed=3)
    for i, j in enumerate(source):
        assert prompts[j] != prompts[i] and completions[j] != completions[i]
    assert (source == mismatched_sources(prompts, completions, seed=3)).all()
    assert not (source == mismatched_sources(prompts, completions, seed=4)).all()
    with pytest.raises(ValueError, match="at least two different prompts"):
        mismatched_sources(["p", "p"], ["a", "b"], seed=0)


class WordTokenizer:
    """Raw-text stand-in: each word is its number, EOS 2, no BOS, no chat template."""

    eos_token_id, bos_token_id, chat_template = 2, None, None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(w) for w in text.split()]}


def words(first: int, n: int) -> str:
    return " ".join(str(first + k) for k in range(n))


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_a_rows_truncation_does_not_depend_on_its_kl_partner(mode):
    """A 300-token prompt with a 10-token completion (max_length 512, max_prompt_length 128) keeps every token
    whatever its KL partner's length (joint truncation cut its prompt to 128 beside a 400-token partner); its
    KL sequence shares its prompt and fits max_length; a partner equal to the completion where both are cut
    no longer drops the row."""
    from dpo_accel.data.tokenize import STATUS_KEPT, STATUS_TRUNCATED, tokenize_row

    prompt, completion = words(1000, 300), words(5000, 9)  # + EOS: 10 tokens

    def row(chosen, partner):
        return tokenize_row({"prompt": prompt, "chosen": chosen, "rejected": partner, "label": True}, 0,
                            WordTokenizer(), 512, 128, mode, True, None, "train")

    expected = list(range(1000, 1300)) + list(range(5000, 5009)) + [2]
    for partner_words in (3, 200, 399):
        out = row(completion, words(7000, partner_words))
        assert out["chosen_input_ids"] == expected and out["prompt_length"] == 300, partner_words
        assert out["chosen_labels"] == [-100] * 300 + expected[300:] and out["_status"] == STATUS_KEPT
        assert out["rejected_input_ids"][:300] == expected[:300]  # one prompt on both sides (prefix sharing)
        assert len(out["rejected_input_ids"]) == min(300 + partner_words + 1, 512)
    long_answer = words(5000, 500)
    short, twin = row(long_answer + " 8", "3 4"), row(long_answer + " 8", long_answer + " 9")
    assert twin["_status"] == short["_status"] == STATUS_TRUNCATED and twin["chosen_input_ids"] == short["chosen_input_ids"]
    assert twin["prompt_length"] == 128 and len(twin["chosen_input_ids"]) == 512


def test_kto_training_rows_are_shuffled_not_grouped_by_length(tmp_path, capsys):
    """data.group_by_length: true (the default) gives KTO rows the epoch-seeded shuffle (a batch's reference
    point must not follow the lengths), said in one line; a DPO run keeps its length-grouped batches."""
    import datasets
    from conftest import tiny_overrides
    from dpo_accel.config.load import load_recipe
    from dpo_accel.config.plan import preflight
    from dpo_accel.data.collate import EpochRandomSampler, LengthGroupedSampler
    from dpo_accel.loops.policy_run import build_loaders

    rows = {"chosen_input_ids": [[5] * n for n in range(1, 17)], "chosen_labels": [[5] * n for n in range(1, 17)],
            "rejected_input_ids": [[6] * 3] * 16, "rejected_labels": [[6] * 3] * 16, "prompt_length": [0] * 16,
            "label": [n % 2 == 0 for n in range(16)], "idx": list(range(16))}
    tokenized = {"train": datasets.Dataset.from_dict(rows)}

    class Pad:
        pad_token_id = 0

    def sampler_of(loss_type):
        plan = preflight(load_recipe(None, tiny_overrides(str(tmp_path / "model"), str(tmp_path / "run"),
                                                          **{"loss.loss_type": loss_type})))
        assert plan.recipe.data.group_by_length
        return build_loaders(plan, tokenized, Pad())[2]

    capsys.readouterr()
    kto = sampler_of("kto")
    assert isinstance(kto, EpochRandomSampler)
    assert "KTO: training rows are shuffled (epoch-seeded), not grouped by length" in capsys.readouterr().out
    kto.set_epoch(1)
    assert sorted(kto) == list(range(16)) and list(kto) == list(EpochRandomSampler(16, kto.seed + 1))
    assert isinstance(sampler_of("sigmoid"), LengthGroupedSampler)


@pytest.mark.parametrize("bad,expected", [
    (dict(loss_type=["kto", "sigmoid"]), "use it alone"),
    (dict(loss_type="kto", rpo_alpha=1.0), "without loss.rpo_alpha"),
    (dict(loss_type="kto", undesirable_weight=0.0), "must be positive"),
    (dict(loss_type="sigmoid", desirable_weight=2.0), "has no effect on loss_type sigmoid; it is read by: kto"),
])
def test_kto_config_errors(bad, expected):
    with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace("[", r"\[")) as err:
        validate_loss_config(LossConfig(**bad))
    assert "\n" not in str(err.value)


def test_kto_without_labels_says_what_to_do():
    policy = {"chosen_logps": torch.zeros(2), "rejected_logps": torch.zeros(2)}
    with pytest.raises(ValueError, match="data.format: unpaired"):
        compute_objective(LossConfig(loss_type="kto"), policy, policy)


def write_unpaired(folder: str) -> str:
    """Unpaired conversational rows (TRL's format) from the shipped arithmetic pairs, 2 desirable in 3."""
    os.makedirs(folder, exist_ok=True)
    for split, n in (("train", 24), ("eval", 8)):
        with open(os.path.join(REPO, "data", "arith_prefs", f"{split}.jsonl")) as f:
            pairs = [json.loads(line) for line in f][:n]
        with open(os.path.join(folder, f"{split}.jsonl"), "w") as f:
            for i, p in enumerate(pairs):
                good = i % 3 != 0
                row = {"prompt": [{"role": "user", "content": p["prompt"]}],
                       "completion": [{"role": "assistant", "content": p["chosen"] if good else p["rejected"]}],
                       "label": good}
                f.write(json.dumps(row) + "\n")
    return folder


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory) -> str:
    from conftest import build_small_vocab_model

    return build_small_vocab_model(str(tmp_path_factory.mktemp("kto_small_vocab")))


def test_unpaired_conversational_rows_train_and_log_kto_metrics(small_model_dir, tmp_path, capsys):
    from conftest import tiny_overrides
    from dpo_accel import train
    from dpo_accel.config.load import load_recipe

    data = write_unpaired(str(tmp_path / "unpaired"))
    out = str(tmp_path / "run")
    summary = train.run(load_recipe(None, tiny_overrides(small_model_dir, out, **{
        "data.dataset_name": data, "loss.loss_type": "kto", "train.report_to": [], "train.export_merged": False})))
    logged = capsys.readouterr()
    assert "KTO rows: 16 desirable, 8 undesirable (train)" in logged.out
    assert "outside the paper's [1, 4/3]; set loss.desirable_weight in [0.50, 0.67]" in logged.out
    assert summary["data"]["train"]["kept"] == 24 and summary["data"]["eval"]["kept"] == 8
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert steps[0]["loss"] == pytest.approx(0.5, abs=1e-6)  # policy == reference: 1 - σ(0) for every row
    assert all("kl" in r and "rewards/accuracies" not in r for r in steps)
    assert {"eval/rewards/desirable", "eval/rewards/undesirable", "eval/kl"} <= set(summary["eval"])


@pytest.mark.slow
def test_two_ranks_equal_one_rank_with_the_reference_point_gathered(small_model_dir, tmp_path):
    """2 gloo ranks x 2 rows == 1 rank x 4 rows, step by step: each rank's loss uses the KL estimate of the
    global batch (the batch-local one differs: the kl column is checked to be non-zero)."""
    from conftest import tiny_overrides

    def run(out, per_device, launch):
        sets = tiny_overrides(small_model_dir, out, **{
            "loss.loss_type": "kto", "loss.beta": 0.5, "data.group_by_length": False, "train.report_to": [],
            "train.per_device_train_batch_size": per_device, "train.per_device_eval_batch_size": per_device,
            "train.mixed_precision": "\"no\"", "train.max_steps": 6, "train.export_merged": False})
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch, os.path.join(REPO, "dpo_accel", "train.py")]
        for s in sets:
            cmd += ["--set", s]
        env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-4000:]
        with open(os.path.join(out, "metrics.jsonl")) as f:
            return [r for r in map(json.loads, f) if "loss" in r]

    from conftest import CONFIGS, free_port

    one = run(str(tmp_path / "one"), 4, ["--config_file", os.path.join(CONFIGS, "cpu_single.yaml")])
    two = run(str(tmp_path / "two"), 2, ["--config_file", os.path.join(CONFIGS, "cpu_two_process.yaml"),
                                         "--main_process_port", str(free_port())])
    assert any(r["kl"] > 1e-4 for r in one), [r["kl"] for r in one]
    for a, b in paired_steps(one, two):
        for key in ("loss", "kl", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key, a[key], b[key])
    reset_accelerate()
