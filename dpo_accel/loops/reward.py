"""Reward models from the same loop: ``loss_type: bradley_terry`` trains an AutoModelForSequenceClassification.

    accelerate launch --config_file accelerate_configs/cpu_single.yaml dpo_accel/train.py \\
        --recipe recipes/smollm2_arith_rm.yaml

The same recipe sections, data (truncation and length grouping included), LoRA, batch geometry, and the
same step engine (optimizer, schedule, logging, ``eval_steps``, ``save_steps``, ``--resume``, the non-finite
guard) as a policy run; what differs is the model (one-label sequence classifier on the policy's backbone, its new ``score`` head
trained in full next to LoRA) and the forward (chosen and rejected rows stacked, one scalar each). Each
(prompt, answer) is rendered and tokenised exactly as ``judge.reward_scores`` does, and scored by the
model's own forward (its last-token pooling), so the exported ``model/`` scores pairs as in training and
serves directly as ``eval.reward_model``. Logged: loss, ``rewards/accuracies``, ``rewards/margins``,
``rewards/chosen``, ``rewards/rejected``, ``rewards/mean``; held-out the same with ``eval/``, before and
after training.
"""
from __future__ import annotations

import hashlib
import json
import os
import time

import torch

from dpo_accel.config.plan import check_resume_data
from dpo_accel.config.errors import RecipeError
from dpo_accel.config.schema import dump_recipe
from dpo_accel.data.tokenize import truncate
from dpo_accel.evaluation.judge import render, render_prompt
from dpo_accel.evaluation.metrics import MetricAccumulator
from dpo_accel.loops.engine import Engine, build_accelerator, steps_per_epoch
from dpo_accel.loops.policy_run import check_truncation, flat_config
from dpo_accel.objectives.registry import compute_objective
from dpo_accel.outputs.checkpoints import base_fingerprint, save_trainable_only
from dpo_accel.outputs.console import log
from dpo_accel.outputs.metrics_log import read_json, write_json

__all__ = ["RewardCollator", "RewardKind", "load_reward_model_for_training", "reward_forward", "run_reward",
           "tokenize_pairs"]


def tokenize_pairs(split, tokenizer, d) -> tuple[list[dict], dict]:
    """(rows, stats): token ids of (prompt + chosen) and (prompt + rejected), rendered as `judge.render` does
    (the text the exported model will be given), a dataset ``margin`` column kept. A pair longer than
    ``data.max_length`` is cut by the policy data's rule (`data.tokenize.truncate`: the prompt first, to
    ``data.max_prompt_length`` from the side ``data.truncation_mode`` keeps, then the answers); a pair whose
    two rows read the same after the cut (nothing of the answers left to tell apart) is dropped. `stats` counts
    them as the policy data's statistics do (pairs, kept, truncated, dropped, raw_max)."""
    special = not getattr(tokenizer, "chat_template", None)

    def ids(text: str) -> list:
        return tokenizer(text, add_special_tokens=special)["input_ids"]

    rows, stats = [], {"pairs": 0, "kept": 0, "truncated": 0, "dropped": 0, "raw_max": 0}
    for i, row in enumerate(split):
        answers = [answer_text(row[side]) for side in ("chosen", "rejected")]
        whole = [ids(render(tokenizer, row["prompt"], a)) for a in answers]
        stats["pairs"], stats["raw_max"] = stats["pairs"] + 1, max(stats["raw_max"], *map(len, whole))
        if max(len(w) for w in whole) > d.max_length:
            n = len(ids(render_prompt(tokenizer, row["prompt"])))  # the prompt's tokens lead both rows
            prompt, cut, _ = truncate(whole[0][:n], [w[n:] for w in whole], d.max_length, d.max_prompt_length,
                                      d.truncation_mode)
            whole = [prompt + c for c in cut]
            stats["truncated"] += 1
        if whole[0] == whole[1]:
            stats["dropped"] += 1
            continue
        rows.append({"chosen": whole[0], "rejected": whole[1], "margin": float(row.get("margin") or 0.0), "idx": i})
    stats["kept"] = len(rows)
    stats["truncated"] -= min(stats["truncated"], stats["dropped"])  # a dropped pair is counted once, as dropped
    return rows, stats


