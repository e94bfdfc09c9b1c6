"""The sweep's winner rule, table and plots, on hand-made trial rows (no Ray)."""

from __future__ import annotations

import pytest

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


def test_a_champion_must_beat_plain_decoding_by_the_floor():
    fast = {"trial": "eagle", "speedup": 1.2, "tau": 2.0}
    slow = {"trial": "medusa", "speedup": 0.95, "tau": 1.0}
    assert report.no_champion_reason(fast, min_speedup=1.0) is None
    assert "0.950x" in report.no_champion_reason(slow, min_speedup=1.0)
    assert report.no_champion_reason(fast, min_speedup=1.2) is not None  # must exceed, not equal
    assert "losslessness" in report.no_champion_reason(None, min_speedup=1.0)


def test_an_evaluation_too_small_to_separate_trials_is_flagged():
    rows = [{"trial": "a", "eval_new_tokens": 64}, {"trial": "b", "eval_new_tokens": 600}]
    assert "64 generated tokens" in report.small_evaluation(rows, min_new_tokens=512)
    assert report.small_evaluation(rows, min_new_tokens=64) is None
    assert report.small_evaluation([{"trial": "a"}], min_new_tokens=512) is None  # nothing measured: no claim


def test_the_alpha_plot_never_compares_a_trial_with_itself(tmp_path, monkeypatch):
    import matplotlib.axes

    labels = []
    original = matplotlib.axes.Axes.bar
    monkeypatch.setattr(matplotlib.axes.Axes, "bar", lambda self, *a, **k: labels.append(k["label"]) or original(self, *a, **k))
    row = {"trial": "eagle-K1-lambda0", "alpha_1": 0.5, "alpha_2": 0.4, "alpha_3": 0.3}
    report.plot_alpha(row, row, tmp_path / "alpha.png")
    assert labels == ["winner, itself the best K=1 λ=0 trial: eagle-K1-lambda0"]


def test_plots_survive_a_sweep_whose_trials_all_failed(tmp_path):
    failed = [{"trial": "eagle", "head.head_type": "eagle", "error": "RayTaskError"}]
    path = report.plot_heatmaps(failed, "speedup", tmp_path / "speedup.png")
    assert path.read_bytes().startswith(b"\x89PNG")
    assert report.plot_alpha(None, None, tmp_path / "alpha.png").read_bytes().startswith(b"\x89PNG")


def test_the_incumbent_competes_but_is_no_baseline_and_no_heatmap_cell(tmp_path, monkeypatch):
    incumbent = row("incumbent", 1.2, 2.0, incumbent="pipeline/drafters/smollm2-eagle", lam=None)
    rows = [*ROWS, incumbent]
    assert report.pick_winner(rows) is incumbent
    assert report.trained_rows(rows) == ROWS
    assert report.pick_baseline(rows)["trial"] == "medusa-K1-lambda0"
    assert report.incumbent_verdict(rows, incumbent) == (
        "No trained head beat the incumbent pipeline/drafters/smollm2-eagle: the best, medusa-K2-lambda0, "
        "decoded at 1.100x.")
    slower = {**incumbent, "speedup": 1.05}
    assert report.incumbent_verdict([*ROWS, slower], report.pick_winner([*ROWS, slower])) == (
        "medusa-K2-lambda0 beat the incumbent pipeline/drafters/smollm2-eagle: 1.100x against 1.050x.")
    diverged = {**incumbent, "exact_match": 0.5}  # fp32 output differs from vanilla: disqualified
    assert report.pick_winner([*ROWS, diverged])["trial"] == "medusa-K2-lambda0"
    assert report.incumbent_verdict([*ROWS, diverged], report.pick_winner([*ROWS, diverged])) == (
        "The incumbent pipeline/drafters/smollm2-eagle did not pass the losslessness check and could not win "
        "(1.200x).")
    assert report.incumbent_verdict(ROWS, report.pick_winner(ROWS)) is None
    failed = {"trial": "incumbent", "incumbent": "heads/x", "error": "incumbent: HeadLoadError: wrong target"}
    assert report.pick_winner([failed]) is None
    assert report.incumbent_verdict([failed], None) == ("The incumbent heads/x failed: incumbent: HeadLoadError: "
                                                        "wrong target")
    cells, is_valid = [], report.is_valid
    monkeypatch.setattr(report, "is_valid", lambda r: cells.append(r["trial"]) or is_valid(r))
    report.plot_heatmaps(rows, "speedup", tmp_path / "heatmap.png")
    assert "incumbent" not in cells


def test_incumbent_auto_is_the_targets_shipped_drafter_and_a_bad_one_fails_on_load(tmp_path):
    import pytest

    from pipeline.config import ConfigError, SweepConfig
    from pipeline.heads import default_drafter_dir
    from tune.sweep import incumbent_dir

    assert incumbent_dir(SweepConfig.from_dict({"train": {"target": {"spec": "smollm2"}}})) == \
        default_drafter_dir("smollm2")
    assert incumbent_dir(SweepConfig.from_dict({"train": {"target": {"spec": str(tmp_path)}}})) is None
    assert incumbent_dir(SweepConfig.from_dict({"incumbent": "none"})) is None
    with pytest.raises(ConfigError, match="incumbent.*must hold head_config.json and head.safetensors"):
        SweepConfig.from_dict({"incumbent": str(tmp_path)})
    (tmp_path / "head_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="incumbent.*must hold head_config.json and head.safetensors"):
        SweepConfig.from_dict({"incumbent": str(tmp_path)})  # no weights
    (tmp_path / "head.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="incumbent.*has no 'head' settings"):
        SweepConfig.from_dict({"incumbent": str(tmp_path)})


def test_an_incumbent_that_fails_to_decode_is_a_row_with_an_error(tmp_path, monkeypatch):
    from pipeline.config import SweepConfig
    from pipeline.heads import default_drafter_dir
    from tune import sweep

    def fail(context, head_dir):
        raise RuntimeError()  # no message: the row still says what failed

    monkeypatch.setattr(sweep, "_evaluate", fail)
    config = SweepConfig.from_dict({"incumbent": str(default_drafter_dir("smollm2"))})
    row = sweep._incumbent_row(config, {"questions": [], "mlflow_uri": None}, tmp_path, sha1="0" * 40)
    assert row["error"] == "incumbent: RuntimeError" and row["head.head_type"] == "eagle"
    assert report.pick_winner([row]) is None and not (tmp_path / "incumbent").exists()


@pytest.mark.parametrize("evaluate", [False, True])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_a_benchmark_of_no_prompts_is_a_one_line_error_not_a_report(tiny_target, evaluate, temperature):
    """No prompts (an empty list, or one a filter emptied) must not divide by zero or report NaN speeds."""
    from pipeline.bench import evaluate_head, run_bench
    from pipeline.config import BenchConfig, ConfigError, DecodeConfig, HeadConfig
    from pipeline.heads import build_head

    drafter = build_head(HeadConfig(head_type="eagle", num_heads=2), tiny_target.model)
    decode = DecodeConfig(max_new_tokens=8, temperature=temperature)
    bench = BenchConfig(include_hf=False, warmup_prompts=0)
    with pytest.raises(ConfigError, match=r"no prompts to benchmark.*pass") as error:
        if evaluate:
            evaluate_head(tiny_target, drafter, [], decode=decode, bench=bench)
        else:
            run_bench(tiny_target, drafter, [], decode=decode, bench=bench, progress=False)
    assert "\n" not in str(error.value)
