"""Train a policy on preference pairs with a DPO-family objective, on a plain Accelerate loop.

    accelerate launch --config_file accelerate_configs/cpu_single.yaml dpo_accel/train.py \\
        --recipe recipes/smollm2_arith_lora.yaml
    # any key can be overridden:   --set train.max_steps=20 --set loss.beta=0.2
    # continue an interrupted run: --resume   (latest checkpoint in train.output_dir)

The run reads top-down: `preflight` (plan.py: every check, the resolved plan) -> `setup` (accelerator, data,
policy, loaders, optimizer, reference, resume) -> `train_loop` (each `micro_step`: forward, objective,
backward, clip, step) -> `finish` (held-out eval, generations, export, summary).
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a file by `accelerate launch dpo_accel/train.py`
    # Python put this folder first on sys.path, where a module named like a standard one (dpo_accel/inspect.py)
    # would shadow it: import the package from the repository root instead.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.abspath(p or ".") != _here]

import argparse
import json
import math
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from dpo_accel.checkpoint import (NonFiniteError, RunStopped, base_fingerprint, export_model, load_checkpoint,
                                  save_checkpoint, save_trainable_only)
from dpo_accel.console import log
from dpo_accel.evaluate import evaluate_preferences, generation_report
from dpo_accel.kto import kto_inputs
from dpo_accel.losses import compute_objective
from dpo_accel.metrics import MetricAccumulator, example_metrics
from dpo_accel.plan import Plan, check_output_dir, preflight
from dpo_accel.recipe import Recipe, RecipeError, dump_recipe, load_recipe, recipe_to_dict

__all__ = ["check_output_dir", "execute", "main", "preflight", "run"]  # check_output_dir: the plan's, kept here


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", help="YAML recipe (defaults apply to every key it leaves out)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one recipe key, value read as YAML; repeatable")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.output_dir")
    return p.parse_args(argv)


def flat_config(recipe: Recipe) -> dict:
    """Recipe as flat scalars for trackers (TensorBoard's hparams take no lists)."""
    flat = {}
    for section, values in recipe_to_dict(recipe).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def build_accelerator(plan: Plan):
    """The Accelerator for the plan's accumulation and precision, after the launch checks it allows."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from dpo_accel.distributed import check_launch

    t = plan.recipe.train
    project = ProjectConfiguration(project_dir=t.output_dir, logging_dir=os.path.join(t.output_dir, "logs"))
    kwargs = dict(gradient_accumulation_steps=plan.geometry.accumulation, log_with=t.report_to or None,
                  project_config=project)
    if t.mixed_precision is not None:
        kwargs["mixed_precision"] = t.mixed_precision
    if not has_accelerator_device():
        # The multi-process launcher does not pass a config's `use_cpu` on; without it two CPU
        # ranks would each run alone instead of forming one gloo group.
        kwargs["cpu"] = True
    accelerator = Accelerator(**kwargs)
    check_launch(accelerator, plan.geometry.processes)
    return accelerator


def has_accelerator_device() -> bool:
    mps = getattr(torch.backends, "mps", None)
    xpu = getattr(torch, "xpu", None)
    return (torch.cuda.is_available() or bool(mps and mps.is_available())
            or bool(xpu and xpu.is_available()))


def build_data(accelerator, recipe: Recipe, tokenizer):
    from dpo_accel.data import format_stats, load_preference_splits, tokenize_splits
    from dpo_accel.kto import is_unpaired, unpaired_splits

    with accelerator.main_process_first():  # the main process tokenises; the others read the cache
        raw = load_preference_splits(recipe.data, recipe.train.seed)
        if is_unpaired(recipe.loss):  # KTO: labelled rows, each with its mismatched KL completion
            raw = unpaired_splits(raw, recipe.loss, recipe.train.seed)
        tokenized, stats = tokenize_splits(raw, tokenizer, recipe.data)
    log(format_stats(stats), prefix=False)
    if len(tokenized["train"]) == 0:
        raise RecipeError("no training pair survived truncation; raise data.max_length or data.max_prompt_length")
    check_truncation(stats.get("train", {}), recipe.data)
    return raw, tokenized, stats


# More than this share of the training pairs dropped by truncation stops the run, as does every kept pair cut;
# a smaller share, or more than TRUNCATED_WARN of the pairs cut, is said in one line.
DROPPED_ERROR, DROPPED_WARN, TRUNCATED_WARN = 0.5, 0.05, 0.25


def check_truncation(train_stats: dict, d) -> None:
    """data.max_length so small that most pairs are dropped is an error; many dropped or cut, a warning."""
    pairs = train_stats.get("pairs") or 0
    if not pairs:
        return
    dropped, cut = train_stats.get("dropped", 0) / pairs, train_stats.get("truncated", 0) / pairs
    longest = train_stats.get("raw_max", 0)
    advice = (f"raise data.max_length (now {d.max_length}, the longest pair needs {longest}) or "
              f"data.max_prompt_length (now {d.max_prompt_length})")
    if dropped > DROPPED_ERROR:
        raise RecipeError(f"truncation drops {train_stats['dropped']} of {pairs} training pairs ({dropped:.0%}); {advice}")
    kept = train_stats.get("kept", 0)
    if kept and train_stats.get("truncated", 0) >= kept:
        raise RecipeError(f"truncation cuts every one of the {kept} training pairs it keeps ({train_stats['dropped']} "
                          f"dropped); {advice}")
    if dropped > DROPPED_WARN or cut > TRUNCATED_WARN:
        log(f"warning: truncation drops {dropped:.0%} of the training pairs and cuts {cut:.0%}; {advice}")


def settle(plan: Plan, accelerator, model, tokenized, tokenizer) -> Plan:
    """The facts that need the built policy: its log-prob path and layout (a self-check on 2 training pairs),
    torch.compile and the auto micro-batch; then the resolved recipe is saved, so recipe.yaml and every
    checkpoint's recipe say what ran."""
    from dpo_accel.data import PreferenceCollator
    from dpo_accel.distributed import whole_weights
    from dpo_accel.logps import settle_logps_path
    from dpo_accel.speed import apply_speed_options

    train = tokenized["train"]
    probe = PreferenceCollator(tokenizer.pad_token_id)([train[i] for i in range(min(2, len(train)))])
    with whole_weights(model):  # ZeRO-3 partitioned the policy as it loaded
        log(settle_logps_path(model, probe, plan.recipe.train.logps_path))
    micro = apply_speed_options(accelerator, plan.recipe, model, tokenized["train"], tokenizer.pad_token_id,
                                with_reference=plan.reference_mode in ("adapter_off", "copy"),
                                search=plan.search_micro_batch)
    plan = plan.settled(model.layout, micro)
    accelerator.gradient_accumulation_steps = plan.geometry.accumulation
    if accelerator.is_main_process:
        os.makedirs(plan.recipe.train.output_dir, exist_ok=True)
        dump_recipe(plan.recipe, os.path.join(plan.recipe.train.output_dir, "recipe.yaml"))
    return plan


class EpochRandomSampler(torch.utils.data.Sampler):
    """A shuffle that is a pure function of (seed, epoch), like data.LengthGroupedSampler.

    torch's RandomSampler draws each epoch from a generator that advanced with every earlier epoch, and
    Accelerate's prepared loader calls ``set_epoch`` with its own iteration counter (0 in a fresh
    process): a run resumed in epoch 2 would replay epoch 0's order. Here the epoch alone decides.
    """

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        return iter(torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist())


def build_loaders(plan: Plan, tokenized, tokenizer):
    from torch.utils.data import DataLoader

    from dpo_accel.data import LengthGroupedSampler, PreferenceCollator, sequence_lengths

    t, d, g = plan.recipe.train, plan.recipe.data, plan.geometry
    collator = PreferenceCollator(tokenizer.pad_token_id)
    train = tokenized["train"]
    if d.group_by_length:
        lengths = sequence_lengths(train, plan.layout)  # the row width the decoder will see
        # Grouped by the GLOBAL batch, so 2 processes x 2 pairs see the same pairs as 1 x 4.
        sampler = LengthGroupedSampler(lengths, g.per_device * g.processes, seed=t.seed)
    else:
        sampler = EpochRandomSampler(len(train), t.seed)
    train_loader = DataLoader(train, batch_size=g.per_device, sampler=sampler, collate_fn=collator)
    eval_loader = None
    if "eval" in tokenized and len(tokenized["eval"]) and plan.recipe.eval.do_eval:
        eval_loader = DataLoader(tokenized["eval"], batch_size=t.per_device_eval_batch_size, collate_fn=collator)
    return train_loader, eval_loader, sampler, collator


LAYOUT_TEXT = {"shared": "prefix sharing (one row per pair, the prompt run once)",
               "packed_shared": "prefix sharing, pairs packed into one row (each prompt run once, no padding)",
               "concat": "chosen and rejected rows stacked", "packed": "padding-free packing"}


def startup_line(plan: Plan, accelerator, model, ref_model, max_steps: int) -> str:
    from dpo_accel.modeling import count_parameters
    from dpo_accel.reference import reference_summary

    trainable, total = count_parameters(model)
    layout = LAYOUT_TEXT[plan.layout] if plan.pairs else "chosen rows only"  # sft trains on the chosen rows alone
    return (f"policy {trainable / 1e6:.2f}M trainable of {total / 1e6:.1f}M | reference: "
            f"{reference_summary(plan.reference_mode, ref_model)} | {plan.geometry.processes} process(es), "
            f"{accelerator.mixed_precision} precision | {layout} | {max_steps} steps of {plan.geometry.global_batch} "
            f"{'pairs' if plan.pairs else 'examples'}")

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
            f.write(strict_json({"step": step, **metrics}) + "\n")


def strict_json(value, indent=None) -> str:
    """JSON any parser reads: a non-finite number becomes null and its key is listed under "nonfinite"
    (json.dumps would write the bare NaN / Infinity tokens that strict JSON has no room for)."""
    def clean(v):
        if isinstance(v, dict):
            bad = [k for k, x in v.items() if isinstance(x, float) and not math.isfinite(x)]
            out = {k: clean(x) for k, x in v.items()}
            if bad:
                out["nonfinite"] = sorted(set(out.get("nonfinite", [])) | set(bad))
            return out
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return None if isinstance(v, float) and not math.isfinite(v) else v

    return json.dumps(clean(value), indent=indent, allow_nan=False)


def truncate_metrics(output_dir: str, step: int) -> None:
    """On resume, drop log lines of steps after the checkpoint (they are about to be redone) and a line torn
    by a kill; the kept lines are written to a new file renamed over the old, so a kill here loses nothing."""
    from dpo_accel.files import atomic_write

    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                continue  # the half-written last line of a killed run
    with atomic_write(path) as tmp:
        with open(tmp, "w") as f:
            f.writelines(kept)


def write_json(path: str, value) -> None:
    with open(path, "w") as f:
        f.write(strict_json(value, indent=1))


@dataclass
class Session:
    """What setup built, read by the loop and the finish; ``step`` is the optimizer step reached."""

    plan: Plan
    accelerator: Any
    model: Any  # the prepared PreferenceLogpsModel
    optimizer: Any
    scheduler: Any
    train_loader: Any
    eval_loader: Any
    sampler: Any
    reference: Any  # a reference.py strategy: .logps(batch, split)
    tokenizer: Any
    prompts: list  # held-out prompts for generations
    data_stats: dict
    train_fingerprint: str
    steps_per_epoch: int
    max_steps: int
    step: int
    started: float
    eval_rows: Any = None  # the held-out rows of `prompts` (their chosen answers, for scorers and the judge)
    skipped: bool = False  # the last optimizer step was skipped: its loss or gradient norm was not finite
    nonfinite_in_a_row: int = 0
    nonfinite_steps: int = 0
    window_bad: Any = None  # this accumulation window's count of non-finite losses (a tensor: no sync per micro-step)
    base: Optional[str] = None  # fingerprint of the frozen base when checkpoints hold the trainable weights only



def run(recipe: Recipe, resume: bool = False) -> dict:
    """Train per `recipe` with the checks of `main`; returns the summary (also <output_dir>/summary.json)."""
    return execute(preflight(recipe, resume))


def execute(plan: Plan) -> dict:
    """Run a preflighted plan: setup, the train loop, the finish."""
    from dpo_accel.modeling import check_model_source

    check_model_source(plan.recipe.model)  # here, not in preflight: inspect plans recipes of models not downloaded
    if plan.objective.reward_model:  # loss_type bradley_terry trains a sequence classifier instead
        from dpo_accel.reward import run_reward

        return run_reward(plan)
    if plan.recipe.train.iterative_rounds:  # iterative DPO: rounds of generate, score, train (one offline run each)
        from dpo_accel.iterative import run_rounds

        return run_rounds(plan)
    session = setup(plan)
    if plan.recipe.train.online_generations:  # online DPO: the policy's own answers, scored, make the pairs
        from dpo_accel.online import online_loop

        online_loop(session)
    else:
        train_loop(session)
    return finish(session)


def setup(plan: Plan) -> Session:
    """Everything before the first step: accelerator, data, policy, loaders, optimizer, reference, resume."""
    from accelerate.utils import set_seed

    from dpo_accel.logps import PreferenceLogpsModel
    from dpo_accel.modeling import load_policy, load_tokenizer, resolve_model_path
    from dpo_accel.plan import check_resume_data
    from dpo_accel.reference import build_reference

    started = time.perf_counter()
    recipe, t = plan.recipe, plan.recipe.train
    accelerator = build_accelerator(plan)
    set_seed(t.seed)
    with accelerator.main_process_first():  # one GGUF conversion, then every process reads the cache
        model_path = resolve_model_path(recipe.model.model_name_or_path, recipe.model.gguf_file)
    tokenizer = load_tokenizer(recipe.model, model_path)
    raw, tokenized, stats = build_data(accelerator, recipe, tokenizer)
    model = PreferenceLogpsModel(load_policy(recipe.model, recipe.lora, model_path), chunk_size=t.logps_chunk_size,
                                 chunk_mb=t.logps_chunk_mb,
                                 wpo=plan.objective.wpo, packing=t.padding_free, prefix_sharing=t.prefix_sharing,
                                 pack_pairs=t.pack_pairs)
    plan = settle(plan, accelerator, model, tokenized, tokenizer)
    frozen = any(not p.requires_grad for p in model.parameters())
    base = base_fingerprint(model) if frozen and save_trainable_only(accelerator) else None
    train_loader, eval_loader, sampler, collator = build_loaders(plan, tokenized, tokenizer)
    g = plan.geometry
    steps_per_epoch = math.ceil(math.ceil(len(train_loader) / g.processes) / g.accumulation)
    check_resume_data(plan, tokenized["train"]._fingerprint, steps_per_epoch)
    max_steps = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * steps_per_epoch)
    optimizer, scheduler = build_optimizer(plan.recipe, model, max_steps)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare_data_loader(eval_loader)
    accelerator.register_for_checkpointing(scheduler)  # stepped by hand: once per optimizer step
    reference, ref_model = build_reference(accelerator, plan.recipe, plan.reference_mode, model, model_path,
                                           tokenized, collator)
    log(startup_line(plan, accelerator, model, ref_model, max_steps))
    accelerator.init_trackers("dpo_accel", config=flat_config(plan.recipe))
    step = resume_step(plan, accelerator, base)
    prompts = list(raw["eval"]["prompt"][:recipe.eval.generation_prompts]) if "eval" in raw else []
    rows = raw["eval"].select(range(len(prompts))).to_list() if prompts else []
    session = Session(plan, accelerator, model, optimizer, scheduler, train_loader, eval_loader, sampler, reference,
                      tokenizer, prompts, stats, tokenized["train"]._fingerprint, steps_per_epoch, max_steps, step,
                      started, rows)
    session.base = base
    measure_before(session)
    return session


