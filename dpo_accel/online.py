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

Not yet: several processes (a process left without a pair would stall the gradient all-reduce), checkpoints
and resume inside the loop (``train.save_steps`` is refused).
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
    """Optimizer steps from s.step to s.max_steps on pairs the policy generates (train.Session `s`)."""
    from dpo_accel.data import PreferenceCollator, _auto_bos, _keep_row, _tokenize_row, load_preference_splits
    from dpo_accel.evaluate import generate_answers
    from dpo_accel.losses import compute_objective
    from dpo_accel.metrics import example_metrics
    from dpo_accel.train import log_metrics

    recipe, accelerator = s.plan.recipe, s.accelerator
    t, d, g = recipe.train, recipe.data, s.plan.geometry
    if accelerator.num_processes > 1:
        raise RecipeError("train.online_generations runs on one process for now; launch with 1 process")
    prompts_all = load_preference_splits(d, t.seed)["train"]["prompt"]
    score = _scorer(recipe, accelerator.device)
    collator, auto_bos = PreferenceCollator(s.tokenizer.pad_token_id), _auto_bos(s.tokenizer)
    hf_model = accelerator.unwrap_model(s.model).model
    position = s.step * g.accumulation * g.per_device
    stats = {"prompts": 0, "pairs": 0, "skipped": 0, "scores": []}
    metrics_sum: dict[str, list] = {}
    last_log, grad_norm = time.perf_counter(), torch.tensor(0.0)
    s.model.train()
    while s.step < s.max_steps:
        prompts = [prompts_all[i] for i in _prompt_order(len(prompts_all), t.seed, position, g.per_device)]
        position += g.per_device
        answers = generate_answers(hf_model, s.tokenizer, prompts, t.online_max_new_tokens,
                                   autocast=accelerator.autocast, temperature=t.online_temperature,
                                   num_return_sequences=t.online_generations, seed=t.seed + position)
        k = t.online_generations
        groups = [answers[i * k:(i + 1) * k] for i in range(len(prompts))]
        flat = [float(x) for x in score([p for p in prompts for _ in range(k)], answers)]
        scores = [flat[i * k:(i + 1) * k] for i in range(len(prompts))]
        pairs, skipped = build_pairs(prompts, groups, scores)
        rows = [_tokenize_row(p, i, s.tokenizer, d.max_length, d.max_prompt_length, d.truncation_mode, True,
                              auto_bos, "online") for i, p in enumerate(pairs)]
        rows = [{**r, "idx": i} for i, r in enumerate(rows) if _keep_row(r["_status"])]
        stats["prompts"] += len(prompts)
        stats["pairs"] += len(rows)
        stats["skipped"] += skipped
        stats["scores"] += flat
        with accelerator.accumulate(s.model):
            if rows:
                batch = {k2: v.to(accelerator.device) for k2, v in collator(rows).items()}
                policy = s.model(**batch)
                out = compute_objective(s.plan.objective, policy, s.reference.logps(batch, "train"))
                accelerator.backward(out.loss * len(rows) / g.per_device)  # a prompt without a pair adds nothing
                for k2, v in example_metrics(out, policy).items():
                    metrics_sum.setdefault(k2, []).append(v)
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(s.model.parameters(), t.max_grad_norm or float("inf"))
            s.optimizer.step()
            s.optimizer.zero_grad()
        if not accelerator.sync_gradients:
            continue
        lr = s.scheduler.get_last_lr()[0]
        s.scheduler.step()
        s.step += 1
        if s.step % t.logging_steps == 0 or s.step == s.max_steps:
            metrics = {k2: float(torch.cat(v).float().mean()) for k2, v in metrics_sum.items()}
            scores_np = np.asarray(stats["scores"])
            metrics.update({"grad_norm": float(grad_norm), "learning_rate": lr,
                            "online/score_mean": float(scores_np.mean()), "online/score_max": float(scores_np.max()),
                            "online/pair_share": stats["pairs"] / stats["prompts"], "online/skipped": stats["skipped"],
                            "num_pairs": stats["pairs"], "seconds": time.perf_counter() - last_log})
            log_metrics(accelerator, t.output_dir, metrics, s.step)
            log(f"step {s.step}: score {metrics['online/score_mean']:.3f}, pairs {stats['pairs']}/{stats['prompts']}"
                + (f", loss {metrics['loss']:.4f}" if "loss" in metrics else ""))
            stats = {"prompts": 0, "pairs": 0, "skipped": 0, "scores": []}
            metrics_sum, last_log = {}, time.perf_counter()


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
    if t.save_steps:
        return "train.save_steps: the online loop writes no checkpoints yet (the run ends with the export); set it to 0"
    if recipe.reference.mode == "precomputed":
        return "reference.mode precomputed cannot score generated pairs; use adapter_off, copy or auto"
    return None
