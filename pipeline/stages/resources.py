"""Resource decisions shared by the Ray stages."""

from __future__ import annotations

from pipeline.config import ConfigError


def use_gpus(use_gpu: str, *, section: str) -> bool:
    """Resolves a stage's `use_gpu` ('auto', 'yes', 'no') against the GPUs the Ray cluster reports."""
    import ray
    import ray.data

    if use_gpu == "no":
        return False
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    if use_gpu == "yes" and not has_gpus:
        raise ConfigError(f"{section}.use_gpu: 'yes' but the Ray cluster has no GPUs; use 'auto' or 'no'")
    return has_gpus


# Set for every process of a Ray cluster this driver starts (the raylet passes its environment on to workers).
# Ray Data's progress bars, relayed from workers as log lines, were most of a run's output; the stages print their
# own progress. Set a variable yourself to keep Ray's default.
QUIET_RAY_ENVIRONMENT = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}


def init_ray(**kwargs) -> None:
    """`ray.init` for the stages, unless Ray is already up: a local cluster without Ray Data's progress bars. On an
    existing cluster (`ray job submit`), jobs/runtime_env.yaml sets the same variables."""
    import os

    import ray
    import ray.data

    if ray.is_initialized():
        return
    for name, value in QUIET_RAY_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    ray.init(**kwargs)
    ray.data.DataContext.get_current().enable_progress_bars = os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] != "1"
