"""Write the shipped geo preference dataset: scripts/make_task_dataset.py with --task geo.

    python scripts/make_geo_dataset.py --out data/geo_prefs
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_task_dataset  # noqa: E402


def main(argv=None) -> None:
    make_task_dataset.main(argv, task="geo")


if __name__ == "__main__":
    main()
