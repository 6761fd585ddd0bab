"""Print the README's table of loss objectives, generated from the registry in dpo_accel/objectives/registry.py.

    python scripts/loss_table.py            # markdown to stdout
    python scripts/loss_table.py --check README.md   # exit 1 if README.md lacks the current table
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dpo_accel.objectives.registry import loss_table_markdown


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", metavar="FILE", help="fail when FILE does not contain the generated table")
    args = parser.parse_args(argv)
    table = loss_table_markdown()
    if args.check is None:
        sys.stdout.write(table)
        return 0
    with open(args.check, encoding="utf-8") as f:
        if table.strip() in f.read():
            return 0
    print(f"{args.check} lacks the current loss table; paste the output of: python scripts/loss_table.py",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