def resume_step(plan: Plan, accelerator, base: Optional[str]) -> int:
    """The step a run starts from: the --resume checkpoint's (its state loaded into the prepared objects), else
    0; the metrics log is cut back to it (a run killed before its first checkpoint restarts at 0)."""
    step = 0
    if plan.resume_from is not None:
        step = int(load_checkpoint(accelerator, plan.resume_from, base)["global_step"])
        log(f"resumed at step {step}")
    if accelerator.is_main_process:
        truncate_metrics(plan.recipe.train.output_dir, step)
    return step


def measure_before(s: Session) -> None:
    """The policy before training, which finish() compares with: its generations and, where no reference
    makes the held-out rewards 0 by construction, its held-out metrics. Kept from the first start on resume."""
    out = s.plan.recipe.train.output_dir
    before = os.path.join(out, "generations_before.json")
    if s.prompts and not os.path.isfile(before):  # every process: a sharded policy is gathered to generate
        report = held_out_answers(s)
        if s.accelerator.is_main_process:
            write_json(before, report)
    eval_before = os.path.join(out, "eval_before.json")
    if s.eval_loader is not None and s.plan.reference_mode == "none" and s.step == 0 and not os.path.isfile(eval_before):
        metrics = evaluate_preferences(s.accelerator, s.model, s.reference, s.eval_loader, s.plan.objective)
        log_metrics(s.accelerator, out, metrics, s.step)
        if s.accelerator.is_main_process:
            write_json(eval_before, metrics)


