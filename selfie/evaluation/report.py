"""report.json, report.md and report.png for each kind of evaluation, all written atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from matplotlib.figure import Figure

from selfie.io import atomic_write_json, atomic_write_text


def _ci(ci: list[float]) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _name(model: str, adapter: str | None) -> str:
    return f"{model} + {adapter}" if adapter else model


def markdown(report: dict) -> str:
    kind = report["kind"]
    lines = [f"# selfie eval {kind}", "", f"judge: `{report['judge']}`", ""]
    if kind == "winrate":
        a, b = report["a"], report["b"]
        lines += [
            "| A | B | win rate of A | 95% CI | length-adjusted | 95% CI | wins | ties | losses | n "
            "| mean score A | mean score B | mean length A (chars) | mean length B (chars) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            f"| {_name(a['model'], a['adapter'])} | {_name(b['model'], b['adapter'])} | {report['win_rate']:.3f} "
            f"| {_ci(report['ci95'])} | {report['length_adjusted_win_rate']:.3f} | {_ci(report['length_adjusted_ci95'])} | {report['wins']} "
            f"| {report['ties']} | {report['losses']} | {report['n']} | {a['score_mean']:.4f} | {b['score_mean']:.4f} "
            f"| {a['chars_mean']:.0f} | {b['chars_mean']:.0f} |",
            "",
            "Lengths in characters; the length-adjusted win rate is the fitted win rate at equal length "
            "(a logistic regression on the length difference alone: not AlpacaEval 2.0's length-controlled win rate, "
            "docs/METHOD.md 4.3).",
        ]
    elif kind == "accuracy":
        lines += [
            "| preferences | accuracy | 95% CI | ties | n | mean margin |",
            "|---|---|---|---|---|---|",
            f"| {report['preferences']} | {report['accuracy']:.3f} | {_ci(report['ci95'])} | {report['ties']} "
            f"| {report['n']} | {report['margin_mean']:.4f} |",
        ]
    else:
        lines += [
            f"run: `{report['run_dir']}`",
            "",
            "| model | mean score | 95% CI | n | mean length (chars) |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {row['label']} | {row['score_mean']:.4f} | {_ci(row['ci95'])} | {row['n']} | {row['chars_mean']:.0f} |"
            for row in report["rows"]
        ]
    return "\n".join(lines) + "\n"


def figure(report: dict) -> Figure:
    # A Figure of its own rather than pyplot's: no global backend to set, no figure to close.
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    kind = report["kind"]
    if kind == "run":
        rows = report["rows"]
        x = range(len(rows))
        y = [row["score_mean"] for row in rows]
        err = [[m - row["ci95"][0] for m, row in zip(y, rows)], [row["ci95"][1] - m for m, row in zip(y, rows)]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=4)
        ax.set_xticks(list(x), [row["label"] for row in rows])
        ax.set_xlabel("model")
        ax.set_ylabel("mean judge score")
    else:
        value = report["win_rate" if kind == "winrate" else "accuracy"]
        lo, hi = report["ci95"]
        ax.bar([0], [value], yerr=[[value - lo], [hi - value]], capsize=8, width=0.5)
        ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
        ax.set_xticks([0], ["A vs B" if kind == "winrate" else report["preferences"]])
        ax.set_ylim(0, 1)
        ax.set_ylabel("win rate of A" if kind == "winrate" else "judge accuracy")
    ax.set_title(f"{kind} (judge: {report['judge']})", fontsize=9)
    fig.tight_layout()
    return fig


def write_report(output: str | os.PathLike, report: dict) -> Path:
    """Write report.json, report.md and report.png into `output`; each appears whole or not at all."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    fig = figure(report)
    fd, tmp = tempfile.mkstemp(prefix=".report.png.", suffix=".tmp", dir=output)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, output / "report.png")
    finally:
        Path(tmp).unlink(missing_ok=True)
    atomic_write_text(output / "report.md", markdown(report))
    atomic_write_json(output / "report.json", report)
    return output
