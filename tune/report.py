"""The sweep's result table, the winner, and the plots: plain functions over trial rows (no Ray).

A row is a flat dict: `trial`, the grid values (`head.head_type`, `head.num_layers`, `adv_weight`, ...) and the
measured metrics (`speedup`, `tau`, `alpha_1..3`, `exact_match`, ...) or an `error`.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TABLE_COLUMNS = ("trial", "speedup", "tau", "alpha_1", "alpha_2", "alpha_3", "exact_match", "near_tie_divergences",
                 "lossless_violations", "vanilla_tokens_per_s",
                 "speculative_tokens_per_s", "draft_to_target_ratio", "val_tau", "val_acc_1", "train_wall_time_s",
                 "eval_wall_time_s", "error")


def is_valid(row: dict[str, Any]) -> bool:
    """A trial counts when it finished and passed the losslessness audit: no violation (near-tie divergences of
    bf16/fp16 arithmetic are allowed), and in fp32, where no near-tie flips, greedy output equal to vanilla's."""
    if row.get("error") or row.get("speedup") is None:
        return False
    if row.get("lossless_violations") is None:  # measured without the audit: exact match is all there is
        return row.get("exact_match") in (None, 1.0)
    if row["lossless_violations"] != 0:
        return False
    return row.get("eval_dtype") != "float32" or row.get("exact_match") in (None, 1.0)


