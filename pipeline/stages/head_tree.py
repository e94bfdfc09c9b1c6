"""`koala head tree`: a head's static draft tree measured again, at another size, on held-out rows.

Training stores a static tree of `STATIC_TREE_NODES` rank paths, chosen from the head's per-depth rank accuracies on
its validation rows (Medusa's sparse-tree construction); decoding's learnt budget drafts the best prefix of it that
the device can verify cheaply. A head trained before the tree grew, or one going to a device that verifies more
tokens per pass (a GPU scores ~60 tokens in about the time of one), can have its tree measured again here: the same
validation pass over rows of distilled data the head was not trained on (the validation split of its training
data by opening prompt, split_id), and a tree of any size written to the head's settings. The weights are not touched.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, HeadConfig, TargetConfig, TrainConfig
from pipeline.data import atomic_path
from pipeline.heads import HEAD_CONFIG_FILE, read_head_metadata
from pipeline.stages.train import (
    TRAIN_CONFIG_FILE, _features, _new_trainer, _validation, data_shards, is_validation, read_rows,
)
from pipeline.target import load_target_from_config
from pipeline.trees import build_static_tree

DEFAULT_VAL_FRACTION = TrainConfig.val_fraction  # training's default split


def measure_static_tree(head_dir: str | Path, data_dirs: list[str], *, nodes: int, target: TargetConfig,
                        val_fraction: float | None = None, max_rows: int = 400, val_draft_length: int = 6,
                        out_dir: str | Path | None = None) -> dict[str, Any]:
    """Measures `head_dir`'s rank accuracies on up to `max_rows` validation rows of `data_dirs` (the rows whose
    opening prompt falls in the `val_fraction` split, as training holds them out) and writes the head, with a static tree
    of `nodes` paths from them, to `out_dir` (default: in place). Returns the validation metrics and the tree.
    `val_fraction` defaults to the held-out fraction of the training run the head was exported by (see
    `held_out_fraction`), else training's default."""
    trained_with = held_out_fraction(Path(head_dir))
    if val_fraction is None:
        val_fraction = DEFAULT_VAL_FRACTION if trained_with is None else trained_with
    elif trained_with is not None and val_fraction > trained_with:
        raise ConfigError(
            f"head tree: --val-fraction {val_fraction} takes rows the head trained on: its training run held out "
            f"{trained_with} ({Path(head_dir).parent / TRAIN_CONFIG_FILE}); pass at most that, or leave it out")
    if nodes < 1:
        raise ConfigError(f"head.static_tree: the tree needs at least one node, got {nodes}")
    if max_rows < 1:
        raise ConfigError(f"head tree: --max-rows must be >= 1, got {max_rows}")
    started = time.perf_counter()
    head_dir = Path(head_dir)
    metadata = read_head_metadata(head_dir)
    config = TrainConfig.from_dict({
        "data_dirs": list(data_dirs), "init_head": str(head_dir), "head": metadata["head"],
        "target": target.to_dict(), "val_fraction": val_fraction, "val_draft_length": val_draft_length,
        "batch_size": 16})
    rows = [row for row in read_rows(data_shards(config)) if is_validation(row["split_id"], val_fraction)][:max_rows]
    if not rows:
        raise ConfigError(f"head.static_tree: no row of {list(data_dirs)} is in the {val_fraction:.0%} validation "
                          "split; pass more data or a larger --val-fraction")
    loaded = load_target_from_config(config.target)
    trainer = _new_trainer(config, loaded, None, total_steps=0)
    features = _features(loaded.model, rows, config, cache=True, progress=False)
    metrics = _validation(trainer, rows, features, config)()
    tree = build_static_tree(trainer.val_rank_accuracy, nodes)
    destination = Path(out_dir) if out_dir else head_dir
    head = HeadConfig.from_dict({**metadata["head"], "static_tree": [list(path) for path in tree]})
    _write_head(head_dir, destination, {**metadata, "head": head.to_dict()})
    return {"head_dir": str(destination), "rows": len(rows), "answer_tokens": sum(sum(r["loss_mask"]) for r in rows),
            "metrics": metrics, "rank_accuracy": trainer.val_rank_accuracy, "static_tree": [list(p) for p in tree],
            "wall_time_s": time.perf_counter() - started}


def held_out_fraction(head_dir: Path) -> float | None:
    """The val_fraction of the training run whose OUT/head `head_dir` is (its OUT/train_config.json), or None for a
    head elsewhere. A larger split would hold rows the head trained on (splits grow by the same hash order)."""
    config_file = head_dir.parent / TRAIN_CONFIG_FILE
    if not config_file.is_file():
        return None
    try:
        return float(json.loads(config_file.read_text())["val_fraction"])
    except (ValueError, KeyError, TypeError):
        return None


def _write_head(source: Path, destination: Path, metadata: dict[str, Any]) -> None:
    """The head's files with new settings, replacing `destination` whole (never half-written)."""
    with atomic_path(destination) as temporary:
        shutil.copytree(source, temporary)
        (Path(temporary) / HEAD_CONFIG_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