def held_out_answers(s: Session) -> dict:
    """The policy's answers to the held-out prompts (greedy, or sampled per eval.*, the same seed before
    and after) with their behaviour scores; every process calls it."""
    e, seed = s.plan.recipe.eval, s.plan.recipe.train.seed
    sampling = {"temperature": e.temperature, "top_p": e.top_p, "num_return_sequences": e.num_return_sequences,
                "seed": seed if e.generation_seed is None else e.generation_seed}
    return generation_report(s.accelerator, s.model, s.tokenizer, s.prompts, e.max_new_tokens, e.behaviour,
                             sampling, s.eval_rows, e.behaviour_regex)


def train_loop(s: Session) -> None:
    """Optimizer steps from s.step to s.max_steps; logs, evaluates and checkpoints on their intervals."""
    t, accelerator = s.plan.recipe.train, s.accelerator
    acc = MetricAccumulator(accelerator, s.plan.layout)
    bar = tqdm(total=s.max_steps, initial=s.step, disable=not accelerator.is_main_process, desc="train")
    last_log, grad_norm = time.perf_counter(), torch.tensor(0.0)
    s.model.train()
    while s.step < s.max_steps:
        epoch = s.step // s.steps_per_epoch
        for batch in epoch_batches(s, epoch):
            if not s.plan.pairs:  # e.g. sft on preference data: train on prompt -> chosen, no rejected forward
                batch = {k: v for k, v in batch.items() if not k.startswith("rejected_")}
            out, policy_logps, grad_norm = micro_step(s, batch, grad_norm)
            acc.add(example_metrics(out, policy_logps), batch)
            if not accelerator.sync_gradients:
                continue
            lr = s.scheduler.get_last_lr()[0]
            s.step += 1
            bar.update(1)
            if s.skipped:
                skip_step(s, acc, grad_norm, lr, epoch, bar)
                last_log = time.perf_counter()
            else:
                s.scheduler.step()
                s.nonfinite_in_a_row = 0
            if not s.skipped and (s.step % t.logging_steps == 0 or s.step == s.max_steps):
                elapsed = time.perf_counter() - last_log
                report = acc.collect()
                metrics = {**report.means, "grad_norm": float(grad_norm), "learning_rate": lr, "epoch": epoch,
                           "tokens_per_second": report.tokens / elapsed,
                           "processed_tokens_per_second": report.processed_tokens / elapsed,
                           "pairs_per_second": report.pairs / elapsed,
                           "num_tokens": report.tokens, "num_pairs": report.pairs}  # since the last line
                log_metrics(accelerator, t.output_dir, metrics, s.step)
                bar.set_postfix(progress_postfix(metrics))
                last_log = time.perf_counter()
            if s.eval_loader is not None and t.eval_steps and s.step % t.eval_steps == 0 and s.step < s.max_steps:
                log_metrics(accelerator, t.output_dir, evaluate_preferences(
                    accelerator, s.model, s.reference, s.eval_loader, s.plan.objective), s.step)
                last_log = time.perf_counter()
            if t.save_steps and s.step % t.save_steps == 0:
                checkpoint_step(s, epoch)
                last_log = time.perf_counter()
            if s.step >= s.max_steps:
                break
    bar.close()


