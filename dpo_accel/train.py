"""Train a policy (or a reward model) on preference data, on a plain Accelerate loop: the entry point.

    accelerate launch --config_file accelerate_configs/cpu_single.yaml dpo_accel/train.py \\
        --recipe recipes/smollm2_arith_lora.yaml
    # any key can be overridden:   --set train.max_steps=20 --set loss.beta=0.2
    # continue an interrupted run: --resume   (latest checkpoint in train.output_dir)

It parses the command line, resolves the recipe into a plan (`preflight`: every check that needs no
weights) and hands the plan to its loop: offline (fixed pairs or rows), online (generated pairs),
iterative (rounds of offline runs) or reward (a sequence classifier). The loops take their steps on one
engine (dpo_accel/loops/engine.py).
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a file by `accelerate launch dpo_accel/train.py`
    # Python put this folder first on sys.path; the package is imported from the repository root instead, so
    # nothing in this folder can stand in for another module of the same name.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.abspath(p or ".") != _here]

import argparse

from dpo_accel.config.plan import Plan, preflight
from dpo_accel.config.errors import RecipeError
from dpo_accel.config.load import load_recipe
from dpo_accel.config.schema import Recipe
from dpo_accel.outputs.checkpoints import RunStopped

__all__ = ["execute", "main", "run"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", help="YAML recipe (defaults apply to every key it leaves out)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one recipe key, value read as YAML; repeatable")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.output_dir")
    return p.parse_args(argv)


def run(recipe: Recipe, resume: bool = False) -> dict:
    """Train per `recipe` with the checks of `main`; returns the summary (also <output_dir>/summary.json)."""
    return execute(preflight(recipe, resume))


def execute(plan: Plan) -> dict:
    """Run a preflighted plan on its loop."""
    from dpo_accel.model.loading import check_model_source

    check_model_source(plan.recipe.model)  # here, not in preflight: inspect plans recipes of models not downloaded
    if plan.objective.reward_model:  # loss_type bradley_terry trains a sequence classifier
        from dpo_accel.loops.reward import run_reward

        return run_reward(plan)
    if plan.recipe.train.iterative_rounds:  # rounds of generate, score, train (one offline run each)
        from dpo_accel.loops.iterative import run_rounds

        return run_rounds(plan)
    if plan.recipe.train.online_generations:  # the policy's own answers, scored, make the pairs
        from dpo_accel.loops.online import run_online

        return run_online(plan)
    from dpo_accel.loops.offline import run_offline

    return run_offline(plan)


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
    finally:
        close_process_group()
    return 0


def close_process_group() -> None:
    """Tear down the processes' group before the interpreter exits: left to exit, a gloo group's threads can
    abort a rank ("terminate called without an active exception") after the run has finished."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def refuse(error: Exception) -> int:
    lines = str(error).strip().splitlines() or [type(error).__name__]
    print(f"error: {lines[0]}", file=sys.stderr)  # one line, whatever raised it
    return 2


if __name__ == "__main__":
    sys.exit(main())
