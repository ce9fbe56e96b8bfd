"""The stop rule and the best iteration (docs/METHOD.md section 1.8): pure functions of the validate stage's
metrics (selfie/run/validation.py) and the eval stage's, so that the run, `selfie status` and `selfie export`
read the same verdicts.
"""

from __future__ import annotations

from collections.abc import Mapping

from selfie.config.schema import ValidationConfig


def failed_checks(validation: ValidationConfig, now: dict, eval_now: dict | None, eval_before: dict | None) -> list[str]:
    """Why iteration t's policy should not be trusted, one reason per failed check (none: it passed):
    - its validation accuracy fell below the previous iteration's by more than the paired interval (the interval
      of the change lies below 0);
    - its responses' mean length moved more than `max_length_change` from pi_init's;
    - its KL estimate from pi_init passed `max_kl`;
    - the eval judge's verdict fell: against the previous iteration, a win-rate interval below 0.5; else a
      headline below the previous iteration's interval."""
    reasons = []
    change = now.get("accuracy_change_ci95")
    if change and change[1] < 0:
        reasons.append(
            f"validation accuracy fell by {-now['accuracy_change']:.0%} (interval [{change[0]:+.0%}, {change[1]:+.0%}]) "
            f"to {now['accuracy']:.0%}"
        )
    bound, moved = validation.max_length_change, now.get("length_change")
    if bound is not None and moved is not None and abs(moved) > bound:
        reasons.append(
            f"responses average {now['tokens_mean']:.0f} tokens against pi_init's {now['init_tokens_mean']:.0f} "
            f"({moved:+.0%}, validation.max_length_change {bound:g})"
        )
    if validation.max_kl is not None and now.get("kl") is not None and now["kl"] > validation.max_kl:
        reasons.append(f"KL from pi_init {now['kl']:.3g} nats > validation.max_kl {validation.max_kl:g}")
    fell = _eval_fell(eval_now, eval_before)
    if fell:
        reasons.append(fell)
    return reasons


def _eval_fell(now: dict | None, before: dict | None) -> str | None:
    if not now:
        return None
    if now.get("baseline") == "previous" and "win_rate" in now:
        if now["ci95"][1] < 0.5:
            return f"the eval judge prefers the previous iteration (win rate {now['win_rate']:.3f} [{now['ci95'][0]:.3f}, {now['ci95'][1]:.3f}])"
        return None
    if not before:
        return None
    key, interval = ("win_rate", "ci95") if "win_rate" in now else ("score_mean", "score_ci95")
    if before.get(interval) and now.get(key) is not None and now[key] < before[interval][0]:
        return f"the eval judge's {key} fell to {now[key]:.4g}, below the previous iteration's interval {before[interval]}"
    return None


def best_iteration(validated: Mapping[int, dict]) -> int | None:
    """The iteration that validated best: the highest held-out accuracy among those that failed no check, ties
    broken by the lower loss, then the later iteration; without held-out pairs, the latest that failed none."""
    passed = {t: v for t, v in validated.items() if not v.get("skipped") and not v.get("failed")}
    if not passed:
        return None
    if all(v.get("accuracy") is None for v in passed.values()):
        return max(passed)
    return max(
        (t for t, v in passed.items() if v.get("accuracy") is not None),
        key=lambda t: (passed[t]["accuracy"], -passed[t]["loss"], t),
    )


def stopped_line(stopped: dict) -> str:
    """The stop rule's verdict in one line (the log, the summary, `selfie status`)."""
    return (
        f"stopped after iteration {stopped['iteration']}: {stopped['reason']} "
        "(the same `selfie run` command with --force continues the loop)"
    )
