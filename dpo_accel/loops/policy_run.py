"""What a run that trains a policy (offline DPO / KTO / SFT on fixed rows, online DPO on generated pairs) builds
before its first step: the accelerator, the tokenised data, the log-prob module around the policy, the loaders,
the engine (optimizer, schedule, resume position) and the reference.

    run_policy(plan, OfflineKind)   # or OnlineKind: setup, measure_before, engine.train(kind), finish
    # setup: every process; the checks that need the data or the model fail here, in one line

A vision-language model (its config read first, no weights) takes the vision path: its processor, the vision
preference data (`data.vision`), `model.vision.VisionLogpsModel` and image prompts for the generations; data
with images given to a text-only model is refused before anything loads.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any

from dpo_accel.config.plan import Plan, check_resume_data
from dpo_accel.config.errors import RecipeError
from dpo_accel.config.schema import Recipe, dump_recipe, recipe_to_dict
from dpo_accel.loops.engine import Engine, build_accelerator, steps_per_epoch
from dpo_accel.loops.finish import finish, measure_before
from dpo_accel.outputs.checkpoints import base_fingerprint, save_trainable_only
from dpo_accel.outputs.console import log
from dpo_accel.outputs.files import atomic_write

__all__ = ["PolicyRun", "run_policy", "setup"]

# More than this share of the training pairs dropped by truncation stops the run, as does every kept pair cut;
# a smaller share, or more than TRUNCATED_WARN of the pairs cut, is said in one line.
DROPPED_ERROR, DROPPED_WARN, TRUNCATED_WARN = 0.5, 0.05, 0.25

LAYOUT_COST_FILE = "layout_cost.json"  # the fitted per-batch layout cost, read back on --resume
LAYOUT_TEXT = {"shared": "prefix sharing (one row per pair, the prompt run once)",
               "packed_shared": "prefix sharing, pairs packed into one row (each prompt run once, no padding)",
               "concat": "chosen and rejected rows stacked", "packed": "padding-free packing"}


@dataclass
class PolicyRun:
    """What setup built, read by the loop kinds and the finish."""

    plan: Plan
    accelerator: Any
    engine: Engine  # holds the prepared model, optimizer, schedule and the step reached
    train_loader: Any
    eval_loader: Any
    sampler: Any
    reference: Any  # a dpo_accel.model.reference strategy: .logps(batch, split)
    tokenizer: Any
    prompts: list  # held-out prompts for generations
    eval_rows: list  # their held-out rows (their chosen answers, for scorers and the judge; images for a VLM)
    data_stats: dict
    started: float
    processor: Any = None  # a vision-language model's processor (None: a text model, `tokenizer` is everything)

    @property
    def model(self):
        return self.engine.model


def flat_config(recipe: Recipe) -> dict:
    """Recipe as flat scalars for trackers (TensorBoard's hparams take no lists)."""
    flat = {}
    for section, values in recipe_to_dict(recipe).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def build_data(accelerator, recipe: Recipe, tokenizer):
    """The raw and tokenised splits (the main process tokenises, the others read its cache) and their stats."""
    from dpo_accel.data.formats import load_preference_splits
    from dpo_accel.data.tokenize import format_stats, tokenize_splits
    from dpo_accel.data.unpaired import is_unpaired, unpaired_splits

    with accelerator.main_process_first():
        raw = load_preference_splits(recipe.data, recipe.train.seed)
        if is_unpaired(recipe.loss):  # KTO: labelled rows, each with its mismatched KL completion
            raw = unpaired_splits(raw, recipe.loss, recipe.train.seed)
        tokenized, stats = tokenize_splits(raw, tokenizer, recipe.data)
    log(format_stats(stats), prefix=False)
    if len(tokenized["train"]) == 0:
        raise RecipeError("no training pair survived truncation; raise data.max_length or data.max_prompt_length")
    check_truncation(stats.get("train", {}), recipe.data)
    return raw, tokenized, stats


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


def keep_layout_cost(plan: Plan, accelerator, model) -> None:
    """The layout cost fitted at start-up (logps.LayoutCost) is timing, so it differs between launches: a new
    run writes it to its folder and a resumed run reads it back, so every batch runs in the layout it had."""
    from dpo_accel.model.logps import LayoutCost

    path = os.path.join(plan.recipe.train.output_dir, LAYOUT_COST_FILE)
    if model.decision.cost is None:
        return
    if plan.resume_from and os.path.isfile(path):
        with open(path) as f:
            model.decision.cost = LayoutCost.from_dict(json.load(f))
        log(f"--resume: the layout {model.decision.cost.describe()}, as the run measured it")
    elif accelerator.is_main_process:
        os.makedirs(plan.recipe.train.output_dir, exist_ok=True)
        with atomic_write(path) as tmp, open(tmp, "w") as f:
            json.dump(model.decision.cost.as_dict(), f)


def settle(plan: Plan, accelerator, model, tokenized, tokenizer, collator=None) -> Plan:
    """The facts that need the built policy: its log-prob path and layout (a self-check on 2 training pairs and,
    where two layouts are exact, their timing on a micro-batch's worth, collated by `collator`, the text
    collator by default), torch.compile and the auto micro-batch; then the
    resolved recipe is saved, so recipe.yaml and every checkpoint's recipe say what ran."""
    from dpo_accel.data.collate import PreferenceCollator
    from dpo_accel.model.distributed import whole_weights
    from dpo_accel.model.logps import settle_logps_path
    from dpo_accel.model.speed import apply_speed_options
    from dpo_accel.model.vision import VisionLogpsModel

    train = tokenized["train"]
    pairs = min(len(train), max(2, min(plan.geometry.per_device, 8)))  # the self-check reads 2, the layout timing all
    probe = (collator or PreferenceCollator(tokenizer.pad_token_id))([train[i] for i in range(pairs)])
    with whole_weights(model):  # ZeRO-3 partitioned the policy as it loaded
        if isinstance(model, VisionLogpsModel):
            log(model.settle(probe))
        else:
            log(settle_logps_path(model, probe, plan.recipe.train.logps_path))
            keep_layout_cost(plan, accelerator, model)
    micro = apply_speed_options(accelerator, plan.recipe, model, tokenized["train"], tokenizer.pad_token_id,
                                with_reference=plan.reference_mode in ("adapter_off", "copy"),
                                search=plan.search_micro_batch)
    plan = plan.settled(model.layout, micro)
    accelerator.gradient_accumulation_steps = plan.geometry.accumulation
    if accelerator.is_main_process:
        os.makedirs(plan.recipe.train.output_dir, exist_ok=True)
        dump_recipe(plan.recipe, os.path.join(plan.recipe.train.output_dir, "recipe.yaml"))
    return plan


def build_loaders(plan: Plan, tokenized, tokenizer, collator=None):
    """The training loader (length-grouped by the global batch, or an epoch-seeded shuffle) and the eval one,
    both collated by `collator` (default: the text collator padding with the tokenizer's pad token).

    KTO rows always get the epoch-seeded shuffle, whatever data.group_by_length says: grouped by length, a
    batch's KL reference point would follow the lengths and a batch could hold rows of one label only."""
    from torch.utils.data import DataLoader

    from dpo_accel.data.collate import EpochRandomSampler, LengthGroupedSampler, PreferenceCollator, sequence_lengths

    t, d, g = plan.recipe.train, plan.recipe.data, plan.geometry
    collator = collator or PreferenceCollator(tokenizer.pad_token_id)
    train = tokenized["train"]
    grouped = d.group_by_length and not plan.objective.unpaired
    if d.group_by_length and not grouped:
        log("KTO: training rows are shuffled (epoch-seeded), not grouped by length (data.group_by_length ignored)")
    if grouped:
        lengths = sequence_lengths(train, plan.layout)  # the row width the decoder will see
        # Grouped by the GLOBAL batch, so 2 processes x 2 pairs see the same pairs as 1 x 4.
        sampler = LengthGroupedSampler(lengths, g.per_device * g.processes, seed=t.seed)
    else:
        sampler = EpochRandomSampler(len(train), t.seed)
    workers = d.dataloader_num_workers  # batches keep their order: workers only collate ahead of the step
    train_loader = DataLoader(train, batch_size=g.per_device, sampler=sampler, collate_fn=collator, num_workers=workers)
    eval_loader = None
    if "eval" in tokenized and len(tokenized["eval"]) and plan.recipe.eval.do_eval:
        eval_loader = DataLoader(tokenized["eval"], batch_size=t.per_device_eval_batch_size, collate_fn=collator,
                                 num_workers=workers)
    return train_loader, eval_loader, sampler, collator


def startup_line(plan: Plan, accelerator, model, ref_model, max_steps: int) -> str:
    from dpo_accel.model.loading import count_parameters
    from dpo_accel.model.reference import reference_summary

    trainable, total = count_parameters(model)
    layout = LAYOUT_TEXT[plan.layout] if plan.pairs else "chosen rows only"  # sft trains on the chosen rows alone
    return (f"policy {trainable / 1e6:.2f}M trainable of {total / 1e6:.1f}M | reference: "
            f"{reference_summary(plan.reference_mode, ref_model)} | {plan.geometry.processes} process(es), "
            f"{accelerator.mixed_precision} precision | {layout} | {max_steps} steps of {plan.geometry.global_batch} "
            f"{'pairs' if plan.pairs else 'examples'}")


@dataclass
class Policy:
    """What `text_policy` / `vision_policy` build: the tokenizer (and a VLM's processor), the data, the
    log-prob module around the policy and the collator of its batches."""

    tokenizer: Any
    processor: Any
    raw: Any
    tokenized: Any
    stats: dict
    model: Any
    collator: Any


def text_policy(plan: Plan, accelerator, model_path: str) -> Policy:
    """A causal LM's tokenizer, the text data, `PreferenceLogpsModel` around the policy."""
    from dpo_accel.data.collate import PreferenceCollator
    from dpo_accel.model.loading import load_policy, load_tokenizer
    from dpo_accel.model.logps import PreferenceLogpsModel

    recipe, t = plan.recipe, plan.recipe.train
    tokenizer = load_tokenizer(recipe.model, model_path)
    raw, tokenized, stats = build_data(accelerator, recipe, tokenizer)
    model = PreferenceLogpsModel(load_policy(recipe.model, recipe.lora, model_path), chunk_size=t.logps_chunk_size,
                                 chunk_mb=t.logps_chunk_mb, wpo=plan.objective.wpo, packing=t.padding_free,
                                 prefix_sharing=t.prefix_sharing, pack_pairs=t.pack_pairs)
    return Policy(tokenizer, None, raw, tokenized, stats, model, PreferenceCollator(tokenizer.pad_token_id))


def is_vision_run(plan: Plan, model_path: str) -> bool:
    """Whether the policy is a vision-language model, from its config (no weights); refused here, in one line
    before anything loads: images for a text-only model, what a VLM's run cannot do (`check_vision`)."""
    from dpo_accel.config.loop_checks import check_vision
    from dpo_accel.data.vision import is_vision_source
    from dpo_accel.model.loading import vision_model_type

    recipe = plan.recipe
    family = vision_model_type(model_path, recipe.model)
    if family is None:
        if is_vision_source(recipe.data, hub=False):  # a local source; a hub one is the text loader's to read
            raise RecipeError(f"data.dataset_name '{recipe.data.dataset_name}' has images but model "
                              f"'{recipe.model.model_name_or_path}' is a text-only model; use a vision-language "
                              f"model (one AutoModelForImageTextToText loads) or data without images")
        return False
    problem = check_vision(recipe, family)
    if problem is None and (not plan.pairs or plan.objective.unpaired):
        problem = (f"a vision-language model (model type '{family}') trains on preference pairs with both answers; "
                   f"loss_type {recipe.loss.loss_type!r} is not supported with images yet")
    if problem:
        raise RecipeError(problem)
    return True


def build_vision_data(accelerator, recipe: Recipe, processor):
    """A VLM's raw and tokenised splits (vision pairs, or text pairs through its processor) and their stats."""
    from dpo_accel.data.formats import load_preference_splits
    from dpo_accel.data.tokenize import format_stats
    from dpo_accel.data.vision import is_vision_source, load_vision_splits, tokenize_vision_splits

    with accelerator.main_process_first():
        if is_vision_source(recipe.data):
            raw = load_vision_splits(recipe.data, recipe.train.seed)
        else:
            raw = load_preference_splits(recipe.data, recipe.train.seed)
        tokenized, stats = tokenize_vision_splits(raw, processor, recipe.data)
    log(format_stats(stats), prefix=False)
    check_truncation(stats.get("train", {}), recipe.data)
    return raw, tokenized, stats


def vision_policy(plan: Plan, accelerator, model_path: str) -> Policy:
    """A VLM's processor, its data, `VisionLogpsModel` around the policy (vision tower frozen)."""
    from dpo_accel.data.vision import VisionPreferenceCollator
    from dpo_accel.model.loading import load_processor, load_vision_policy
    from dpo_accel.model.vision import VisionLogpsModel

    recipe, t = plan.recipe, plan.recipe.train
    processor = load_processor(recipe.model, model_path)
    raw, tokenized, stats = build_vision_data(accelerator, recipe, processor)
    model = VisionLogpsModel(load_vision_policy(recipe.model, recipe.lora, model_path), chunk_size=t.logps_chunk_size,
                             chunk_mb=t.logps_chunk_mb, wpo=plan.objective.wpo, prefix_sharing=t.prefix_sharing)
    collator = VisionPreferenceCollator(processor.tokenizer.pad_token_id, processor=processor)
    return Policy(processor.tokenizer, processor, raw, tokenized, stats, model, collator)


def setup(plan: Plan) -> PolicyRun:
    """Everything before the first step: accelerator, data, policy, loaders, engine, reference, resume."""
    from accelerate.utils import set_seed

    from dpo_accel.model.loading import resolve_model_path
    from dpo_accel.model.reference import build_reference

    started = time.perf_counter()
    recipe, t = plan.recipe, plan.recipe.train
    accelerator = build_accelerator(plan)
    set_seed(t.seed)
    with accelerator.main_process_first():  # one GGUF conversion, then every process reads the cache
        model_path = resolve_model_path(recipe.model.model_name_or_path, recipe.model.gguf_file)
    policy = (vision_policy if is_vision_run(plan, model_path) else text_policy)(plan, accelerator, model_path)
    tokenizer, raw, tokenized, stats, model = policy.tokenizer, policy.raw, policy.tokenized, policy.stats, policy.model
    plan = settle(plan, accelerator, model, tokenized, tokenizer, policy.collator)
    frozen = any(not p.requires_grad for p in model.parameters())
    base = base_fingerprint(model) if frozen and save_trainable_only(accelerator) else None
    train_loader, eval_loader, sampler, collator = build_loaders(plan, tokenized, tokenizer, policy.collator)
    epoch_steps = steps_per_epoch(plan, len(train_loader))
    fingerprint = tokenized["train"]._fingerprint
    check_resume_data(plan, fingerprint, epoch_steps)
    engine, train_loader = Engine.prepare(plan, accelerator, model, train_loader, epoch_steps, fingerprint, base)
    if eval_loader is not None:
        eval_loader = accelerator.prepare_data_loader(eval_loader)
    reference, ref_model = build_reference(accelerator, plan.recipe, plan.reference_mode, engine.model, model_path,
                                           tokenized, collator)
    log(startup_line(plan, accelerator, engine.model, ref_model, engine.max_steps))
    accelerator.init_trackers("dpo_accel", config=flat_config(plan.recipe))
    engine.resume()  # after the reference: a prepared reference copy is part of the checkpoint
    prompts = list(raw["eval"]["prompt"][:recipe.eval.generation_prompts]) if "eval" in raw else []
    rows = raw["eval"].select(range(len(prompts))).to_list() if prompts else []
    return PolicyRun(plan=plan, accelerator=accelerator, engine=engine, train_loader=train_loader,
                     eval_loader=eval_loader, sampler=sampler, reference=reference, tokenizer=tokenizer,
                     prompts=prompts, eval_rows=rows, data_stats=stats, started=started, processor=policy.processor)



def run_policy(plan: Plan, make_kind) -> dict:
    """A policy run from start to end: setup, the policy before training, the engine's steps on the kind
    `make_kind(run)` builds, the finish; returns the summary."""
    run = setup(plan)
    measure_before(run)
    run.engine.train(make_kind(run))
    return finish(run)
