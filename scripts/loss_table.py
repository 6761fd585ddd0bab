"""Print docs/objectives.md's table of loss objectives, generated from the registry in dpo_accel/objectives/registry.py.

    python scripts/loss_table.py            # markdown to stdout
    python scripts/loss_table.py --check docs/objectives.md   # exit 1 if the page lacks the current table
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from generated_table import print_or_check  # noqa: E402
from dpo_accel.objectives.registry import loss_table_markdown


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", metavar="FILE", help="fail when FILE does not contain the generated table")
    args = parser.parse_args(argv)
    table = loss_table_markdown()
    return print_or_check(table, args.check, "loss table", "python scripts/loss_table.py")


if __name__ == "__main__":
    sys.exit(main())
