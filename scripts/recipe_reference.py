"""Print the recipe reference (docs/recipes.md's table), generated from dpo_accel/config/schema.py.

Every key of the recipe's dataclasses: section.key, type, default, the allowed values (schema.CHOICES) and
its meaning, read from the field's comment in the source: the comment lines right above the field and its
trailing comment. A trailing comment that fills its line and stops mid-sentence continues on the next comment
lines that start in lower case, up to the one that ends a sentence or a parenthesis.

    python scripts/recipe_reference.py                        # markdown to stdout
    python scripts/recipe_reference.py --check docs/recipes.md   # exit 1 if the page lacks the current table
"""
import argparse
import ast
import dataclasses
import io
import os
import sys
import tokenize
import typing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from generated_table import print_or_check  # noqa: E402
from dpo_accel.config import schema  # noqa: E402

SCHEMA_PATH = os.path.join(REPO, "dpo_accel", "config", "schema.py")
WRAPPED = 100  # a trailing-comment line at least this long was wrapped by its author


def _comments(source: str) -> dict:
    """{line number: (comment text without '#', whether it stands alone on its line)}."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            alone = not tok.line[:tok.start[1]].strip()
            out[tok.start[0]] = (tok.string.lstrip("#").strip(), alone)
    return out


def _ends_thought(text: str) -> bool:
    return text.endswith((".", ")", ";", ":", "]"))


def field_docs(source: str) -> dict:
    """{(class name, field name): (type text, meaning)} for every annotated field of every class."""
    comments = _comments(source)
    lines = source.splitlines()
    docs = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = [s for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]
        taken = set()  # comment lines already given to a field (as a trailing comment's continuation)
        for f in fields:
            first, last = f.lineno, f.end_lineno
            parts = []
            above = []
            n = first - 1
            while n in comments and comments[n][1] and n not in taken:
                above.insert(0, comments[n][0])
                n -= 1
            parts += above
            trailing = [comments[n][0] for n in range(first, last + 1) if n in comments and not comments[n][1]]
            if trailing:
                parts += trailing
                n, prev = last + 1, last
                while (n in comments and comments[n][1] and comments[n][0][:1].islower()
                       and len(lines[prev - 1]) >= WRAPPED and not _ends_thought(comments[prev][0])):
                    parts.append(comments[n][0])
                    taken.add(n)
                    prev, n = n, n + 1
            docs[(node.name, f.target.id)] = (ast.unparse(f.annotation), " ".join(parts))
    return docs


def _yaml(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    return str(value)


def _cell(text: str, code: bool = False) -> str:
    """One table cell: pipes escaped; outside code spans, angle brackets too (else Markdown reads HTML)."""
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if code else text.replace("<", "&lt;").replace(">", "&gt;")


def reference_markdown() -> str:
    with open(SCHEMA_PATH, encoding="utf-8") as f:
        docs = field_docs(f.read())
    rows = ["| key | type | default | allowed values | meaning |", "| --- | --- | --- | --- | --- |"]
    for section, cls in typing.get_type_hints(schema.Recipe).items():
        default = cls()
        for fld in dataclasses.fields(cls):
            key = f"{section}.{fld.name}"
            type_text, meaning = docs[(cls.__name__, fld.name)]
            allowed = schema.CHOICES.get(key)
            allowed_text = ", ".join(f"`{_yaml(a)}`" for a in allowed) if allowed else ""
            value = _cell(_yaml(getattr(default, fld.name)), True)
            rows.append(f"| `{key}` | `{_cell(type_text, True)}` | `{value}` | {allowed_text} | {_cell(meaning)} |")
    return "\n".join(rows) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", metavar="FILE", help="fail when FILE does not contain the generated table")
    args = parser.parse_args(argv)
    table = reference_markdown()
    return print_or_check(table, args.check, "recipe reference", "python scripts/recipe_reference.py")


if __name__ == "__main__":
    sys.exit(main())