def tokenized_pairs(raw: dict, tokenizer, d) -> tuple[dict, dict]:
    """Every split through `tokenize_pairs`; one line of counts per split, and the training split's truncation
    checked as a policy run's is (most pairs dropped, or every kept pair cut: an error naming the keys)."""
    splits, stats = {}, {}
    for key, ds in raw.items():
        splits[key], stats[key] = tokenize_pairs(ds, tokenizer, d)
        s = stats[key]
        log(f"reward pairs ({key}): {s['pairs']} read, {s['kept']} kept, {s['truncated']} cut to data.max_length "
            f"{d.max_length}, {s['dropped']} dropped (chosen and rejected the same after the cut); longest "
            f"{s['raw_max']} tokens")
    check_truncation(stats["train"], d)
    if not splits["train"]:
        raise RecipeError("no training pair survived truncation; raise data.max_length or data.max_prompt_length")
    return splits, stats


def answer_text(value) -> str:
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

    from dpo_accel.model.loading import disable_dropout, weights_dtype

    m, lora = recipe.model, recipe.lora
    kwargs = dict(dtype=weights_dtype(m.dtype), trust_remote_code=m.trust_remote_code, num_labels=1)
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


class RewardKind:
    """Pairs of the training split in the sampler's order; the classifier's two rewards, the objective."""

    def __init__(self, engine: Engine, train_loader, eval_loader, sampler):
        self.plan, self.accelerator, self.model = engine.plan, engine.accelerator, engine.model
        self.loader, self.eval_loader, self.sampler = train_loader, eval_loader, sampler
        self.metrics = MetricAccumulator(engine.accelerator)

    def batches(self, engine):
        return engine.fixed_batches(self.loader, self.sampler)

    def forward(self, batch: dict) -> torch.Tensor:
        out = compute_objective(self.plan.objective, reward_forward(self.model, batch), None)
        self.metrics.add(pair_metrics(out), {"chosen_attention_mask": batch["attention_mask"]})  # both rows: tokens
        return out.loss

    def collect(self, seconds: float) -> dict:
        report = self.metrics.collect()
        return {**report.means, "tokens_per_second": report.tokens / seconds,
                "pairs_per_second": report.pairs / seconds, "num_tokens": report.tokens, "num_pairs": report.pairs}

    def evaluate(self):
        if self.eval_loader is None:
            return None
        return evaluate_reward(self.accelerator, self.model, self.eval_loader, self.plan.objective)

    def progress(self, metrics: dict) -> dict:
        from dpo_accel.loops.offline import progress_postfix

        return progress_postfix(metrics)


def reward_loaders(plan, splits: dict, tokenizer):
    """The training loader (length-grouped by the global batch, as a policy run, or an epoch-seeded shuffle)
    and the eval one."""
    from torch.utils.data import DataLoader

    from dpo_accel.data.collate import EpochRandomSampler, LengthGroupedSampler

    t, g, train = plan.recipe.train, plan.geometry, splits["train"]
    collator = RewardCollator(tokenizer.pad_token_id)
    if plan.recipe.data.group_by_length:
        lengths = [max(len(r["chosen"]), len(r["rejected"])) for r in train]
        sampler = LengthGroupedSampler(lengths, g.per_device * g.processes, seed=t.seed)
    else:
        sampler = EpochRandomSampler(len(train), t.seed)
    workers = plan.recipe.data.dataloader_num_workers
    train_loader = DataLoader(train, batch_size=g.per_device, sampler=sampler, collate_fn=collator, num_workers=workers)
    eval_loader = None
    if splits.get("eval") and plan.recipe.eval.do_eval:
        eval_loader = DataLoader(splits["eval"], batch_size=t.per_device_eval_batch_size, collate_fn=collator,
                                 num_workers=workers)
    return train_loader, eval_loader, sampler


