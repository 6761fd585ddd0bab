"""Print the table of model families of docs/internals.md, from the checks of tests/test_families.py
(with --vision: the vision-language families of docs/methods/vision.md, from tests/test_vision_families.py).

Each family's tiny random model (with LoRA) runs the same checks as the tests: the start-up self-check
(lean or full log-probs, prefix sharing on or off and why) and every public way to get the log-probs,
compared with separate unpadded forwards of each sequence. About a minute on 2 CPU cores.

    python scripts/families_table.py                  # markdown to stdout
    python scripts/families_table.py --json out.json  # also every family's measured facts and start-up line
    python scripts/families_table.py --check docs/internals.md   # exit 1 if the page lacks the current table
    python scripts/families_table.py --vision         # the vision-language families' table
"""
import argparse
import json
import os
import sys
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

from generated_table import print_or_check  # noqa: E402
from test_families import FAMILIES, check_family, families_table  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", metavar="FILE", help="fail when FILE does not contain the generated table")
    parser.add_argument("--json", metavar="FILE", help="write each family's results (path, layout, reasons, "
                                                       "max relative difference, start-up line) to FILE")
    parser.add_argument("--vision", action="store_true", help="the vision-language families instead")
    args = parser.parse_args(argv)
    if args.vision:
        return vision_table(args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = [check_family(name) for name in FAMILIES]
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    table = families_table(results)
    return print_or_check(table, args.check, "families table", "python scripts/families_table.py")


def vision_table(args) -> int:
    """The vision-language families' table (each family's shared and stacked layouts against separate forwards)."""
    from test_vision_families import FAMILIES as VISION_FAMILIES
    from test_vision_families import check_vision_family, vision_families_table

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = [check_vision_family(name) for name in VISION_FAMILIES]
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([{k: v for k, v in r.items() if not k.endswith("_rows")} for r in results], f, indent=1)
    return print_or_check(vision_families_table(results), args.check, "vision families table",
                          "python scripts/families_table.py --vision")


if __name__ == "__main__":
    sys.exit(main())
