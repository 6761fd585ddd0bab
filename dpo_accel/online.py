"""Online DPO: each step the policy answers its own prompts, a verifier or reward model scores the answers,
and the best and worst answer of each prompt make the pair of one DPO-family step.

    accelerate launch --config_file accelerate_configs/cpu_single.yaml dpo_accel/train.py \\
        --recipe recipes/smollm2_arith_online.yaml

Set ``train.online_generations`` (k > 1 answers per prompt) to run this loop instead of the fixed pairs;
everything else (policy, LoRA, reference, objective, logging, export) is the offline run's. Per micro-step:
``per_device_train_batch_size`` prompts of the training split (a seeded order, one epoch after another),
k sampled answers each (``train.online_temperature``, ``train.online_max_new_tokens``), scored by
``train.online_verifier`` (``arith``, or ``module:function`` returning one number per answer, as the
behaviour scorers are named) or ``train.online_reward_model`` (a one-label sequence classifier, as
eval.reward_model); a prompt whose answers all score the same gives no pair and is counted
(``online/skipped``). The pairs are tokenised as training data and take the usual forward, reference
log-probs and objective. Logged besides the usual metrics: ``online/score_mean``, ``online/score_max``,
``online/pair_share`` (share of prompts that gave a pair), ``online/skipped``.

Several processes each answer their own prompts; ``train.save_steps`` checkpoints and ``--resume`` continues
where the straight run would be (see `online_loop`).
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np
import torch

from dpo_accel.console import log
from dpo_accel.recipe import RecipeError

__all__ = ["arith_verifier", "build_pairs", "online_loop", "resolve_verifier"]


def arith_verifier(prompts: list, answers: list[str]) -> list[float]:
    """The shipped addition task: 1 for the right sum plus 1 for the exact "a + b = c." form."""
    from dpo_accel.arith_task import score_answer

    out = []
    for p, a in zip(prompts, answers):
        s = score_answer(p if isinstance(p, str) else p[-1]["content"], a)
        out.append(float(s["correct"]) + float(s["format"]))
    return out


VERIFIERS = {"arith": arith_verifier}


def resolve_verifier(spec: str) -> Callable[[list, list], list]:
    """A built-in verifier name or ``module:function`` (a module or a .py path) -> func(prompts, answers)."""
    if spec in VERIFIERS:
        return VERIFIERS[spec]
    if ":" not in spec:
        raise RecipeError(f"train.online_verifier '{spec}' is neither a built-in ({', '.join(VERIFIERS)}) nor "
                          "module:function")
    from dpo_accel.scorers import _import_callable

    return _import_callable(spec)


def build_pairs(prompts: list, answers: list[list[str]], scores: list[list[float]]) -> tuple[list[dict], int]:
    """(pairs, skipped): per prompt its best-scored answer as chosen and its worst as rejected (the first of
    equals); a prompt whose answers all score the same, or whose best and worst read the same, is skipped."""
    pairs, skipped = [], 0
    for prompt, group, score in zip(prompts, answers, scores):
        best, worst = int(np.argmax(score)), int(np.argmin(score))
        if score[best] == score[worst] or group[best].strip() == group[worst].strip():
            skipped += 1
            continue
        pairs.append({"prompt": prompt, "chosen": group[best], "rejected": group[worst],
                      "score_chosen": float(score[best]), "score_rejected": float(score[worst])})
    return pairs, skipped


def _scorer(recipe, device) -> Callable[[list, list], list]:
    t = recipe.train
    if t.online_reward_model:
        from dpo_accel.judge import load_reward_model, reward_scores

        model, tokenizer = load_reward_model(t.online_reward_model, device)
        return lambda prompts, answers: reward_scores(model, tokenizer, prompts, answers)
    return resolve_verifier(t.online_verifier)


def _prompt_order(n: int, seed: int, start: int, count: int) -> list[int]:
    """Positions start..start+count of an endless seeded order over n prompts (a new shuffle each epoch)."""
    out = []
    for pos in range(start, start + count):
        epoch, i = divmod(pos, n)
        out.append(int(np.random.default_rng(seed + epoch).permutation(n)[i]))
    return out


def online_loop(s) -> None:
    """Optimizer steps from s.step to s.max_steps on pairs the policy generates (train.Session `s`).

    Every process takes its own prompts of the seeded order (rank r the r-th slice of each global
    micro-batch). A process whose prompts gave no pair still runs the forward and backward, on a stand-in
    pair weighted 0, so the gradient all-reduce of a step never waits for it. Counts and metrics are
    summed over the processes before they are logged. Resume: the prompt position and the sampling seed
    both follow from the step, so a resumed run generates what the straight run would have."""
    from dpo_accel.data import PreferenceCollator, _auto_bos, _keep_row, _tokenize_row, load_preference_splits
    from dpo_accel.evaluate import generate_answers
    from dpo_accel.losses import compute_objective
    from dpo_accel.metrics import example_metrics, token_counts
    from dpo_accel.train import NonFiniteError, checkpoint_step, log_metrics, step_if_finite

    recipe, accelerator = s.plan.recipe, s.accelerator
    t, d, g = recipe.train, recipe.data, s.plan.geometry
    prompts_all = load_preference_splits(d, t.seed)["train"]["prompt"]
    score = _scorer(recipe, accelerator.device)
    collator, auto_bos = PreferenceCollator(s.tokenizer.pad_token_id), _auto_bos(s.tokenizer)
    hf_model = accelerator.unwrap_model(s.model).model
    k, per_step = t.online_generations, g.per_device * g.processes  # prompts per micro-step, all processes
    position = s.step * g.accumulation * per_step
    window, bad = _Window(), torch.zeros((), device=accelerator.device)
    last_log, grad_norm = time.perf_counter(), torch.tensor(0.0)
    s.model.train()
    while s.step < s.max_steps:
        mine = position + accelerator.process_index * g.per_device
        prompts = [prompts_all[i] for i in _prompt_order(len(prompts_all), t.seed, mine, g.per_device)]
        position += per_step
        answers = generate_answers(hf_model, s.tokenizer, prompts, t.online_max_new_tokens,
                                   autocast=accelerator.autocast, temperature=t.online_temperature,
                                   num_return_sequences=k, seed=t.seed + mine)
        groups = [answers[i * k:(i + 1) * k] for i in range(len(prompts))]
        flat = [float(x) for x in score([p for p in prompts for _ in range(k)], answers)]
        pairs, skipped = build_pairs(prompts, groups, [flat[i * k:(i + 1) * k] for i in range(len(prompts))])
        rows = _tokenized(pairs, s.tokenizer, d, auto_bos, _tokenize_row, _keep_row)
        weight = len(rows) / g.per_device  # a prompt without a pair adds nothing
        if not rows:  # a stand-in pair (two of the answers) so this process joins the step's all-reduce
            rows = _tokenized([{"prompt": prompts[0], "chosen": groups[0][0], "rejected": groups[0][-1]}],
                              s.tokenizer, d, auto_bos, _tokenize_row, lambda status: True)
        window.add(len(prompts), round(weight * g.per_device), skipped, flat)
        with accelerator.accumulate(s.model):
            batch = {k2: v.to(accelerator.device) for k2, v in collator(rows).items()}
            policy = s.model(**batch)
            out = compute_objective(s.plan.objective, policy, s.reference.logps(batch, "train"))
            bad = bad + (~torch.isfinite(out.loss.detach())).float()
            accelerator.backward(out.loss * weight)
            window.add_metrics(example_metrics(out, policy), real=bool(weight))  # the stand-in counts 0
            window.tokens += token_counts(batch)[0] if weight else 0.0
            grad_norm, skipped = step_if_finite(s, bad, grad_norm)
        if not accelerator.sync_gradients:
            continue
        bad = torch.zeros((), device=accelerator.device)
        lr = s.scheduler.get_last_lr()[0]
        s.step += 1
        if skipped:  # as the offline loop: weights, optimizer and scheduler unchanged; too many in a row stop
            s.nonfinite_steps, s.nonfinite_in_a_row = s.nonfinite_steps + 1, s.nonfinite_in_a_row + 1
            log(f"step {s.step}: loss or gradient norm not finite; step skipped ({s.nonfinite_in_a_row} in a row)")
            if s.nonfinite_in_a_row >= t.max_nonfinite_steps:
                raise NonFiniteError(f"{t.max_nonfinite_steps} online steps in a row (to step {s.step}) had a "
                                     "non-finite loss or gradient norm; lower train.learning_rate or loss.beta")
        else:
            s.scheduler.step()
            s.nonfinite_in_a_row = 0
        if s.step % t.logging_steps == 0 or s.step == s.max_steps:
            metrics = window.collect(accelerator)
            metrics.update({"grad_norm": float(grad_norm), "learning_rate": lr,
                            "seconds": time.perf_counter() - last_log})
            log_metrics(accelerator, t.output_dir, metrics, s.step)
            log(f"step {s.step}: score {metrics['online/score_mean']:.3f}, pairs {metrics['num_pairs']}/"
                f"{metrics['online/prompts']}" + (f", loss {metrics['loss']:.4f}" if "loss" in metrics else ""))
            window, last_log = _Window(), time.perf_counter()
        if t.save_steps and s.step % t.save_steps == 0:
            checkpoint_step(s, 0)
            last_log = time.perf_counter()


def _tokenized(pairs: list[dict], tokenizer, d, auto_bos: bool, tokenize_row, keep_row) -> list[dict]:
    rows = [tokenize_row(p, i, tokenizer, d.max_length, d.max_prompt_length, d.truncation_mode, True, auto_bos,
                         "online") for i, p in enumerate(pairs)]
    return [{**r, "idx": i} for i, r in enumerate(rows) if keep_row(r["_status"])]


class _Window:
    """One logging window's counts, scores and per-pair metrics on this process; `collect` sums them over
    the processes (every process calls it)."""

    def __init__(self):
        self.prompts = self.pairs = self.skipped = 0
        self.scores: list[float] = []
        self.sums: dict[str, float] = {}
        self.count, self.tokens = 0, 0.0  # pairs' metric rows; real tokens of the pairs trained on

    def add(self, prompts: int, pairs: int, skipped: int, scores: list[float]) -> None:
        self.prompts, self.pairs, self.skipped = self.prompts + prompts, self.pairs + pairs, self.skipped + skipped
        self.scores += scores

    def add_metrics(self, metrics: dict, real: bool) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + (float(value.float().sum()) if real else 0.0)
        self.count += len(next(iter(metrics.values()))) if real else 0

    def collect(self, accelerator) -> dict:
        keys = sorted(self.sums)  # the same on every process: every micro-step adds the objective's metrics
        local = torch.tensor([self.prompts, self.pairs, self.skipped, len(self.scores), sum(self.scores), self.count,
                              self.tokens] + [self.sums[k] for k in keys], dtype=torch.float64)
        best = torch.tensor([max(self.scores, default=float("-inf"))], dtype=torch.float64)
        total = accelerator.reduce(local.to(accelerator.device), reduction="sum").cpu().tolist()
        best = accelerator.reduce(best.to(accelerator.device), reduction="max").item()
        prompts, pairs, skipped, n_scores, score_sum, count, tokens = total[:7]
        out = {k: total[7 + i] / count for i, k in enumerate(keys)} if count else {}
        out.update({"online/score_mean": score_sum / max(n_scores, 1), "online/score_max": best,
                    "online/pair_share": pairs / max(prompts, 1), "online/skipped": int(skipped),
                    "online/prompts": int(prompts), "num_pairs": int(pairs), "num_tokens": tokens})
        return out


def check_online(recipe) -> Optional[str]:
    """What stops an online run before any compute (None: nothing)."""
    t = recipe.train
    if t.online_generations == 0:
        return None
    if t.online_generations < 2:
        return f"train.online_generations is {t.online_generations}; use 0 (offline) or 2 or more answers per prompt"
    if (t.online_verifier is None) == (t.online_reward_model is None):
        return "train.online_generations needs exactly one of train.online_verifier and train.online_reward_model"
    if t.online_temperature <= 0:
        return "train.online_temperature must be > 0 (greedy answers to one prompt would all be the same)"
    if t.online_verifier is not None:
        try:
            resolve_verifier(t.online_verifier)
        except RecipeError as e:  # scorers.ScorerError included: a module or function that is not there
            return str(e)
    if recipe.reference.mode == "precomputed":
        return "reference.mode precomputed cannot score generated pairs; use adapter_off, copy or auto"
    return None
