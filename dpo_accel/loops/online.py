"""Online DPO: each step the policy answers its own prompts, a verifier or reward model scores the answers,
and the best and worst answer of each prompt make the pairs of one DPO-family step.

    accelerate launch --config_file accelerate_configs/cpu_single.yaml dpo_accel/train.py \\
        --recipe recipes/smollm2_arith_online.yaml

Set ``train.online_generations`` (k > 1 answers per prompt) to run this loop instead of the fixed pairs. The
setup (policy, LoRA, reference, loaders), the engine (logging, ``eval_steps`` on the held-out pairs,
``save_steps``, ``--resume``, the non-finite guard) and the finish (held-out metrics, generations, export) are
the offline run's; what differs is where a micro-batch comes from. Per micro-step:
``per_device_train_batch_size`` prompts of the training split (a seeded order, one pass after another),
k sampled answers each (``train.online_temperature``, ``train.online_max_new_tokens``), scored by
``train.online_verifier`` or ``train.online_reward_model`` (dpo_accel/evaluation/verifiers.py); a prompt whose
answers all score the same gives no pair and is counted (``online/skipped``). A pair trains on the token
ids the policy sampled (the prompt's ids as generation saw them, each answer's ids up to and with its stop
token: no EOS is added to an answer ``online_max_new_tokens`` cut off; ``train.online_missing_eos_penalty``
says whether such an answer is left out of the pick or scored down, see dpo_accel/data/generated.py), cut by
the data's truncation rule, and takes the usual forward, reference log-probs and objective. Logged besides the usual
metrics: ``online/score_mean``, ``online/score_max``, ``online/pair_share`` (share of prompts that gave a
pair), ``online/skipped``.

Several processes each answer their own prompts (rank r the r-th slice of each global micro-batch); a policy
sharded by FSDP2 or ZeRO-3 is gathered to generate (dpo_accel/evaluation/generation.py). A process whose
prompts gave no pair still runs the forward and backward, on a stand-in pair weighted 0, so the gradient
all-reduce of a step never waits for it. Resume: the prompt position and the sampling seed both follow from
the step, so a resumed run generates what the straight run would have.
"""
from __future__ import annotations

import torch

from dpo_accel.config.plan import Plan
from dpo_accel.data.collate import PreferenceCollator
from dpo_accel.data.formats import load_preference_splits
from dpo_accel.data.generated import best_and_worst, missing_eos_scores, prompt_order, sampled_pair_row
from dpo_accel.evaluation.generation import generate_on_every_process
from dpo_accel.evaluation.metrics import example_metrics, token_counts
from dpo_accel.evaluation.verifiers import answer_scorer
from dpo_accel.loops.finish import held_out_metrics
from dpo_accel.loops.policy_run import PolicyRun, run_policy
from dpo_accel.objectives.registry import compute_objective

__all__ = ["OnlineKind", "run_online"]


class OnlineKind:
    """Micro-batches of pairs the policy generates now, from the prompt position of the engine's step."""

    def __init__(self, run: PolicyRun):
        recipe, self.run = run.plan.recipe, run
        self.prompts_all = load_preference_splits(recipe.data, recipe.train.seed)["train"]["prompt"]
        self.score = answer_scorer(recipe.train, run.accelerator.device)
        self.collator = PreferenceCollator(run.tokenizer.pad_token_id)
        self.window = Window()

    def batches(self, engine):
        """(pass over the prompts, micro-batch of generated pairs with its weight), endlessly."""
        g, accelerator = self.run.plan.geometry, self.run.accelerator
        per_step = g.per_device * g.processes  # prompts per micro-step, all processes
        position = engine.step * g.accumulation * per_step
        while True:
            mine = position + accelerator.process_index * g.per_device
            yield position // len(self.prompts_all), self.micro_batch(mine)
            position += per_step

    def micro_batch(self, mine: int) -> dict:
        """This process's prompts from position `mine`: k sampled answers each, scored, the best and worst of
        each prompt as a row of the token ids the policy sampled, collated."""
        run, t, per_device = self.run, self.run.plan.recipe.train, self.run.plan.geometry.per_device
        k = t.online_generations
        prompts = [self.prompts_all[i] for i in prompt_order(len(self.prompts_all), t.seed, mine, per_device)]
        answers = generate_on_every_process(run.accelerator, run.model, run.tokenizer, prompts,
                                            t.online_max_new_tokens, seed=t.seed + mine, return_tokens=True,
                                            temperature=t.online_temperature, num_return_sequences=k)
        flat = [float(x) for x in self.score([p for p in prompts for _ in range(k)], [a.text for a in answers])]
        picked = missing_eos_scores(flat, [a.ended for a in answers], t.online_missing_eos_penalty)
        rows, skipped = [], 0
        for i in range(len(prompts)):
            group, scores = answers[i * k:(i + 1) * k], picked[i * k:(i + 1) * k]
            pick = best_and_worst([a.text for a in group], scores)
            row = pick and sampled_pair_row(group[0].prompt_ids, group[pick[0]].answer_ids,
                                            group[pick[1]].answer_ids, run.plan.recipe.data)
            skipped += pick is None
            if row:
                rows.append({**row, "idx": len(rows)})
        kept, weight = len(rows), len(rows) / per_device  # a prompt without a pair adds nothing
        if not rows:  # a stand-in pair (two of the answers) so this process joins the step's all-reduce
            rows = [{**sampled_pair_row(answers[0].prompt_ids, answers[0].answer_ids, answers[-1].answer_ids,
                                        run.plan.recipe.data, keep_any=True), "idx": 0}]
        self.window.add(len(prompts), kept, skipped, flat)
        batch = {key: v.to(run.accelerator.device) for key, v in self.collator(rows).items()}
        return {**batch, "weight": weight}

    def forward(self, batch: dict) -> torch.Tensor:
        run, weight = self.run, batch.pop("weight")
        policy = run.model(**batch)
        out = compute_objective(run.plan.objective, policy, run.reference.logps(batch, "train"))
        self.window.add_metrics(example_metrics(out, policy), real=bool(weight))  # the stand-in counts 0
        self.window.tokens += token_counts(batch)[0] if weight else 0.0
        return out.loss * weight

    def collect(self, seconds: float) -> dict:
        metrics = self.window.collect(self.run.accelerator)
        self.window = Window()
        return {**metrics, "seconds": seconds}

    def evaluate(self):
        return held_out_metrics(self.run)

    def progress(self, metrics: dict) -> dict:
        shown = {"score": f"{metrics['online/score_mean']:.3f}",
                 "pairs": f"{metrics['num_pairs']}/{metrics['online/prompts']}"}
        if "loss" in metrics:
            shown["loss"] = f"{metrics['loss']:.4f}"
        return shown


class Window:
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


def run_online(plan: Plan) -> dict:
    """Set up as an offline run, train on generated pairs, finish; returns the summary."""
    return run_policy(plan, OnlineKind)