def pick_winner(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Best measured speedup; tau breaks ties; the incumbent's row competes too."""
    candidates = [r for r in rows if is_valid(r)]
    return max(candidates, key=lambda r: (r["speedup"], r["tau"]), default=None)


def trained_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The grid's trials: every row but the incumbent's (a head this sweep did not train)."""
    return [r for r in rows if not r.get("incumbent")]


def no_champion_reason(winner: dict[str, Any] | None, *, min_speedup: float) -> str | None:
    """Why the best trial may not be the champion (None when it may): a champion must have passed its
    losslessness check (`is_valid`, which `pick_winner` already requires) and beaten plain decoding by more than
    the floor."""
    if winner is None:
        return "no trial finished with a passing losslessness check"
    if winner["speedup"] <= min_speedup:
        return (f"the best head, {winner['trial']}, decoded at {winner['speedup']:.3f}x plain decoding's speed "
                f"(tau {winner['tau']:.2f}); a champion must exceed {min_speedup:.2f}x")
    return None


def small_evaluation(rows: Sequence[dict[str, Any]], *, min_new_tokens: int) -> str | None:
    """A warning when the trials' evaluations generated too few tokens for their timings to separate them."""
    counts = [r["eval_new_tokens"] for r in rows if r.get("eval_new_tokens") is not None]
    if not counts or min(counts) >= min_new_tokens:
        return None
    return (f"evaluation too small to separate trials: {min(counts)} generated tokens per trial (< "
            f"sweep.eval.min_new_tokens {min_new_tokens}); speedups this close to timing noise decide nothing, "
            "raise sweep.eval.per_category / limit / max_new_tokens")


def run_description(summary: dict[str, Any]) -> str:
    """The sweep's parent-run description in MLflow (markdown): the verdict first, then the trial table."""
    winner = summary.get("winner")
    if winner and summary.get("champion", True):
        verdict = (f"**Champion: {winner['trial']}**: speedup {winner['speedup']:.3f}x over plain decoding, "
                   f"tau {winner['tau']:.2f}, n-alpha {_alphas(winner)}.")
    else:
        verdict = f"**No champion**: {summary.get('no_champion_reason') or 'no trial finished'}."
    lines = [verdict]
    if incumbent_line := incumbent_verdict(summary["rows"], winner):
        lines.append(incumbent_line)
    if summary.get("eval_warning"):
        lines.append(f"Warning: {summary['eval_warning']}.")
    lines += ["", "Trials, fastest first (speedup = speculative / vanilla tokens per second on the same prompts; "
                  "metrics under eval/ on each trial's run):", "",
              table_markdown(summary["rows"], summary["grid_keys"], winner=winner and winner["trial"])]
    return "\n".join(lines)


def incumbent_verdict(rows: Sequence[dict[str, Any]], winner: dict[str, Any] | None) -> str | None:
    """How the trained heads fared against the incumbent (the head the sweep had to beat), if there was one."""
    incumbent = next((r for r in rows if r.get("incumbent")), None)
    if incumbent is None:
        return None
    if incumbent.get("error"):
        return f"The incumbent {incumbent['incumbent']} failed: {incumbent['error']}"
    if not is_valid(incumbent):
        return (f"The incumbent {incumbent['incumbent']} did not pass the losslessness check and could not win "
                f"({incumbent['speedup']:.3f}x).")
    if winner is None:  # not from pick_winner, where a valid incumbent always competes
        return None
    if winner["trial"] != incumbent["trial"]:
        return (f"{winner['trial']} beat the incumbent {incumbent['incumbent']}: {winner['speedup']:.3f}x against "
                f"{incumbent['speedup']:.3f}x.")
    best = pick_winner(trained_rows(rows))
    return (f"No trained head beat the incumbent {incumbent['incumbent']}: " +
            (f"the best, {best['trial']}, decoded at {best['speedup']:.3f}x." if best
             else "none finished with a passing losslessness check."))


def _alphas(row: dict[str, Any]) -> str:
    return ", ".join(f"{row[f'alpha_{n}']:.2f}" for n in (1, 2, 3) if row.get(f"alpha_{n}") is not None) or "-"


def pick_baseline(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The best plain (non-KOALA) trial: K=1, lambda=0."""
    plain = [r for r in trained_rows(rows)
             if is_valid(r) and r.get("head.num_layers", 1) == 1 and r.get("adv_weight", 0.0) == 0]
    return max(plain, key=lambda r: (r["speedup"], r["tau"]), default=None)


def _columns(rows: Sequence[dict[str, Any]], grid_keys: Sequence[str]) -> list[str]:
    present = {k for r in rows for k in r}
    return ["trial", *grid_keys, *(c for c in TABLE_COLUMNS[1:] if c in present)]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table_csv(rows: Sequence[dict[str, Any]], grid_keys: Sequence[str]) -> str:
    columns = _columns(rows, grid_keys)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in sorted(rows, key=_sort_key):
        writer.writerow({c: _cell(row.get(c)) for c in columns})
    return buffer.getvalue()


def table_markdown(rows: Sequence[dict[str, Any]], grid_keys: Sequence[str], *, winner: str | None = None) -> str:
    columns = _columns(rows, grid_keys)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in sorted(rows, key=_sort_key):
        cells = [_cell(row.get(c)) for c in columns]
        if row["trial"] == winner:
            cells[0] = f"**{cells[0]}** (winner)"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _sort_key(row: dict[str, Any]) -> tuple:
    return (-(row.get("speedup") or -math.inf), row["trial"])


def plot_heatmaps(rows: Sequence[dict[str, Any]], metric: str, path: Path) -> Path:
    """One heatmap per head type: K (rows) x lambda (columns); a cell holds the best value over other grid fields."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    valid = [r for r in trained_rows(rows) if is_valid(r)]
    head_types = sorted({r.get("head.head_type", "head") for r in valid}) or ["head"]
    figure, axes = plt.subplots(1, len(head_types), figsize=(4.5 * len(head_types), 3.8), squeeze=False)
    for axis, head_type in zip(axes[0], head_types):
        subset = [r for r in valid if r.get("head.head_type", "head") == head_type]
        layers = sorted({r.get("head.num_layers", 1) for r in subset})
        lambdas = sorted({r.get("adv_weight", 0.0) for r in subset})
        grid = [[math.nan] * len(lambdas) for _ in layers]
        if not subset:  # every trial failed: an empty panel that says so, not a crash
            axis.text(0.5, 0.5, "no valid trial", ha="center", va="center", transform=axis.transAxes)
            axis.set_title(f"{head_type}: {metric}")
            continue
        for r in subset:
            i, j = layers.index(r.get("head.num_layers", 1)), lambdas.index(r.get("adv_weight", 0.0))
            grid[i][j] = r[metric] if math.isnan(grid[i][j]) else max(grid[i][j], r[metric])
        image = axis.imshow(grid, cmap="viridis", aspect="auto")
        axis.set_xticks(range(len(lambdas)), [f"{v:g}" for v in lambdas])
        axis.set_yticks(range(len(layers)), [str(v) for v in layers])
        axis.set_xlabel("λ (adv_weight)")
        axis.set_ylabel("K (num_layers)")
        axis.set_title(f"{head_type}: {metric}")
        for i, line in enumerate(grid):
            for j, value in enumerate(line):
                if not math.isnan(value):
                    axis.text(j, i, f"{value:.3f}", ha="center", va="center", color="white")
        figure.colorbar(image, ax=axis)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_alpha(baseline: dict[str, Any] | None, winner: dict[str, Any] | None, path: Path) -> Path:
    """n-alpha by draft position: the best K=1 lambda=0 baseline against the winner (one bar set when the winner
    is that baseline: a trial is never compared with itself)."""
    winner_label = "winner"
    if baseline is not None and winner is not None and baseline["trial"] == winner["trial"]:
        baseline, winner_label = None, "winner, itself the best K=1 λ=0 trial"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.5))
    for label, row, offset in (("baseline K=1 λ=0", baseline, -0.2), (winner_label, winner, 0.2)):
        if row is None:
            continue
        positions = [n for n in (1, 2, 3) if row.get(f"alpha_{n}") is not None]
        axis.bar([n + offset for n in positions], [row[f"alpha_{n}"] for n in positions], width=0.4,
                 label=f"{label}: {row['trial']}")
    axis.set_xticks([1, 2, 3], ["1-α", "2-α", "3-α"])
    axis.set_ylabel("acceptance rate")
    axis.set_ylim(0, 1)
    if baseline is None and winner is None:
        axis.text(2, 0.5, "no valid trial", ha="center", va="center")
    else:
        axis.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