def checkpoint_step(s: Session, epoch: int) -> None:
    """Checkpoint after optimizer step s.step (every process calls it: saving is collective)."""
    t = s.plan.recipe.train
    state = {"global_step": s.step, "epoch": epoch, "steps_per_epoch": s.steps_per_epoch,
             "num_processes": s.plan.geometry.processes, "train_fingerprint": s.train_fingerprint,
             "weights": "full" if s.base is None else "trainable", "base_fingerprint": s.base}
    save_checkpoint(s.accelerator, t.output_dir, state, s.plan.recipe, t.save_total_limit, s.model)


def skip_step(s: Session, acc, grad_norm, lr: float, epoch: int, bar) -> None:
    """A step whose loss or gradient norm was not finite: nothing changed (weights, optimizer, scheduler),
    the data position moved on. Logged on its own line; too many in a row stop the run."""
    s.nonfinite_steps += 1
    s.nonfinite_in_a_row += 1
    report = acc.collect()  # every process skipped (the flag was reduced): a collective is safe here
    log_metrics(s.accelerator, s.plan.recipe.train.output_dir,
                {**report.means, "grad_norm": float(grad_norm), "learning_rate": lr, "epoch": epoch,
                 "skipped": True, "nonfinite_steps": s.nonfinite_steps}, s.step)
    limit = s.plan.recipe.train.max_nonfinite_steps
    log(f"step {s.step}: loss or gradient norm not finite (grad norm {float(grad_norm)}); step skipped, weights, "
        f"optimizer and scheduler unchanged ({s.nonfinite_in_a_row} in a row, train.max_nonfinite_steps {limit})")
    if s.nonfinite_in_a_row >= limit:
        bar.close()  # the error line below it, not inside it
        raise NonFiniteError(
            f"{limit} optimizer steps in a row (to step {s.step}) had a non-finite loss or gradient norm; the run "
            f"stopped with its weights from before them (last checkpoint in {s.plan.recipe.train.output_dir}/checkpoints)"
            "; lower train.learning_rate or loss.beta, or raise train.max_nonfinite_steps")


