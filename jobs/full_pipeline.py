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
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not __package__:  # `python jobs/full_pipeline.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

from pipeline.config import ConfigError, PipelineConfig, apply_overrides
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


class StageClock:
    """Prints which stage runs and how long each took; the table goes into the summary."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.stages: dict[str, dict[str, Any]] = {}

    def run(self, name: str, work, *, number: int, total: int):
        print(f"\n[pipeline] stage {number}/{total}: {name} (elapsed {self.elapsed():.0f}s)", flush=True)
        started = time.perf_counter()
        result, cached = work()
        seconds = time.perf_counter() - started
        self.stages[name] = {"seconds": round(seconds, 1), "cached": cached}
        print(f"[pipeline] {name}: {'reused cached output' if cached else 'done'} in {seconds:.0f}s", flush=True)
        return result

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def run_pipeline(config: PipelineConfig) -> dict[str, Any]:
    import ray

    from pipeline.stages.distill import run_distill
    from pipeline.tracking import reachable_from_cluster, tracking_uri
    from tune.sweep import register_winner, run_sweep

    if not ray.is_initialized():
        ray.init()
    run_dir = Path(config.run_dir).resolve()
    if config.tracking.enabled:
        uri = reachable_from_cluster(tracking_uri(config.tracking), ray.util.get_node_ip_address())
        config = config.replace(tracking=config.tracking.replace(uri=uri))
    else:
        uri = None
    parent = _pipeline_run(config, run_dir, uri)
    clock = StageClock()
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
               "registered": registered, "serve": served, "mlflow_uri": uri, "mlflow_parent_run_id": parent}
    _finish(uri, parent, summary, swept)
    print_summary(summary, swept)
    return summary


def serve_settings(config: PipelineConfig, *, drafter: str, tracking_uri: str | None):
    """The Serve stage's config: `serve_options` (any ServeConfig field) with the pipeline's target, tracking and
    the registered champion filled in."""
    from serve.config import ServeConfig

    try:
        return ServeConfig.from_dict({**config.serve_options, "target": config.target.to_dict(), "drafter": drafter,
                                      "tracking": {**config.tracking.to_dict(), "uri": tracking_uri or ""}})
    except ConfigError as error:
        raise ConfigError(f"pipeline.serve_options: {error}") from None


def _serve(config: PipelineConfig, registered: dict[str, Any] | None, uri: str | None) -> dict[str, Any] | None:
    """Deploys the champion (target + registered head) with Ray Serve and sends one smoke request."""
    from serve.app import run_serve
    from serve.client import smoke_request

    if registered is None:
        print("[pipeline] serve: no registered champion to deploy")
        return None
    serve_config = serve_settings(config, drafter=registered["model_uri"], tracking_uri=uri)
    url = run_serve(serve_config)
    answer = smoke_request(url, model=serve_config.model_name)
    tau = answer.get("speculative", {}).get("acceptance_length", float("nan"))
    print(f"[pipeline] serve: {url} answered the smoke request with {answer['usage']['completion_tokens']} tokens "
          f"(tau {tau:.2f}): {answer['choices'][0]['message']['content'][:80]!r}")
    return {"url": url, "model": serve_config.model_name, "drafter": registered["model_uri"],
            "smoke_completion_tokens": answer["usage"]["completion_tokens"]}


def _pipeline_run(config: PipelineConfig, run_dir: Path, uri: str | None) -> str | None:
    """One MLflow parent run per pipeline config; a re-run of the same config logs into the same parent."""
    if uri is None:
        return None
    from pipeline.tracking import Run

    # How the winner is served does not change the experiment: serve_options stay out of the key.
    key = content_key({k: v for k, v in config.to_dict().items() if k != "serve_options"})
    state_path = run_dir / "pipelines" / f"{config.name}-{key}.json"
    if state_path.is_file():
        run_id = json.loads(state_path.read_text())["run_id"]
        Run(uri, run_id).client.update_run(run_id, status="RUNNING")
        return run_id
    run = Run.start(uri, experiment=config.tracking.experiment, run_name=f"pipeline-{config.name}",
                    params=config.to_dict(), tags={"koala.stage": "pipeline", "koala.pipeline_key": key})
    state_path.parent.mkdir(parents=True, exist_ok=True)
    state_path.write_text(json.dumps({"run_id": run.run_id}) + "\n")
    return run.run_id


def _finish(uri: str | None, parent: str | None, summary: dict[str, Any], swept: dict[str, Any]) -> None:
    if uri is None or parent is None:
        return
    from pipeline.tracking import Run

    run = Run(uri, parent)
    run.log_metrics({f"stage_{name}_s": stage["seconds"] for name, stage in summary["stages"].items()})
    run.log_metrics({"wall_time_s": summary["wall_time_s"]})
    run.log_dict(summary, "pipeline_summary.json")
    run.end()


def _format_alpha(row: dict[str, Any] | None) -> str:
    if not row:
        return "-"
    return "[" + ", ".join("-" if row.get(f"alpha_{n}") is None else f"{row[f'alpha_{n}']:.3f}" for n in (1, 2, 3)) + "]"


def print_summary(summary: dict[str, Any], swept: dict[str, Any]) -> None:
    print("\n[pipeline] stages: " + ", ".join(
        f"{name} {stage['seconds']:.0f}s{' (cached)' if stage['cached'] else ''}" for name, stage in summary["stages"].items()))
    print(f"[pipeline] trials ({swept['table']}):\n")
    print(Path(swept["table"]).read_text())
    winner, baseline = summary["winner"], summary["baseline"]
    if winner:
        print(f"[pipeline] winner {winner['trial']}: speedup {winner['speedup']:.3f}x, tau {winner['tau']:.3f}, "
              f"n-alpha {_format_alpha(winner)}")
    if baseline:
        print(f"[pipeline] best K=1 lambda=0 baseline {baseline['trial']}: speedup {baseline['speedup']:.3f}x, "
              f"tau {baseline['tau']:.3f}, n-alpha {_format_alpha(baseline)}")
    if summary["registered"]:
        print(f"[pipeline] registered {summary['registered']['model_uri']} (version {summary['registered']['version']})")
    if summary["mlflow_uri"]:
        print(f"[pipeline] MLflow: {summary['mlflow_uri']} (parent run {summary['mlflow_parent_run_id']}); "
              f"browse with: mlflow ui --backend-store-uri {summary['mlflow_uri']}")
    if summary["serve"]:
        print(f"[pipeline] Serve endpoint: {summary['serve']['url']} (model {summary['serve']['model']!r}); it lives as "
              "long as this Ray cluster: on a cluster it stays deployed, locally pass --keep-serving or run "
              f"`koala serve --drafter {summary['serve']['drafter']}`")
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
    return 0 if summary["winner"] else 1


if __name__ == "__main__":
    sys.exit(main())
