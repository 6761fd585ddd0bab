"""Every command a user is shown is run by a test, checked, or marked as needing a GPU.

The commands: every line of a ```bash / ```sh block of README.md and docs/**/*.md (comment lines skipped,
`\\` continuing a line, `&&` separating commands), the lines of plain ``` blocks that start with a program
(the rest is output), inline `accelerate launch ...`, `python ...`, `pip install ...` and `tensorboard ...`
spans, and the indented `#   command` lines of the header comments of recipes/*.yaml and accelerate_configs/*.
Each distinct command (the same words, wherever it is shown) must be one of:

- run here, as shown or as a faithful equivalent: the same entry point, launch config, recipe and flags, in
  a temporary folder laid out like the repository, with a tiny random Llama (the real SmolLM2 tokenizer) in
  place of SmolLM2, 2 steps, small data and eval (TINY), local copies of hub datasets; training commands run
  in this process (``train.main``, what a one-process CPU launch runs), the several-process one through a
  real ``accelerate launch``;
- run by the existing test REUSED names (the test must exist and hold the command's tell-tale);
- a setup command (pip install, git clone, cd, wandb sync, tensorboard, pytest): what it names is checked;
- a template (X.yaml, <file>, ...) that a concrete command shown elsewhere matches, or an entry point named
  without arguments whose commands are shown elsewhere;
- marked ``# needs a GPU`` (a trailing comment on the command's last line), which is allowed only where CUDA
  is needed: a launch config without use_cpu, Slurm, or a 4-bit recipe. Marked commands still have to name
  existing files and parse (launcher flags, train.py arguments, the recipe with its overrides).
"""
from __future__ import annotations

import ast
import configparser
import functools
import glob
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest
import yaml

from conftest import REPO, free_port, reset_accelerate, stop_after

GPU_MARK = "# needs a GPU"
PROGRAMS = {"accelerate", "python", "pip", "git", "cd", "sbatch", "bash", "wandb", "tensorboard"}
INLINE_STARTS = ("accelerate launch ", "python ", "pip install ", "tensorboard ")
PAGES = ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "**", "*.md"),
                                                                          recursive=True))
HEADERS = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "recipes", "*.yaml"))
                 + glob.glob(os.path.join(REPO, "accelerate_configs", "*")))
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
PLACEHOLDER = re.compile(r"<[^>]*>|\.\.\.|\b[XY]\.yaml\b")  # RUN_DIR is filled in by its test


# ------------------------------------------------------------------------------------------ extraction

@dataclass(frozen=True)
class Command:
    where: str  # page:line
    text: str   # continuation lines joined, the comment dropped, spaces collapsed
    gpu: bool   # marked "# needs a GPU"

    @property
    def words(self) -> list[str]:
        return shlex.split(self.text)


def split_comment(line: str) -> tuple[str, str]:
    """A shell line's code and its trailing comment: the first '#' outside quotes that starts a word."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i], line[i:]
    return line, ""


def is_command(code: str) -> bool:
    """A line is a command when its first word (after VAR=value assignments) is a program users run."""
    try:
        words = shlex.split(code)
    except ValueError:  # unbalanced quotes: output or prose, not a command
        return False
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        words = words[1:]
    return bool(words) and words[0] in PROGRAMS


def shell_commands(lines: list[tuple[int, str]], where: str, strict: bool) -> list[Command]:
    """Commands of numbered shell lines: `\\` joins a line to the next, `&&` separates commands, comment
    lines are skipped, and so are output lines (lines that start with no program) unless `strict` (a bash
    block, where every line is a command and one that starts with no known program is kept, to fail)."""
    out, pending, start = [], "", None
    for number, line in lines:
        code, comment = split_comment(line)
        if code.rstrip().endswith("\\") and not comment:
            pending, start = pending + code.rstrip()[:-1] + " ", start or number
            continue
        code, start, pending = pending + code, start or number, ""
        if code.strip():
            for part in code.split("&&"):
                if strict or is_command(part):
                    out.append(Command(f"{where}:{start}", " ".join(part.split()), GPU_MARK in comment))
        start = None
    return out


def markdown_commands(text: str, page: str) -> list[Command]:
    """The commands of a page: shell and plain blocks, then inline spans (which may wrap a line)."""
    out = []
    for m in FENCE.finditer(text):
        if m.group(1) in ("", "bash", "sh"):
            first = text.count("\n", 0, m.start(2)) + 1
            lines = list(enumerate(m.group(2).splitlines(), first))
            out += shell_commands(lines, page, strict=m.group(1) != "")
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)  # same line numbers, no blocks
    for m in re.finditer(r"`([^`]+)`", prose):
        span = " ".join(m.group(1).split())
        if span.startswith(INLINE_STARTS):
            code, comment = split_comment(span)
            out.append(Command(f"{page}:{prose.count(chr(10), 0, m.start()) + 1}", code.strip(), GPU_MARK in comment))
    return out


def comment_commands(text: str, path: str) -> list[Command]:
    """The commands of a file's leading comment block: lines `#` + at least two spaces + a command."""
    lines = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith(("#!", "#SBATCH")):
            continue
        if not line.startswith("#"):
            break
        lines.append((number, line[1:] if re.match(r"#\s\s", line) else ""))  # prose ends a command
    return shell_commands(lines, path, strict=False)


def read(path: str) -> str:
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        return f.read()


def all_commands() -> list[Command]:
    return [c for p in PAGES for c in markdown_commands(read(p), p)] + [
        c for h in HEADERS for c in comment_commands(read(h), h)]


COMMANDS = all_commands()


def program(words: list[str]) -> tuple[dict, list[str]]:
    """The VAR=value assignments in front of a command, and its words after them."""
    env = {}
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        key, _, value = words[0].partition("=")
        env[key], words = value, words[1:]
    return env, words