def epoch_batches(s: Session, epoch: int):
    """This epoch's micro-batches, from the data position of s.step (mid-epoch on resume).

    The prepared loader sets its sampler's epoch from its own iteration counter when it starts (a fresh
    process counts from 0, a skip_first_batches copy keeps the count it was made with): set both to `epoch`.
    """
    s.sampler.set_epoch(epoch)
    skip = (s.step % s.steps_per_epoch) * s.plan.geometry.accumulation
    loader = s.accelerator.skip_first_batches(s.train_loader, skip) if skip else s.train_loader
    loader.set_epoch(epoch)
    return loader


def micro_step(s: Session, batch: dict, grad_norm):
    """Forward, objective, backward; at the end of an accumulation window also clip and step (Accelerate
    skips the step and the gradient sync inside the window). Returns the loss output, the policy's
    log-probs and the latest gradient norm."""
    if s.window_bad is None or s.accelerator.sync_gradients:  # the previous micro-step closed a window
        s.window_bad = torch.zeros((), device=s.accelerator.device)
    with s.accelerator.accumulate(s.model):
        policy_logps, reference = s.model(**batch), s.reference.logps(batch, "train")
        if s.plan.objective.unpaired:  # KTO: labels and the reference point over all processes
            policy_logps = kto_inputs(s.accelerator, batch, policy_logps, reference)
        out = compute_objective(s.plan.objective, policy_logps, reference)
        s.window_bad = s.window_bad + (~torch.isfinite(out.loss.detach())).float()
        s.accelerator.backward(out.loss)
        grad_norm, s.skipped = step_if_finite(s, s.window_bad, grad_norm)
    return out, policy_logps, grad_norm


