"""PNG figures of a run's training and eval curves, from its ``metrics.jsonl``.

    python -m dpo_accel.evaluation.plots outputs/smollm2_arith_lora     # any finished (or running) run folder

Written at the end of every run too. Two files in the run folder:
  loss_accuracy.png  loss and reward accuracy, train and eval (the headline figure)
  curves.png         every curve the run logged: loss, reward accuracy and margin, chosen and
                     rejected log-probs and rewards, NLL, learning rate, grad norm, tokens/s

matplotlib is an optional extra (``pip install -e ".[plots]"``); without it no figure is drawn and
one line says how to get it. Each PNG records the curves drawn on it in a ``Curves`` text chunk
(``PIL.Image.open(path).text["Curves"]``), so a test or a script can check what a figure shows.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Optional

HINT = "no plots: matplotlib is not installed (pip install matplotlib, or pip install -e \".[plots]\")"

# (panel title, [(metric key, label)]); a panel is drawn when at least one of its keys was logged.
PANELS = (
    ("loss", [("loss", "train"), ("eval/loss", "eval")]),
    ("reward accuracy", [("rewards/accuracies", "train"), ("eval/rewards/accuracies", "eval")]),
    ("reward margin", [("rewards/margins", "train"), ("eval/rewards/margins", "eval")]),
    ("log-probs", [("logps/chosen", "chosen"), ("logps/rejected", "rejected"),
                   ("eval/logps/chosen", "eval chosen"), ("eval/logps/rejected", "eval rejected")]),
    ("rewards", [("rewards/chosen", "chosen"), ("rewards/rejected", "rejected"),
                 ("eval/rewards/chosen", "eval chosen"), ("eval/rewards/rejected", "eval rejected")]),
    ("NLL of chosen", [("nll", "train"), ("eval/nll", "eval")]),
    ("learning rate", [("learning_rate", "learning rate")]),
    ("grad norm", [("grad_norm", "grad norm")]),
    ("tokens/s", [("tokens_per_second", "real tokens"), ("processed_tokens_per_second", "processed")]),
)
HEADLINE = ("loss", "reward accuracy")


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"'{run_dir}' holds no metrics.jsonl; pass a run folder (train.output_dir)")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def series(rows: list[dict], key: str) -> tuple[list, list]:
    """(steps, values) of `key` over the rows that logged it."""
    points = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
    return [p[0] for p in points], [p[1] for p in points]


def _figure(plt, rows: list[dict], panels: list, title: str, path: str) -> list[str]:
    """Draw `panels` in a grid, save to `path`; returns the curves drawn ("panel: label")."""
    cols = min(3, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    curves = []
    for ax, (name, keys) in zip(axes.flat, panels):
        for key, label in keys:
            steps, values = series(rows, key)
            if not steps:
                continue
            marker = "o" if key.startswith("eval/") or len(steps) < 8 else None
            ax.plot(steps, values, label=label, marker=marker, markersize=3)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if len(ax.get_lines()) > 1:
            ax.legend(fontsize=7)
        curves += [f"{name}: {line.get_label()}" for line in ax.get_lines()]
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Curves": "; ".join(curves), "Software": "dpo_accel.evaluation.plots"})
    plt.close(fig)
    return curves


def plot_run(run_dir: str, title: Optional[str] = None) -> dict[str, list[str]]:
    """Write loss_accuracy.png and curves.png into `run_dir`; returns {path: curves drawn}, or {} (and
    prints the hint) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display is needed, or opened
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"[dpo_accel] {HINT}")
        return {}
    rows = read_metrics(run_dir)
    logged = {k for r in rows for k in r}
    panels = [(name, keys) for name, keys in PANELS if any(k in logged for k, _ in keys)]
    if not panels:
        return {}
    title = title or os.path.basename(os.path.abspath(run_dir))
    written = {}
    headline = [p for p in panels if p[0] in HEADLINE]
    for name, chosen in (("loss_accuracy.png", headline), ("curves.png", panels)):
        if chosen:
            path = os.path.join(run_dir, name)
            written[path] = _figure(plt, rows, chosen, title, path)
    return written


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m dpo_accel.evaluation.plots RUN_DIR", file=sys.stderr)
        return 2
    try:
        written = plot_run(args[0])
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path, curves in written.items():
        print(f"{path}: {len(curves)} curves")
    return 0


if __name__ == "__main__":
    sys.exit(main())
