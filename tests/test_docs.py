"""The README and docs/: the generated recipe reference matches the schema, the README stays a front page,
no development history leaks into the pages, every relative link resolves, and the recipes and example rows
the pages show load as the code reads them."""
import glob
import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
PAGES = [README] + sorted(glob.glob(os.path.join(REPO, "docs", "**", "*.md"), recursive=True))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def _anchors(path: str) -> set:
    text = re.sub(r"```.*?```", "", _read(path), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)}


def _links(path: str) -> list:
    text = re.sub(r"```.*?```", "", _read(path), flags=re.S)  # code blocks hold no links
    return [m.group(1) for m in LINK.finditer(text) if not re.match(r"[a-z]+:", m.group(1))]


def test_recipe_reference_page_matches_the_schema():
    proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "recipe_reference.py"), "--check",
                           os.path.join(REPO, "docs", "recipes.md")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.strip()


def test_recipe_reference_lists_every_key_with_its_choices():
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    try:
        from recipe_reference import reference_markdown
    finally:
        sys.path.pop(0)
    from dpo_accel.config.schema import CHOICES, all_keys

    rows = {line.split(" | ")[0].strip("| `"): line for line in reference_markdown().splitlines()[2:]}
    assert list(rows) == all_keys()
    for key, allowed in CHOICES.items():
        assert all(f"`{'null' if a is None else a}`" in rows[key] for a in allowed), rows[key]
    assert "QLoRA" in rows["model.load_in_4bit"]  # a trailing comment
    assert "peft LoRA adapter dir" in rows["lora.init_adapter"]  # comment lines above the field
    assert "one-line error if not" in rows["train.prefix_sharing"]  # the comment lines above the field
    assert rows["train.pack_pairs"].split(" | ")[-1].startswith("With prefix sharing")
    assert rows["eval.reward_model"].split(" | ")[-1].startswith("Local dir")  # not the field above's


def test_readme_is_a_front_page():
    lines = _read(README).splitlines()
    assert len(lines) <= 350, f"README.md has {len(lines)} lines; move detail to docs/"


@pytest.mark.parametrize("path", PAGES, ids=lambda p: os.path.relpath(p, REPO))
def test_no_development_history_in_the_pages(path):
    text = _read(path)
    for pattern in (r"issue \d+", r"this machine"):
        found = re.search(pattern, text, flags=re.I)
        assert not found, f"{os.path.relpath(path, REPO)}: '{found.group(0)}'; name the hardware and date instead"


@pytest.mark.parametrize("path", PAGES, ids=lambda p: os.path.relpath(p, REPO))
def test_every_relative_link_resolves(path):
    for link in _links(path):
        target, _, anchor = link.partition("#")
        full = os.path.normpath(os.path.join(os.path.dirname(path), target)) if target else path
        assert os.path.exists(full), f"{os.path.relpath(path, REPO)} links to missing {link}"
        if anchor and full.endswith(".md"):
            assert anchor in _anchors(full), f"{os.path.relpath(path, REPO)}: no heading for #{anchor} in {target}"


def test_readme_recipes_load(tmp_path):
    """Every recipe the README shows has only keys of the schema and values that pass validation."""
    from dpo_accel.config.load import load_recipe

    blocks = re.findall(r"```yaml\n(.*?)```", _read(README), flags=re.S)
    assert len(blocks) >= 3
    for i, block in enumerate(blocks):
        path = tmp_path / f"recipe_{i}.yaml"
        path.write_text(block)
        load_recipe(str(path))


def test_data_page_example_rows_are_their_formats():
    from dpo_accel.data.formats import detect_format

    text = _read(os.path.join(REPO, "docs", "data.md"))
    seen = set()
    for fmt, block in re.findall(r"\n\*\*(\w+)\*\*.*?```json\n(.*?)```", text, flags=re.S):
        for line in block.strip().splitlines():
            row = json.loads(line)
            assert detect_format(list(row), row) == fmt, line
            seen.add(fmt)
    assert seen == {"explicit", "conversational", "implicit", "hh", "sft", "unpaired"}