def step_if_finite(s: Session, window_bad, grad_norm) -> tuple:
    """Inside `accelerator.accumulate`, after the backward: at the end of an accumulation window clip and take
    the optimizer step unless a loss of the window (`window_bad` counts them) or the gradient norm was not
    finite (then only the gradients are dropped). Inside the window Accelerate's step is a no-op. Returns
    (the latest gradient norm, whether the step was skipped)."""
    skipped = False
    if s.accelerator.sync_gradients:
        max_norm = s.plan.recipe.train.max_grad_norm or float("inf")
        grad_norm = s.accelerator.clip_grad_norm_(s.model.parameters(), max_norm)
        skipped = not all_finite(s.accelerator, window_bad, grad_norm)
    if not skipped:
        s.optimizer.step()
    s.optimizer.zero_grad()
    return grad_norm, skipped


def all_finite(accelerator, window_bad, grad_norm) -> bool:
    """Whether every process's losses in this accumulation window and the gradient norm are finite: one
    all-reduce, so every process skips the same steps. (Under DeepSpeed the engine steps inside backward:
    a non-finite step is counted and stops the run after train.max_nonfinite_steps, but is not undone.)"""
    # DeepSpeed may not report a norm (None): then the losses decide. FSDP2 returns a DTensor, which a plain
    # all-reduce refuses: take its full (replicated) value first.
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    norm = torch.tensor(0.0 if grad_norm is None else float(grad_norm), device=window_bad.device)
    bad = window_bad + (~torch.isfinite(norm)).float()
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    return float(bad) == 0