def launch_split(words: list[str]) -> tuple[list[str], list[str]]:
    """`accelerate launch OPTIONS dpo_accel/train.py ARGS` -> (OPTIONS, ARGS)."""
    i = words.index("dpo_accel/train.py")
    return words[2:i], words[i + 1:]


def option(words: list[str], name: str, default=None):
    return words[words.index(name) + 1] if name in words else default


def sets_of(args: list[str]) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == "--set"]


def distinct(commands: list[Command]) -> list[Command]:
    """One command per text (the first place it is shown); a GPU mark anywhere marks it."""
    seen = {}
    for c in commands:
        seen[c.text] = Command(seen[c.text].where, c.text, seen[c.text].gpu or c.gpu) if c.text in seen else c
    return list(seen.values())


DISTINCT = distinct(COMMANDS)
MAIN_JOB = ("accelerate launch --config_file accelerate_configs/cpu_single.yaml dpo_accel/train.py "
            "--recipe recipes/smollm2_arith_lora.yaml")

# Commands an existing test already runs (that command, or the script behind it): the test, and a string its
# body must hold to show that it runs this command.
REUSED = {
    "accelerate launch --config_file accelerate_configs/cpu_single.yaml dpo_accel/train.py --recipe "
    "recipes/handbook_dpo.yaml": ("tests/test_handbook.py::test_handbook_dpo_recipe_runs_end_to_end", '"dpo")'),
    "accelerate launch --config_file accelerate_configs/cpu_single.yaml dpo_accel/train.py --recipe "
    "recipes/handbook_orpo.yaml": ("tests/test_handbook.py::test_handbook_orpo_recipe_runs_end_to_end", '"orpo")'),
    "accelerate launch --config_file accelerate_configs/cpu_single.yaml dpo_accel/train.py --recipe "
    "recipes/smollm2_arith_mixture.yaml": ("tests/test_mixture.py::test_shipped_mixture_recipe_trains_on_a_tiny_model",
                                           "smollm2_arith_mixture.yaml"),
    "accelerate launch --config_file accelerate_configs/cpu_single.yaml dpo_accel/train.py --recipe "
    "recipes/smollm2_arith_sft.yaml": ("tests/test_sft_pipeline.py::test_two_stage_recipes_run_as_documented",
                                       "launch(sft_cmd"),
    "accelerate launch --config_file accelerate_configs/cpu_single.yaml dpo_accel/train.py --recipe "
    "recipes/smollm2_arith_dpo_from_sft.yaml": ("tests/test_sft_pipeline.py::test_two_stage_recipes_run_as_documented",
                                                "launch(merged_cmd)"),
    "accelerate launch --config_file accelerate_configs/cpu_single.yaml dpo_accel/train.py --recipe "
    "recipes/smollm2_arith_dpo_from_sft.yaml --set model.model_name_or_path=smollm2-135m-instruct --set "
    "lora.init_adapter=outputs/smollm2_arith_sft/adapter": (
        "tests/test_sft_pipeline.py::test_two_stage_recipes_run_as_documented", "launch(adapter_cmd"),
    "accelerate launch -q ...": ("tests/test_bad_inputs.py::test_through_accelerate_launch_the_user_sees_the_one_line",
                                 '"-q"'),
    "python -m dpo_accel.inspect_recipe --recipe recipes/smollm2_arith_lora.yaml --gpu 24GB --gpu 80GB": (
        "tests/test_inspect.py::test_inspect_reads_no_weight_file_and_reports_plan_data_and_fit",
        'run_inspect(MAIN, "--gpu", "24GB", "--gpu", "80GB")'),
    "python -m dpo_accel.inspect_recipe --recipe recipes/qlora_8b_ultrafeedback.yaml --gpu 24GB --model-config "
    "model_configs/qwen2.5-7b-instruct.json": ("tests/test_gpu_recipes.py::test_qlora_dry_run_fits_one_24gb_gpu",
                                               'smol_dir, "--gpu", "24GB")'),
    "python -m dpo_accel.inspect_recipe --recipe recipes/zero3_8b_ultrafeedback.yaml --gpu 80GB --model-config "
    "model_configs/qwen2.5-7b-instruct.json --backend zero3 --processes 8": (
        "tests/test_gpu_recipes.py::test_zero3_dry_run_fits_eight_80gb_gpus",
        '"--backend", "zero3", "--processes", "8"'),
    "python -m dpo_accel.inspect_recipe --recipe recipes/smolvlm_rlaifv_lora.yaml --model-config "
    "model_configs/smolvlm-256m-instruct --gpu 24GB": (
        "tests/test_inspect_vision.py::test_smolvlm_recipe_fits_one_24gb_gpu",
        'smolvlm_dry_run(shapes_five, smol_dir, "--model-config", SMOLVLM_CONFIG, "--gpu", "24GB")'),
    "python -m benchmarks.bench_dpo_step --quick": ("tests/test_speed_options.py::test_benchmark_quick_smoke",
                                                    'bench.main(["--quick"'),
    "python -m benchmarks.bench_generation": ("tests/test_speed_options.py::test_generation_benchmark_smoke",
                                              "bench_generation.main(["),
    "python -m benchmarks.bench_memory": ("tests/test_speed_options.py::test_memory_benchmark_smoke",
                                          "bench_memory.main(["),
    "python -m benchmarks.bench_vision": ("tests/test_vision_train.py::test_vision_benchmark_smoke",
                                          "bench_vision.main(["),
    "python scripts/recipe_reference.py": ("tests/test_docs.py::test_recipe_reference_page_matches_the_schema",
                                           '"recipe_reference.py"'),
    "python scripts/loss_table.py": ("tests/test_objectives_e2e.py::test_readme_loss_table_matches_the_registry",
                                     '"loss_table.py"'),
    "python scripts/families_table.py": ("tests/test_families.py::test_families_table_is_the_checks_output",
                                         "families_table(results)"),
}


