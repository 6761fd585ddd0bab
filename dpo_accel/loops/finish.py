"""The before and after of a policy run: what the policy did before its first step (generations, and held-out
metrics where no reference makes them 0 by construction), and after the last: held-out metrics, generations,
the reward model's verdict, the export, plots and ``summary.json``. A vision-language policy answers its
held-out image prompts and exports its processor. Every process calls both; the main
process writes the files."""
from __future__ import annotations

import os
import sys
import time
from typing import Optional

from dpo_accel.outputs.console import log
from dpo_accel.outputs.export import export_model
from dpo_accel.outputs.metrics_log import log_metrics, read_json, write_json

__all__ = ["finish", "final_table", "held_out_metrics", "measure_before"]


def held_out_metrics(run) -> Optional[dict]:
    """Held-out preference metrics of the policy now (a collective), or None without a held-out split."""
    from dpo_accel.evaluation.heldout import evaluate_preferences

    if run.eval_loader is None:
        return None
    return evaluate_preferences(run.accelerator, run.model, run.reference, run.eval_loader, run.plan.objective)


def measure_before(run) -> None:
    """The policy before training, which `finish` compares with: its generations and, where no reference
    makes the held-out rewards 0 by construction, its held-out metrics. Kept from the first start on resume."""
    out, accelerator = run.plan.recipe.train.output_dir, run.accelerator
    before = os.path.join(out, "generations_before.json")
    if run.prompts and not os.path.isfile(before):  # every process: a sharded policy is gathered to generate
        report = held_out_answers(run)
        if accelerator.is_main_process:
            write_json(before, report)
    eval_before = os.path.join(out, "eval_before.json")
    if run.plan.reference_mode == "none" and run.engine.step == 0 and not os.path.isfile(eval_before):
        metrics = held_out_metrics(run)
        if metrics is not None:
            log_metrics(accelerator, out, metrics, 0)
            if accelerator.is_main_process:
                write_json(eval_before, metrics)


def held_out_answers(run) -> dict:
    """The policy's answers to the held-out prompts (greedy, or sampled per eval.*, the same seed before
    and after) with their behaviour scores; every process calls it."""
    from dpo_accel.evaluation.generation import generation_report, vision_generation_report

    e, seed = run.plan.recipe.eval, run.plan.recipe.train.seed
    sampling = {"temperature": e.temperature, "top_p": e.top_p, "num_return_sequences": e.num_return_sequences,
                "seed": seed if e.generation_seed is None else e.generation_seed}
    if run.processor is not None:  # a vision-language policy: the held-out rows' image prompts
        return vision_generation_report(run.accelerator, run.model, run.processor, run.eval_rows, e.max_new_tokens,
                                        e.behaviour, sampling, e.behaviour_regex)
    return generation_report(run.accelerator, run.model, run.tokenizer, run.prompts, e.max_new_tokens, e.behaviour,
                             sampling, run.eval_rows, e.behaviour_regex)


def finish(run) -> dict:
    """After the last step: held-out metrics, generations against the 'before' ones, export, summary."""
    accelerator, t = run.accelerator, run.plan.recipe.train
    main, step = accelerator.is_main_process, run.engine.step
    summary = {"global_step": step, "data": run.data_stats}
    eval_before = os.path.join(t.output_dir, "eval_before.json")
    if main and os.path.isfile(eval_before):
        summary["eval_before"] = read_json(eval_before)
    metrics = held_out_metrics(run)
    if metrics is not None:
        summary["eval"] = metrics
        log_metrics(accelerator, t.output_dir, metrics, step)
    if run.prompts:
        after = held_out_answers(run)
        if main:
            before = read_json(os.path.join(t.output_dir, "generations_before.json"))
            write_json(os.path.join(t.output_dir, "generations_after.json"), after)
            summary["behaviour"] = {"before": before["scores"], "after": after["scores"]}
            if run.plan.recipe.eval.reward_model:
                summary["judge"] = judge_generations(run, before, after)
    card = run_card(run, summary) if main else None
    saver = run.processor or run.tokenizer  # a VLM's folders get its processor (tokenizer and image processor)
    summary["exported"] = export_model(accelerator, run.model, saver, run.plan.recipe, t.output_dir,
                                       t.export_merged, card=card)
    accelerator.end_training()
    if main:
        write_summary(run, summary, card)
    return summary


