"""Write the second shipped addition dataset, in the implicit conversational format, for mixtures.

    python scripts/make_arith_chat_dataset.py --out data/arith_chat

Rows are {"chosen": [user, assistant], "rejected": [user, assistant]} (the prompt is their shared
first message), drawn like data/arith_prefs (dpo_accel/data/tasks/arith.py) with another seed and with no
operand pair of data/arith_prefs' eval split, so a mixture of both keeps that held-out set unseen.
Rerunning rewrites a byte-identical file (tests/test_mixture.py checks it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):  # run as a file: make the repository's package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dpo_accel.data.tasks.arith import make_pairs, operands

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def chat_rows(n: int, seed: int, held_out: str) -> list:
    with open(held_out) as f:
        unseen = {tuple(sorted(operands(json.loads(line)["prompt"]))) for line in f}
    rows = [r for r in make_pairs(n_train=3800, n_eval=0, seed=seed)[0]
            if tuple(sorted(operands(r["prompt"]))) not in unseen][:n]
    if len(rows) < n:
        raise ValueError(f"only {len(rows)} rows avoid the held-out operand pairs; ask for fewer")
    user = lambda r: {"role": "user", "content": r["prompt"]}  # noqa: E731
    return [{"chosen": [user(r), {"role": "assistant", "content": r["chosen"]}],
             "rejected": [user(r), {"role": "assistant", "content": r["rejected"]}]} for r in rows]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/arith_chat", help="output directory")
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--held-out", default=os.path.join(REPO, "data", "arith_prefs", "eval.jsonl"),
                        help="a split whose operand pairs must not appear")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "train.jsonl")
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in chat_rows(args.n_train, args.seed, args.held_out):
            f.write(json.dumps(row, ensure_ascii=True) + "\n")
    print(f"{path}: {args.n_train} pairs")


if __name__ == "__main__":
    main()
