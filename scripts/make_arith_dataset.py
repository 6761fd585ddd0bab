"""Write the shipped arith preference dataset: scripts/make_task_dataset.py with --task arith.

    python scripts/make_arith_dataset.py --out data/arith_prefs
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_task_dataset  # noqa: E402


def main(argv=None) -> None:
    make_task_dataset.main(argv, task="arith")


if __name__ == "__main__":
    main()
