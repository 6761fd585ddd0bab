"""The one print-or-check step of the scripts that generate a docs table (objectives, recipe keys, families):
print the table, or with a file exit 1 unless the file holds it verbatim."""
import sys


def print_or_check(table: str, path, what: str, command: str) -> int:
    """`table` to stdout when `path` is None; else 0 when `path` contains it, 1 (and a one-line hint) when not."""
    if path is None:
        sys.stdout.write(table)
        return 0
    with open(path, encoding="utf-8") as f:
        if table.strip() in f.read():
            return 0
    print(f"{path} lacks the current {what}; paste the output of: {command}", file=sys.stderr)
    return 1