def config_of(cmd: Command):
    """The launch config a command uses: --config_file, or CONFIG= (the Slurm script's default otherwise)."""
    env, words = program(cmd.words)
    if words[:2] == ["accelerate", "launch"]:
        return option(words, "--config_file")
    if any(w.endswith("slurm_multinode.sh") for w in words):
        with open(os.path.join(REPO, "accelerate_configs", "slurm_multinode.sh")) as f:
            return env.get("CONFIG") or re.search(r"CONFIG=\$\{CONFIG:-(\S+)\}", f.read()).group(1)
    return None


def kind(cmd: Command):
    """How the command is covered (see the module docstring); None: it is not."""
    env, words = program(cmd.words)
    if cmd.gpu:
        return "gpu"
    if cmd.text in REUSED:
        return "reused"
    if words[0] in ("pip", "git", "cd", "wandb", "tensorboard"):
        return "setup"
    if PLACEHOLDER.search(cmd.text):
        return "template"
    if words[:3] == ["python", "-m", "pytest"]:
        return "pytest"
    if len(words) == 3 and words[:2] == ["python", "-m"] and any(
            o.text.startswith(cmd.text + " ") for o in DISTINCT):
        return "entry"  # the entry point named in prose; its commands with arguments are covered on their own
    if words[:2] == ["accelerate", "launch"]:
        if not os.path.isfile(os.path.join(REPO, config_of(cmd) or "-")):
            return None  # test_every_file_and_module_a_command_names_exists names it
        config = yaml.safe_load(read(config_of(cmd)))
        if config.get("use_cpu") and set(env) <= {"WANDB_MODE"}:
            return "train" if config["num_processes"] == 1 else "processes"
        return None
    scripts = {"dpo_accel.inspect_recipe": "inspect", "dpo_accel.evaluation.plots": "plots",
               "benchmarks.gpu_check": "gpu_check", "benchmarks.bench_dpo_step": "bench", "pyflakes": "pyflakes"}
    if words[:2] == ["python", "-m"] and words[2] in scripts and not env:
        return scripts[words[2]]
    if words[0] == "python" and re.fullmatch(r"scripts/make_\w+_dataset\.py", words[1]) and not env:
        return "dataset"
    return None


def of_kind(name: str) -> list[Command]:
    return [c for c in DISTINCT if kind(c) == name]


def ids(commands: list[Command]) -> list[str]:
    return [re.sub(r"accelerate_configs/|recipes/|dpo_accel/train.py |--config_file |\.yaml", "", c.text)[:90]
            for c in commands]


def template_regex(text: str):
    pattern = re.escape(text)
    for m in PLACEHOLDER.finditer(text):
        found = re.escape(m.group(0))
        choices = m.group(0)[1:-1].split("|") if m.group(0).startswith("<") and "|" in m.group(0) else None
        pattern = pattern.replace(found, "(?:" + "|".join(map(re.escape, choices)) + ")" if choices
                                  else r"[\w./-]+\.yaml" if m.group(0).endswith(".yaml") else r"\S.*", 1)
    return re.compile(pattern)


# --------------------------------------------------------------------------------- every command is covered

def test_the_commands_are_found_where_users_read_them():
    """The extractor sees the pages and headers: each recipe and launch config shows a command, and so do
    the README's install, main-job, resume and test sections."""
    places = {c.where.split(":")[0] for c in COMMANDS}
    assert set(HEADERS) <= places, sorted(set(HEADERS) - places)
    texts = {c.text for c in COMMANDS}
    for text in (MAIN_JOB, MAIN_JOB + " --resume", "pip install -e .", "python -m pytest -q"):
        assert text in texts, text
    assert not [c for c in COMMANDS if "\\" in c.text or "#" in c.text], "a continuation or comment left in"


def coverage_problems(commands: list[Command]) -> list[str]:
    """One line per command that is neither run, reused, checked, matched (a template) nor marked."""
    problems = []
    covered = [c for c in commands if kind(c) not in (None, "template", "entry")]
    for cmd in commands:
        k = kind(cmd)
        if k is None:
            problems.append(f"{cmd.where}: `{cmd.text}` is neither run by tests/test_commands.py nor marked "
                            f"`{GPU_MARK}` (a GPU config, or a program this module does not run?)")
        elif k == "template" and not any(template_regex(cmd.text).fullmatch(c.text) for c in covered):
            problems.append(f"{cmd.where}: no command shown anywhere is an instance of the template `{cmd.text}`")
    return problems


def test_every_command_is_run_checked_or_marked():
    problems = coverage_problems(DISTINCT)
    assert not problems, "\n".join(problems)


def cuda_needed(cmd: Command) -> bool:
    """The command cannot run on a CPU: its launch config wants GPUs, it goes through Slurm (asked for GPUs by
    the script's #SBATCH lines), or its recipe loads the model in 4 bits (bitsandbytes' kernels are CUDA's)."""
    env, words = program(cmd.words)
    config = config_of(cmd)
    if config is not None and os.path.isfile(os.path.join(REPO, config)) and not yaml.safe_load(read(config)).get(
            "use_cpu"):
        return True
    recipe = option(words, "--recipe") or next((w for w in words if w.startswith("recipes/")), None)
    return "sbatch" in words or bool(recipe and recipe_file(recipe).get("model", {}).get("load_in_4bit"))


def test_gpu_marks_only_where_cuda_is_needed():
    wrong = [f"{c.where}: `{c.text}` is marked but runs on a CPU" for c in DISTINCT if c.gpu and not cuda_needed(c)]
    assert not wrong, "\n".join(wrong)


