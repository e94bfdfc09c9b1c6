"""The sweep's winner rule, table and plots, on hand-made trial rows (no Ray)."""

from __future__ import annotations

from tune import report
from tune.sweep import trial_name


def row(trial, speedup, tau, *, head="eagle", k=1, lam=0.0, exact=1.0, **extra):
    return {"trial": trial, "head.head_type": head, "head.num_layers": k, "adv_weight": lam, "speedup": speedup,
            "tau": tau, "exact_match": exact, "alpha_1": 0.5, "alpha_2": 0.3, "alpha_3": None, **extra}


ROWS = [
    row("eagle-K1-lambda0", 0.9, 1.3),
    row("eagle-K2-lambda0.1", 1.1, 1.4, k=2, lam=0.1),
    row("medusa-K2-lambda0", 1.1, 1.5, head="medusa", k=2),  # same speedup, higher tau: wins the tie
    row("medusa-K1-lambda0", 1.0, 1.2, head="medusa"),
    row("medusa-K1-lambda0.1", 3.0, 2.0, head="medusa", lam=0.1, exact=0.5),  # not lossless: cannot win
    {"trial": "eagle-K1-lambda0.1", "head.head_type": "eagle", "head.num_layers": 1, "adv_weight": 0.1,
     "error": "RayTaskError: out of memory"},
]


def test_winner_is_the_fastest_lossless_trial_and_tau_breaks_ties():
    assert report.pick_winner(ROWS)["trial"] == "medusa-K2-lambda0"
    assert report.pick_baseline(ROWS)["trial"] == "medusa-K1-lambda0"
    assert report.pick_winner([ROWS[-1]]) is None


def test_tables_list_every_trial_best_first():
    keys = ["head.head_type", "head.num_layers", "adv_weight"]
    csv_lines = report.table_csv(ROWS, keys).splitlines()
    assert len(csv_lines) == len(ROWS) + 1
    assert csv_lines[0].startswith("trial,head.head_type,head.num_layers,adv_weight,speedup,tau")
    assert csv_lines[1].startswith("medusa-K1-lambda0.1")
    markdown = report.table_markdown(ROWS, keys, winner="medusa-K2-lambda0")
    assert "**medusa-K2-lambda0** (winner)" in markdown and "out of memory" in markdown


def test_plots_are_png_files(tmp_path):
    for path in (report.plot_heatmaps(ROWS, "speedup", tmp_path / "s.png"),
                 report.plot_alpha(report.pick_baseline(ROWS), report.pick_winner(ROWS), tmp_path / "a.png")):
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000


def test_trial_names_are_readable_and_unique():
    assert trial_name({"head.head_type": "eagle", "head.num_layers": 2, "adv_weight": 0.1}) == "eagle-K2-lambda0.1"
    assert trial_name({"adv_weight": 0, "head_lr": 0.001}) == "lambda0-head_lr=0.001"