def finish(s: Session) -> dict:
    """After the last step: held-out metrics, generations against the 'before' ones, export, summary.
    Every process calls it (each part may be collective); the main process writes the files."""
    accelerator, t, e = s.accelerator, s.plan.recipe.train, s.plan.recipe.eval
    main = accelerator.is_main_process
    summary = {"global_step": s.step, "data": s.data_stats}
    eval_before = os.path.join(t.output_dir, "eval_before.json")
    if main and os.path.isfile(eval_before):
        with open(eval_before) as f:
            summary["eval_before"] = json.load(f)
    if s.eval_loader is not None:
        summary["eval"] = evaluate_preferences(accelerator, s.model, s.reference, s.eval_loader, s.plan.objective)
        log_metrics(accelerator, t.output_dir, summary["eval"], s.step)
    if s.prompts:
        after = held_out_answers(s)
        if main:
            with open(os.path.join(t.output_dir, "generations_before.json")) as f:
                before = json.load(f)
            write_json(os.path.join(t.output_dir, "generations_after.json"), after)
            summary["behaviour"] = {"before": before["scores"], "after": after["scores"]}
            if e.reward_model:
                summary["judge"] = judge_generations(s, before, after)
    card = None
    if main:
        from dpo_accel.plots import read_metrics  # here: the package imports train, and `-m dpo_accel.plots` the package

        summary["table"] = final_table(summary)
        rows = read_metrics(t.output_dir)
        summary["tokens_seen"] = sum(r.get("num_tokens", 0) for r in rows)
        summary["pairs_seen"] = sum(r.get("num_pairs", 0) for r in rows)
        card = {**summary, "reference_mode": s.plan.reference_mode}
        if "judge" in summary:
            from dpo_accel.judge import judge_table

            card["judge_table"] = judge_table(summary["judge"])
    summary["exported"] = export_model(accelerator, s.model, s.tokenizer, s.plan.recipe, t.output_dir, t.export_merged,
                                       card=card)
    accelerator.end_training()
    if main:
        if t.push_to_hub:
            push_export(summary, t.hub_model_id)
        summary["plots"] = plot_curves(t.output_dir)
        summary["wall_seconds"] = time.perf_counter() - s.started
        log(summary["table"], prefix=False)
        if "judge" in summary:
            log(card["judge_table"], prefix=False)
        log(f"{s.step} steps, {summary['wall_seconds']:.0f} s in all (loading, data, training, evaluation, "
            "generation, export)")
        write_json(os.path.join(t.output_dir, "summary.json"), summary)
    return summary

