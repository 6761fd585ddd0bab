"""Write a shipped preference task's dataset (deterministic): arith (dpo_accel/data/tasks/arith.py) or geo
(dpo_accel/data/tasks/geo.py).

    python scripts/make_task_dataset.py --task arith --out data/arith_prefs
    python scripts/make_task_dataset.py --task geo --out data/geo_prefs

Rerunning with the same arguments rewrites byte-identical train.jsonl / eval.jsonl (tests/test_data.py
and tests/test_scorers.py check the committed files against a fresh run). make_arith_dataset.py and
make_geo_dataset.py are this script with --task set.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

if __package__ in (None, ""):  # run as a file: make the repository's package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# task -> (module, default output folder, default held-out pairs, what the held-out pairs are)
TASKS = {
    "arith": ("dpo_accel.data.tasks.arith", "data/arith_prefs", 200, "operand pairs unseen in train"),
    "geo": ("dpo_accel.data.tasks.geo", "data/geo_prefs", 192, "countries unseen in train"),
}


def main(argv=None, task: str | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    if task is None:
        parser.add_argument("--task", choices=sorted(TASKS), required=True)
    args, _ = parser.parse_known_args(argv)
    task = task or args.task
    module, out, n_eval, unseen = TASKS[task]
    parser.add_argument("--out", default=out, help="output directory")
    parser.add_argument("--n-train", type=int, default=2000, help="training pairs")
    parser.add_argument("--n-eval", type=int, default=n_eval, help=f"held-out pairs ({unseen})")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    counts = importlib.import_module(module).write_dataset(args.out, args.n_train, args.n_eval, args.seed)
    for split, kinds in counts.items():
        shown = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
        print(f"{os.path.join(args.out, split + '.jsonl')}: {sum(kinds.values())} pairs ({shown})")


if __name__ == "__main__":
    main()
