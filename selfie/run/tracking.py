"""wandb (offline unless the user's environment says otherwise), per-iteration runs, and the run summary."""

from __future__ import annotations

import contextlib
import logging
import netrc
import os
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from selfie.io import TMP_SUFFIX, atomic_write_text
from selfie.labelling.signal import seed_choice_lines, signal_line
from selfie.run.guard import stopped_line
from selfie.run.plan import EVAL, GENERATE, JUDGE, SEED, TRAIN, VALIDATE
from selfie.run.rundir import RunContext
from selfie.run.validation import recorded_best

logger = logging.getLogger(__name__)


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def configure_wandb(run_dir: Path) -> Path:
    """Offline mode unless WANDB_MODE or a wandb login says otherwise; returns where the run files go: under the
    user's WANDB_DIR, else RUN/wandb (passed to wandb.init, not set in the environment, so a second run in the same
    process, or a process it starts, writes under its own run directory)."""
    if "WANDB_MODE" not in os.environ and not _has_wandb_credentials():
        os.environ["WANDB_MODE"] = "offline"
    directory = Path(os.environ.get("WANDB_DIR", run_dir))
    (directory / "wandb").mkdir(parents=True, exist_ok=True)
    return directory


def flatten_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = value
    return flat


class Tracker:
    """One wandb run per iteration, grouped under the run name; a no-op without wandb or off the main process.
    wandb is imported only by a tracker that reports to it (a heavy import most runs do not need)."""

    def __init__(self, run_dir: Path, run_name: str, report_to: list[str], config: dict, is_main: bool):
        self.enabled = "wandb" in report_to and is_main
        self.run_dir, self.run_name, self.config = run_dir, run_name, config
        self.wandb_dir = configure_wandb(run_dir) if "wandb" in report_to else None

    def start(self, iteration: int) -> None:
        if not self.enabled:
            return
        import wandb

        wandb.init(
            project=os.environ.get("WANDB_PROJECT", "selfie"),
            group=self.run_name,
            name=f"{self.run_name}-iter{iteration:03d}",
            job_type=f"iteration_{iteration}",
            config={**self.config, "iteration": iteration},
            dir=self.wandb_dir,
            reinit="finish_previous",
        )

    def log(self, metrics: dict[str, Any]) -> None:
        if self.enabled:
            import wandb

            if wandb.run is not None:
                wandb.run.summary.update(flatten_metrics(metrics))
                wandb.log(flatten_metrics(metrics))

    def finish(self, failed: bool = False) -> None:
        """End the iteration's wandb run; after a failure as far as it can (a full disk may fail wandb too)."""
        if self.enabled:
            import wandb

            if wandb.run is not None:
                with contextlib.suppress(Exception) if failed else contextlib.nullcontext():
                    wandb.finish(exit_code=1 if failed else None)


SUMMARY_COLUMNS = [
    ("iteration", "iter"),
    ("pairs", "pairs kept"),
    ("dropped", "dropped (by reason)"),
    ("margin_mean", "mean margin"),
    ("lengths", "chosen vs rejected tokens"),
    ("decided_by_truncation", "decided by truncation"),
    ("negative_margin", "negative margins"),
    ("agreement", "agree with eval judge"),
    ("smoothed_fraction", "smoothed frac"),
    ("loss", "loss"),
    ("times", "time per stage (s)"),
    ("tokens_per_second", "gen tok/s"),
]


def summary_rows(per_iteration: dict[int, dict]) -> list[dict]:
    """Pick the table's fields out of each iteration's metrics.json."""
    rows = []
    for iteration, m in sorted(per_iteration.items()):
        judge, gen = m.get(JUDGE.name, {}), m.get(GENERATE.name, {})
        train = m.get(TRAIN.name) or m.get(SEED.name, {})
        rows.append(
            {
                "iteration": iteration,
                "pairs": judge.get("pairs", train.get("pairs")),
                "dropped": judge.get("dropped"),
                "margin_mean": judge.get("margin_mean"),
                "chosen_tokens": judge.get("chosen_tokens_mean"),
                "rejected_tokens": judge.get("rejected_tokens_mean"),
                "lengths": (
                    f"{judge['chosen_tokens_mean']:.0f} vs {judge['rejected_tokens_mean']:.0f}"
                    if judge.get("chosen_tokens_mean") is not None
                    else None
                ),
                "decided_by_truncation": judge.get("decided_by_truncation"),
                "negative_margin": judge.get("negative_margin"),
                "agreement": judge.get("eval_judge_agreement"),
                "smoothed_fraction": train.get("refine/smoothed_fraction"),
                "loss": train.get("train_loss"),
                "times": m.get("times", {}),
                "tokens_per_second": gen.get("tokens_per_second"),
                "eval": m.get(EVAL.name),
                "validation": m.get(VALIDATE.name),
            }
        )
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_cell(v)}" for k, v in value.items()) or "-"
    return str(value)


