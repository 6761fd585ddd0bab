"""Write the shipped shapes preference dataset (pictures and TRL vision-format pairs; deterministic).

    python scripts/make_shapes_dataset.py --out data/shapes_prefs

Writes train.jsonl, test.jsonl and images/*.png (paths in the rows are relative to the JSONL files).
Rerunning with the same arguments rewrites byte-identical files (tests/test_vision_data.py checks the
committed files against a fresh run). The task: dpo_accel/data/tasks/shapes.py.
"""
from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a file: make the repository's package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dpo_accel.data.tasks.shapes import write_dataset  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/shapes_prefs", help="output directory")
    parser.add_argument("--n-train", type=int, default=800, help="training pairs")
    parser.add_argument("--n-eval", type=int, default=96, help="held-out pairs (pictures unseen in train)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    counts = write_dataset(args.out, args.n_train, args.n_eval, args.seed)
    for split, kinds in counts.items():
        shown = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
        print(f"{os.path.join(args.out, split + '.jsonl')}: {sum(kinds.values())} pairs ({shown})")


if __name__ == "__main__":
    main()