def test_the_rules_catch_a_stale_or_unmarked_command():
    """The checks above can fail: an unmarked GPU launch, a mark on a CPU launch, a template nothing matches,
    an unknown program, and a recipe that does not exist are each caught."""
    gpu = "accelerate launch --config_file accelerate_configs/gpu_single.yaml dpo_accel/train.py --recipe recipes/{}"
    cpu = MAIN_JOB.replace("smollm2_arith_lora", "{}")
    bad = [Command("x.md:1", gpu.format("smollm2_arith_lora.yaml"), False),
           Command("x.md:2", "python -m dpo_accel.inspect_recipe --recipe <file> --gpu 99GB", False),
           Command("x.md:3", "make train", False)]
    assert len(coverage_problems(DISTINCT + bad)) == 3
    assert not cuda_needed(Command("x.md:4", cpu.format("smollm2_arith_full"), True))
    assert cuda_needed(Command("x.md:5", gpu.format("smollm2_arith_lora.yaml"), True))
    assert missing_paths([Command("x.md:6", cpu.format("tiny_test"), False)]) == ["x.md:6: recipes/tiny_test.yaml"]


def test_the_extractor_joins_continuations_and_skips_comments_output_and_prose():
    page = """Run `accelerate launch --config_file
accelerate_configs/cpu_single.yaml dpo_accel/train.py` or `--set a=b`:

```bash
# a comment
pip install -e . && python -m pytest -q   # two commands
accelerate launch --config_file accelerate_configs/fsdp2.yaml dpo_accel/train.py \\
    --recipe recipes/smollm2_arith_full.yaml   # needs a GPU
```

```
== plan (output, not a command)
python -m dpo_accel.inspect_recipe --recipe r.yaml
```
"""
    got = [(c.where, c.text, c.gpu) for c in markdown_commands(page, "p.md")]
    assert got == [("p.md:6", "pip install -e .", False), ("p.md:6", "python -m pytest -q", False),
                   ("p.md:7", "accelerate launch --config_file accelerate_configs/fsdp2.yaml dpo_accel/train.py "
                              "--recipe recipes/smollm2_arith_full.yaml", True),
                   ("p.md:13", "python -m dpo_accel.inspect_recipe --recipe r.yaml", False),
                   ("p.md:1", "accelerate launch --config_file accelerate_configs/cpu_single.yaml dpo_accel/train.py",
                    False)]
    header = ("#!/bin/bash\n# Prose: python is named here.\n#   bash run.sh \\\n#       x.yaml   # needs a GPU\n"
              "key: 1\n#   bash\n")
    got = [(c.where, c.text, c.gpu) for c in comment_commands(header, "h.sh")]
    assert got == [("h.sh:3", "bash run.sh x.yaml", True)]


@functools.lru_cache(maxsize=None)
def readme_recipes() -> dict:
    """The README's example recipes, by the file name their first comment gives them."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```yaml\n(.*?)```", f.read(), flags=re.S)
    return {m.group(1): block for block in blocks if (m := re.match(r"# (my_\w+\.yaml):", block))}


def recipe_file(path: str) -> dict:
    if path in readme_recipes():
        return yaml.safe_load(readme_recipes()[path])
    with open(os.path.join(REPO, path)) as f:
        return yaml.safe_load(f)


REPO_DIRS = ("accelerate_configs/", "recipes/", "model_configs/", "scripts/", "dpo_accel/", "benchmarks/", "tests/",
             "data/")


def missing_paths(commands: list[Command]) -> list[str]:
    """Paths into the repository, the README's example recipes and `python -m` modules that do not exist."""
    missing = []
    for cmd in commands:
        env, words = program(cmd.words)
        for word in words + list(env.values()):
            if word.startswith(REPO_DIRS) and not PLACEHOLDER.search(word) and "*" not in word:
                if not os.path.exists(os.path.join(REPO, word)):
                    missing.append(f"{cmd.where}: {word}")
            elif word.endswith(".yaml") and "/" not in word and not PLACEHOLDER.search(word) \
                    and word not in readme_recipes():
                missing.append(f"{cmd.where}: {word} (not a recipe of the README)")
        if words[:2] == ["python", "-m"] and importlib.util.find_spec(words[2]) is None:
            missing.append(f"{cmd.where}: module {words[2]}")
    return missing


def test_every_file_and_module_a_command_names_exists():
    """Also in the commands marked as needing a GPU, which no test runs."""
    missing = missing_paths(DISTINCT)
    assert not missing, "\n".join(missing)


def test_gpu_commands_parse_as_their_tools_read_them():
    """What no test can run on a CPU is still read by the launcher, train.py and the recipe loader: flags that
    exist, a recipe that loads with the command's overrides."""
    from accelerate.commands.launch import launch_command_parser

    from dpo_accel import train
    from dpo_accel.config.load import load_recipe

    gpu = [c for c in DISTINCT if c.gpu]
    assert len(gpu) >= 10
    for cmd in gpu:
        env, words = program(cmd.words)
        if words[:2] == ["accelerate", "launch"]:
            options, args = launch_split(words)
            launch_command_parser().parse_args(options + ["dpo_accel/train.py"])
        else:  # the Slurm script: RECIPE then train.py's arguments
            script = next(i for i, w in enumerate(words) if w.endswith("slurm_multinode.sh"))
            args = ["--recipe", words[script + 1], *words[script + 2:]]
        parsed = train.parse_args(args)
        if parsed.recipe in readme_recipes():
            load_recipe_text(readme_recipes()[parsed.recipe], parsed.set)
        else:
            load_recipe(os.path.join(REPO, parsed.recipe), parsed.set)


def load_recipe_text(text: str, sets: list[str]):
    """A recipe given as text (the README's examples), loaded and validated as the command would load it."""
    import tempfile

    from dpo_accel.config.load import load_recipe

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "recipe.yaml")
        with open(path, "w") as f:
            f.write(text)
        return load_recipe(path, sets)


