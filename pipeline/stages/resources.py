"""Resource decisions shared by the Ray stages."""

from __future__ import annotations

from pipeline.config import ConfigError


def use_gpus(use_gpu: str, *, section: str) -> bool:
    """Resolves a stage's `use_gpu` ('auto', 'yes', 'no') against the GPUs the Ray cluster reports."""
    import ray

    if use_gpu == "no":
        return False
    has_gpus = ray.cluster_resources().get("GPU", 0) > 0
    if use_gpu == "yes" and not has_gpus:
        raise ConfigError(f"{section}.use_gpu: 'yes' but the Ray cluster has no GPUs; use 'auto' or 'no'")
    return has_gpus
