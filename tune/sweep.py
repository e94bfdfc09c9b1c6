"""`koala tune`: a Ray Tune grid over KOALA heads, each trial trained on Ray Train and then measured.

Following Ray's Tune + Train V2 pattern, a trial is a driver function that calls the training stage (a
`TorchTrainer.fit()` inside the trial) and then runs the evaluation as a Ray task with fixed resources, so every
trial is timed alike. The trial driver itself only coordinates and reserves next to nothing; the training workers
and the evaluation task request their own CPUs or GPUs, and `max_concurrent_trials` keeps the number of trials in
flight to what the cluster can hold.

Everything a sweep writes lives in `<out_dir>/<sweep key>/`, where the key is a content hash of the sweep settings,
the training data and the incumbent head's content: the Tune experiment (resumed with `Tuner.restore`), one
directory per trial (a trial whose head and evaluation exist is not redone), the incumbent's evaluation and MLflow
run (`incumbent/`), the result table, plots, and `results.json` once it is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from pipeline.bench import Question, drop_training_overlap, evaluate_head, load_questions
from pipeline.config import ConfigError, EvalConfig, SweepConfig, TargetConfig, TrainConfig
from pipeline.data import write_json_atomically
from pipeline.stages.resources import init_ray, use_gpus
from pipeline.stages.train import TRAIN_SUMMARY_FILE, data_shards, response_token_counts, run_train
from tune import report

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"


class SweepInterrupted(RuntimeError):
    """The sweep stopped (Ctrl-C, a lost driver) before every trial finished; running it again resumes it."""

EVAL_FILE = "eval.json"
# The row of the head the trials must beat (`SweepConfig.incumbent`), and its directory in the sweep's.
INCUMBENT = "incumbent"
# A trial driver only coordinates; a placement group cannot be empty, so it holds a token amount of memory.
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 1_000_000}


def trial_name(overrides: dict[str, Any]) -> str:
    """`eagle-K2-lambda0.1`, plus `-field=value` for any other grid field."""
    parts = []
    if "head.head_type" in overrides:
        parts.append(str(overrides["head.head_type"]))
    if "head.num_layers" in overrides:
        parts.append(f"K{overrides['head.num_layers']}")
    if "adv_weight" in overrides:
        parts.append(f"lambda{float(overrides['adv_weight']):g}")
    parts += [f"{key.removeprefix('head.')}={value}" for key, value in overrides.items()
              if key not in ("head.head_type", "head.num_layers", "adv_weight")]
    return "-".join(parts).replace("/", "_") or "trial"


def data_identity(data_dirs: list[str], paths: list[Path]) -> list[Any]:
    """What the training data is, by content: a koala distill directory's manifest (settings and prompt ids per
    shard), and a content hash of every other Parquet file of `paths` (what training reads: any *.parquet in a
    directory, or a file named directly), so edited or replaced data is never taken for the old."""
    identity: list[Any] = []
    described: set[Path] = set()
    for directory in map(Path, data_dirs):
        manifest = directory / "manifest.json"
        if manifest.is_file():
            identity.append(json.loads(manifest.read_text()))
            described.add(directory.resolve())
    identity += [[path.name, file_sha1(path)] for path in paths if path.resolve().parent not in described]
    return identity


def file_sha1(path: Path) -> str:
    digest = hashlib.sha1()
    _update_digest(digest, path)
    return digest.hexdigest()


def _update_digest(digest, path: Path) -> None:
    with path.open("rb") as file:  # in chunks: a large file (a large target's head) need not fit in memory
        while chunk := file.read(1 << 20):
            digest.update(chunk)


def incumbent_dir(config: SweepConfig) -> Path | None:
    """The head the trials must beat: `auto` = the drafter shipped for the target (None where none is), `none` =
    None, else the directory given."""
    from pipeline.heads import default_drafter_dir

    if config.incumbent == "none":
        return None
    if config.incumbent == "auto":
        return default_drafter_dir(config.train.target.spec)
    return Path(config.incumbent).resolve()


def head_identity(directory: Path | None) -> str | None:
    """A head directory by content (its config and weights), so a changed incumbent is measured again."""
    if directory is None:
        return None
    digest = hashlib.sha1()
    for name in ("head_config.json", "head.safetensors"):  # both files' bytes in one digest, as before
        _update_digest(digest, directory / name)
    return digest.hexdigest()


def sweep_key(config: SweepConfig, data_dirs: list[str], questions: list[Question], *,
              incumbent_sha1: str | None) -> str:
    """Content hash of everything that changes the sweep's results or what they are recorded in (not where it
    runs or how fast): the training workers count (it sets the global batch and the step count), and the tracking
    settings (a sweep run without MLflow has no runs to register; another store lacks this one's). The incumbent
    counts by its `head_identity`."""
    settings = config.to_dict()
    for volatile in ("out_dir", "max_concurrent_trials", "max_trial_failures", "register", "model_name"):
        settings.pop(volatile)
    for volatile in ("data_dirs", "out_dir", "max_failures", "fail_once_at_step"):
        settings["train"].pop(volatile)
    settings["incumbent"] = incumbent_sha1
    paths = data_shards(config.train.replace(data_dirs=tuple(data_dirs)))
    payload = [settings, data_identity(data_dirs, paths), [q.prompt for q in questions]]
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def training_prompt_ids(paths: list[Path]) -> set[str]:
    """The ids of every prompt the data trains on: `prompt_id`, and where the data has them `split_id` (the opening
    prompt's hash; a teacher-forced row's prompt id hashes the whole conversation) and `first_turn_id` (the first
    user turn's hash, which is what an evaluation prompt matches when the training prompt has a system prompt)."""
    import pyarrow.parquet as pq

    ids: set[str] = set()
    for path in paths:
        columns = [c for c in ("prompt_id", "split_id", "first_turn_id") if c in pq.read_schema(path).names]
        table = pq.read_table(path, columns=columns)
        for column in columns:
            ids.update(v for v in table.column(column).to_pylist() if v)
    return ids


def evaluation_questions(config: EvalConfig, data_dirs: list[str], paths: list[Path]) -> tuple[list[Question], int]:
    bench = config.bench_config()
    questions = load_questions(bench.questions, limit=bench.limit, per_category=bench.per_category)
    kept, dropped = drop_training_overlap(questions, training_prompt_ids(paths))
    if not kept:
        raise ConfigError(f"eval.questions: all {len(questions)} evaluation prompts occur in the training data")
    return kept, dropped


def _check_draft_vocabulary(config: SweepConfig, paths: list[Path]) -> None:
    """A draft vocabulary larger than the data's distinct tokens would fail every trial: fail once, up front.
    The data's response tokens are counted (a distill directory's token_freq.json, else the rows), so Parquet
    from elsewhere is checked too; a trial's training rows hold fewer, which its training reports."""
    sizes = {config.trial_config(o).head.draft_vocab_size for o in config.trial_overrides()} - {0}
    if not sizes:
        return
    distinct = response_token_counts(paths)
    if max(sizes) > len(distinct):
        raise ConfigError(f"sweep.train.head.draft_vocab_size: {max(sizes)} exceeds the {len(distinct)} distinct "
                          "tokens in the training data; use a smaller size, 0 (full vocabulary), or more data")


def _absolute_spec(target: TargetConfig) -> TargetConfig:
    """Trials may run in another working directory (or node): paths are made absolute first."""
    return target.replace(spec=str(Path(target.spec).resolve())) if Path(target.spec).exists() else target


# ----------------------------------------------------------------------------------------------- trial side


def evaluate_trial(payload: dict[str, Any]) -> dict[str, Any]:
    """The evaluation task of one trial: load the target and the trained head, time vanilla vs speculative."""
    import ray
    import torch

    from pipeline.heads import load_head
    from pipeline.target import load_target_from_config

    eval_config = EvalConfig.from_dict(payload["eval"])
    started = time.perf_counter()
    torch.set_num_threads(eval_config.cpus)
    target_config = TargetConfig.from_dict(payload["target"])
    device = "cuda" if payload["use_gpu"] and torch.cuda.is_available() else "cpu"
    target = load_target_from_config(target_config.replace(device=device))
    drafter = load_head(payload["head_dir"], target.model, target_name=target.name)
    questions = [Question(**q) for q in payload["questions"]]
    metrics = evaluate_head(target, drafter, questions, decode=eval_config.decode_config(),
                            bench=eval_config.bench_config())
    return {**metrics, "eval_wall_time_s": time.perf_counter() - started,
            "eval_node_id": ray.get_runtime_context().get_node_id(), "eval_device": device}


def run_trial(params: dict[str, Any], *, context: dict[str, Any]) -> None:
    """The Tune trial driver: train (or reuse) the head, evaluate (or reuse) it, log to the trial's MLflow run."""
    import ray.tune

    name = params["trial"]
    config = TrainConfig.from_dict(context["trials"][name])
    trial_dir = Path(config.out_dir)
    train = _read_json(trial_dir / TRAIN_SUMMARY_FILE) if (trial_dir / "head").is_dir() else None
    if train is None:
        print(f"[sweep] trial {name}: training")
        train = run_train(config, run_name=name, parent_run_id=context["parent_run_id"], end_run=False)
    else:
        print(f"[sweep] trial {name}: head already trained, reusing {train['head_dir']}")
    evaluation = _read_json(trial_dir / EVAL_FILE)
    if evaluation is None:
        print(f"[sweep] trial {name}: evaluating on {len(context['questions'])} prompts")
        try:
            evaluation = _evaluate(context, train["head_dir"])
        except BaseException:
            _end_trial_run(context, train, "FAILED")  # a retry that succeeds ends it again, as FINISHED
            raise
        write_json_atomically(evaluation, trial_dir / EVAL_FILE)
    metrics = _trial_metrics(train, evaluation)
    _log_trial(context, train, evaluation, trial_dir)
    print(f"[sweep] trial {name}: speedup {metrics['speedup']:.3f}, tau {metrics['tau']:.3f}")
    ray.tune.report(metrics)


def _evaluate(context: dict[str, Any], head_dir: str) -> dict[str, Any]:
    """`evaluate_trial` as a Ray task with the evaluation's fixed resources, so every head is timed alike."""
    import ray

    payload = {key: context[key] for key in ("eval", "target", "questions", "use_gpu")}
    task = ray.remote(evaluate_trial).options(
        num_cpus=context["eval"]["cpus"], num_gpus=1 if context["use_gpu"] else 0,
        scheduling_strategy="DEFAULT",  # outside the trial driver's (token) placement group
    )
    return ray.get(task.remote({**payload, "head_dir": head_dir}))


def _trial_metrics(train: dict[str, Any], evaluation: dict[str, Any]) -> dict[str, Any]:
    trained = train["metrics"]
    return {
        **evaluation,
        **{k: v for k, v in trained.items() if k.startswith("val_acc_") or k == "val_tau"},
        "train_steps": trained.get("step"),
        "train_wall_time_s": train["wall_time_s"],
        "train_node_id": trained.get("node_id"),
        "mlflow_run_id": train.get("mlflow_run_id"),
    }


def _log_trial(context: dict[str, Any], train: dict[str, Any], evaluation: dict[str, Any], trial_dir: Path) -> None:
    if not train.get("mlflow_run_id"):
        return
    from pipeline.tracking import Run

    run = Run(context["mlflow_uri"], train["mlflow_run_id"])
    run.log_metrics(evaluation, prefix="eval/")
    run.log_artifact(trial_dir / EVAL_FILE)
    run.end()


def _end_trial_run(context: dict[str, Any], train: dict[str, Any], status: str) -> None:
    if train.get("mlflow_run_id"):
        from pipeline.tracking import Run

        Run(context["mlflow_uri"], train["mlflow_run_id"]).end(status)


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


# ----------------------------------------------------------------------------------------------- driver side


def run_sweep(config: SweepConfig, *, data_dirs: list[str], parent_run_id: str | None = None) -> dict[str, Any]:
    """Runs (or resumes, or reuses) the grid and returns the summary: rows, winner, baseline, paths."""
    import ray

    started = time.perf_counter()
    data_dirs = [str(Path(d).resolve()) for d in data_dirs]
    paths = data_shards(config.train.replace(data_dirs=tuple(data_dirs)))  # fails early when the data is missing
    _check_draft_vocabulary(config, paths)
    questions, dropped = evaluation_questions(config.eval, data_dirs, paths)
    incumbent_sha1 = head_identity(incumbent_dir(config))
    key = sweep_key(config, data_dirs, questions, incumbent_sha1=incumbent_sha1)
    sweep_dir = (Path(config.out_dir) / key).resolve()
    finished = _read_json(sweep_dir / RESULTS_FILE)
    if finished is not None:
        print(f"[sweep] {sweep_dir} already holds the results of this sweep; nothing to run")
        return {**finished, "cached": True}
    sweep_dir.mkdir(parents=True, exist_ok=True)
    init_ray()
    uri = _tracking_uri(config)
    parent = _parent_run(config, sweep_dir, uri, parent_run_id, key)
    trials = {trial_name(o): o for o in config.trial_overrides()}
    context = {
        "trials": {
            name: config.trial_config(
                overrides, data_dirs=data_dirs, out_dir=str(sweep_dir / "trials" / name),
                target=_absolute_spec(config.train.target).to_dict(),
                tracking={**config.train.tracking.to_dict(), "uri": uri or "", "enabled": uri is not None},
            ).to_dict()
            for name, overrides in trials.items()
        },
        "eval": config.eval.to_dict(),
        "target": _absolute_spec(config.train.target).to_dict(),
        "questions": [q.__dict__ for q in questions],
        "use_gpu": use_gpus(config.eval.use_gpu, section="eval"),
        "parent_run_id": parent,
        "mlflow_uri": uri,
        "experiment": config.train.tracking.experiment,
    }
    print(f"[sweep] {len(trials)} trials, {len(questions)} evaluation prompts ({dropped} dropped: in the training "
          f"data); sweep directory {sweep_dir}")
    incumbent = _incumbent_row(config, context, sweep_dir, sha1=incumbent_sha1)
    grid = _fit(config, context, sweep_dir, list(trials))
    described = {name: _describe(TrainConfig.from_dict(values)) | trials[name] for name, values in context["trials"].items()}
    # A trial Tune never started (the sweep was stopped first) has no config; it counts as unfinished below.
    rows = [_row(result, described) for result in grid if result.config is not None]
    unfinished = [r["trial"] for r in rows if r.get("speedup") is None and not r.get("error")]
    if unfinished or len(rows) < len(trials):
        raise SweepInterrupted(f"the sweep stopped with {len(trials) - len(rows) + len(unfinished)} of {len(trials)} "
                               f"trials unfinished; run the same command again to resume it from {sweep_dir}")
    if incumbent is not None:
        rows.append(incumbent)
    summary = _summarize(config, rows, sweep_dir, key=key, questions=len(questions), dropped=dropped)
    summary["wall_time_s"] = time.perf_counter() - started
    _log_parent(uri, parent, summary, sweep_dir, own_run=parent_run_id is None)
    write_json_atomically(summary, sweep_dir / RESULTS_FILE)
    return {**summary, "cached": False}


def _incumbent_row(config: SweepConfig, context: dict[str, Any], sweep_dir: Path, *,
                   sha1: str | None) -> dict[str, Any] | None:
    """The incumbent measured like a trial (once per sweep; a resumed sweep reuses it) and logged as a child run
    with its head as an artifact, so it can be registered like a trial when it wins. A head that fails to decode
    is a row with an error, as a failed trial is: it cannot win. It is measured before the trials, alone: where
    trials run side by side (`max_concurrent_trials` > 1 on one node) they are timed on a busier machine."""
    head_dir = incumbent_dir(config)
    if head_dir is None:
        return None
    from pipeline.heads import read_head_metadata

    directory = sweep_dir / INCUMBENT
    metadata = read_head_metadata(head_dir)  # checked when the config was loaded
    head = metadata["head"]
    row: dict[str, Any] = {"trial": INCUMBENT, "incumbent": str(head_dir), "head.head_type": head["head_type"],
                           "head.num_layers": head["num_layers"], "adv_weight": None,
                           # what registering it needs, kept with the result: the directory may be gone by then
                           "target_identity": metadata.get("target"), "incumbent_sha1": sha1}
    evaluation = _read_json(directory / EVAL_FILE)
    if evaluation is None:
        print(f"[sweep] incumbent {head_dir}: evaluating on {len(context['questions'])} prompts (a trial must beat it "
              "to win)")
        try:
            evaluation = _evaluate(context, str(head_dir))
        except Exception as error:  # noqa: BLE001 - reported in the table, as a failed trial's error is
            lines = str(error).strip().splitlines() or [type(error).__name__]
            print(f"[sweep] incumbent failed: {lines[-1]}")
            return {**row, "error": f"incumbent: {lines[-1][:200]}"}
        write_json_atomically(evaluation, directory / EVAL_FILE)
    row.update(evaluation)
    row["mlflow_run_id"] = _log_incumbent(context, head_dir, head, evaluation, directory)
    print(f"[sweep] incumbent: speedup {row['speedup']:.3f}, tau {row['tau']:.3f}")
    return row


def _log_incumbent(context: dict[str, Any], head_dir: Path, head: dict[str, Any], evaluation: dict[str, Any],
                   directory: Path) -> str | None:
    """The incumbent's child run of the sweep (made once): its source, head settings, eval/ metrics and the head."""
    uri = context["mlflow_uri"]
    if uri is None:
        return None
    logged = _read_json(directory / "run.json")
    if logged:
        return logged["run_id"]
    from pipeline.tracking import Run

    run = Run.start(uri, experiment=context["experiment"], run_name=INCUMBENT,
                    params={"incumbent": str(head_dir), "head": head}, parent_run_id=context["parent_run_id"],
                    tags={"koala.stage": INCUMBENT})
    run.log_metrics(evaluation, prefix="eval/")
    run.log_artifact(head_dir, "head")
    run.end()
    write_json_atomically({"run_id": run.run_id}, directory / "run.json")
    return run.run_id


def _tracking_uri(config: SweepConfig) -> str | None:
    """Trials may run on other nodes: a server at localhost on this node is reached at this node's IP."""
    if not config.train.tracking.enabled:
        return None
    import ray

    from pipeline.tracking import reachable_from_cluster, tracking_uri

    return reachable_from_cluster(tracking_uri(config.train.tracking), ray.util.get_node_ip_address())


def _parent_run(config: SweepConfig, sweep_dir: Path, uri: str | None, parent_run_id: str | None, key: str):
    """The caller's parent run, or the sweep's own, kept in the sweep directory so a resumed sweep reuses it."""
    if uri is None or parent_run_id:
        return parent_run_id
    state = _read_json(sweep_dir / "parent_run.json")
    if state:
        return state["run_id"]
    from pipeline.tracking import Run

    run = Run.start(uri, experiment=config.train.tracking.experiment, run_name=f"sweep-{key}",
                    params={"sweep": {k: v for k, v in config.to_dict().items() if k != "train"}, "sweep_key": key},
                    tags={"koala.stage": "sweep"})
    write_json_atomically({"run_id": run.run_id}, sweep_dir / "parent_run.json")
    return run.run_id


def max_concurrent_trials(config: SweepConfig, *, use_gpu: bool) -> int:
    """As many trials as the cluster holds at once: a trial needs its training workers' CPUs (or GPUs), then the
    evaluation task's; both never run at the same time within a trial."""
    import ray

    if config.max_concurrent_trials:
        return config.max_concurrent_trials
    resources = ray.cluster_resources()
    train = config.train
    cpus_needed = max(train.num_workers * train.cpus_per_worker, config.eval.cpus)
    slots = int(resources.get("CPU", 1) // cpus_needed)
    if use_gpu:
        slots = min(slots, int(resources.get("GPU", 0) // max(train.num_workers, 1)))
    return max(1, slots)


def _fit(config: SweepConfig, context: dict[str, Any], sweep_dir: Path, names: list[str]):
    import ray.tune

    trainable = ray.tune.with_resources(ray.tune.with_parameters(run_trial, context=context), TRIAL_DRIVER_RESOURCES)
    experiment = sweep_dir / "tune"
    if ray.tune.Tuner.can_restore(str(experiment)):
        print(f"[sweep] resuming the interrupted sweep in {experiment}; finished trials are kept")
        tuner = ray.tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True,
                                       restart_errored=True)
    else:
        concurrency = max_concurrent_trials(config, use_gpu=context["use_gpu"])
        print(f"[sweep] running up to {concurrency} trial(s) at a time")
        tuner = ray.tune.Tuner(
            trainable,
            param_space={"trial": ray.tune.grid_search(names)},
            tune_config=ray.tune.TuneConfig(max_concurrent_trials=concurrency),
            run_config=ray.tune.RunConfig(
                name="tune", storage_path=str(sweep_dir), verbose=0,  # trials print their own progress lines
                failure_config=ray.tune.FailureConfig(max_failures=config.max_trial_failures),
            ),
        )
    return tuner.fit()


def _describe(config: TrainConfig) -> dict[str, Any]:
    """The fields every table and plot groups by, whether or not the grid varies them."""
    return {"head.head_type": config.head.head_type, "head.num_layers": config.head.num_layers,
            "adv_weight": config.adv_weight}


def _row(result, trials: dict[str, dict[str, Any]]) -> dict[str, Any]:
    name = result.config["trial"]
    row: dict[str, Any] = {"trial": name, **trials[name]}
    if result.error:
        row["error"] = str(result.error).splitlines()[0][:200]
    else:
        row.update({k: v for k, v in (result.metrics or {}).items() if not k.startswith(("config", "time_", "date",
                    "timestamp", "pid", "hostname", "node_ip", "training_iteration", "done", "trial_id",
                    "iterations_since_restore", "checkpoint_dir_name", "should_checkpoint"))})
    return row


def _summarize(config: SweepConfig, rows: list[dict[str, Any]], sweep_dir: Path, *, key: str, questions: int,
               dropped: int) -> dict[str, Any]:
    grid_keys = list(dict.fromkeys(["head.head_type", "head.num_layers", "adv_weight", *config.grid]))
    winner, baseline = report.pick_winner(rows), report.pick_baseline(rows)
    (sweep_dir / "trials.csv").write_text(report.table_csv(rows, grid_keys))
    (sweep_dir / "trials.md").write_text(report.table_markdown(rows, grid_keys, winner=winner and winner["trial"]))
    plots = [report.plot_heatmaps(rows, "speedup", sweep_dir / "plots" / "speedup_heatmap.png"),
             report.plot_heatmaps(rows, "tau", sweep_dir / "plots" / "tau_heatmap.png"),
             report.plot_alpha(baseline, winner, sweep_dir / "plots" / "alpha_baseline_vs_winner.png")]
    failed = [r["trial"] for r in rows if not report.is_valid(r)]
    if failed:
        print(f"[sweep] {len(failed)} trial(s) failed or were not lossless and cannot win: {failed}")
    not_champion = report.no_champion_reason(winner, min_speedup=config.champion_min_speedup)
    eval_warning = report.small_evaluation(rows, min_new_tokens=config.eval.min_new_tokens)
    if eval_warning:
        print(f"[sweep] warning: {eval_warning}")
    # The incumbent's verdict is in the table (trials.md) and the pipeline's summary lines, not printed here too.
    return {"sweep_key": key, "sweep_dir": str(sweep_dir), "rows": rows, "winner": winner, "baseline": baseline,
            "champion": not_champion is None, "no_champion_reason": not_champion,
            "champion_min_speedup": config.champion_min_speedup, "eval_warning": eval_warning,
            "grid_keys": grid_keys, "eval_prompts": questions, "eval_prompts_dropped": dropped,
            "plots": [str(p) for p in plots], "table": str(sweep_dir / "trials.md")}


def _log_parent(uri: str | None, parent: str | None, summary: dict[str, Any], sweep_dir: Path, *, own_run: bool):
    if uri is None or parent is None:
        return
    from pipeline.tracking import Run

    run = Run(uri, parent)
    winner = summary["winner"] or {}
    trained = report.trained_rows(summary["rows"])
    run.log_metrics({"trials": len(trained), "trials_failed": sum(not report.is_valid(r) for r in trained),
                     "champion": float(summary["champion"]),
                     "incumbent_won": float(bool(winner.get("incumbent")))}, prefix="sweep/")
    run.log_metrics({k: winner.get(k) for k in ("speedup", "tau", "alpha_1", "alpha_2", "alpha_3", "exact_match",
                                                "lossless_violations", "val_tau")}, prefix="best/")
    run.describe(report.run_description(summary))
    if winner:
        run.client.set_tag(parent, "koala.winner", winner["trial"])
    run.client.set_tag(parent, "koala.champion", str(summary["champion"]).lower())
    if summary["no_champion_reason"]:
        run.client.set_tag(parent, "koala.no_champion_reason", summary["no_champion_reason"])
    if summary["eval_warning"]:
        run.client.set_tag(parent, "koala.eval_warning", summary["eval_warning"])
    for name in ("trials.csv", "trials.md"):
        run.log_artifact(sweep_dir / name, "sweep")
    run.log_artifact(sweep_dir / "plots", "sweep/plots")
    if own_run:
        run.end()


def register_winner(summary: dict[str, Any], *, model_name: str, tracking_uri: str | None,
                    target: TargetConfig) -> dict[str, Any] | None:
    """Registers the best trial's head as a new version of `model_name` (once per sweep). It gets the alias
    `champion` only when the sweep found a champion (it beat plain decoding by the floor); otherwise the version is
    tagged `koala.champion: false` with the reason, and the alias stays where it was."""
    winner = summary.get("winner")
    if not winner or tracking_uri is None or not winner.get("mlflow_run_id"):
        print("[sweep] no registrable head (no valid trial, or tracking disabled)")
        return None
    marker = Path(summary["sweep_dir"]) / "registered.json"
    done = _read_json(marker)
    if done and done["model_name"] == model_name:
        return done
    from pipeline.tracking import CHAMPION_ALIAS, register_head

    champion = summary.get("champion", True)
    reason = summary.get("no_champion_reason")
    metrics = {k: winner.get(k) for k in ("speedup", "tau", "alpha_1", "alpha_2", "alpha_3", "exact_match",
                                          "near_tie_divergences", "lossless_violations")}
    if winner.get("incumbent"):
        target_identity = winner["target_identity"]
    else:
        target_identity = json.loads((Path(summary["sweep_dir"]) / "trials" / winner["trial"] / TRAIN_SUMMARY_FILE)
                                     .read_text())["data"]["target"]
    tags = {"target": target.spec, "target_identity": target_identity, "trial": winner["trial"],
            "sweep_key": summary["sweep_key"], "metrics": metrics,
            "head": {k: winner.get(k) for k in summary["grid_keys"]}, "koala.champion": str(champion).lower()}
    if reason:
        tags["koala.no_champion_reason"] = reason
    if winner.get("incumbent"):
        tags["koala.incumbent"] = winner["incumbent"]
        tags["koala.incumbent_sha1"] = winner["incumbent_sha1"]
    version = register_head(
        tracking_uri, model_name=model_name, run_id=winner["mlflow_run_id"], tags=tags,
        alias=CHAMPION_ALIAS if champion else None,
        description=(f"sweep {summary['sweep_key']} {'winner' if champion else 'best head (not champion)'} "
                     f"{winner['trial']}: speedup {winner['speedup']:.3f}, tau {winner['tau']:.3f}"
                     + (f"; not champion: {reason}" if reason else "")),
    )
    registered = {"model_name": model_name, "version": version, "trial": winner["trial"], "champion": champion,
                  "model_uri": f"models:/{model_name}@{CHAMPION_ALIAS}" if champion else f"models:/{model_name}/{version}"}
    write_json_atomically(registered, marker)
    return registered
