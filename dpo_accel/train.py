"""Train a policy on preference pairs with a DPO-family objective, on a plain Accelerate loop.

    accelerate launch --config_file accelerate_configs/cpu_single.yaml dpo_accel/train.py \\
        --recipe recipes/smollm2_arith_lora.yaml
    # any key can be overridden:   --set train.max_steps=20 --set loss.beta=0.2
    # continue an interrupted run: --resume   (latest checkpoint in train.output_dir)

Phases: recipe -> accelerator -> data -> models and reference -> optimizer -> loop -> export.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

if __package__ in (None, ""):  # run as a file by `accelerate launch dpo_accel/train.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from dpo_accel.recipe import Recipe, RecipeError, dump_recipe, load_recipe, recipe_to_dict

LOG_PREFIX = "[dpo_accel]"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", help="YAML recipe (defaults apply to every key it leaves out)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one recipe key, value read as YAML; repeatable")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.output_dir")
    return p.parse_args(argv)


def check_output_dir(recipe: Recipe, resume: bool) -> None:
    """Refuse to mix two runs in one folder, before any compute is spent."""
    from dpo_accel.checkpoint import latest_checkpoint

    out = recipe.train.output_dir
    if resume:
        if latest_checkpoint(out) is None:
            raise RecipeError(f"--resume: no complete checkpoint in '{out}/checkpoints'; drop --resume to start fresh")
    elif os.path.isfile(os.path.join(out, "metrics.jsonl")) or os.path.isdir(os.path.join(out, "checkpoints")):
        raise RecipeError(f"train.output_dir '{out}' already holds a run; pass --resume to continue it "
                          "or set train.output_dir to a new folder")


def flat_config(recipe: Recipe) -> dict:
    """Recipe as flat scalars for trackers (TensorBoard's hparams take no lists)."""
    flat = {}
    for section, values in recipe_to_dict(recipe).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def build_accelerator(recipe: Recipe):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    t = recipe.train
    project = ProjectConfiguration(project_dir=t.output_dir, logging_dir=os.path.join(t.output_dir, "logs"))
    kwargs = dict(gradient_accumulation_steps=t.gradient_accumulation_steps, log_with=t.report_to or None,
                  project_config=project)
    if t.mixed_precision is not None:
        kwargs["mixed_precision"] = t.mixed_precision
    if not has_accelerator_device():
        # The multi-process launcher does not pass a config's `use_cpu` on; without it two CPU
        # ranks would each run alone instead of forming one gloo group.
        kwargs["cpu"] = True
    return Accelerator(**kwargs)


def has_accelerator_device() -> bool:
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return (torch.cuda.is_available() or bool(mps and mps.is_available())
            or bool(xpu and xpu.is_available()))


def build_data(accelerator, recipe: Recipe, tokenizer):
    from dpo_accel.data import format_stats, load_preference_splits, tokenize_splits

    with accelerator.main_process_first():  # the main process tokenises; the others read the cache
        raw = load_preference_splits(recipe.data, recipe.train.seed)
        tokenized, stats = tokenize_splits(raw, tokenizer, recipe.data)
    if accelerator.is_main_process:
        print(format_stats(stats))
    if len(tokenized["train"]) == 0:
        raise RecipeError("no training pair survived truncation; raise data.max_length or data.max_prompt_length")
    return raw, tokenized, stats


def build_loaders(recipe: Recipe, tokenized, tokenizer, num_processes: int, layout: str = "concat"):
    from torch.utils.data import DataLoader, RandomSampler

    from dpo_accel.data import LengthGroupedSampler, PreferenceCollator, sequence_lengths

    t, d = recipe.train, recipe.data
    collator = PreferenceCollator(tokenizer.pad_token_id)
    train = tokenized["train"]
    if d.group_by_length:
        lengths = sequence_lengths(train, layout)  # the row width the decoder will see
        # Grouped by the GLOBAL batch, so 2 processes x 2 pairs see the same pairs as 1 x 4.
        sampler = LengthGroupedSampler(lengths, t.per_device_train_batch_size * num_processes, seed=t.seed)
    else:
        sampler = RandomSampler(train, generator=torch.Generator().manual_seed(t.seed))
    train_loader = DataLoader(train, batch_size=t.per_device_train_batch_size, sampler=sampler, collate_fn=collator)
    eval_loader = None
    if "eval" in tokenized and len(tokenized["eval"]) and recipe.eval.do_eval:
        eval_loader = DataLoader(tokenized["eval"], batch_size=t.per_device_eval_batch_size, collate_fn=collator)
    return train_loader, eval_loader, sampler, collator


LAYOUT_TEXT = {"shared": "prefix sharing (one row per pair, the prompt run once)",
               "concat": "chosen and rejected rows stacked", "packed": "padding-free packing"}


def build_reference(accelerator, recipe: Recipe, mode: str, prepared_model, model_path: str, tokenized, collator):
    """The reference strategy object; a precomputed one runs its pre-pass here, before training."""
    from dpo_accel.distributed import check_backend, place_reference, reference_load_device
    from dpo_accel.logps import PreferenceLogpsModel
    from dpo_accel.modeling import load_frozen_copy, resolve_model_path
    from dpo_accel.reference import (AdapterOffReference, CopyReference, NoReference, build_precomputed)

    r, t = recipe.reference, recipe.train
    check_backend(accelerator)
    if mode == "none":
        return NoReference(), None
    if mode == "adapter_off" or (mode == "precomputed" and recipe.lora.use_peft and not r.ref_model_name_or_path):
        source = AdapterOffReference(accelerator.unwrap_model(prepared_model))
        source_model = source.module.model
    else:
        path = resolve_model_path(r.ref_model_name_or_path) if r.ref_model_name_or_path else model_path
        placed = mode == "copy"  # a precomputed pre-pass keeps a replica: its cache key hashes the full weights
        device = reference_load_device(accelerator) if placed else accelerator.device
        init = None if r.ref_model_name_or_path else recipe.lora.init_adapter  # the reference = the policy's start
        copy = load_frozen_copy(path, recipe.model, r.dtype, device, init_adapter=init)
        module = PreferenceLogpsModel(copy, chunk_size=t.logps_chunk_size, packing=t.padding_free,
                                      prefix_sharing=t.prefix_sharing)
        source = CopyReference(place_reference(accelerator, module) if placed else module, accelerator.autocast)
        source_model = copy
    if mode != "precomputed":
        return source, (source_model if mode == "copy" else None)
    splits = {name: tokenized[name] for name in ("train", "eval") if name in tokenized}
    settings = {"mixed_precision": accelerator.mixed_precision, "dtype": r.dtype or recipe.model.dtype,
                "max_length": recipe.data.max_length, "max_prompt_length": recipe.data.max_prompt_length}
    was_training = prepared_model.training
    prepared_model.eval()
    precomputed = build_precomputed(accelerator, recipe, source, source_model, splits, collator, settings)
    prepared_model.train(was_training)
    return precomputed, None  # the copy, if one was loaded, is released here


def build_optimizer(recipe: Recipe, model, num_training_steps: int):
    from transformers import get_scheduler

    t = recipe.train
    params = [p for p in model.parameters() if p.requires_grad]
    if t.optimizer == "rmsprop":
        optimizer = torch.optim.RMSprop(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    warmup = t.warmup_steps or math.ceil(t.warmup_ratio * num_training_steps)
    name = {"constant": "constant_with_warmup"}.get(t.lr_scheduler_type, t.lr_scheduler_type)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=num_training_steps)
    return optimizer, scheduler


def log_metrics(accelerator, output_dir: str, metrics: dict, step: int) -> None:
    accelerator.log(metrics, step=step)
    if accelerator.is_main_process:
        with open(os.path.join(output_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")


def truncate_metrics(output_dir: str, step: int) -> None:
    """On resume, drop log lines of steps after the checkpoint: they are about to be redone."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if os.path.isfile(path):
        with open(path) as f:
            kept = [line for line in f if json.loads(line)["step"] <= step]
        with open(path, "w") as f:
            f.writelines(kept)


def generation_report(accelerator, recipe: Recipe, model, tokenizer, prompts) -> dict:
    """Greedy answers to held-out prompts and their behaviour scores (main process only)."""
    from dpo_accel.evaluate import behaviour_scores, generate_answers

    if not prompts or not accelerator.is_main_process:
        return {}
    start = time.perf_counter()
    answers = generate_answers(accelerator.unwrap_model(model).model, tokenizer, prompts,
                               recipe.eval.max_new_tokens, autocast=accelerator.autocast)
    seconds = time.perf_counter() - start
    print(f"{LOG_PREFIX} generated {len(prompts)} held-out answers in {seconds:.1f} s")
    return {"scores": behaviour_scores(recipe.eval.behaviour, prompts, answers), "seconds": seconds,
            "samples": [{"prompt": p, "answer": a} for p, a in zip(prompts, answers)]}


def run(recipe: Recipe, resume: bool = False) -> dict:
    """Train per `recipe`; returns the final summary (also written to <output_dir>/summary.json)."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from dpo_accel.checkpoint import export_model, latest_checkpoint, load_checkpoint, save_checkpoint
    from dpo_accel.evaluate import evaluate_preferences
    from dpo_accel.logps import PreferenceLogpsModel
    from dpo_accel.losses import compute_objective, needs_reference, needs_rejected, uses_wpo
    from dpo_accel.metrics import MetricAccumulator, example_metrics
    from dpo_accel.modeling import count_parameters, load_policy, load_tokenizer, resolve_model_path
    from dpo_accel.reference import reference_summary, resolve_mode
    from dpo_accel.speed import apply_speed_options, check_speed_options

    t = recipe.train
    run_start = time.perf_counter()
    check_speed_options(recipe)
    accelerator = build_accelerator(recipe)
    main = accelerator.is_main_process
    set_seed(t.seed)
    mode = resolve_mode(recipe, needs_reference(recipe.loss))
    with accelerator.main_process_first():  # one GGUF conversion, then every process reads the cache
        model_path = resolve_model_path(recipe.model.model_name_or_path, recipe.model.gguf_file)
    tokenizer = load_tokenizer(recipe.model, model_path)
    raw, tokenized, stats = build_data(accelerator, recipe, tokenizer)
    if main:
        os.makedirs(t.output_dir, exist_ok=True)
        dump_recipe(recipe, os.path.join(t.output_dir, "recipe.yaml"))

    policy = load_policy(recipe.model, recipe.lora, model_path)
    model = PreferenceLogpsModel(policy, chunk_size=t.logps_chunk_size, wpo=uses_wpo(recipe.loss),
                                 packing=t.padding_free, prefix_sharing=t.prefix_sharing)
    # torch.compile of the decoder; auto_find_batch_size rewrites the micro-batch and accumulation here
    apply_speed_options(accelerator, recipe, model, tokenized["train"], tokenizer.pad_token_id,
                        with_reference=mode in ("adapter_off", "copy"))
    train_loader, eval_loader, sampler, collator = build_loaders(recipe, tokenized, tokenizer, accelerator.num_processes,
                                                                   model.layout)
    steps_per_epoch = math.ceil(math.ceil(len(train_loader) / accelerator.num_processes) / t.gradient_accumulation_steps)
    max_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * steps_per_epoch)
    optimizer, scheduler = build_optimizer(recipe, model, max_steps)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare_data_loader(eval_loader)
    accelerator.register_for_checkpointing(scheduler)  # stepped by hand: once per optimizer step
    reference, ref_model = build_reference(accelerator, recipe, mode, model, model_path, tokenized, collator)
    trainable, total = count_parameters(model)
    if main:
        pairs = needs_rejected(recipe.loss)  # sft trains on the chosen rows alone
        layout = LAYOUT_TEXT[accelerator.unwrap_model(model).layout] if pairs else "chosen rows only"
        global_batch = t.per_device_train_batch_size * t.gradient_accumulation_steps * accelerator.num_processes
        print(f"{LOG_PREFIX} policy {trainable / 1e6:.2f}M trainable of {total / 1e6:.1f}M | reference: "
              f"{reference_summary(mode, ref_model)} | {accelerator.num_processes} process(es), "
              f"{accelerator.mixed_precision} precision | {layout} | {max_steps} steps of {global_batch} "
              f"{'pairs' if pairs else 'examples'}")
    accelerator.init_trackers("dpo_accel", config=flat_config(recipe))

    global_step = 0
    if resume:
        state = load_checkpoint(accelerator, latest_checkpoint(t.output_dir))
        global_step = int(state["global_step"])
        if main:
            truncate_metrics(t.output_dir, global_step)
            print(f"{LOG_PREFIX} resumed at step {global_step}")
    prompts = list(raw["eval"]["prompt"][:recipe.eval.generation_prompts]) if "eval" in raw else []
    before_path = os.path.join(t.output_dir, "generations_before.json")
    if main and prompts and not os.path.isfile(before_path):
        with open(before_path, "w") as f:
            json.dump(generation_report(accelerator, recipe, model, tokenizer, prompts), f, indent=1)

    eval_before_path = os.path.join(t.output_dir, "eval_before.json")
    if eval_loader is not None and mode == "none" and global_step == 0 and not os.path.isfile(eval_before_path):
        # Without a reference the rewards are not 0 at the start: measure the starting point (all processes).
        eval_before = evaluate_preferences(accelerator, model, reference, eval_loader, recipe.loss)
        log_metrics(accelerator, t.output_dir, eval_before, global_step)
        if main:
            with open(eval_before_path, "w") as f:
                json.dump(eval_before, f, indent=1)
    rejected_needed = needs_rejected(recipe.loss)
    acc = MetricAccumulator(accelerator, accelerator.unwrap_model(model).layout)
    bar = tqdm(total=max_steps, initial=global_step, disable=not main, desc="train")
    last_log, grad_norm = time.perf_counter(), torch.tensor(0.0)
    model.train()
    while global_step < max_steps:
        epoch = global_step // steps_per_epoch
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        skip = (global_step % steps_per_epoch) * t.gradient_accumulation_steps
        loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        for batch in loader:
            with accelerator.accumulate(model):
                if not rejected_needed:  # e.g. sft on preference data: train on prompt -> chosen, no rejected forward
                    batch = {k: v for k, v in batch.items() if not k.startswith("rejected_")}
                policy_logps = model(**batch)
                out = compute_objective(recipe.loss, policy_logps, reference.logps(batch, "train"))
                accelerator.backward(out.loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm or float("inf"))
                optimizer.step()
                optimizer.zero_grad()
            acc.add(example_metrics(out, policy_logps), batch)
            if not accelerator.sync_gradients:
                continue
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            global_step += 1
            bar.update(1)
            if global_step % t.logging_steps == 0 or global_step == max_steps:
                elapsed = time.perf_counter() - last_log
                tokens, processed, pairs = acc.reset_counts()
                metrics = {**acc.means(), "grad_norm": float(grad_norm), "learning_rate": lr, "epoch": epoch,
                           "tokens_per_second": tokens / elapsed, "processed_tokens_per_second": processed / elapsed,
                           "pairs_per_second": pairs / elapsed}
                log_metrics(accelerator, t.output_dir, metrics, global_step)
                bar.set_postfix(progress_postfix(metrics))
                last_log = time.perf_counter()
            if eval_loader is not None and t.eval_steps and global_step % t.eval_steps == 0 and global_step < max_steps:
                log_metrics(accelerator, t.output_dir,
                            evaluate_preferences(accelerator, model, reference, eval_loader, recipe.loss), global_step)
                last_log = time.perf_counter()
            if t.save_steps and global_step % t.save_steps == 0:
                state = {"global_step": global_step, "epoch": epoch, "steps_per_epoch": steps_per_epoch}
                save_checkpoint(accelerator, t.output_dir, state, recipe, t.save_total_limit)
                last_log = time.perf_counter()
            if global_step >= max_steps:
                break
    bar.close()

    summary = {"global_step": global_step, "data": stats}
    if main and os.path.isfile(eval_before_path):
        with open(eval_before_path) as f:
            summary["eval_before"] = json.load(f)
    if eval_loader is not None:
        summary["eval"] = evaluate_preferences(accelerator, model, reference, eval_loader, recipe.loss)
        log_metrics(accelerator, t.output_dir, summary["eval"], global_step)
    if main and prompts:
        with open(before_path) as f:
            before = json.load(f)
        after = generation_report(accelerator, recipe, model, tokenizer, prompts)
        with open(os.path.join(t.output_dir, "generations_after.json"), "w") as f:
            json.dump(after, f, indent=1)
        summary["behaviour"] = {"before": before["scores"], "after": after["scores"]}
    summary["exported"] = export_model(accelerator, model, tokenizer, recipe, t.output_dir, t.export_merged)
    accelerator.end_training()
    if main:
        summary["table"] = final_table(summary)
        summary["wall_seconds"] = time.perf_counter() - run_start
        print(summary["table"])
        print(f"{LOG_PREFIX} {global_step} steps, {summary['wall_seconds']:.0f} s in all (loading, data, "
              f"training, evaluation, generation, export)")
        with open(os.path.join(t.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    return summary


def final_table(summary: dict) -> str:
    """Held-out before/after table. With a reference the policy equals it before training, so every
    implicit reward is 0: accuracy and margin are 0 by construction, not measured. Without one (simpo,
    orpo, sft, reference_free) the loop measured the start (``eval_before``), NLL included."""
    from dpo_accel.evaluate import before_after_table

    before, after = {}, {}
    measured = summary.get("eval_before", {})
    for key in ("eval/rewards/accuracies", "eval/rewards/margins", "eval/nll"):
        if key in summary.get("eval", {}) and (key in measured or key != "eval/nll"):
            before[key], after[key] = measured.get(key, 0.0), summary["eval"][key]
    if "behaviour" in summary:
        before.update(summary["behaviour"]["before"])
        after.update(summary["behaviour"]["after"])
    return before_after_table(before, after)


def progress_postfix(metrics: dict) -> dict:
    """What the progress bar shows: the loss, and the reward accuracy where there is a rejected side
    (the NLL where there is not, e.g. sft on single-answer data)."""
    postfix = {"loss": f"{metrics['loss']:.4f}"}
    if "rewards/accuracies" in metrics:
        postfix["acc"] = f"{metrics['rewards/accuracies']:.2f}"
    elif "nll" in metrics:
        postfix["nll"] = f"{metrics['nll']:.3f}"
    return postfix


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        from dpo_accel.losses import validate_loss_config

        recipe = load_recipe(args.recipe, args.set)
        from dpo_accel.speed import check_speed_options

        validate_loss_config(recipe.loss)
        check_speed_options(recipe)
        check_output_dir(recipe, args.resume)
    except (RecipeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run(recipe, resume=args.resume)
    return 0


if __name__ == "__main__":
    sys.exit(main())
