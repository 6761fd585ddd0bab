"""Iterative DPO (iterative reasoning preference optimisation, Pang et al. 2024, arXiv:2404.19733): rounds of
generate -> score -> train, each round's trained policy answering the next round's prompts.

    accelerate launch --config_file accelerate_configs/cpu_single.yaml dpo_accel/train.py \\
        --recipe recipes/smollm2_arith_iterative.yaml            # add --resume to continue where it stopped

Why rounds, beside online DPO: a round's pairs are a whole preference dataset on disk before a step is trained
on them, so each round can be read, rescored or rerun, its reference log-probs can be precomputed, and its
training is the offline run with everything that comes with it (any objective, RPO's NLL term included,
checkpoints, exact resume, held-out eval, export).

How: ``train.iterative_rounds: R``. Round r (1..R) works in ``<output_dir>/round_<r>/``:

1. Generation. The round's starting policy (round 1: model.model_name_or_path; later: round r-1's merged
   ``model/``) samples ``train.online_generations`` (k) answers to each of the round's training prompts
   (``train.iterative_prompts`` per round from a seeded order over the training split, a new pass after
   each; 0: every prompt, every round) at ``train.online_temperature`` / ``train.online_max_new_tokens``,
   scored by ``train.online_verifier`` or ``train.online_reward_model``; each prompt's best and worst answer
   make a pair (``data.generated.build_pairs``: all-equal groups are skipped and counted). The prompts go in chunks of
   ``CHUNK``, each sampled with a seed of its own, on the processes in turn; the chunks are gathered on every
   process, the main one writes ``answers.jsonl`` (every answer and score), ``generation.json`` (counts,
   scores) and, last, ``data/`` (``train.jsonl``: prompt, chosen, rejected, score_chosen, score_rejected;
   ``eval.jsonl``: the recipe's held-out split as loaded), each atomically. The pairs do not depend on the
   number of processes.
2. Training. An ordinary offline run (``train.run``) of the recipe on ``data/`` with output_dir
   ``round_<r>``; ``train.max_steps`` (or ``num_train_epochs``) counts per round. Its reference
   (``train.iterative_reference``): ``previous``, the round's starting policy (with LoRA the merged model
   with the new adapter off; else a frozen copy of it; precomputed works too), or ``initial``, the first
   model (from round 2 on a frozen copy, or precomputed log-probs, of model.model_name_or_path).
   With LoRA, ``train.export_merged`` must be on: the merged ``model/`` is the next round's policy.

``<output_dir>/summary.json`` (rewritten after every round) lists each round: prompts, pairs, skipped,
score mean, the held-out eval and behaviour after it, its model. ``--resume``: a finished round (its
``summary.json`` and ``model/``) is skipped; a round whose ``data/`` exists trains on those pairs (they are
never regenerated); an interrupted round's training continues from its last checkpoint (the offline run's
exact resume; ``train.save_steps`` sets how often).

Several processes: each loads the starting policy for generation (a full copy; no FSDP/ZeRO sharding while
generating), rounds run one after another in the same processes.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import json
import os
import time
from typing import Optional

import numpy as np

from dpo_accel.config.plan import preflight
from dpo_accel.config.errors import RecipeError
from dpo_accel.config.schema import Recipe
from dpo_accel.data.generated import build_pairs, missing_eos_scores, prompt_order
from dpo_accel.evaluation.verifiers import answer_scorer
from dpo_accel.loops.engine import build_accelerator
from dpo_accel.loops.offline import run_offline
from dpo_accel.outputs.console import is_main_process, log

__all__ = ["generate_round", "round_recipe", "run_rounds"]

CHUNK = 16  # prompts per generation chunk: the unit a process samples, with a seed of its own
SCORER_KEYS = "train.online_verifier or train.online_reward_model"


def round_dir(recipe: Recipe, r: int) -> str:
    return os.path.join(recipe.train.output_dir, f"round_{r}")


def finished(folder: str) -> bool:
    """A round whose training ended: its summary.json (written last) and its model/ export."""
    return os.path.isfile(os.path.join(folder, "summary.json")) and os.path.isdir(os.path.join(folder, "model"))


def start_model(recipe: Recipe, r: int):
    """(model section, lora.init_adapter) round r starts from: the recipe's for round 1, then round r-1's merged
    export (its init adapter is merged into it)."""
    model = copy.deepcopy(recipe.model)
    if r == 1:
        return model, recipe.lora.init_adapter
    model.model_name_or_path, model.gguf_file = os.path.join(round_dir(recipe, r - 1), "model"), None
    return model, None


def round_recipe(recipe: Recipe, r: int, initial_path: Optional[str] = None) -> Recipe:
    """The offline run of round r: the recipe on round r's data/ in round_<r>/, from round r-1's merged model
    (round 1: the recipe's model), with the reference train.iterative_reference names. `initial_path`: the
    first model's loadable folder (needed from round 2 on with ``initial``)."""
    from dpo_accel.objectives.registry import plan_loss

    out = copy.deepcopy(recipe)
    t, d, data = out.train, out.data, os.path.join(round_dir(recipe, r), "data")
    t.output_dir = round_dir(recipe, r)
    t.iterative_rounds, t.online_generations = 0, 0
    t.push_to_hub = recipe.train.push_to_hub and r == recipe.train.iterative_rounds  # the last round's model only
    d.dataset_name, d.dataset_config, d.dataset_mixture, d.format = data, None, None, "auto"
    d.train_split, d.eval_fraction, d.max_train_samples, d.max_eval_samples = "train", 0.0, None, None
    d.eval_split = "eval" if os.path.isfile(os.path.join(data, "eval.jsonl")) else None
    out.model, out.lora.init_adapter = start_model(recipe, r)
    if r > 1 and t.iterative_reference == "initial" and plan_loss(recipe.loss).needs_reference:
        if initial_path is None:
            raise ValueError("round_recipe: train.iterative_reference initial needs the first model's path")
        out.reference.mode = "precomputed" if recipe.reference.mode == "precomputed" else "copy"
        out.reference.ref_model_name_or_path = initial_path
    return out


def _seed(seed: int, r: int, chunk: int) -> int:
    return seed * 1_000_003 + r * 10_007 + chunk


def _as_answer(prompt, answer: str):
    """An answer in the prompt's format: a string, or one assistant message after a conversational prompt."""
    return [{"role": "assistant", "content": answer}] if isinstance(prompt, list) else answer


def _write_jsonl(path: str, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def round_prompts(prompts_all: list, t, r: int) -> list:
    """Round r's training prompts: all of them, or train.iterative_prompts from a seeded endless order."""
    if not t.iterative_prompts:
        return list(prompts_all)
    n = t.iterative_prompts
    return [prompts_all[i] for i in prompt_order(len(prompts_all), t.seed, (r - 1) * n, n)]


def sample_chunks(recipe: Recipe, r: int, accelerator, model, tokenizer, prompts: list) -> list[dict]:
    """This process's chunks of round r's prompts (chunk j on process j mod processes): each prompt's k sampled
    answers (text and ids), their scores, and the scores the pick reads (train.online_missing_eos_penalty)."""
    from dpo_accel.evaluation.generation import generate_answers

    t = recipe.train
    score, k = answer_scorer(t, accelerator.device), t.online_generations
    mine = []
    for j in range(accelerator.process_index, -(-len(prompts) // CHUNK), accelerator.num_processes):
        group = prompts[j * CHUNK:(j + 1) * CHUNK]
        sampled = generate_answers(model, tokenizer, group, t.online_max_new_tokens, batch_size=CHUNK,
                                   autocast=accelerator.autocast, temperature=t.online_temperature,
                                   num_return_sequences=k, seed=_seed(t.seed, r, j), return_tokens=True)
        answers, ended = [a.text for a in sampled], [a.ended for a in sampled]
        flat = [float(x) for x in score([p for p in group for _ in range(k)], answers)]
        if len(flat) != len(answers):
            raise RecipeError(f"the scorer ({SCORER_KEYS}) returned {len(flat)} scores for {len(answers)} answers; "
                              "it must return one number per answer")
        picked = missing_eos_scores(flat, ended, t.online_missing_eos_penalty)  # a cut answer: left out or scored down
        mine.append({"chunk": j, "answers": [answers[i * k:(i + 1) * k] for i in range(len(group))],
                     "scores": [flat[i * k:(i + 1) * k] for i in range(len(group))],
                     "picked": [picked[i * k:(i + 1) * k] for i in range(len(group))],
                     "tokens": [sampled[i * k:(i + 1) * k] for i in range(len(group))]})
    return mine


def generate_round(recipe: Recipe, r: int, accelerator) -> dict:
    """Sample, score and pair round r's prompts (every process its chunks); the main process writes the round's
    answers.jsonl, generation.json and data/; every process returns generation.json's content."""
    import torch
    from accelerate.utils import gather_object

    from dpo_accel.data.formats import load_preference_splits
    from dpo_accel.outputs.files import atomic_write
    from dpo_accel.model.loading import load_causal_lm, load_tokenizer, merge_adapter, resolve_model_path
    from dpo_accel.outputs.metrics_log import strict_json

    t, folder, start = recipe.train, round_dir(recipe, r), time.perf_counter()
    with accelerator.main_process_first():
        splits = load_preference_splits(recipe.data, t.seed)
    prompts = round_prompts(splits["train"]["prompt"], t, r)
    model_cfg, init_adapter = start_model(recipe, r)
    with accelerator.main_process_first():  # one GGUF conversion
        path = resolve_model_path(model_cfg.model_name_or_path, model_cfg.gguf_file)
    tokenizer = load_tokenizer(model_cfg, path)
    model = load_causal_lm(path, model_cfg)
    if init_adapter:
        model = merge_adapter(model, init_adapter, path)
    model = model.to(accelerator.device).eval().requires_grad_(False)
    log(f"round {r}: generating {t.online_generations} answers to each of {len(prompts)} prompts with "
        f"{model_cfg.model_name_or_path}")
    mine = sample_chunks(recipe, r, accelerator, model, tokenizer, prompts)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    chunks = sorted(gather_object(mine), key=lambda c: c["chunk"])  # every process gets every chunk
    groups = [a for c in chunks for a in c["answers"]]
    scores = [s for c in chunks for s in c["scores"]]
    pairs, skipped = build_pairs(prompts, groups, [s for c in chunks for s in c["picked"]],
                                 [s for c in chunks for s in c["tokens"]])  # each pair keeps its sampled ids
    flat = np.asarray([s for group in scores for s in group], dtype=np.float64)
    info = {"round": r, "model": model_cfg.model_name_or_path, "prompts": len(prompts),
            "generations": t.online_generations,
            "pairs": len(pairs), "skipped": skipped, "pair_share": len(pairs) / max(len(prompts), 1),
            "score_mean": float(flat.mean()), "score_max": float(flat.max()),
            "chosen_score_mean": float(np.mean([p["score_chosen"] for p in pairs])) if pairs else None,
            "rejected_score_mean": float(np.mean([p["score_rejected"] for p in pairs])) if pairs else None,
            "temperature": t.online_temperature, "max_new_tokens": t.online_max_new_tokens,
            "scorer": t.online_verifier or t.online_reward_model, "processes": accelerator.num_processes,
            "seconds": time.perf_counter() - start}
    if accelerator.is_main_process:
        os.makedirs(folder, exist_ok=True)
        with atomic_write(os.path.join(folder, "answers.jsonl")) as tmp:
            _write_jsonl(tmp, ({"prompt": p, "answers": a, "scores": s} for p, a, s in zip(prompts, groups, scores)))
        with atomic_write(os.path.join(folder, "generation.json")) as tmp:
            with open(tmp, "w") as f:
                f.write(strict_json(info, indent=1))
        if pairs:
            with atomic_write(os.path.join(folder, "data")) as tmp:  # last: its presence means the round's pairs exist
                os.makedirs(tmp)
                _write_jsonl(os.path.join(tmp, "train.jsonl"),
                             ({**p, "chosen": _as_answer(p["prompt"], p["chosen"]),
                               "rejected": _as_answer(p["prompt"], p["rejected"])} for p in pairs))
                if "eval" in splits:
                    _write_jsonl(os.path.join(tmp, "eval.jsonl"), splits["eval"].to_list())
    accelerator.wait_for_everyone()
    if not pairs:
        raise RecipeError(f"round {r}: none of the {len(prompts)} prompts gave a pair (all {t.online_generations} "
                          f"answers of each scored "
                          f"the same; {folder}/answers.jsonl has them); raise train.online_generations or "
                          "train.online_temperature, or use a scorer that tells the answers apart")
    log(f"round {r}: {len(pairs)} pairs from {len(prompts)} prompts ({skipped} skipped), score mean "
        f"{info['score_mean']:.3f}, in {info['seconds']:.1f} s -> {folder}/data")
    return info


def _fresh_accelerator_state() -> None:
    """Each phase (a round's generation, a round's training) builds its own Accelerator: clear Accelerate's
    process-wide AcceleratorState and GradientState; the PartialState (processes, device, process group) stays."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(False)
    GradientState._reset_state()


@contextlib.contextmanager
def _one_process_group():
    """Every round in one process group. A run's end (accelerator.end_training) destroys the group, and a new
    one cannot be formed in the same processes under torchrun (its rendezvous store still holds the first
    group's keys: the ranks fail to connect), so the destroy is skipped while the rounds run; the group is
    destroyed once, after the last round."""
    import torch
    from accelerate.state import PartialState

    destroy = PartialState.destroy_process_group
    PartialState.destroy_process_group = lambda self, group=None: None
    try:
        yield
    finally:
        PartialState.destroy_process_group = destroy
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def round_entry(folder: str, r: int) -> dict:
    """One round's line of the top-level summary, from its folder's files."""
    gen, summary = _read_json(os.path.join(folder, "generation.json")), _read_json(os.path.join(folder, "summary.json"))
    entry = {"round": r, **{k: gen.get(k) for k in ("prompts", "pairs", "skipped", "score_mean", "score_max")},
             "global_step": summary.get("global_step"), "model": summary.get("exported", {}).get("model")}
    if "eval" in summary:
        entry["eval"] = summary["eval"]
    if "behaviour" in summary:
        entry["behaviour"] = summary["behaviour"]["after"]
        entry["behaviour_before"] = summary["behaviour"]["before"]
    return entry


def rounds_table(rounds: list[dict]) -> str:
    """A markdown table: per round its pairs, the mean score of every sampled answer, the held-out reward
    accuracy and behaviour after it (a "start" row: the behaviour before round 1)."""
    keys = sorted({k for e in rounds for k in e.get("behaviour", {}) if k != "n"})
    accuracy = "eval/rewards/accuracies"
    with_eval = any(accuracy in e.get("eval", {}) for e in rounds)

    def number(value) -> str:
        return "" if value is None else f"{value:.3f}"

    head = ["round", "pairs / prompts", "sampled score mean"] + (["held-out reward accuracy"] if with_eval else [])
    lines = [head + [f"held-out {k}" for k in keys]]
    start = next((e["behaviour_before"] for e in rounds if e["round"] == 1 and "behaviour_before" in e), None)
    if start is not None and keys:
        lines.append(["start", "", ""] + ([""] if with_eval else []) + [number(start.get(k)) for k in keys])
    for e in rounds:
        cells = [str(e["round"]), f"{e.get('pairs')} / {e.get('prompts')}", number(e.get("score_mean"))]
        cells += [number(e.get("eval", {}).get(accuracy))] if with_eval else []
        lines.append(cells + [number(e.get("behaviour", {}).get(k)) for k in keys])
    rows = ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(rows[:1] + ["|" + " --- |" * len(lines[0])] + rows[1:])


def write_summary(recipe: Recipe, rounds: list[dict], started: float) -> dict:
    from dpo_accel.outputs.files import atomic_write
    from dpo_accel.outputs.metrics_log import strict_json

    t = recipe.train
    summary = {"rounds": rounds, "iterative_rounds": t.iterative_rounds, "iterative_reference": t.iterative_reference,
               "model": rounds[-1].get("model") if rounds else None, "table": rounds_table(rounds),
               "wall_seconds": time.perf_counter() - started}
    if is_main_process():
        with atomic_write(os.path.join(t.output_dir, "summary.json")) as tmp:
            with open(tmp, "w") as f:
                f.write(strict_json(summary, indent=1))
    return summary


def run_rounds(plan) -> dict:
    """Every round of a preflighted iterative plan (dpo_accel.train dispatches here); returns the top-level summary."""
    from dpo_accel.config.plan import holds_run
    from dpo_accel.config.schema import dump_recipe
    from dpo_accel.data.vision import is_vision_source

    recipe, t, started = plan.recipe, plan.recipe.train, time.perf_counter()
    if is_vision_source(recipe.data):  # before any folder is made or weights load
        raise RecipeError(f"data.dataset_name '{recipe.data.dataset_name}' holds images; iterative DPO samples "
                          "text-only answers for now: drop train.iterative_rounds to train offline on the pairs")
    resume = holds_run(t.output_dir)  # preflight refused a started run without --resume
    rounds: list[dict] = []
    with _one_process_group():
        _fresh_accelerator_state()
        build_accelerator(plan).wait_for_everyone()  # every process is past its preflight's folder check
        if is_main_process():
            os.makedirs(t.output_dir, exist_ok=True)
            dump_recipe(recipe, os.path.join(t.output_dir, "recipe.yaml"))  # also what marks the folder as a run
        if resume:
            log(f"iterative: continuing in {t.output_dir} (finished rounds skipped, generated pairs reused)")
        for r in range(1, t.iterative_rounds + 1):
            folder = round_dir(recipe, r)
            if finished(folder):
                log(f"round {r}/{t.iterative_rounds}: finished before, skipped ({folder})")
            else:
                run_round(plan, r)
            rounds.append(round_entry(folder, r) if is_main_process() else {"round": r})  # main wrote the files
            summary = write_summary(recipe, rounds, started)
    _fresh_accelerator_state()
    log(summary["table"], prefix=False)
    log(f"{t.iterative_rounds} rounds, {summary['wall_seconds']:.0f} s in all; final model {summary['model']}")
    return summary


def run_round(plan, r: int) -> None:
    """Round r: its pairs (generated now, or the ones its data/ holds), then its offline run (continued from its
    last checkpoint when one started)."""
    from dpo_accel.model.loading import resolve_model_path
    from dpo_accel.config.plan import holds_run

    recipe, t, folder = plan.recipe, plan.recipe.train, round_dir(plan.recipe, r)
    _fresh_accelerator_state()
    accelerator = build_accelerator(plan)
    if os.path.isdir(os.path.join(folder, "data")):
        log(f"round {r}/{t.iterative_rounds}: training on the pairs generated before ({folder}/data)")
    else:
        generate_round(recipe, r, accelerator)
    initial = None
    if r > 1 and t.iterative_reference == "initial":
        with accelerator.main_process_first():  # the first model's loadable folder (a GGUF converted once)
            initial = resolve_model_path(recipe.model.model_name_or_path, recipe.model.gguf_file)
    accelerator.wait_for_everyone()
    _fresh_accelerator_state()
    log(f"round {r}/{t.iterative_rounds}: training in {folder}")
    run_offline(preflight(round_recipe(recipe, r, initial), resume=holds_run(folder)))