def eval_headline(result: dict | None) -> str:
    """The eval stage's headline: a win rate with its 95% interval, or a mean score when there is no baseline."""
    if not result:
        return "-"
    if "win_rate" in result:
        low, high = result["ci95"]
        return f"win rate {result['win_rate']:.3f} [{low:.3f}, {high:.3f}] vs {result['baseline']} ({result['judge']})"
    return f"score {_cell(result.get('score_mean'))} ({result['judge']})"


def validation_cell(result: dict | None) -> str:
    """The validate stage's figures in a table cell: held-out accuracy, length against pi_init, KL, failed checks."""
    if not result or result.get("skipped"):
        return "-"
    parts = []
    if result.get("accuracy") is not None:
        low, high = result["accuracy_ci95"]
        parts.append(f"acc {result['accuracy']:.0%} [{low:.0%}, {high:.0%}]")
    if result.get("length_change") is not None:
        parts.append(f"length {result['length_change']:+.0%}")
    parts.append(f"KL {result['kl']:.3g}")
    return ", ".join(parts) + (" (failed a check)" if result.get("failed") else "")


RENDERED = {"eval": eval_headline, "validation": validation_cell}  # the optional columns, shown when a row has one


def summary_markdown(rows: list[dict]) -> str:
    columns = SUMMARY_COLUMNS + [(key, key) for key in RENDERED if any(row.get(key) for row in rows)]
    header = "| " + " | ".join(title for _, title in columns) + " |"
    lines = [header, "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(RENDERED.get(key, _cell)(row.get(key)) for key, _ in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot_summary(rows: list[dict], path: Path) -> None:
    """The summary's panels as a PNG; drawn on a Figure of its own (no pyplot), so no GUI backend is chosen."""
    eval_score = [
        {
            **r,
            "eval_score": (r.get("eval") or {}).get("score_mean"),
            "validation_accuracy": (r.get("validation") or {}).get("accuracy"),
            "length_change": (r.get("validation") or {}).get("length_change"),
        }
        for r in rows
    ]
    panels = [  # (title, [(key, label)]): one line per key
        ("pairs kept", [("pairs", None)]),
        ("mean judge margin", [("margin_mean", None)]),
        ("mean tokens", [("chosen_tokens", "chosen"), ("rejected_tokens", "rejected")]),
        ("label diagnostics", [("decided_by_truncation", "decided by truncation"), ("agreement", "agree with eval judge")]),
        ("train loss", [("loss", None)]),
        ("smoothed fraction", [("smoothed_fraction", None)]),
        ("eval score", [("eval_score", None)]),
        ("validation", [("validation_accuracy", "held-out accuracy"), ("length_change", "length vs pi_init")]),
    ]
    fig = Figure(figsize=(3.6 * len(panels), 3.2))
    axes = fig.subplots(1, len(panels))
    for ax, (title, lines) in zip(axes, panels):
        for key, label in lines:
            points = [(r["iteration"], r[key]) for r in eval_score if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), marker="o", label=label)
        if any(label for _, label in lines) and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}{TMP_SUFFIX}")  # a killed run's is removed on resume (rundir.remove_leftovers)
    fig.savefig(tmp, dpi=100, format="png")
    os.replace(tmp, path)


def write_summary(ctx: RunContext) -> str:
    """The run's summary table (its markdown, returned) and plot, from every iteration's metrics."""
    rows = summary_rows({t: ctx.read_metrics(t) for t in range(ctx.config.num_iterations + 1)})
    table = summary_markdown(rows)
    seed = ctx.read_metrics(0).get(SEED.name, {})
    if seed.get("seed_choice"):  # the check chose the seed training: every candidate's accuracy
        table += "".join(f"\n{line}\n" for line in seed_choice_lines(seed["seed_choice"]))
    if seed.get("label_signal"):
        table += f"\n{signal_line(seed['label_signal'])}\n"
    table += "".join(f"\n{line}\n" for line in verdict_lines(ctx))
    atomic_write_text(ctx.summary_file, f"# Run summary: {ctx.run_dir.name}\n\n{table}")
    plot_summary(rows, ctx.summary_plot)
    return table


def verdict_lines(ctx: RunContext) -> list[str]:
    """What the validation says of the run: the best iteration so far, and the stop rule's verdict."""
    best, stopped = recorded_best(ctx), ctx.manifest().stopped
    return ([f"best iteration (validation): {best}"] if best is not None else []) + ([stopped_line(stopped)] if stopped else [])