@pytest.mark.parametrize("text", sorted(REUSED))
def test_reused_test_runs_the_command(text):
    """Each command left to another test is still shown, and that test exists and runs it."""
    assert text in {c.text for c in DISTINCT}, f"`{text}` is no longer shown; drop it from REUSED"
    node, needle = REUSED[text]
    path, name = node.split("::")
    with open(os.path.join(REPO, path)) as f:
        source = f.read()
    found = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef) and n.name == name]
    assert found, f"{node} does not exist"
    assert needle in ast.get_source_segment(source, found[0]), f"{node} no longer holds {needle!r}"


# ------------------------------------------------------------------------------------- the commands, run

SMOLLM2 = "smollm2-135m-instruct"
# 2 steps on 16 pairs, 8 held-out pairs, no held-out generations but where the command is about them.
TINY = ["data.max_train_samples=16", "data.max_eval_samples=8", "train.max_steps=2", "train.save_steps=1",
        "train.logging_steps=1"]
GENERATIONS = ["eval.generation_prompts=2", "eval.max_new_tokens=4"]
# A random model finishes no answer and gets no sum right, so its sampled answers would give no pair: the
# generated-pairs loops score by length and keep answers cut off (iterative DPO stops on a round without
# pairs); short answers, and one round of 4 prompts.
SAMPLED = ["train.online_verifier=scorer.py:by_length", "train.online_missing_eos_penalty=0.0",
           "train.online_max_new_tokens=4"]
ROUNDS = ["train.iterative_rounds=1", "train.iterative_prompts=4"]
HUB_MODELS = {"Qwen/Qwen2.5-7B-Instruct": "model_configs/qwen2.5-7b-instruct.json"}


@dataclass
class Workspace:
    root: str
    tiny: str   # the tiny random Llama with SmolLM2's tokenizer
    runs: dict  # command text -> its output folder (relative to root)

    def stand_in(self, model: str):
        """The tiny random model that replaces a recipe's `model` in a run, or None (the test then fails: a
        shipped model is never trained here)."""
        if model == SMOLLM2:
            return self.tiny
        if model == "tiny-vlm-smollm2":  # SmolLM2-135M inside a LLaVA: the same LLaVA around the tiny Llama
            path = os.path.join(self.root, "tiny_llava")
            if not os.path.isdir(path):
                save_tiny_llava(self.tiny, path)
            return path
        return None


def save_tiny_llava(tiny_llama: str, path: str) -> None:
    """The tiny VLM's layout (dpo_accel/model/tiny_vlm.py: processor, SigLIP tower, projector) with the tiny
    Llama's shape as its language model, random weights."""
    import torch
    from transformers import AutoConfig, LlavaForConditionalGeneration

    from dpo_accel.model.tiny_vlm import build_processor, llava_config, set_generation_tokens

    processor = build_processor(tiny_llama)
    text = AutoConfig.from_pretrained(tiny_llama)
    text.vocab_size = len(processor.tokenizer)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(llava_config(text, processor))
    set_generation_tokens(model, processor.tokenizer)
    model.save_pretrained(path)
    processor.save_pretrained(path)


def _pairs(n: int, split: str = "train") -> list[dict]:
    with open(os.path.join(REPO, "data", "arith_prefs", f"{split}.jsonl")) as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def _write_rows(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def hub_mirrors(root: str) -> dict:
    """Local stand-ins for the hub datasets the README names, in their own formats and split names."""
    def turns(r, answer):
        return [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r[answer]}]

    hh = os.path.join(root, "hub", "hh-rlhf")
    uf = os.path.join(root, "hub", "ultrafeedback_binarized")
    for split, n in (("train", 32), ("eval", 8)):
        rows = _pairs(n, split)
        _write_rows(os.path.join(hh, f"{'test' if split == 'eval' else split}-00000.jsonl"),
                    [{a: f"\n\nHuman: {r['prompt']}\n\nAssistant: {r[a]}" for a in ("chosen", "rejected")}
                     for r in rows])
        _write_rows(os.path.join(uf, f"{'test' if split == 'eval' else 'train'}_prefs-00000.jsonl"),
                    [{"prompt": r["prompt"], "chosen": turns(r, "chosen"), "rejected": turns(r, "rejected")}
                     for r in rows])
    return {"Anthropic/hh-rlhf": hh, "HuggingFaceH4/ultrafeedback_binarized": uf}


@pytest.fixture(scope="module")
def workspace(tiny_model_dir, tmp_path_factory) -> Workspace:
    """A folder laid out like the repository, where the commands run as shown: their relative paths (data/...,
    outputs/...) resolve here, one run's outputs/ feed the next command, and the README's example recipes and
    its own-JSONL folder data/my_prefs exist as a user would have made them."""
    root = str(tmp_path_factory.mktemp("commands"))
    for name in ("recipes", "accelerate_configs", "model_configs", "dpo_accel"):
        os.symlink(os.path.join(REPO, name), os.path.join(root, name))
    for name in os.listdir(os.path.join(REPO, "data")):
        os.makedirs(os.path.join(root, "data"), exist_ok=True)
        os.symlink(os.path.join(REPO, "data", name), os.path.join(root, "data", name))
    _write_rows(os.path.join(root, "data", "my_prefs", "train.jsonl"), _pairs(32))
    _write_rows(os.path.join(root, "data", "my_prefs", "eval.jsonl"), _pairs(8, "eval"))
    for name, text in readme_recipes().items():
        with open(os.path.join(root, name), "w") as f:
            f.write(text)
    with open(os.path.join(root, "scorer.py"), "w") as f:
        f.write("def by_length(prompts, answers):\n    return [float(len(a)) for a in answers]\n")
    return Workspace(root, tiny_model_dir, {})


