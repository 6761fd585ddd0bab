"""Plots of a run folder: valid PNGs with the expected curves, the CLI, and no matplotlib."""
from __future__ import annotations

import json
import sys

import pytest

from conftest import curves_of
from dpo_accel.evaluation import plots


def write_run(path, eval_steps=(2, 4), with_rewards=True):
    rows = []
    for step in range(1, 5):
        row = {"step": step, "loss": 0.7 - 0.1 * step, "logps/chosen": -20.0 + step, "grad_norm": 1.0 / step,
               "learning_rate": 1e-4, "tokens_per_second": 500.0, "processed_tokens_per_second": 400.0}
        if with_rewards:
            row.update({"rewards/chosen": 0.1 * step, "rewards/rejected": -0.1 * step, "rewards/margins": 0.2 * step,
                        "rewards/accuracies": 0.5, "logps/rejected": -30.0})
        else:
            row["nll"] = 2.0 / step
        rows.append(row)
        if step in eval_steps:
            rows.append({"step": step, "eval/loss": 0.6, "eval/rewards/accuracies": 0.6, "eval/rewards/margins": 0.3})
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plot_run_writes_pngs_with_every_logged_curve(tmp_path):
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "run")
    written = plots.plot_run(str(tmp_path / "run"))
    assert sorted(written) == [str(tmp_path / "run" / "curves.png"), str(tmp_path / "run" / "loss_accuracy.png")]
    assert curves_of(str(tmp_path / "run" / "loss_accuracy.png")) == [
        "loss: train", "loss: eval", "reward accuracy: train", "reward accuracy: eval"]
    curves = curves_of(str(tmp_path / "run" / "curves.png"))
    # 2 loss + 2 accuracy + 2 margin + 2 log-probs + 2 rewards + lr + grad norm + 2 tokens/s; no NLL panel
    assert len(curves) == 14 and curves == written[str(tmp_path / "run" / "curves.png")]
    assert "log-probs: rejected" in curves and not any(c.startswith("NLL") for c in curves)

    # An sft-like run (no rejected side, no eval): only the panels it logged
    write_run(tmp_path / "sft", eval_steps=(), with_rewards=False)
    curves = curves_of(list(plots.plot_run(str(tmp_path / "sft")))[1])
    assert curves == ["loss: train", "log-probs: chosen", "NLL of chosen: train", "learning rate: learning rate",
                      "grad norm: grad norm", "tokens/s: real tokens", "tokens/s: processed"]


def test_cli_and_missing_run(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "run")
    assert plots.main([str(tmp_path / "run")]) == 0
    assert "curves.png: 14 curves" in capsys.readouterr().out
    assert plots.main([str(tmp_path / "nothing")]) == 2
    assert "holds no metrics.jsonl" in capsys.readouterr().err


def test_without_matplotlib_no_plot_and_one_line_hint(tmp_path, monkeypatch, capsys):
    write_run(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert plots.plot_run(str(tmp_path / "run")) == {}
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "matplotlib is not installed" in out
    assert not (tmp_path / "run" / "curves.png").exists()
