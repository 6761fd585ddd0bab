"""Reward models from the same loop: ``loss_type: bradley_terry`` trains an AutoModelForSequenceClassification.

    accelerate launch --config_file accelerate_configs/cpu_single.yaml dpo_accel/train.py \\
        --recipe recipes/smollm2_arith_rm.yaml

The same recipe sections, data, LoRA, batch geometry, optimizer, schedule and logging as a policy run;
what differs is the model (one-label sequence classifier on the policy's backbone, its new ``score`` head
trained in full next to LoRA) and the forward (chosen and rejected rows stacked, one scalar each). Each
(prompt, answer) is rendered and tokenised exactly as ``judge.reward_scores`` does, and scored by the
model's own forward (its last-token pooling), so the exported ``model/`` scores pairs as in training and
serves directly as ``eval.reward_model``. Logged: loss, ``rewards/accuracies``, ``rewards/margins``,
``rewards/chosen``, ``rewards/rejected``, ``rewards/mean``; held-out the same with ``eval/``, before and
after training. ``train.save_steps`` checkpoints and ``--resume`` continues at the straight run's data
position, and a step whose loss or gradient norm is not finite is skipped, as in the offline loop (see
`reward_loop`).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time

import torch

from dpo_accel.console import log
from dpo_accel.losses import compute_objective

__all__ = ["RewardCollator", "load_reward_model_for_training", "reward_forward", "reward_loop", "run_reward",
           "tokenize_pairs"]


def tokenize_pairs(split, tokenizer, max_length: int) -> list[dict]:
    """Rows of token ids of (prompt + chosen) and (prompt + rejected), rendered as `judge.render` does
    (the text the exported model will be given); a dataset ``margin`` column is kept."""
    from dpo_accel.judge import render

    special = not getattr(tokenizer, "chat_template", None)
    rows = []
    for i, row in enumerate(split):
        enc = [tokenizer(render(tokenizer, row["prompt"], _answer(row[side])), truncation=True, max_length=max_length,
                         add_special_tokens=special)["input_ids"] for side in ("chosen", "rejected")]
        rows.append({"chosen": enc[0], "rejected": enc[1], "margin": float(row.get("margin") or 0.0), "idx": i})
    return rows


def _answer(value) -> str:
    """A normalised answer as text: an assistant message list becomes its content."""
    return "".join(m["content"] for m in value) if isinstance(value, list) else value


class RewardCollator:
    """Rows of `tokenize_pairs` -> input_ids / attention_mask [2B, T] (chosen rows first, right padding with
    the pad id, where the model's pooling looks for each row's end) and margin [B]."""

    def __init__(self, pad_token_id: int):
        self.pad = int(pad_token_id)

    def __call__(self, rows: list) -> dict:
        seqs = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.as_tensor(s)
            mask[i, :len(s)] = 1
        return {"input_ids": ids, "attention_mask": mask,
                "margin": torch.tensor([r["margin"] for r in rows], dtype=torch.float32)}


def load_reward_model_for_training(recipe, model_path: str, tokenizer):
    """One-label AutoModelForSequenceClassification on the policy's checkpoint (a new ``score`` head), with
    LoRA on the body and the head trained in full when ``lora.use_peft``."""
    from transformers import AutoModelForSequenceClassification

    from dpo_accel.modeling import DTYPES, disable_dropout

    m, lora = recipe.model, recipe.lora
    kwargs = dict(dtype=DTYPES[m.dtype], trust_remote_code=m.trust_remote_code, num_labels=1)
    if m.attn_implementation:
        kwargs["attn_implementation"] = m.attn_implementation
    model = AutoModelForSequenceClassification.from_pretrained(model_path, **kwargs)
    model.config.pad_token_id = tokenizer.pad_token_id  # batched rows end where the pad id starts
    model.config.use_cache = False
    disable_dropout(model)
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not lora.use_peft:
        return model
    from peft import LoraConfig, get_peft_model

    targets = lora.lora_target_modules
    if targets == "all-linear":  # every linear layer of the body; the head is trained in full instead
        targets = sorted({n.split(".")[-1] for n, mod in model.named_modules()
                          if isinstance(mod, torch.nn.Linear) and not n.startswith("score")})
    if m.gradient_checkpointing:
        model.enable_input_require_grads()
    return get_peft_model(model, LoraConfig(
        r=lora.lora_r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout, target_modules=targets,
        modules_to_save=["score"] + list(lora.lora_modules_to_save or []), bias="none", task_type="SEQ_CLS"))


def reward_forward(model, batch: dict) -> dict:
    """The objective's inputs: the chosen and rejected rows' rewards [B] (float32) and the margins."""
    rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].float()
    b = rewards.shape[0] // 2
    return {"chosen_logps": rewards[:b], "rejected_logps": rewards[b:], "margin": batch["margin"]}


def pair_metrics(out) -> dict:
    c, r = out.chosen_rewards.float(), out.rejected_rewards.float()
    return {"loss": out.losses.detach().float(), "rewards/chosen": c, "rewards/rejected": r,
            "rewards/accuracies": (c > r).float(), "rewards/margins": c - r, "rewards/mean": (c + r) / 2}


@torch.no_grad()
def evaluate_reward(accelerator, model, loader, objective) -> dict:
    """Held-out means over every pair of every process."""
    model.eval()
    parts: dict[str, list] = {}
    for batch in loader:
        out = compute_objective(objective, reward_forward(model, batch), None)
        for k, v in pair_metrics(out).items():
            parts.setdefault(k, []).append(accelerator.gather_for_metrics(v))
    model.train()
    return {f"eval/{k}": float(torch.cat(v).mean()) for k, v in parts.items()}


def run_reward(plan) -> dict:
    """Train the reward model of the plan (loss_type bradley_terry) and export it; returns the summary."""
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader

    from dpo_accel.checkpoint import base_fingerprint, save_trainable_only
    from dpo_accel.data import load_preference_splits
    from dpo_accel.modeling import load_tokenizer, resolve_model_path
    from dpo_accel.plan import check_resume_data
    from dpo_accel.train import (EpochRandomSampler, Session, build_accelerator, build_optimizer, dump_recipe,
                                 log_metrics, resume_step, write_json)

    started = time.perf_counter()
    recipe, t, g = plan.recipe, plan.recipe.train, plan.geometry
    accelerator = build_accelerator(plan)
    set_seed(t.seed)
    with accelerator.main_process_first():
        model_path = resolve_model_path(recipe.model.model_name_or_path, recipe.model.gguf_file)
    tokenizer = load_tokenizer(recipe.model, model_path)
    raw = load_preference_splits(recipe.data, t.seed)
    splits = {k: tokenize_pairs(ds, tokenizer, recipe.data.max_length) for k, ds in raw.items()}
    model = load_reward_model_for_training(recipe, model_path, tokenizer)
    if accelerator.is_main_process:
        os.makedirs(t.output_dir, exist_ok=True)
        dump_recipe(recipe, os.path.join(t.output_dir, "recipe.yaml"))
    frozen = any(not p.requires_grad for p in model.parameters())  # LoRA: checkpoints hold the trainable weights
    base = base_fingerprint(model) if frozen and save_trainable_only(accelerator) else None
    collator = RewardCollator(tokenizer.pad_token_id)
    sampler = EpochRandomSampler(len(splits["train"]), t.seed)  # an epoch's order from (seed, epoch) alone
    train_loader = DataLoader(splits["train"], batch_size=g.per_device, sampler=sampler, collate_fn=collator)
    eval_loader = None
    if splits.get("eval") and recipe.eval.do_eval:
        eval_loader = DataLoader(splits["eval"], batch_size=t.per_device_eval_batch_size, collate_fn=collator)
    steps_per_epoch = math.ceil(math.ceil(len(train_loader) / g.processes) / g.accumulation)
    fingerprint = hashlib.sha256(json.dumps(splits["train"]).encode()).hexdigest()[:16]
    check_resume_data(plan, fingerprint, steps_per_epoch)
    max_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * steps_per_epoch)
    optimizer, scheduler = build_optimizer(recipe, model, max_steps)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare_data_loader(eval_loader)
    accelerator.register_for_checkpointing(scheduler)  # stepped by hand: once per optimizer step
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"reward model {trainable / 1e6:.2f}M trainable | {g.processes} process(es), {accelerator.mixed_precision} "
        f"precision | chosen and rejected rows stacked | {max_steps} steps of {g.global_batch} pairs")
    step = resume_step(plan, accelerator, base)
    s = Session(plan, accelerator, model, optimizer, scheduler, train_loader, eval_loader, sampler, None, tokenizer,
                [], {k: {"pairs": len(v)} for k, v in splits.items()}, fingerprint, steps_per_epoch, max_steps, step,
                started)
    s.base = base
    summary = {"global_step": step, "task": "reward_model", "data": s.data_stats}
    if eval_loader is not None:  # measured at the first start, kept for a resume
        before = os.path.join(t.output_dir, "eval_before.json")
        if step == 0:
            summary["eval_before"] = evaluate_reward(accelerator, model, eval_loader, plan.objective)
            if accelerator.is_main_process:
                write_json(before, summary["eval_before"])
        elif os.path.isfile(before):
            with open(before) as f:
                summary["eval_before"] = json.load(f)
    reward_loop(s)
    step = summary["global_step"] = s.step
    if eval_loader is not None:
        summary["eval"] = evaluate_reward(accelerator, model, eval_loader, plan.objective)
        log_metrics(accelerator, t.output_dir, summary["eval"], step)
    summary["exported"] = export_reward_model(accelerator, model, tokenizer, recipe, t.output_dir)
    accelerator.end_training()
    if accelerator.is_main_process:
        summary["wall_seconds"] = time.perf_counter() - started
        if "eval" in summary:
            log("held-out " + ", ".join(f"{k[5:]} {summary.get('eval_before', {}).get(k, float('nan')):.3f} -> "
                                        f"{v:.3f}" for k, v in summary["eval"].items() if k != "eval/loss"))
        log(f"{step} steps, {summary['wall_seconds']:.0f} s in all; reward model in {summary['exported']['model']}")
        write_json(os.path.join(t.output_dir, "summary.json"), summary)
    return summary


def reward_loop(s) -> None:
    """Optimizer steps from s.step to s.max_steps (train.Session `s`), as the offline loop: the data position
    follows from the step (`epoch_batches`), ``train.save_steps`` checkpoints (`checkpoint_step`), and a step
    whose loss or gradient norm is not finite is skipped (weights, optimizer and scheduler unchanged), logged,
    and train.max_nonfinite_steps of them in a row stop the run."""
    from dpo_accel.metrics import MetricAccumulator
    from dpo_accel.train import (NonFiniteError, checkpoint_step, epoch_batches, log_metrics, progress_postfix,
                                 step_if_finite)

    t, accelerator = s.plan.recipe.train, s.accelerator
    acc = MetricAccumulator(accelerator)
    last_log, grad_norm = time.perf_counter(), torch.tensor(0.0)
    bad = torch.zeros((), device=accelerator.device)
    s.model.train()
    while s.step < s.max_steps:
        epoch = s.step // s.steps_per_epoch
        for batch in epoch_batches(s, epoch):
            with accelerator.accumulate(s.model):
                out = compute_objective(s.plan.objective, reward_forward(s.model, batch), None)
                bad = bad + (~torch.isfinite(out.loss.detach())).float()
                accelerator.backward(out.loss)
                grad_norm, skipped = step_if_finite(s, bad, grad_norm)
            acc.add(pair_metrics(out), {"chosen_attention_mask": batch["attention_mask"]})  # both rows: token counts
            if not accelerator.sync_gradients:
                continue
            bad = torch.zeros((), device=accelerator.device)
            lr = s.scheduler.get_last_lr()[0]
            s.step += 1
            if skipped:  # its metrics on a line of their own, out of the next window's means
                s.nonfinite_steps, s.nonfinite_in_a_row = s.nonfinite_steps + 1, s.nonfinite_in_a_row + 1
                log_metrics(accelerator, t.output_dir, {**acc.collect().means, "grad_norm": float(grad_norm),
                                                        "learning_rate": lr, "epoch": epoch, "skipped": True,
                                                        "nonfinite_steps": s.nonfinite_steps}, s.step)
                log(f"step {s.step}: loss or gradient norm not finite; step skipped ({s.nonfinite_in_a_row} in a row)")
                if s.nonfinite_in_a_row >= t.max_nonfinite_steps:
                    raise NonFiniteError(f"{t.max_nonfinite_steps} reward model steps in a row (to step {s.step}) had "
                                         "a non-finite loss or gradient norm; lower train.learning_rate")
                last_log = time.perf_counter()
            else:
                s.scheduler.step()
                s.nonfinite_in_a_row = 0
            if not skipped and (s.step % t.logging_steps == 0 or s.step == s.max_steps):
                report = acc.collect()
                elapsed = time.perf_counter() - last_log
                metrics = {**report.means, "grad_norm": float(grad_norm), "learning_rate": lr, "epoch": epoch,
                           "tokens_per_second": report.tokens / elapsed, "pairs_per_second": report.pairs / elapsed,
                           "num_tokens": report.tokens, "num_pairs": report.pairs}
                log_metrics(accelerator, t.output_dir, metrics, s.step)
                log(f"step {s.step}: " + ", ".join(f"{k} {v}" for k, v in progress_postfix(metrics).items()))
                last_log = time.perf_counter()
            if t.save_steps and s.step % t.save_steps == 0:
                checkpoint_step(s, epoch)
                last_log = time.perf_counter()
            if s.step >= s.max_steps:
                break


def export_reward_model(accelerator, model, tokenizer, recipe, output_dir: str) -> dict:
    """``<output_dir>/model``: the classifier with any LoRA merged, its tokenizer and recipe, loadable by
    AutoModelForSequenceClassification.from_pretrained (and so by eval.reward_model)."""
    from dpo_accel.recipe import dump_recipe

    accelerator.wait_for_everyone()
    folder = os.path.join(output_dir, "model")
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        if hasattr(unwrapped, "merge_and_unload"):
            unwrapped = unwrapped.merge_and_unload()
        unwrapped.config.use_cache = True
        unwrapped.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        dump_recipe(recipe, os.path.join(folder, "recipe.yaml"))
    accelerator.wait_for_everyone()
    return {"model": folder}