def training_args(ws: Workspace, cmd: Command) -> tuple[list[str], str]:
    """train.py's arguments for the command: its own, its model swapped for a tiny stand-in, then TINY (and
    SAMPLED for generated pairs); and the run's output folder (the recipe's, or a fresh one if taken)."""
    from dpo_accel.config.load import load_recipe

    args = [a for a in launch_split(program(cmd.words)[1])[1] if a != "--resume"]
    args = [re.sub(r"^model\.model_name_or_path=(.+)$",
                   lambda m: f"model.model_name_or_path={ws.stand_in(m.group(1)) or m.group(1)}", a) for a in args]
    recipe = load_recipe(option(args, "--recipe"), sets_of(args))
    shown = {s.split("=")[0] for s in sets_of(args)}
    extra = TINY + (SAMPLED if recipe.train.online_generations else []) + (
        ROUNDS if recipe.train.iterative_rounds else [])
    if recipe.eval.generation_prompts:
        extra += GENERATIONS if cmd.text == MAIN_JOB or recipe.eval.reward_model else ["eval.generation_prompts=0"]
    model = recipe.model.model_name_or_path
    if ws.stand_in(model):
        extra.append(f"model.model_name_or_path={ws.stand_in(model)}")
    else:  # another command's output (outputs/...), or the tiny model already swapped in by the command's own --set
        assert model.startswith(("outputs/", ws.root)) or model in (ws.tiny, os.path.join(ws.root, "tiny_llava")), \
            f"{cmd.where}: no tiny stand-in for the model {model}; add one to Workspace.stand_in"
    assert not shown & {s.split("=")[0] for s in extra}, "the test would change a key the command sets"
    out, n = recipe.train.output_dir, 0
    while os.path.exists(os.path.join(ws.root, out)):  # taken by another command's run of the same recipe
        out, n = f"outputs/run_{n}", n + 1
    extra.append(f"train.output_dir={out}")
    return args + [x for s in extra for x in ("--set", s)], out


def run_training(ws: Workspace, cmd: Command) -> str:
    """The command in this process (train.main, as `accelerate launch` of one CPU process runs it), once per
    session; first the commands whose outputs it reads (outputs/<run>/...); --resume continues a copy of the
    command's run stopped after its step-1 checkpoint. Returns the run's folder."""
    from dpo_accel import train

    if cmd.text in ws.runs:
        return ws.runs[cmd.text]
    for needed in re.findall(r"=(outputs/\w+)/", cmd.text):
        producer = next(c for c in of_kind("train") if yaml_output_dir(c) == needed)
        assert run_training(ws, producer) == needed, f"{producer.text} did not write {needed}"
    args, out = training_args(ws, cmd)
    if "--resume" in cmd.words:
        base = run_training(ws, Command(cmd.where, cmd.text.replace(" --resume", ""), False))
        shutil.copytree(os.path.join(ws.root, base), os.path.join(ws.root, out))
        stop_after(os.path.join(ws.root, out), 1)
        args.append("--resume")
    reset_accelerate()
    try:
        code = train.main(args)
    finally:
        reset_accelerate()
    assert code == 0, f"`{cmd.text}` exited {code}"
    ws.runs[cmd.text] = out
    return out


def yaml_output_dir(cmd: Command) -> str:
    recipe = recipe_file(option(cmd.words, "--recipe"))
    return (recipe.get("train") or recipe).get("output_dir")  # sectioned, or a flat handbook recipe


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


FAST = (MAIN_JOB, MAIN_JOB + " --resume")  # the other recipes' runs are end-to-end runs: slow (3 to 9 s each)


@pytest.mark.parametrize("cmd", [pytest.param(c, id=i, marks=() if c.text in FAST else pytest.mark.slow)
                                 for c, i in zip(of_kind("train"), ids(of_kind("train")))])
def test_training_command_runs(cmd, workspace, monkeypatch, capsys):
    """Each training command runs to its second step and writes its metrics, summary and exported model; the
    resumed run says so, the judged one writes judge.json, the offline W&B one its run (without wandb installed
    it is refused in one line that says to install it)."""
    monkeypatch.chdir(workspace.root)
    env, _ = program(cmd.words)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if "wandb" in cmd.text and not importlib.util.find_spec("wandb"):  # refused in one line, before any compute
        with pytest.raises(AssertionError, match="exited 2"):
            run_training(workspace, cmd)
        assert "train.report_to names wandb, which is not installed: pip install wandb" in capsys.readouterr().err
        return
    out = os.path.join(workspace.root, run_training(workspace, cmd))
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    rounds = sorted(glob.glob(os.path.join(out, "round_*")))
    for folder in rounds or [out]:
        steps = [r["step"] for r in read_jsonl(os.path.join(folder, "metrics.jsonl")) if "loss" in r]
        assert steps and steps[-1] == 2, (folder, steps)
        assert os.path.isfile(os.path.join(folder, "model", "config.json"))
    if "--resume" in cmd.words:
        assert "resumed at step 1" in capsys.readouterr().out and summary["global_step"] == 2
    if "eval.reward_model=" in cmd.text:
        assert os.path.isfile(os.path.join(out, "judge.json"))
    if "wandb" in cmd.text:
        assert glob.glob(os.path.join(workspace.root, "wandb", "offline-run-*")), "no offline wandb run"
    if cmd.text == MAIN_JOB:
        assert "| held-out measure (2 generations) | before | after |" in summary["table"]


