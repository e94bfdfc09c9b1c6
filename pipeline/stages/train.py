"""`koala train` on Ray Train: a TorchTrainer whose workers train one KOALA head with DDP.

The driver reads the distilled Parquet data as a Ray Data dataset (split into train/validation by prompt id),
chooses between cached and on-the-fly target features, creates the MLflow run, and exports the final head. Each
worker loads the frozen target, builds the head, resumes from `ray.train.get_checkpoint()` when Ray restarted it,
and reports metrics and safetensors checkpoints through `ray.train.report`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from pipeline.config import ConfigError, TrainConfig
from pipeline.data import FREQUENCY_FILE, atomic_path, read_token_frequencies, shard_metadata, write_json_atomically
from pipeline.heads import build_head, save_head, target_identity_dict
from pipeline.stages.resources import use_gpus
from pipeline.target import load_target_from_config
from pipeline.training import KoalaTrainer, TrainBatch, iterate_batches, pad_rows, target_features
from pipeline.vocab import top_token_ids

log = logging.getLogger(__name__)
FEATURE_BYTES = 2  # fp16
TRAIN_SUMMARY_FILE = "train_summary.json"


def data_shards(config: TrainConfig) -> list[Path]:
    if not config.data_dirs:
        raise ConfigError("train.data_dirs: name at least one directory written by koala distill")
    paths: list[Path] = []
    for directory in map(Path, config.data_dirs):
        found = sorted(directory.glob("shard-*.parquet"))
        if not found:
            raise ConfigError(f"train.data_dirs: {directory} holds no shard-*.parquet files; run koala distill first")
        paths.extend(found)
    return paths


def data_stats(paths: list[Path]) -> dict[str, Any]:
    rows = tokens = response_tokens = 0
    for path in paths:
        table = pq.read_table(path, columns=["prompt_tokens", "response_tokens", "input_ids"])
        rows += table.num_rows
        response_tokens += sum(table.column("response_tokens").to_pylist())
        tokens += sum(len(ids) for ids in table.column("input_ids").to_pylist())
    first = shard_metadata(paths[0])
    return {"rows": rows, "tokens": tokens, "response_tokens": response_tokens, "shards": len(paths),
            "target": first["target"], "distill_settings": first["settings"]}


def choose_feature_cache(config: TrainConfig, *, tokens: int, hidden_size: int) -> tuple[bool, str]:
    """(cache?, reason). The estimate is the fp16 size of one hidden state per training token."""
    estimate_gb = tokens * hidden_size * FEATURE_BYTES / 1e9
    if config.feature_cache == "on":
        return True, f"feature_cache=on (estimate {estimate_gb:.2f} GB)"
    if config.feature_cache == "off":
        return False, f"feature_cache=off (estimate {estimate_gb:.2f} GB)"
    if estimate_gb <= config.cache_limit_gb:
        return True, f"estimate {estimate_gb:.2f} GB <= cache_limit_gb {config.cache_limit_gb}"
    return False, f"estimate {estimate_gb:.2f} GB > cache_limit_gb {config.cache_limit_gb}: features computed on the fly"


def is_validation(prompt_id: str, fraction: float) -> bool:
    """A stable split by prompt id, so a prompt never moves between train and validation across runs."""
    return int(hashlib.sha1(prompt_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def draft_vocabulary(config: TrainConfig, eos_ids: list[int]) -> list[int] | None:
    if not config.head.draft_vocab_size:
        return None
    counts = read_token_frequencies(Path(config.data_dirs[0]) / FREQUENCY_FILE)
    for directory in config.data_dirs[1:]:
        counts.update(read_token_frequencies(Path(directory) / FREQUENCY_FILE))
    return top_token_ids(counts, config.head.draft_vocab_size, always_include=eos_ids).tolist()


# ----------------------------------------------------------------------------------------------- worker side


class _FeatureSource:
    """Target features per row: from an in-memory fp16 cache (persisted as safetensors) or recomputed."""

    def __init__(self, target_model, rows: list[dict[str, Any]], *, max_seq_len: int, cache_path: Path | None):
        self.target_model = target_model
        self.max_seq_len = max_seq_len
        self.cache: list[torch.Tensor] | None = None
        if cache_path is not None:
            self.cache = self._load_or_build(rows, cache_path)

    def _load_or_build(self, rows: list[dict[str, Any]], path: Path) -> list[torch.Tensor]:
        from safetensors.torch import load_file, save_file
        from tqdm.auto import tqdm

        if path.is_file():
            flat = load_file(path)
            return [flat[f"row{i}"] for i in range(len(rows))]
        features = []
        for start in tqdm(range(0, len(rows), 8), desc="caching target features", unit="batch"):
            chunk = rows[start : start + 8]
            input_ids, loss_mask = pad_rows(chunk, max_seq_len=self.max_seq_len)
            hidden = target_features(self.target_model, input_ids.to(self.target_model.device), loss_mask)
            for index, row in enumerate(chunk):
                features.append(hidden[index, : min(len(row["input_ids"]), self.max_seq_len)].half().cpu().contiguous())
        with atomic_path(path) as temporary:
            save_file({f"row{i}": f for i, f in enumerate(features)}, temporary)
        return features

    def batch(self, rows: list[dict[str, Any]], indices: list[int]) -> TrainBatch:
        device = self.target_model.device
        dtype = self.target_model.get_output_embeddings().weight.dtype
        input_ids, loss_mask = pad_rows([rows[i] for i in indices], max_seq_len=self.max_seq_len)
        input_ids, loss_mask = input_ids.to(device), loss_mask.to(device)
        if self.cache is None:
            features = target_features(self.target_model, input_ids, loss_mask)
        else:
            features = torch.zeros(*input_ids.shape, self.cache[0].shape[-1], dtype=dtype, device=device)
            for slot, index in enumerate(indices):
                cached = self.cache[index]
                features[slot, : len(cached)] = cached.to(device=device, dtype=dtype)
        return TrainBatch(input_ids=input_ids, loss_mask=loss_mask, features=features)


def _rows(dataset) -> list[dict[str, Any]]:
    rows = [{"prompt_id": r["prompt_id"], "input_ids": list(r["input_ids"]), "loss_mask": list(r["loss_mask"])}
            for r in dataset.iter_rows()]
    return sorted(rows, key=lambda r: r["prompt_id"])  # a fixed order, whatever order Ray Data delivered


def train_loop_per_worker(payload: dict[str, Any]) -> None:
    """The Ray Train worker function."""
    import ray.train
    import ray.train.torch

    config = TrainConfig.from_dict(payload["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.cpus_per_worker)
    target = load_target_from_config(config.target.replace(device="cuda" if torch.cuda.is_available() else "cpu"))
    draft_ids = payload["draft_token_ids"]
    head = build_head(config.head, target.model,
                      draft_token_ids=torch.tensor(draft_ids) if draft_ids is not None else None)
    head.requires_grad_(True)
    payload = {**payload, "target_identity": target_identity_dict(target.model, target.name)}
    trainer = KoalaTrainer(config, head=ray.train.torch.prepare_model(head, move_to_device=False), target_model=target.model)
    if world > 1:
        trainer.wrap_discriminator(lambda module: ray.train.torch.prepare_model(module, move_to_device=False))

    import ray.data

    # The shards are read once into memory; their progress bars would only clutter the sweep's output.
    ray.data.DataContext.get_current().enable_progress_bars = False
    train_rows = _rows(ray.train.get_dataset_shard("train"))
    validation_rows = _rows(ray.train.get_dataset_shard("validation")) if rank == 0 else []
    cache_dir = Path(payload["cache_dir"]) if payload["use_feature_cache"] else None
    train_features = _FeatureSource(target.model, train_rows, max_seq_len=config.max_seq_len,
                                    cache_path=cache_dir / f"train-rank{rank}-of{world}.safetensors" if cache_dir else None)
    validation_features = _FeatureSource(target.model, validation_rows, max_seq_len=config.max_seq_len,
                                         cache_path=cache_dir / "validation.safetensors" if cache_dir and validation_rows else None)

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            trainer.load_state(Path(directory))
    tracking = _worker_run(payload) if rank == 0 else None
    if tracking and checkpoint:
        tracking.log_metrics({"resumed_from_step": trainer.step}, step=trainer.step)

    steps_per_epoch = -(-len(train_rows) // config.batch_size)
    total_steps = config.max_steps or steps_per_epoch * config.epochs
    epochs = -(-total_steps // steps_per_epoch)
    started = time.perf_counter()
    for epoch in range(trainer.step // steps_per_epoch, epochs):
        batches = list(iterate_batches(train_rows, batch_size=config.batch_size, seed=config.seed, epoch=epoch))
        for batch_index in range(trainer.step - epoch * steps_per_epoch, len(batches)):
            if trainer.step >= total_steps:
                break
            metrics = trainer.train_step(train_features.batch(train_rows, batches[batch_index]))
            metrics["epoch"] = epoch
            epoch_done = trainer.step >= total_steps or batch_index == len(batches) - 1
            if epoch_done:
                metrics.update(_validate(trainer, validation_rows, validation_features, config))
            if tracking and (epoch_done or trainer.step % config.log_every_steps == 0):
                tracking.log_metrics(metrics, step=trainer.step)
            if epoch_done or trainer.step % config.checkpoint_every_steps == 0:
                metrics.update(step=trainer.step, seconds=time.perf_counter() - started, node_id=ray.get_runtime_context().get_node_id())
                _report(trainer, metrics, rank=rank, payload=payload)
            if config.fail_once_at_step and trainer.step == config.fail_once_at_step:
                _fail_once(Path(payload["fault_marker"]))
        if trainer.step >= total_steps:
            break


def _validate(trainer: KoalaTrainer, rows, features: _FeatureSource, config: TrainConfig) -> dict[str, float]:
    if not rows:
        return {}
    batches = (features.batch(rows, indices) for indices in
               iterate_batches(rows, batch_size=config.batch_size, seed=0, epoch=0, shuffle=False))
    return {k: v for k, v in trainer.evaluate(batches).items() if v is not None}


def _report(trainer: KoalaTrainer, metrics: dict[str, float], *, rank: int, payload: dict[str, Any]) -> None:
    """Rank 0 writes the checkpoint (trainer state + an exportable head directory); every rank reports."""
    import ray.train

    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            trainer.save_state(Path(directory))
            save_head(trainer.head_module, Path(directory) / "head", target_identity=payload["target_identity"])
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=checkpoint)


def _fail_once(marker: Path) -> None:
    """Test-only fault injection: the first time this step is reached the worker process dies.

    Ray Train's controller collects reports when it polls the workers (every 2 s by default), so a checkpoint
    reported moments before a crash can be lost and the run resumes from the one before it. The injected crash
    waits past a few poll intervals so the test checks resumption from the latest checkpoint deterministically.
    """
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("injected failure\n")
    time.sleep(6)
    os._exit(1)


def _worker_run(payload: dict[str, Any]):
    if not payload.get("mlflow_run_id"):
        return None
    from pipeline.tracking import Run

    return Run(payload["mlflow_uri"], payload["mlflow_run_id"])


# ----------------------------------------------------------------------------------------------- driver side


def run_train(config: TrainConfig, *, run_name: str | None = None, parent_run_id: str | None = None,
              end_run: bool = True) -> dict[str, Any]:
    """Trains one head on Ray Train and exports it to `<out_dir>/head`. Returns the final metrics and paths.

    With `end_run=False` the MLflow run stays open for the caller (a sweep adds the evaluation to it)."""
    import ray
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    started = time.perf_counter()
    paths = data_shards(config)
    stats = data_stats(paths)
    out_dir = Path(config.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    hidden_size = stats["target"]["hidden_size"]
    use_cache, cache_reason = choose_feature_cache(config, tokens=stats["tokens"], hidden_size=hidden_size)
    log.warning("train: %d rows, %d tokens; feature cache: %s", stats["rows"], stats["tokens"], cache_reason)
    draft_ids = draft_vocabulary(config, _eos_ids(config)) if config.head.draft_vocab_size else None
    if not ray.is_initialized():
        ray.init()
    use_gpu = use_gpus(config.use_gpu, section="train")

    dataset = ray.data.read_parquet([str(p) for p in paths], columns=["prompt_id", "input_ids", "loss_mask"])
    fraction = config.val_fraction
    # Materialised on the driver, before the workers claim their CPUs: token ids are small, and Ray Data tasks
    # started later would wait for CPUs that the training workers hold (a deadlock on a one-node cluster).
    train_set = dataset.filter(lambda row: not is_validation(row["prompt_id"], fraction)).materialize()
    validation_set = dataset.filter(lambda row: is_validation(row["prompt_id"], fraction)).materialize()

    tracking = _start_run(config, stats, cache_reason, run_name=run_name, parent_run_id=parent_run_id)
    data_key = hashlib.sha1(json.dumps([str(p) for p in paths] + [stats["tokens"], config.max_seq_len,
                                        config.target.spec, config.target.dtype]).encode()).hexdigest()[:12]
    payload = {
        "config": config.to_dict(),
        "draft_token_ids": draft_ids,
        "use_feature_cache": use_cache,
        "cache_dir": str(out_dir.parent / "feature_cache" / data_key),
        "fault_marker": str(out_dir / "ray" / "injected_failure"),
        "mlflow_uri": tracking.uri if tracking else None,
        "mlflow_run_id": tracking.run_id if tracking else None,
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=payload,
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": config.cpus_per_worker}),
        run_config=RunConfig(
            name="train", storage_path=str(out_dir / "ray"),
            failure_config=FailureConfig(max_failures=config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": train_set, "validation": validation_set},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    try:
        result = trainer.fit()
    except Exception:
        if tracking:
            tracking.end("FAILED")
        raise
    head_dir = out_dir / "head"
    with result.checkpoint.as_directory() as directory:
        if head_dir.exists():
            shutil.rmtree(head_dir)
        shutil.copytree(Path(directory) / "head", head_dir)
    summary = {"metrics": result.metrics, "head_dir": str(head_dir), "feature_cache": cache_reason,
               "data": {k: v for k, v in stats.items() if k != "distill_settings"},
               "wall_time_s": time.perf_counter() - started,
               "mlflow_run_id": tracking.run_id if tracking else None}
    write_json_atomically(summary, out_dir / TRAIN_SUMMARY_FILE)
    if tracking:
        tracking.log_metrics({"wall_time_s": summary["wall_time_s"]}, step=int(result.metrics.get("step", 0)))
        tracking.log_artifact(head_dir, "head")
        tracking.log_artifact(out_dir / TRAIN_SUMMARY_FILE)
        tracking.log_dict(config.to_dict(), "train_config.json")
        frequency = Path(config.data_dirs[0]) / FREQUENCY_FILE
        if frequency.is_file():
            tracking.log_artifact(frequency, "data")
        if end_run:
            tracking.end()
    return summary


def _eos_ids(config: TrainConfig) -> list[int]:
    """EOS must stay draftable in a draft vocabulary."""
    from pipeline.target import load_tokenizer

    tokenizer = load_tokenizer(config.target.spec, trust_remote_code=config.target.trust_remote_code)
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def _start_run(config: TrainConfig, stats: dict[str, Any], cache_reason: str, *, run_name: str | None,
               parent_run_id: str | None):
    if not config.tracking.enabled:
        return None
    from pipeline.tracking import Run, tracking_uri

    head = config.head
    name = run_name or f"{head.head_type}-K{head.num_layers}-lambda{config.adv_weight:g}"
    return Run.start(
        tracking_uri(config.tracking), experiment=config.tracking.experiment, run_name=name,
        params={**config.to_dict(), "data": stats, "feature_cache_choice": cache_reason},
        tags={"koala.stage": "train", "koala.head_type": head.head_type}, parent_run_id=parent_run_id,
    )