def run_card(run, summary: dict) -> dict:
    """The summary's table and counts, and what the model card shows (main process)."""
    from dpo_accel.evaluation.judge import judge_table
    from dpo_accel.evaluation.plots import read_metrics

    summary["table"] = final_table(summary)
    rows = read_metrics(run.plan.recipe.train.output_dir)
    summary["tokens_seen"] = sum(r.get("num_tokens", 0) for r in rows)
    summary["pairs_seen"] = sum(r.get("num_pairs", 0) for r in rows)
    card = {**summary, "reference_mode": run.plan.reference_mode}
    if "judge" in summary:
        card["judge_table"] = judge_table(summary["judge"])
    return card


def write_summary(run, summary: dict, card: dict) -> None:
    """The hub upload, plots, the console's before/after table and ``summary.json`` (main process)."""
    t = run.plan.recipe.train
    if t.push_to_hub:
        push_export(summary, t.hub_model_id)
    summary["plots"] = plot_curves(t.output_dir)
    summary["wall_seconds"] = time.perf_counter() - run.started
    log(summary["table"], prefix=False)
    if "judge" in summary:
        log(card["judge_table"], prefix=False)
    log(f"{run.engine.step} steps, {summary['wall_seconds']:.0f} s in all (loading, data, training, evaluation, "
        "generation, export)")
    write_json(os.path.join(t.output_dir, "summary.json"), summary)


def judge_generations(run, before: dict, after: dict) -> dict:
    """eval.reward_model's verdict on the answers before and after training and the chosen ones (main
    process); the per-answer rewards go to judge.json."""
    from dpo_accel.evaluation.judge import judge_reports

    e, t, start = run.plan.recipe.eval, run.plan.recipe.train, time.perf_counter()
    result = judge_reports(e.reward_model, before, after, run.accelerator.device, e.reward_batch_size,
                           run.accelerator.autocast, t.seed)
    write_json(os.path.join(t.output_dir, "judge.json"), result)
    log(f"reward model judged {3 * len(after['samples'])} answers in {time.perf_counter() - start:.1f} s")
    return result["scores"]


def push_export(summary: dict, repo_id: str) -> None:
    """Upload the finished export; a failure is one line and leaves the local folders as they are."""
    from dpo_accel.outputs.model_card import PushError, push_to_hub

    try:
        summary["pushed"] = {"repo_id": repo_id, "folder": push_to_hub(summary["exported"], repo_id)}
        log(f"pushed {summary['pushed']['folder']} to the hub as {repo_id}")
    except PushError as error:
        print(f"error: {error}", file=sys.stderr)
        summary["pushed"] = {"repo_id": repo_id, "error": str(error)}


def plot_curves(output_dir: str) -> list:
    """The run's curves as PNGs in its folder (nothing, and a one-line hint, without matplotlib)."""
    from dpo_accel.evaluation.plots import plot_run

    written = plot_run(output_dir)
    if written:
        log(f"plots: {', '.join(sorted(os.path.basename(p) for p in written))} in {output_dir}")
    return sorted(written)


def final_table(summary: dict) -> str:
    """Held-out before/after table. With a reference the policy equals it before training, so every
    implicit reward is 0: accuracy and margin are 0 by construction, not measured. Without one (simpo,
    orpo, sft, reference_free) the loop measured the start (``eval_before``), NLL included."""
    from dpo_accel.evaluation.heldout import before_after_table

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