@pytest.mark.slow  # a real launch of 2 gloo ranks: 10 to 30 s on two cores
@pytest.mark.parametrize("cmd", of_kind("processes"), ids=ids(of_kind("processes")))
def test_launch_of_several_cpu_processes_runs(cmd, workspace, monkeypatch):
    """`accelerate launch` itself, with the command's config (a free port in place of the fixed one)."""
    monkeypatch.chdir(workspace.root)
    options, _ = launch_split(cmd.words)
    args, out = training_args(workspace, cmd)
    config = yaml.safe_load(open(os.path.join(REPO, option(options, "--config_file"))))
    command = [sys.executable, "-m", "accelerate.commands.launch", *options, "--main_process_port", str(free_port()),
               "dpo_accel/train.py", *args]
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=workspace.root, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert f"| {config['num_processes']} process(es)" in proc.stdout, proc.stdout[-2000:]
    with open(os.path.join(workspace.root, out, "summary.json")) as f:
        assert json.load(f)["global_step"] == 2


def dry_run_args(ws: Workspace, cmd: Command) -> list[str]:
    """inspect's arguments for the command: its own, with the hub's datasets and models (which need a network)
    swapped for local copies in their formats and split names, and a hub model's shape for its config.json."""
    args = cmd.words[3:]
    mirrors = hub_mirrors(ws.root)
    args = [re.sub(r"=(\S+)$", lambda m: "=" + mirrors.get(m.group(1), m.group(1)), a) for a in args]
    recipe = recipe_file(option(args, "--recipe"))
    model = recipe.get("model", {}).get("model_name_or_path")
    if recipe.get("data", {}).get("dataset_name") in mirrors and not any(
            s.startswith("data.dataset_name=") for s in sets_of(args)):
        args += ["--set", f"data.dataset_name={mirrors[recipe['data']['dataset_name']]}"]
    if model in HUB_MODELS:
        args += ["--set", f"model.tokenizer_name_or_path={ws.tiny}"]
        args += [] if "--model-config" in args else ["--model-config", HUB_MODELS[model]]
    return args


@pytest.mark.parametrize("cmd", of_kind("inspect"), ids=ids(of_kind("inspect")))
def test_dry_run_command_runs(cmd, workspace, monkeypatch, capsys):
    from dpo_accel import inspect_recipe

    monkeypatch.chdir(workspace.root)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub id left unswapped fails here instead of downloading
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    code = inspect_recipe.main(dry_run_args(workspace, cmd))
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    assert "== plan" in out and "== data" in out and "(no weights loaded)" in out, out[-2000:]
    for gpu in re.findall(r"--gpu (\S+)", cmd.text):
        assert re.search(rf"-- {gpu} .*\n(.*\n)*?  fits: (yes|NO)", out), f"no estimate for {gpu}"


@pytest.mark.parametrize("cmd", of_kind("dataset"), ids=ids(of_kind("dataset")))
def test_dataset_script_command_rewrites_the_shipped_files(cmd, tmp_path, monkeypatch):
    """The command in an empty folder writes, under its --out (or default) folder, exactly the shipped files."""
    import runpy

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", cmd.words[1:])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts scripts/ first; not for later tests
    runpy.run_path(os.path.join(REPO, cmd.words[1]), run_name="__main__")
    written = [os.path.relpath(p, tmp_path) for p in glob.glob(str(tmp_path / "**" / "*"), recursive=True)
               if os.path.isfile(p)]
    assert written, "the script wrote nothing"
    for name in written:
        with open(tmp_path / name, "rb") as new, open(os.path.join(REPO, name), "rb") as shipped:
            assert new.read() == shipped.read(), f"{name} differs from the shipped file"


@pytest.mark.parametrize("cmd", of_kind("pyflakes"), ids=ids(of_kind("pyflakes")))
def test_pyflakes_command_passes(cmd):
    proc = subprocess.run([sys.executable, *cmd.words[1:]], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]


@pytest.mark.parametrize("cmd", of_kind("gpu_check"), ids=ids(of_kind("gpu_check")))
def test_gpu_check_command_runs(cmd, tmp_path, monkeypatch, capsys):
    """On a CPU it says there is no GPU and exits 0 (so it is not marked); on a GPU it writes its table."""
    import torch

    from benchmarks import gpu_check

    monkeypatch.chdir(tmp_path)
    assert gpu_check.main(cmd.words[3:]) == 0
    if torch.cuda.is_available():
        assert (tmp_path / "gpu_check.md").is_file()
    else:
        assert "no CUDA GPU" in capsys.readouterr().out


@pytest.mark.parametrize("cmd", of_kind("bench"), ids=ids(of_kind("bench")))
def test_benchmark_command_runs_on_the_tiny_model(cmd, tmp_path, capsys):
    """Every flag as shown, with --quick (a tiny random model), rows in this process, one round, 16 pairs and
    one short length for a sweep; trl's rows run where trl is installed and are skipped where not."""
    from benchmarks import bench_dpo_step as bench

    small = {"--repeats": "1", "--pairs": "16", "--sweep": "128", "--json": str(tmp_path / "bench.json")}
    words = cmd.words[3:]
    args = [small.get(words[i - 1], w) if i else w for i, w in enumerate(words)]
    if "--json" not in words:
        args += ["--json", small["--json"]]
    assert bench.main(args + ["--quick", "--no-subprocess"]) == 0, capsys.readouterr().out[-3000:]
    with open(tmp_path / "bench.json") as f:
        result = json.load(f)
    missing = {"trl"} if not importlib.util.find_spec("trl") else set()
    ran = {r["name"] for r in result["rows"]}
    asked = set() if "--only-sweep" in words else set(option(words, "--configs").split(","))
    assert ran == asked - missing, ran
    assert [p["tokens"] for p in result.get("sweep") or []] == ([128] if "--sweep" in words else [])
    if "--sweep-configs" in words:
        swept = {r["name"] for p in result["sweep"] for r in p["rows"]}
        assert swept == set(option(words, "--sweep-configs").split(",")) - missing, swept


