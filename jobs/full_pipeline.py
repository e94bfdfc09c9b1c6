"""The whole KOALA experiment: distill -> sweep (train + evaluate every trial) -> register the winner -> serve it.

    ray job submit --working-dir . -- python jobs/full_pipeline.py --config cpu-demo
    python jobs/full_pipeline.py --config jobs/presets/smoke.yaml --set sweep.eval.max_new_tokens=32

`--config` takes a preset name (`cpu-demo`, `smoke`, `paper-vicuna-7b`, see jobs/presets/) or a YAML file. Each
stage's output sits under `run_dir`, keyed by a content hash of its inputs, so a re-run skips finished stages and
an interrupted sweep resumes. Without a cluster address, Ray starts locally.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not __package__:  # `python jobs/full_pipeline.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

from pipeline.config import ConfigError, PipelineConfig, TrackingConfig, apply_overrides
from tune import report
from tune.sweep import SweepInterrupted

REPO_ROOT = Path(__file__).resolve().parents[1]
PRESETS_DIR = Path(__file__).resolve().parent / "presets"
PROMPT_FILE_SUFFIXES = (".json", ".jsonl")


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_pipeline_config(config: str, overrides: list[str] = ()) -> PipelineConfig:
    """A preset name or YAML path, then `field.sub=value` overrides; relative prompt files are looked up in the
    working directory, then next to the repository (where the presets expect ../shared/data)."""
    path = PRESETS_DIR / f"{config}.yaml" if config in preset_names() else Path(config)
    if not path.is_file():
        raise ConfigError(f"pipeline: {config!r} is neither a preset ({', '.join(preset_names())}) nor a YAML file")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"pipeline: {path} must hold a mapping of field: value")
    apply_overrides(values, overrides, section="pipeline")
    distill = values.get("distill") or {}
    if isinstance(distill, dict) and "prompts" in distill:
        prompts = distill["prompts"] if isinstance(distill["prompts"], list) else [distill["prompts"]]
        distill["prompts"] = [_locate_prompt_file(str(p)) for p in prompts]
    config = PipelineConfig.from_dict(values)
    if config.serve:
        serve_settings(config, drafter="models:/koala-drafter@champion", tracking_uri=None)  # validate up front
    return config


def _locate_prompt_file(source: str) -> str:
    if not source.endswith(PROMPT_FILE_SUFFIXES):
        return source  # a Hugging Face dataset name
    for candidate in (Path(source).expanduser(), REPO_ROOT / source):
        if candidate.is_file():
            return str(candidate.resolve())
    raise ConfigError(
        f"distill.prompts: {source} not found (relative paths are tried in the working directory and in {REPO_ROOT}); "
        "pass your own prompt files or a Hugging Face dataset: --set 'distill.prompts=[my_prompts.jsonl]'"
    )


def content_key(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def prompt_identity(sources: tuple[str, ...], split: str) -> list[Any]:
    """Files by content (so editing a prompt file means new data), dataset names by name and split."""
    identity = []
    for source in sources:
        path = Path(source)
        identity.append(hashlib.sha1(path.read_bytes()).hexdigest() if path.is_file() else [source, split])
    return identity


class StageFailed(RuntimeError):
    """A stage raised: carries the stage's name so that the job's one-line error can say which."""

    def __init__(self, stage: str, error: BaseException) -> None:
        text = str(error).strip()
        detail = text.splitlines()[0] if text else ""
        super().__init__(f"stage {stage} failed: {type(error).__name__}" + (f": {detail}" if detail else ""))
        self.stage = stage
        self.traceback_file: Path | None = None  # where the full traceback went (the error line is only the start)


class StageClock:
    """Prints which stage runs and how long each took; the table goes into the summary. A stage whose output was
    reused keeps the cost of the run that made it (`original_seconds`, from `known_costs`, else the stage output's
    own `wall_time_s`); `seconds` is always what this run spent."""

    def __init__(self, known_costs: dict[str, float] | None = None) -> None:
        self.started = time.perf_counter()
        self.stages: dict[str, dict[str, Any]] = {}
        self.known_costs = dict(known_costs or {})

    def run(self, name: str, work, *, number: int, total: int):
        print(f"\n[pipeline] stage {number}/{total}: {name} (elapsed {self.elapsed():.0f}s)", flush=True)
        started = time.perf_counter()
        try:
            result, cached = work()
        except SweepInterrupted:
            raise
        except Exception as error:
            raise StageFailed(name, error) from error
        seconds = time.perf_counter() - started
        stage: dict[str, Any] = {"seconds": round(seconds, 1), "cached": cached}
        if cached:
            original = self.known_costs.get(name)
            if original is None and isinstance(result, dict) and result.get("wall_time_s") is not None:
                original = result["wall_time_s"]
            stage["original_seconds"] = None if original is None else round(float(original), 1)
            made = f"; made in {original:.0f}s by an earlier run" if original is not None else ""
            print(f"[pipeline] {name}: reused cached output in {seconds:.0f}s{made}", flush=True)
        else:
            print(f"[pipeline] {name}: done in {seconds:.0f}s", flush=True)
        self.stages[name] = stage
        return result

    @property
    def any_cached(self) -> bool:
        return any(stage["cached"] for stage in self.stages.values())

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def run_pipeline(config: PipelineConfig) -> dict[str, Any]:
    import ray

    from pipeline.stages.resources import init_ray
    from pipeline.tracking import reachable_from_cluster, tracking_uri

    init_ray()
    run_dir = Path(config.run_dir).resolve()
    if config.tracking.enabled:
        uri = reachable_from_cluster(tracking_uri(tracking_settings(config)), ray.util.get_node_ip_address())
        config = config.replace(tracking=config.tracking.replace(uri=uri))
    else:
        uri = None
    state_path = _state_path(config, run_dir)
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    parent = _pipeline_run(config, state_path, state, uri)
    try:
        return _run_stages(config, run_dir, state_path, state, parent, uri)
    except (StageFailed, SweepInterrupted) as error:
        if isinstance(error, StageFailed):
            error.traceback_file = state_path.with_suffix(".error.txt")
            error.traceback_file.parent.mkdir(parents=True, exist_ok=True)
            error.traceback_file.write_text("".join(traceback.format_exception(error.__cause__)))
        _end_failed(uri, parent, error)
        raise


def _run_stages(config: PipelineConfig, run_dir: Path, state_path: Path, state: dict[str, Any], parent: str | None,
                uri: str | None) -> dict[str, Any]:
    from pipeline.stages.distill import run_distill
    from tune.sweep import register_winner, run_sweep

    clock = StageClock(state.get("stage_seconds"))
    total = 4 if config.serve else 3

    distill_config = config.distill_config(str(run_dir / "data" / content_key(
        config.distill.generation_settings(), config.distill.max_prompts, config.distill.split,
        prompt_identity(config.distill.prompts, config.distill.split))))

    def distill():
        summary_path = Path(distill_config.out_dir) / "summary.json"
        if summary_path.is_file():
            return json.loads(summary_path.read_text()), True
        return run_distill(distill_config, parent_run_id=parent), False

    data = clock.run("distill", distill, number=1, total=total)
    print(f"[pipeline] data: {data['prompts_kept']} prompts, {data['response_tokens_total']} response tokens "
          f"in {distill_config.out_dir}")

    def sweep():
        summary = run_sweep(config.sweep_config(str(run_dir / "sweeps")), data_dirs=[distill_config.out_dir],
                            parent_run_id=parent)
        return summary, summary["cached"]

    swept = clock.run("sweep", sweep, number=2, total=total)

    def register():
        marker = Path(swept["sweep_dir"]) / "registered.json"
        cached = marker.is_file()
        return register_winner(swept, model_name=config.sweep.model_name, tracking_uri=uri,
                               target=config.target), cached

    registered = clock.run("register", register, number=3, total=total)
    served = None
    if config.serve:
        served = clock.run("serve", lambda: (_serve(config, registered, uri), False), number=4, total=total)
    summary = {"stages": clock.stages, "wall_time_s": round(clock.elapsed(), 1), "data_dir": distill_config.out_dir,
               "sweep_dir": swept["sweep_dir"], "winner": swept["winner"], "baseline": swept["baseline"],
               "champion": swept.get("champion", True), "no_champion_reason": swept.get("no_champion_reason"),
               "eval_warning": swept.get("eval_warning"),
               "registered": registered, "serve": served, "mlflow_uri": uri, "mlflow_parent_run_id": parent}
    _remember_costs(state_path, clock)
    _finish(uri, parent, summary, cached=clock.any_cached)
    print_summary(summary, swept)
    return summary


def tracking_settings(config: PipelineConfig) -> TrackingConfig:
    """The pipeline's tracking; the embedded MLflow store lives in `run_dir` with the rest of the run's output
    unless `tracking.run_dir` is set (with `ray job submit --working-dir .`, a store left in the job's copy of the
    directory would go with it)."""
    if not config.tracking.run_dir:
        return config.tracking.replace(run_dir=str(Path(config.run_dir).resolve()))
    return config.tracking


def serve_settings(config: PipelineConfig, *, drafter: str, tracking_uri: str | None):
    """The Serve stage's config: `serve_options` (ServeConfig fields the pipeline does not set itself) with the
    pipeline's target, tracking, the registered champion and the drafting settings the sweep measured it with
    (`sweep.eval`: a head measured with one tree and served with another is not the head that won) filled in."""
    from serve.config import MEASURED_DRAFTING_FIELDS, ServeConfig, check_pipeline_serve_options

    check_pipeline_serve_options(config.serve_options)
    measured = config.sweep.eval.decode_config()
    try:
        return ServeConfig.from_dict({**config.serve_options, "target": config.target.to_dict(), "drafter": drafter,
                                      "tracking": {**config.tracking.to_dict(), "uri": tracking_uri or ""},
                                      **{field: getattr(measured, field) for field in MEASURED_DRAFTING_FIELDS}})
    except ConfigError as error:
        raise ConfigError(f"pipeline.serve_options: {error}") from None


def _serve(config: PipelineConfig, registered: dict[str, Any] | None, uri: str | None) -> dict[str, Any] | None:
    """Deploys the champion (target + the registered head version) with Ray Serve and sends one smoke request.
    Without a champion the target is served with plain decoding (a head that does not beat it would only slow
    requests), unless `serve_best_head_anyway` asks for the best registered head."""
    from serve.app import run_serve
    from serve.client import smoke_request

    if registered is not None and (registered.get("champion", True) or config.serve_best_head_anyway):
        # The version the register stage registered, not the `champion` alias: another run may have moved it since.
        version_uri = f"models:/{registered['model_name']}/{registered['version']}"
        serve_config = serve_settings(config, drafter=version_uri, tracking_uri=uri)
    else:
        serve_config = serve_settings(config, drafter="", tracking_uri=uri).replace(use_drafter=False)
        print("[pipeline] serve: no champion: serving the target with plain decoding (no drafter); set "
              "serve_best_head_anyway: true to serve the best registered head regardless")
    url = run_serve(serve_config)
    answer = smoke_request(url, model=serve_config.model_name)
    tau = answer.get("speculative", {}).get("acceptance_length", float("nan"))
    print(f"[pipeline] serve: {url} answered the smoke request with {answer['usage']['completion_tokens']} tokens "
          f"(tau {tau:.2f}): {answer['choices'][0]['message']['content'][:80]!r}")
    return {"url": url, "model": serve_config.model_name, "drafter": serve_config.drafter_source or None,
            "smoke_completion_tokens": answer["usage"]["completion_tokens"]}


def _state_path(config: PipelineConfig, run_dir: Path) -> Path:
    """Where this pipeline config keeps its MLflow parent run id and the real cost of each stage it ran."""
    # How the winner is served does not change the experiment: serve_options stay out of the key.
    key = content_key({k: v for k, v in config.to_dict().items() if k != "serve_options"})
    return run_dir / "pipelines" / f"{config.name}-{key}.json"


def _pipeline_run(config: PipelineConfig, state_path: Path, state: dict[str, Any], uri: str | None) -> str | None:
    """One MLflow parent run per pipeline config; a re-run of the same config logs into the same parent."""
    if uri is None:
        return None
    from pipeline.tracking import Run

    if state.get("run_id"):
        Run(uri, state["run_id"]).client.update_run(state["run_id"], status="RUNNING")
        return state["run_id"]
    run = Run.start(uri, experiment=config.tracking.experiment, run_name=f"pipeline-{config.name}",
                    params=config.to_dict(), tags={"koala.stage": "pipeline", "koala.pipeline_key": state_path.stem})
    state["run_id"] = run.run_id
    _write_state(state_path, state)
    return run.run_id


def _write_state(state_path: Path, state: dict[str, Any]) -> None:
    from pipeline.data import write_json_atomically

    write_json_atomically(state, state_path)


def _remember_costs(state_path: Path, clock: StageClock) -> None:
    """Keeps the cost of every stage that really ran (a later run that reuses its output reports it)."""
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    costs = state.setdefault("stage_seconds", {})
    for name, stage in clock.stages.items():
        if not stage["cached"]:
            costs[name] = stage["seconds"]
    if not clock.any_cached:
        state["wall_time_s"] = round(clock.elapsed(), 1)
    _write_state(state_path, state)


def _finish(uri: str | None, parent: str | None, summary: dict[str, Any], *, cached: bool) -> None:
    """Logs the run's costs on the parent run. A run that did every stage logs `time/stage_<name>_s`,
    `time/wall_time_s` and `pipeline_summary.json`: the real cost of the experiment. A run that reused any stage
    leaves those alone and logs its own times as `time/rerun_*` and its summary as `pipeline_summary_rerun.json`."""
    if uri is None or parent is None:
        return
    from pipeline.tracking import Run

    run = Run(uri, parent)
    if not cached:
        run.log_metrics({"wall_time_s": summary["wall_time_s"],
                         **{f"stage_{name}_s": stage["seconds"] for name, stage in summary["stages"].items()}},
                        prefix="time/")
        run.log_dict(summary, "pipeline_summary.json")
    else:
        run.log_metrics({"rerun_wall_time_s": summary["wall_time_s"],
                         **{f"rerun_stage_{name}_s": stage["seconds"] for name, stage in summary["stages"].items()}},
                        prefix="time/")
        reused = [name for name, stage in summary["stages"].items() if stage["cached"]]
        run.client.set_tag(parent, "koala.last_rerun", f"reused cached {', '.join(reused)}; "
                                                       f"took {summary['wall_time_s']:.0f}s")
        run.log_dict(summary, "pipeline_summary_rerun.json")
    run.end()


def _end_failed(uri: str | None, parent: str | None, error: Exception) -> None:
    """Ends the parent run FAILED (KILLED for an interrupted sweep, which a re-run resumes), tagged with the stage,
    so that MLflow does not show a failed pipeline as still running."""
    if uri is None or parent is None:
        return
    from pipeline.tracking import Run

    run = Run(uri, parent)
    if isinstance(error, StageFailed):
        run.client.set_tag(parent, "koala.failed_stage", error.stage)
        run.client.set_tag(parent, "koala.error", str(error)[:500])
        run.log_artifact(error.traceback_file)
    run.end("KILLED" if isinstance(error, SweepInterrupted) else "FAILED")


def _format_alpha(row: dict[str, Any] | None) -> str:
    if not row:
        return "-"
    return "[" + ", ".join("-" if row.get(f"alpha_{n}") is None else f"{row[f'alpha_{n}']:.3f}" for n in (1, 2, 3)) + "]"


def _stage_line(name: str, stage: dict[str, Any]) -> str:
    if not stage["cached"]:
        return f"{name} {stage['seconds']:.0f}s"
    original = stage.get("original_seconds")
    return f"{name} cached ({stage['seconds']:.0f}s now" + (f", {original:.0f}s when made)" if original is not None else ")")


def print_summary(summary: dict[str, Any], swept: dict[str, Any]) -> None:
    print("\n[pipeline] stages: " + ", ".join(_stage_line(name, stage) for name, stage in summary["stages"].items()))
    print(f"[pipeline] trials ({swept['table']}):\n")
    print(Path(swept["table"]).read_text())
    winner, baseline = summary["winner"], summary["baseline"]
    if summary["eval_warning"]:
        print(f"[pipeline] warning: {summary['eval_warning']}")
    if winner:
        title = "champion" if summary["champion"] else "best head"
        name = f"incumbent {winner['incumbent']}" if winner.get("incumbent") else winner["trial"]
        print(f"[pipeline] {title} {name}: speedup {winner['speedup']:.3f}x, tau {winner['tau']:.3f}, "
              f"n-alpha {_format_alpha(winner)}")
    if verdict := report.incumbent_verdict(swept["rows"], winner):
        print(f"[pipeline] {verdict}")
    if baseline and winner and baseline["trial"] == winner["trial"]:
        print("[pipeline] it is also the best K=1 lambda=0 (plain EAGLE/Medusa) trial")
    elif baseline:
        print(f"[pipeline] best K=1 lambda=0 baseline {baseline['trial']}: speedup {baseline['speedup']:.3f}x, "
              f"tau {baseline['tau']:.3f}, n-alpha {_format_alpha(baseline)}")
    if summary["registered"]:
        alias = "" if summary["registered"].get("champion", True) else " without the champion alias"
        print(f"[pipeline] registered {summary['registered']['model_uri']} (version "
              f"{summary['registered']['version']}){alias}")
    if summary["no_champion_reason"]:
        print(f"[pipeline] no head beat plain decoding: {summary['no_champion_reason']}")
    if summary["mlflow_uri"]:
        from pipeline.tracking import runs_page

        page = runs_page(summary["mlflow_uri"], summary["mlflow_parent_run_id"])
        print(f"[pipeline] MLflow: {summary['mlflow_uri']} (parent run {summary['mlflow_parent_run_id']}); browse "
              f"with `mlflow ui --backend-store-uri {summary['mlflow_uri']}`, then open http://127.0.0.1:5000{page}")
    if summary["serve"]:
        drafter = summary["serve"]["drafter"]
        again = f"koala serve --drafter {drafter}" if drafter else "koala serve --no-drafter"
        if drafter and drafter.startswith("models:/") and summary["mlflow_uri"]:
            again += f" --tracking-uri {summary['mlflow_uri']}"
        print(f"[pipeline] Serve endpoint: {summary['serve']['url']} (model {summary['serve']['model']!r}, "
              f"{'drafter ' + drafter if drafter else 'plain decoding'}); it lives as long as this Ray cluster: on a "
              f"cluster it stays deployed, locally pass --keep-serving or run `{again}`")
    print(f"[pipeline] total wall time {summary['wall_time_s']:.0f}s")


def _wait_for_ctrl_c(url: str) -> None:
    print(f"[pipeline] serving at {url} until Ctrl-C")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="cpu-demo", help=f"a preset ({', '.join(preset_names())}) or a YAML file")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override any field, dotted (e.g. --set sweep.eval.per_category=2)")
    parser.add_argument("--address", help="Ray cluster address (default: the job's cluster, or a local Ray)")
    parser.add_argument("--keep-serving", action="store_true",
                        help="keep the process (and a local Ray cluster with the endpoint) alive until Ctrl-C")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_pipeline_config(args.config, args.set)
        if args.address:
            import ray

            ray.init(address=args.address)
        summary = run_pipeline(config)
        if args.keep_serving and summary["serve"]:
            _wait_for_ctrl_c(summary["serve"]["url"])
    except ConfigError as error:
        print(f"koala run: error: {error}", file=sys.stderr)
        return 2
    except SweepInterrupted as error:
        print(f"koala run: {error}", file=sys.stderr)
        return 130
    except StageFailed as error:
        print(f"koala run: error: {error} (traceback in {error.traceback_file})", file=sys.stderr)
        return 2
    return 0 if summary["winner"] else 1


if __name__ == "__main__":
    sys.exit(main())