def judge_generations(s: Session, before: dict, after: dict) -> dict:
    """eval.reward_model's verdict on the answers before and after training and the chosen ones (main
    process); the per-answer rewards go to judge.json."""
    from dpo_accel.judge import judge_reports

    e, t, start = s.plan.recipe.eval, s.plan.recipe.train, time.perf_counter()
    result = judge_reports(e.reward_model, before, after, s.accelerator.device, e.reward_batch_size,
                           s.accelerator.autocast, t.seed)
    write_json(os.path.join(t.output_dir, "judge.json"), result)
    log(f"reward model judged {3 * len(after['samples'])} answers in {time.perf_counter() - start:.1f} s")
    return result["scores"]


def push_export(summary: dict, repo_id: str) -> None:
    """Upload the finished export; a failure is one line and leaves the local folders as they are."""
    from dpo_accel.model_card import PushError, push_to_hub

    try:
        summary["pushed"] = {"repo_id": repo_id, "folder": push_to_hub(summary["exported"], repo_id)}
        log(f"pushed {summary['pushed']['folder']} to the hub as {repo_id}")
    except PushError as error:
        print(f"error: {error}", file=sys.stderr)
        summary["pushed"] = {"repo_id": repo_id, "error": str(error)}


def plot_curves(output_dir: str) -> list:
    """The run's curves as PNGs in its folder (nothing, and a one-line hint, without matplotlib)."""
    from dpo_accel.plots import plot_run

    written = plot_run(output_dir)
    if written:
        log(f"plots: {', '.join(sorted(os.path.basename(p) for p in written))} in {output_dir}")
    return sorted(written)


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
    if "judge" in summary:  # the reward model's mean reward of the answers before and after training
        before["reward_model/mean_reward"] = summary["judge"]["reward_before"]
        after["reward_model/mean_reward"] = summary["judge"]["reward_after"]
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
    """The command line. Every refusal is one ``error:`` line on stderr and exit code 2, before compute where
    the recipe or the data say so; a run that cannot go on (non-finite steps in a row, a full disk) ends with
    one line and exit code 3. Through ``accelerate launch`` the launcher turns any non-zero exit into its own
    exit 1 and adds a CalledProcessError traceback under the line; ``accelerate launch -q`` drops it."""
    args = parse_args(argv)
    try:
        plan = preflight(load_recipe(args.recipe, args.set), args.resume)
        if args.recipe is None and not any(s.startswith("model.model_name_or_path=") for s in args.set):
            raise RecipeError("a recipe is required: pass --recipe recipes/<name>.yaml (or --recipe a file of your "
                              "own); the defaults alone would fine-tune the whole model into outputs/run")
    except ValueError as e:  # RecipeError, and the objective's checks
        return refuse(e)
    try:
        execute(plan)
    except RecipeError as e:  # the checks that need the accelerator or the data (launch, resume position)
        return refuse(e)
    except RunStopped as e:  # diverged, or a full disk: not a refusal, a stop (exit 3)
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0


def refuse(error: Exception) -> int:
    lines = str(error).strip().splitlines() or [type(error).__name__]
    print(f"error: {lines[0]}", file=sys.stderr)  # one line, whatever raised it
    return 2

if __name__ == "__main__":
    sys.exit(main())
