"""Checks made on the driver before deploying, so that a mistake fails in seconds with one line that says what to do
instead of inside every replica after a minute of retries.

They read only the target's config and the head's JSON config (no weights; for a registered drafter only its
`head_config.json` is downloaded, to a temporary directory).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from pipeline.heads import HEAD_CONFIG_FILE, HeadLoadError, check_target_matches, read_head_metadata
from pipeline.target import load_model_config
from pipeline.tracking import download_registered_head, tracking_uri
from serve.config import REGISTRY_PREFIX, ServeConfig


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def registered_head_metadata(config: ServeConfig) -> dict[str, Any]:
    """The head config of a `models:/` drafter, or `HeadLoadError` when the URI does not resolve to a head."""
    uri = tracking_uri(config.tracking)
    with tempfile.TemporaryDirectory(prefix="koala-drafter-check-") as scratch:
        try:
            head_dir = download_registered_head(uri, config.drafter_source, scratch, only=HEAD_CONFIG_FILE)
        except Exception as error:  # MLflow raises its own exception types (and OSError, for an unreachable store)
            raise HeadLoadError(
                f"drafter {config.drafter_source} does not resolve in the MLflow registry at {uri} "
                f"({first_line(error)}); register a head with `koala tune` or `koala run`, point --tracking-uri at "
                "the store that has it, or pass a head directory"
            ) from error
        try:
            return read_head_metadata(head_dir, with_weights=False)
        except HeadLoadError as error:
            raise HeadLoadError(f"drafter {config.drafter_source} is not a head: {error}") from error


def target_identity(config: ServeConfig) -> dict[str, Any]:
    """The sizes a head must match, read from the target's config only (`TargetLoadError` if it cannot be read)."""
    model_config = load_model_config(config.target.spec, trust_remote_code=config.target.trust_remote_code)
    text_config = model_config.get_text_config()
    return {"name": config.target.spec, "model_type": model_config.model_type,
            "hidden_size": getattr(text_config, "hidden_size", None),
            "vocab_size": getattr(text_config, "vocab_size", None)}


def check_before_deploy(config: ServeConfig) -> None:
    """Raises `HeadLoadError` when the drafter directory is missing or malformed, a `models:/` drafter does not
    resolve, or the head was made for a target of another hidden size or vocabulary; `TargetLoadError` when the
    target's config cannot be read. The API key is checked where the replicas run (`serve.app`)."""
    metadata = None
    source = config.drafter_source
    if source.startswith(REGISTRY_PREFIX):
        metadata = registered_head_metadata(config)
    elif source:
        metadata = read_head_metadata(Path(source).expanduser())
    actual = target_identity(config)
    if metadata is not None and None not in (actual["hidden_size"], actual["vocab_size"]):
        check_target_matches(metadata.get("target", {}), actual, directory=Path(source))
