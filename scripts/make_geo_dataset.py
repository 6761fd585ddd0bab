"""Write the shipped one-word capital-city preference dataset (deterministic; see dpo_accel/geo_task.py).

    python scripts/make_geo_dataset.py --out data/geo_prefs

Rerunning with the same arguments rewrites byte-identical train.jsonl / eval.jsonl
(tests/test_scorers.py checks the committed files against a fresh run).
"""
from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a file: make the repository's package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dpo_accel.geo_task import write_dataset  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/geo_prefs", help="output directory")
    parser.add_argument("--n-train", type=int, default=2000, help="training pairs")
    parser.add_argument("--n-eval", type=int, default=192, help="held-out pairs (countries unseen in train)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    counts = write_dataset(args.out, args.n_train, args.n_eval, args.seed)
    for split, kinds in counts.items():
        shown = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
        print(f"{os.path.join(args.out, split + '.jsonl')}: {sum(kinds.values())} pairs ({shown})")


if __name__ == "__main__":
    main()
