"""The one place that talks to MLflow. Called from the driver and from rank 0 only.

Runs are created on the driver and their id handed to Ray workers, so a worker restarted after a failure keeps
logging into the same run instead of starting a new one.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit
from typing import Any

from pipeline.config import TrackingConfig

log = logging.getLogger(__name__)
MAX_PARAM_LENGTH = 500
DEFAULT_STORE_DIR = "runs"  # the embedded store's directory when tracking.run_dir is not set


def tracking_uri(config: TrackingConfig) -> str:
    """The configured URI, else `MLFLOW_TRACKING_URI`, else the embedded default: a SQLite store in the run
    directory."""
    if config.uri:
        return config.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    path = Path(config.run_dir or DEFAULT_STORE_DIR).resolve() / "mlflow.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def reachable_from_cluster(uri: str, driver_ip: str) -> str:
    """A tracking server at localhost on the driver's node is at the driver's IP for every other node."""
    parsed = urlsplit(uri)
    if parsed.scheme in ("http", "https") and parsed.hostname in ("127.0.0.1", "localhost"):
        return urlunsplit(parsed._replace(netloc=parsed.netloc.replace(parsed.hostname, driver_ip, 1)))
    return uri


def default_artifact_location(uri: str) -> str | None:
    """For a local SQLite store, artifacts go next to the database (not into the working directory)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return None


def flatten_params(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config dicts -> MLflow params `a.b.c: str`, values cut to MLflow's length limit."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
            flat[name] = text[:MAX_PARAM_LENGTH]
    return flat


# Metric names in MLflow carry their stage as a prefix, which the UI turns into chart sections and the runs table
# sorts by, so the measured results come first: best/ (a pipeline's or sweep's best head: speedup, tau, n-alpha),
# distill/, eval/ (a trial's measured speedup, tau, n-alpha, losslessness), sweep/, time/ (seconds), train/
# (losses, learning rate, steps), val/ (held-out accuracy and tau during training).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # MLflow 3 opens such an experiment in its training-runs view
RUN_DESCRIPTION_TAG = "mlflow.note.content"


def training_metric_names(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Training-loop metrics as MLflow names: `val_tau` -> `val/tau`, `loss_distill` -> `train/loss_distill`."""
    return {(f"val/{k.removeprefix('val_')}" if k.startswith("val_") else f"train/{k}"): v for k, v in metrics.items()}


def runs_page(uri: str, run_id: str) -> str:
    """The UI path of a run's experiment, opened in MLflow 3's model-training view (its default is the GenAI
    view, and it ignores the experiment's kind tag once the view toggle exists)."""
    from mlflow.tracking import MlflowClient

    experiment_id = MlflowClient(tracking_uri=uri).get_run(run_id).info.experiment_id
    return f"/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


class Run:
    """An MLflow run addressed by id through `MlflowClient` (no global active-run state, safe in Ray workers)."""

    def __init__(self, uri: str, run_id: str) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri=uri)

    @classmethod
    def start(cls, uri: str, *, experiment: str, run_name: str, params: Mapping[str, Any],
              tags: Mapping[str, str] | None = None, parent_run_id: str | None = None,
              started_at: float | None = None) -> Run:
        """A new run; `started_at` (seconds since the epoch) backdates its start for work done before logging."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(
            experiment, artifact_location=default_artifact_location(uri), tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )
        if found and EXPERIMENT_KIND_TAG not in found.tags:
            client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        start_time = int(started_at * 1000) if started_at is not None else None
        run = client.create_run(experiment_id, run_name=run_name, tags=all_tags, start_time=start_time)
        tracked = cls(uri, run.info.run_id)
        tracked.log_params(params)
        return tracked

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat = [Param(k, v) for k, v in flatten_params(params).items()]
        for start in range(0, len(flat), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=flat[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float | None], *, step: int = 0, prefix: str = "") -> None:
        """Numeric metrics (None, strings and booleans are skipped), each name with `prefix` (e.g. "eval/")."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(prefix + k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: Any, name: str) -> None:
        self.client.log_dict(self.run_id, data, name)

    def describe(self, markdown: str) -> None:
        """The run's description (the text MLflow shows at the top of the run page)."""
        self.client.set_tag(self.run_id, RUN_DESCRIPTION_TAG, markdown)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


CHAMPION_ALIAS = "champion"


def register_head(uri: str, *, model_name: str, run_id: str, artifact_path: str = "head",
                  tags: Mapping[str, Any] | None = None, description: str = "", alias: str | None = CHAMPION_ALIAS) -> str:
    """Registers `runs:/<run_id>/<artifact_path>` (a head directory) as a new version of `model_name` and points
    `alias` at it (none: the version is registered without moving any alias). Returns the version. Tag values are
    stored as strings (JSON for structures)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        client.get_registered_model(model_name)
    except MlflowException:
        client.create_registered_model(model_name, description="KOALA draft heads; alias 'champion' is the sweep winner")
    version = client.create_model_version(
        model_name, source=f"runs:/{run_id}/{artifact_path}", run_id=run_id,
        tags={k: v if isinstance(v, str) else json.dumps(v) for k, v in (tags or {}).items()},
        description=description,
    )
    if alias:
        client.set_registered_model_alias(model_name, alias, version.version)
    return version.version


def download_registered_head(uri: str, model_uri: str, dst: str | Path, *, only: str = "") -> Path:
    """`models:/NAME@champion` (or `models:/NAME/VERSION`) -> a local head directory that `load_head` reads.
    With `only` (a file name in the head directory) just that file is fetched, into `dst`, and its directory is
    returned: enough for `read_head_metadata` without the weights."""
    import mlflow.artifacts
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name, _, selector = model_uri.removeprefix("models:/").partition("@")
    if selector:
        source = client.get_model_version_by_alias(name, selector).source
    else:
        name, _, number = model_uri.removeprefix("models:/").partition("/")
        source = client.get_model_version(name, number).source
    Path(dst).mkdir(parents=True, exist_ok=True)
    if only:
        source = f"{source.rstrip('/')}/{only}"
    if source.startswith("runs:/"):  # through this client: mlflow.artifacts would open the default registry, a
        run_id, _, path = source.removeprefix("runs:/").partition("/")  # mlflow.db in the working directory
        local = Path(client.download_artifacts(run_id, path, str(dst)))
    else:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst), tracking_uri=uri))
    return local.parent if only else local