def reward_setup(plan):
    """Accelerator, tokenised pairs, the classifier, loaders and the engine (resumed); returns (engine, kind,
    tokenizer, data stats)."""
    from accelerate.utils import set_seed

    from dpo_accel.data.formats import load_preference_splits
    from dpo_accel.model.loading import load_tokenizer, resolve_model_path

    recipe, t, g = plan.recipe, plan.recipe.train, plan.geometry
    accelerator = build_accelerator(plan)
    set_seed(t.seed)
    with accelerator.main_process_first():
        model_path = resolve_model_path(recipe.model.model_name_or_path, recipe.model.gguf_file)
    tokenizer = load_tokenizer(recipe.model, model_path)
    raw = load_preference_splits(recipe.data, t.seed)
    splits, stats = tokenized_pairs(raw, tokenizer, recipe.data)
    model = load_reward_model_for_training(recipe, model_path, tokenizer)
    if accelerator.is_main_process:
        os.makedirs(t.output_dir, exist_ok=True)
        dump_recipe(recipe, os.path.join(t.output_dir, "recipe.yaml"))
    frozen = any(not p.requires_grad for p in model.parameters())  # LoRA: checkpoints hold the trainable weights
    base = base_fingerprint(model) if frozen and save_trainable_only(accelerator) else None
    train_loader, eval_loader, sampler = reward_loaders(plan, splits, tokenizer)
    epoch_steps = steps_per_epoch(plan, len(train_loader))
    fingerprint = hashlib.sha256(json.dumps(splits["train"]).encode()).hexdigest()[:16]
    check_resume_data(plan, fingerprint, epoch_steps)
    engine, train_loader = Engine.prepare(plan, accelerator, model, train_loader, epoch_steps, fingerprint, base)
    if eval_loader is not None:
        eval_loader = accelerator.prepare_data_loader(eval_loader)
    trainable = sum(p.numel() for p in engine.model.parameters() if p.requires_grad)
    log(f"reward model {trainable / 1e6:.2f}M trainable | {g.processes} process(es), {accelerator.mixed_precision} "
        f"precision | chosen and rejected rows stacked | {engine.max_steps} steps of {g.global_batch} pairs")
    accelerator.init_trackers("dpo_accel", config=flat_config(recipe))
    engine.resume()
    kind = RewardKind(engine, train_loader, eval_loader, sampler)
    return engine, kind, tokenizer, stats


def run_reward(plan) -> dict:
    """Train the reward model of the plan (loss_type bradley_terry) and export it; returns the summary."""
    started = time.perf_counter()
    engine, kind, tokenizer, stats = reward_setup(plan)
    accelerator, t = engine.accelerator, plan.recipe.train
    summary = {"global_step": engine.step, "task": "reward_model", "data": stats}
    if kind.eval_loader is not None:  # measured at the first start, kept for a resume
        before = os.path.join(t.output_dir, "eval_before.json")
        if engine.step == 0:
            summary["eval_before"] = evaluate_reward(accelerator, engine.model, kind.eval_loader, plan.objective)
            if accelerator.is_main_process:
                write_json(before, summary["eval_before"])
        elif os.path.isfile(before):
            summary["eval_before"] = read_json(before)
    engine.train(kind)
    summary["global_step"] = engine.step
    if kind.eval_loader is not None:
        summary["eval"] = evaluate_reward(accelerator, engine.model, kind.eval_loader, plan.objective)
        engine.log(summary["eval"])
    summary["exported"] = export_reward_model(accelerator, engine.model, tokenizer, plan.recipe, t.output_dir)
    accelerator.end_training()
    if accelerator.is_main_process:
        summary["wall_seconds"] = time.perf_counter() - started
        if "eval" in summary:
            log("held-out " + ", ".join(f"{k[5:]} {summary.get('eval_before', {}).get(k, float('nan')):.3f} -> "
                                        f"{v:.3f}" for k, v in summary["eval"].items() if k != "eval/loss"))
        log(f"{engine.step} steps, {summary['wall_seconds']:.0f} s in all; reward model in {summary['exported']['model']}")
        write_json(os.path.join(t.output_dir, "summary.json"), summary)
    return summary


def export_reward_model(accelerator, model, tokenizer, recipe, output_dir: str) -> dict:
    """``<output_dir>/model``: the classifier with any LoRA merged, its tokenizer and recipe, loadable by
    AutoModelForSequenceClassification.from_pretrained (and so by eval.reward_model). A model sharded by FSDP2
    or ZeRO-3 is gathered first (every process calls this), as the policy's export does; the folder appears
    atomically."""
    from dpo_accel.model.distributed import export_from_copy, gathered_copy
    from dpo_accel.outputs.files import atomic_write

    state = accelerator.get_state_dict(model)  # a collective: the full weights on the main process
    folder = os.path.join(output_dir, "model")
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        if export_from_copy(accelerator, unwrapped):
            unwrapped = gathered_copy(unwrapped, state)
        if hasattr(unwrapped, "merge_and_unload"):
            unwrapped = unwrapped.merge_and_unload()
        unwrapped.config.use_cache = True
        with atomic_write(folder) as tmp:
            unwrapped.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            dump_recipe(recipe, os.path.join(tmp, "recipe.yaml"))
    accelerator.wait_for_everyone()
    return {"model": folder}