@pytest.mark.parametrize("cmd", of_kind("plots"), ids=ids(of_kind("plots")))
def test_plots_command_draws_a_runs_curves(cmd, workspace, monkeypatch):
    """RUN_DIR is the main job's run (its own PNGs removed first, so the command is what draws them)."""
    from dpo_accel.evaluation import plots

    monkeypatch.chdir(workspace.root)
    run = os.path.join(workspace.root, "outputs", "plotted")
    shutil.copytree(os.path.join(workspace.root, run_training(workspace, main_job())), run)
    for png in ("curves.png", "loss_accuracy.png"):
        os.remove(os.path.join(run, png))
    assert plots.main([run if w == "RUN_DIR" else w for w in cmd.words[3:]]) == 0
    assert all(os.path.getsize(os.path.join(run, png)) > 0 for png in ("curves.png", "loss_accuracy.png"))


def main_job() -> Command:
    return next(c for c in DISTINCT if c.text == MAIN_JOB)


# ------------------------------------------------------------------------------ setup commands, checked

def setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    return cfg


def requirement_lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().splitlines() if line.strip()]


def ci_installs() -> dict:
    """What .ci/run installs: package name -> (its flags, its pinned version or None)."""
    installs = {}
    with open(os.path.join(REPO, ".ci", "run")) as f:
        for line in f:
            if "pip install" in line:
                words = shlex.split(line.split("#")[0])
                words = words[words.index("install") + 1:]
                flags = {w for w in words if w.startswith("-") and w != "--quiet"}
                for req in (w for w in words if not w.startswith("-")):
                    name, _, version = req.partition("==")
                    installs[name] = (flags, version or None)
    return installs


def named_by_the_code(name: str) -> bool:
    """The package is imported or looked up by dpo_accel or the benchmarks, or is a tracker that
    `train.report_to` hands to Accelerate."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    if name in LOGGER_TYPE_TO_CLASS:
        return True
    for path in glob.glob(os.path.join(REPO, "dpo_accel", "**", "*.py"), recursive=True) + glob.glob(
            os.path.join(REPO, "benchmarks", "*.py")):
        with open(path) as f:
            if re.search(rf"\b{re.escape(name)}\b", f.read()):
                return True
    return False


def check_pip(words: list[str]) -> None:
    """The extras exist; a package is a dependency, what CI installs (the same way) or what the code uses;
    a pinned version is CI's and meets setup.cfg's requirement."""
    from packaging.requirements import Requirement

    cfg = setup_cfg()
    extras = {k: requirement_lines(v) for k, v in cfg["options.extras_require"].items()}
    requires = {Requirement(r).name: Requirement(r) for r in requirement_lines(cfg["options"]["install_requires"])
                + [r for rs in extras.values() for r in rs]}
    flags = {w for w in words if w.startswith("-")}
    assert flags <= {"-e", "--no-deps"}, flags
    ci = ci_installs()
    for req in (w for w in words if not w.startswith("-")):
        local = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", req)
        if local:
            assert "-e" in flags and cfg["metadata"]["name"] == "dpo_accel"
            assert set((local.group(1) or "").split(",")) - {""} <= set(extras), f"no such extra: {req}"
            continue
        name, _, version = req.partition("==")
        assert name in requires or name in ci or named_by_the_code(name), f"{name}: nothing uses it"
        if name in ci:
            assert ci[name] == (flags - {"-e"}, version or None), f"{req}: .ci/run installs {name} as {ci[name]}"
        if version and name in requires:
            assert requires[name].specifier.contains(version), f"{req} does not meet setup.cfg's {requires[name]}"


@pytest.mark.parametrize("cmd", of_kind("setup"), ids=ids(of_kind("setup")))
def test_setup_command_names_what_exists(cmd):
    _, words = program(cmd.words)
    page = [c for c in COMMANDS if c.where.split(":")[0] == cmd.where.split(":")[0]]
    if words[:2] == ["pip", "install"]:
        check_pip(words[2:])
    elif words[:2] == ["git", "clone"] or words[0] == "cd":
        assert words[-1] == setup_cfg()["metadata"]["name"], "the clone's folder is the project's name"
        assert words[0] == "git" or any(c.text.startswith("git clone ") and c.words[-1] == words[1] for c in page)
    elif words[0] == "tensorboard":  # a run's events: <output_dir>/logs of a shipped recipe, a dependency
        assert "tensorboard" in setup_cfg()["options"]["install_requires"]
        runs = {f"{yaml_output_dir(Command('', f'--recipe {os.path.relpath(p, REPO)}', False))}/logs"
                for p in glob.glob(os.path.join(REPO, "recipes", "*.yaml"))}
        assert option(words, "--logdir") in runs, f"{option(words, '--logdir')} is no recipe's output_dir/logs"
    elif words[:2] == ["wandb", "sync"]:
        assert "pip install wandb" in {c.text for c in page}
        assert any(program(c.words)[0].get("WANDB_MODE") == "offline" for c in page), "nothing logs offline"
        assert words[2] == "wandb/offline-run-*"  # where WANDB_MODE=offline writes a run
    else:
        raise AssertionError(f"{cmd.where}: no check for `{cmd.text}`")


@pytest.mark.parametrize("cmd", of_kind("pytest"), ids=ids(of_kind("pytest")))
def test_pytest_command_names_what_exists(cmd):
    """Test files that exist, markers that are registered; the whole suite is what CI runs."""
    markers = {line.split(":")[0].strip() for line in requirement_lines(setup_cfg()["tool:pytest"]["markers"])}
    words = cmd.words[3:]
    for i, word in enumerate(words):
        if words[i - 1] == "-m" and i:
            assert set(re.findall(r"\w+", word)) - {"and", "or", "not"} <= markers, word
        elif not word.startswith("-"):
            assert os.path.exists(os.path.join(REPO, word)), word
        else:
            assert word in ("-q", "-s", "-m", "-x", "-ra"), word
    with open(os.path.join(REPO, ".ci", "run")) as f:
        assert "python -m pytest -q" in f.read()
