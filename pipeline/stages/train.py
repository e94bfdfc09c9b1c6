"""`koala train`: one KOALA head, on Ray Train (`run_train`) or in this process without Ray (`run_train_local`).

Both read the same data (any Parquet with `prompt_id`, `input_ids`, `loss_mask`: `koala distill` shards or a file
such as ../shared/data/smollm2_answers/answers.parquet), split it into train and validation by prompt id, apply the
data budget, and run the same loop (`pipeline.training.run_training_loop`). On Ray, the driver reads the data as a
Ray Data dataset, creates the MLflow run and exports the head; each worker loads the frozen target, builds the
head, resumes from `ray.train.get_checkpoint()` when Ray restarted it, and reports metrics and safetensors
checkpoints through `ray.train.report`. Without Ray, one process does it all on one device (CUDA when present),
checkpoints into OUT/checkpoint and resumes from it, and logs to OUT/metrics.jsonl (and MLflow when installed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.config import ConfigError, TrainConfig
from pipeline.data import FREQUENCY_FILE, atomic_path, read_token_frequencies, write_json_atomically
from pipeline.heads import build_head, save_head, target_identity_dict
from pipeline.target import load_target_from_config
from pipeline.tracking import training_metric_names
from pipeline.training import (
    FeatureStore, KoalaTrainer, LiveFeatures, LoopHooks, iterate_batches, planned_steps, run_training_loop,
)
from pipeline.vocab import top_token_ids

log = logging.getLogger(__name__)
FEATURE_BYTES = 2  # fp16
FEATURE_CACHE_VERSION = 2
TRAIN_SUMMARY_FILE = "train_summary.json"
TRAIN_CONFIG_FILE = "train_config.json"  # the settings of the run in OUT (head tree reads its val_fraction)
RUN_FILE = "mlflow_run.json"  # the MLflow run a Ray training run logs into, kept so a resumed run goes on in it
METRICS_FILE = "metrics.jsonl"
DATA_COLUMNS = ["prompt_id", "input_ids", "loss_mask"]


# ----------------------------------------------------------------------------------------------- data


def data_shards(config: TrainConfig) -> list[Path]:
    """The Parquet files of `data_dirs`: each entry is a `koala distill` directory (its shard-*.parquet), any
    directory of .parquet files with `prompt_id`/`input_ids`/`loss_mask` columns, or one such file."""
    if not config.data_dirs:
        raise ConfigError("train.data_dirs: name at least one directory written by koala distill (or a .parquet file)")
    paths: list[Path] = []
    for entry in map(Path, config.data_dirs):
        if entry.is_file() and entry.suffix == ".parquet":
            found = [entry]
        else:
            found = sorted(entry.glob("shard-*.parquet")) or sorted(entry.glob("*.parquet"))
        if not found:
            raise ConfigError(f"train.data_dirs: {entry} holds no .parquet files; run koala distill first")
        for path in found:
            missing = set(DATA_COLUMNS) - set(pq.read_schema(path).names)
            if missing:
                raise ConfigError(f"train.data_dirs: {path} lacks the column(s) {sorted(missing)}")
        paths.extend(found)
    return paths


def _koala_metadata(path: Path) -> dict[str, Any] | None:
    metadata = pq.read_schema(path).metadata or {}
    return json.loads(metadata[b"koala"]) if b"koala" in metadata else None


def read_rows(paths: list[Path]) -> list[dict[str, Any]]:
    """Every row of the data, sorted by prompt id (a fixed order, whatever order the files list them in).
    `split_id` is the key of the train/validation split: the opening prompt's hash where the data has it (koala
    distill writes it), else the prompt id (data written before, and other Parquet)."""
    rows = []
    for path in paths:
        columns = DATA_COLUMNS + (["split_id"] if "split_id" in pq.read_schema(path).names else [])
        table = pq.read_table(path, columns=columns)
        prompt_ids = table.column("prompt_id").to_pylist()
        split_ids = table.column("split_id").to_pylist() if "split_id" in columns else prompt_ids
        rows += [{"prompt_id": p, "split_id": s or p, "input_ids": i, "loss_mask": m} for p, s, i, m in zip(
            prompt_ids, split_ids, table.column("input_ids").to_pylist(), table.column("loss_mask").to_pylist())]
        _check_masks(rows[len(rows) - table.num_rows:], path)
    return sorted(rows, key=lambda r: r["prompt_id"])


def _check_masks(rows: list[dict[str, Any]], path: Path) -> None:
    """Each row's loss_mask has one flag per token (data not written by koala distill may not)."""
    for number, row in enumerate(rows):
        flags, tokens = len(row["loss_mask"] or ()), len(row["input_ids"] or ())
        if flags != tokens:
            raise ConfigError(
                f"train.data_dirs: {path} row {number} (prompt_id {row['prompt_id']}) has {flags} loss_mask flags for "
                f"{tokens} input_ids; each token needs one flag (1 = train on it)")


def data_stats(paths: list[Path]) -> dict[str, Any]:
    rows = tokens = response_tokens = 0
    for path in paths:
        table = pq.read_table(path, columns=["input_ids", "loss_mask"])
        rows += table.num_rows
        for ids, mask in zip(table.column("input_ids").to_pylist(), table.column("loss_mask").to_pylist()):
            tokens += len(ids)
            response_tokens += sum(mask)
    first = _koala_metadata(paths[0]) or {}
    return {"rows": rows, "tokens": tokens, "response_tokens": response_tokens, "shards": len(paths),
            "target": first.get("target"), "distill_settings": first.get("settings")}


def check_data_target(stats: dict[str, Any], rows: list[dict[str, Any]], *, vocab_size: int, target: str) -> None:
    """The data's token ids are the target's: the vocabulary koala distill recorded is the target's, and no id is
    past it (Parquet from elsewhere). Another tokenizer's ids would train on nonsense or fail inside the model."""
    distilled = stats.get("target") or {}
    if distilled.get("vocab_size") not in (None, vocab_size):
        raise ConfigError(f"train.data_dirs: the data was distilled from {distilled.get('name')!r} "
                          f"({distilled['vocab_size']} tokens), but train.target {target!r} has {vocab_size}; "
                          "train with the target that wrote it")
    largest = max((max(row["input_ids"], default=-1) for row in rows), default=-1)
    if largest >= vocab_size:
        raise ConfigError(f"train.data_dirs: token id {largest} is past the vocabulary of train.target {target!r} "
                          f"({vocab_size} tokens): the data was tokenized for another target")


def is_validation(split_id: str, fraction: float) -> bool:
    """A stable split by a row's `split_id` (its opening prompt), so a prompt never moves between train and
    validation across runs, and all rows of one prompt are on the same side."""
    return int(hashlib.sha1(split_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def within_budget(rows: list[dict[str, Any]], max_train_tokens: int, *, seed: int) -> list[dict[str, Any]]:
    """The data budget: rows in a fixed random order (by seed) until `max_train_tokens` response tokens
    (0 = all rows). The same budget always picks the same rows, and a larger budget contains a smaller one."""
    if not max_train_tokens:
        return rows
    generator = torch.Generator().manual_seed(seed)
    kept, tokens = [], 0
    for index in torch.randperm(len(rows), generator=generator).tolist():
        if tokens >= max_train_tokens:
            break
        kept.append(rows[index])
        tokens += sum(rows[index]["loss_mask"])
    return sorted(kept, key=lambda r: r["prompt_id"])


def split_rows(rows: list[dict[str, Any]], config: TrainConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    validation = [r for r in rows if is_validation(r["split_id"], config.val_fraction)]
    train = [r for r in rows if not is_validation(r["split_id"], config.val_fraction)]
    return within_budget(train, config.max_train_tokens, seed=config.seed), validation


def choose_feature_cache(config: TrainConfig, *, tokens: int, hidden_size: int) -> tuple[bool, str]:
    """(cache?, reason). The estimate is the fp16 size of the head's input features per training token (one hidden
    state, or 1 + n for a head that fuses n extra layers)."""
    width = hidden_size * (1 + len(config.head.extra_feature_layers))
    estimate_gb = tokens * width * FEATURE_BYTES / 1e9
    if config.feature_cache == "on":
        return True, f"feature_cache=on (estimate {estimate_gb:.2f} GB)"
    if config.feature_cache == "off":
        return False, f"feature_cache=off (estimate {estimate_gb:.2f} GB)"
    if estimate_gb <= config.cache_limit_gb:
        return True, f"estimate {estimate_gb:.2f} GB <= cache_limit_gb {config.cache_limit_gb}"
    return False, f"estimate {estimate_gb:.2f} GB > cache_limit_gb {config.cache_limit_gb}: features computed on the fly"


def response_token_counts(paths: list[Path]) -> Counter[int]:
    """Token counts of the responses (under the loss mask): a distill directory's token_freq.json when every
    file comes from one, else counted from the rows."""
    directories = {path.parent for path in paths}
    if all((directory / FREQUENCY_FILE).is_file() and path.name.startswith("shard-")
           for directory in directories for path in paths if path.parent == directory):
        counts: Counter[int] = Counter()
        for directory in sorted(directories):
            counts.update(read_token_frequencies(directory / FREQUENCY_FILE))
        return counts
    from pipeline.data import token_frequencies

    return token_frequencies(paths)


def draft_vocabulary(config: TrainConfig, eos_ids: list[int], train_rows: list[dict[str, Any]]) -> list[int] | None:
    """The draft vocabulary: the most frequent response tokens of the rows the head trains on, and every EOS id.
    Validation rows and rows outside the data budget are not counted: the vocabulary must not know the held-out
    answers (their val_tau would read high), and a budget is all the data a run learns from."""
    if not config.head.draft_vocab_size:
        return None
    counts: Counter[int] = Counter()
    for row in train_rows:
        counts.update(token for token, keep in zip(row["input_ids"], row["loss_mask"]) if keep)
    return top_token_ids(counts, config.head.draft_vocab_size, always_include=eos_ids).tolist()


def _eos_ids(config: TrainConfig) -> list[int]:
    """The EOS ids HF `generate` stops at (`Target.eos_token_ids`: the generation config's, else the tokenizer's),
    read without loading the weights: EOS must stay draftable in a draft vocabulary."""
    from transformers import GenerationConfig

    from pipeline.target import load_model_config, load_tokenizer, resolve_spec

    location, extra = resolve_spec(config.target.spec)
    try:
        source = GenerationConfig.from_pretrained(location, **extra).eos_token_id
    except OSError:  # no generation_config.json: transformers derives one from the model config, as here
        model_config = load_model_config(config.target.spec, trust_remote_code=config.target.trust_remote_code)
        source = GenerationConfig.from_model_config(model_config).eos_token_id
    if source is None:
        source = load_tokenizer(config.target.spec, trust_remote_code=config.target.trust_remote_code).eos_token_id
    if source is None:
        return []
    return sorted({source} if isinstance(source, int) else set(source))


def initial_head_weights(config: TrainConfig) -> dict[str, torch.Tensor] | None:
    """The weights of `init_head` (fp32), checked against the head settings; None without `init_head`."""
    if not config.init_head:
        return None
    from pipeline.config import HeadConfig
    from pipeline.heads import HEAD_WEIGHTS_FILE, read_head_metadata

    saved = HeadConfig.from_dict(read_head_metadata(config.init_head)["head"])
    # A plain head may start a fused one (its fusion starts as "read the last state", see EagleHead).
    fusable = {"extra_feature_layers": config.head.extra_feature_layers} if not saved.extra_feature_layers else {}
    if saved.replace(num_heads=config.head.num_heads, static_tree=config.head.static_tree, **fusable) != config.head:
        raise ConfigError(f"train.init_head: {config.init_head} holds a {saved} head, but train.head is {config.head}; "
                          "set head to match it")
    from safetensors.torch import load_file

    tensors = load_file(Path(config.init_head) / HEAD_WEIGHTS_FILE)
    return {name: tensor.float() if tensor.is_floating_point() else tensor for name, tensor in tensors.items()}


def _new_trainer(config: TrainConfig, target, draft_ids: list[int] | None, *, total_steps: int,
                 wrap_head=None) -> KoalaTrainer:
    torch.manual_seed(config.seed)
    initial = initial_head_weights(config)
    if initial is not None and "vocabulary.draft_token_ids" in initial:
        draft_ids = initial["vocabulary.draft_token_ids"].tolist()  # the head keeps the vocabulary it was made with
    head = build_head(config.head, target.model,
                      draft_token_ids=torch.tensor(draft_ids) if draft_ids is not None else None)
    if initial is not None:
        if getattr(head, "fuse", None) is not None and "fuse.weight" not in initial:
            initial = {**initial, "fuse.weight": head.fuse.weight.detach().clone()}  # started from a plain head
        head.load_state_dict(initial, strict=True)
    head.requires_grad_(True)
    return KoalaTrainer(config, head=wrap_head(head) if wrap_head else head, target_model=target.model,
                        total_steps=total_steps)


def _validation(trainer: KoalaTrainer, rows: list[dict[str, Any]], features, config: TrainConfig):
    # The frozen target's greedy tokens on the validation rows, by batch: a full-vocabulary argmax per position
    # that every epoch would otherwise repeat (about a third of a CPU validation).
    target_greedy: dict[int, torch.Tensor] = {}

    def batches():
        for number, indices in enumerate(iterate_batches(rows, batch_size=config.batch_size, seed=0, epoch=0,
                                                         shuffle=False)):
            batch = features.batch(rows, indices, dtype=trainer.feature_dtype)
            if number not in target_greedy:
                with torch.no_grad():
                    target_greedy[number] = trainer.target_greedy(batch.features)
            yield dataclasses.replace(batch, target_greedy=target_greedy[number])

    def validate() -> dict[str, float]:
        if not rows:
            return {}
        return {k: v for k, v in trainer.evaluate(batches()).items() if v is not None}

    return validate


def _features(model, rows, config: TrainConfig, *, cache: bool, progress: bool, cache_path: Path | None = None):
    """The rows' target features: computed once and kept (`cache`; also saved to and reloaded from `cache_path`
    when given), or recomputed per batch."""
    extra_layers = config.head.extra_feature_layers
    if not cache or not rows:
        return LiveFeatures(model, max_seq_len=config.max_seq_len, extra_layers=extra_layers)
    if cache_path is not None and cache_path.is_file():
        store = FeatureStore.load(cache_path, device=model.device, rows=rows, max_seq_len=config.max_seq_len)
        if store is not None:
            return store
        log.warning("feature cache %s was computed for other rows; computing it again", cache_path)
    store = FeatureStore.build(model, rows, max_seq_len=config.max_seq_len, progress=progress,
                               extra_layers=extra_layers)
    if cache_path is not None:
        store.save(cache_path, rows=rows)
    return store


def export_head(trainer: KoalaTrainer, directory: Path, *, target_identity: dict[str, Any]) -> Path:
    """Writes the head to export (the best validated epoch's, see `select_best`) as a head directory."""
    head = trainer.head_module
    current, config = {k: v.detach().clone() for k, v in head.state_dict().items()}, head.config
    head.load_state_dict(trainer.export_state())
    # The static draft tree its validation accuracies call for (kept if validation never ran).
    head.config = config.replace(static_tree=trainer.static_tree() or config.static_tree)
    try:
        with atomic_path(directory) as temporary:
            save_head(head, temporary, target_identity=target_identity)
    finally:
        head.load_state_dict(current)
        head.config = config
    return directory


# ----------------------------------------------------------------------------------------------- Ray worker side


def train_loop_per_worker(payload: dict[str, Any]) -> None:
    """The Ray Train worker function."""
    import ray.train
    import ray.train.torch

    config = TrainConfig.from_dict(payload["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(config.cpus_per_worker)
    target = load_target_from_config(config.target.replace(device="cuda" if torch.cuda.is_available() else "cpu"))
    payload = {**payload, "target_identity": target_identity_dict(target.model, target.name)}

    import ray.data

    # The shards are read once into memory; their progress bars would only clutter the sweep's output.
    ray.data.DataContext.get_current().enable_progress_bars = False
    train_rows = _dataset_rows(ray.train.get_dataset_shard("train"))
    validation_rows = _dataset_rows(ray.train.get_dataset_shard("validation")) if rank == 0 else []
    wrap = ddp_wrapper()
    total_steps = payload["total_steps"]
    trainer = _new_trainer(config, target, payload["draft_token_ids"], total_steps=total_steps, wrap_head=wrap)
    if world > 1:
        trainer.wrap_discriminator(wrap)

    cache_dir = Path(payload["cache_dir"]) if payload["use_feature_cache"] else None
    train_features = _features(target.model, train_rows, config, cache=cache_dir is not None, progress=False,
                               cache_path=cache_dir / f"train-rank{rank}-of{world}.safetensors" if cache_dir else None)
    validation_features = _features(target.model, validation_rows, config, cache=cache_dir is not None,
                                    progress=False,
                                    cache_path=cache_dir / "validation.safetensors" if cache_dir else None)

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            trainer.load_state(Path(directory))
    tracking = _worker_run(payload) if rank == 0 else None
    if tracking and checkpoint:
        tracking.log_metrics({"resumed_from_step": trainer.step}, step=trainer.step, prefix="train/")

    def report(metrics: dict[str, float]) -> None:
        """Rank 0 writes the checkpoint (trainer state + the exportable head); every rank reports."""
        metrics = {**metrics, "node_id": ray.get_runtime_context().get_node_id()}
        with tempfile.TemporaryDirectory() as directory:
            saved = None
            if rank == 0:
                trainer.save_state(Path(directory))
                export_head(trainer, Path(directory) / "head", target_identity=payload["target_identity"])
                saved = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=saved)

    def after_step(step: int) -> None:
        if config.fail_once_at_step and step == config.fail_once_at_step:
            _fail_once(Path(payload["fault_marker"]))

    hooks = LoopHooks(log=(lambda m, s: tracking.log_metrics(training_metric_names(m), step=s)) if tracking
                      else LoopHooks.log,
                      checkpoint=report, after_step=after_step)
    validate = _validation(trainer, validation_rows, validation_features, config)
    run_training_loop(trainer, train_rows=train_rows, features=train_features, validate=validate, hooks=hooks)


def ddp_wrapper():
    """Wraps a module for DDP without buffer broadcasts: the head's only buffers are the frozen vocabulary map and
    LM-head rows, identical on every rank; re-broadcasting a vocabulary-sized buffer each step is pure waste, and
    a broadcast in a forward that only rank 0 runs (validation) would desynchronise the collectives."""
    import ray.train.torch

    return lambda module: ray.train.torch.prepare_model(
        module, move_to_device=False, parallel_strategy_kwargs={"broadcast_buffers": False})


def rows_dataset(rows: list[dict[str, Any]]):
    """Exactly these rows as a Ray dataset, numbered in their order. (Selecting them from the shards by prompt id
    took every row of a prompt the data budget kept one answer of, and rows sharing an id came in any order.)"""
    import ray.data

    return ray.data.from_arrow(pa.table({
        "row": pa.array(range(len(rows)), pa.int64()),
        "prompt_id": pa.array([row["prompt_id"] for row in rows], pa.string()),
        "input_ids": pa.array([row["input_ids"] for row in rows], pa.list_(pa.int32())),
        "loss_mask": pa.array([row["loss_mask"] for row in rows], pa.list_(pa.int8())),
    }))


def _dataset_rows(dataset) -> list[dict[str, Any]]:
    """A worker's rows in the driver's order, whatever order Ray Data delivered them in."""
    rows = sorted(dataset.iter_rows(), key=lambda r: r["row"])
    return [{"prompt_id": r["prompt_id"], "input_ids": list(r["input_ids"]), "loss_mask": list(r["loss_mask"])}
            for r in rows]


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


# ----------------------------------------------------------------------------------------------- Ray driver side


def _hidden_size(stats: dict[str, Any], config: TrainConfig) -> int:
    if stats["target"]:
        return stats["target"]["hidden_size"]
    from pipeline.target import load_model_config

    return load_model_config(config.target.spec, trust_remote_code=config.target.trust_remote_code).hidden_size


def _vocab_size(config: TrainConfig) -> int:
    from pipeline.target import load_model_config

    model_config = load_model_config(config.target.spec, trust_remote_code=config.target.trust_remote_code)
    return model_config.get_text_config().vocab_size


def run_train(config: TrainConfig, *, run_name: str | None = None, parent_run_id: str | None = None,
              end_run: bool = True) -> dict[str, Any]:
    """Trains one head on Ray Train and exports it to `<out_dir>/head`. Returns the final metrics and paths.

    With `end_run=False` the MLflow run stays open for the caller (a sweep adds the evaluation to it)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.stages.resources import init_ray, use_gpus

    started = time.perf_counter()
    paths = data_shards(config)
    stats = data_stats(paths)
    out_dir = Path(config.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    use_cache, cache_reason = choose_feature_cache(config, tokens=stats["tokens"], hidden_size=_hidden_size(stats, config))
    log.warning("train: %d rows, %d tokens; feature cache: %s", stats["rows"], stats["tokens"], cache_reason)
    train_rows, validation_rows = split_rows(read_rows(paths), config)
    draft_ids = draft_vocabulary(config, _eos_ids(config), train_rows) if config.head.draft_vocab_size else None
    check_data_target(stats, train_rows + validation_rows, vocab_size=_vocab_size(config), target=config.target.spec)
    init_ray()
    use_gpu = use_gpus(config.use_gpu, section="train")

    # The rows the driver chose, as they are (already in memory: token ids are small). No Ray Data tasks read them
    # later, which would wait for CPUs that the training workers hold (a deadlock on a one-node cluster).
    train_set, validation_set = rows_dataset(train_rows), rows_dataset(validation_rows)

    tracking = _resumed_or_new_run(config, out_dir, stats, cache_reason, run_name=run_name,
                                   parent_run_id=parent_run_id)
    write_json_atomically(config.to_dict(), out_dir / TRAIN_CONFIG_FILE)
    data_key = hashlib.sha1(json.dumps([str(p) for p in paths] + [
        stats["tokens"], config.max_seq_len, config.max_train_tokens, config.seed, config.val_fraction,
        config.target.spec, config.target.dtype, FEATURE_CACHE_VERSION,
        *config.head.extra_feature_layers]).encode()).hexdigest()[:12]
    rows_per_worker = -(-len(train_rows) // config.num_workers)
    payload = {
        "config": config.to_dict(),
        "draft_token_ids": draft_ids,
        "total_steps": planned_steps(config, rows_per_worker),
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
        tracking.log_metrics({"wall_time_s": summary["wall_time_s"]}, prefix="time/", step=int(result.metrics.get("step", 0)))
        tracking.log_artifact(head_dir, "head")
        tracking.log_artifact(out_dir / TRAIN_SUMMARY_FILE)
        tracking.log_dict(config.to_dict(), TRAIN_CONFIG_FILE)
        frequency = Path(config.data_dirs[0]) / FREQUENCY_FILE
        if frequency.is_file():
            tracking.log_artifact(frequency, "data")
        if end_run:
            tracking.end()
    return summary


def _resumed_or_new_run(config: TrainConfig, out_dir: Path, stats: dict[str, Any], cache_reason: str, *,
                        run_name: str | None, parent_run_id: str | None):
    """The MLflow run of this training: the one an earlier, interrupted attempt with the same settings started
    (Ray Train resumes it from its checkpoint, so its loss curve goes on in the same run), else a new one."""
    if not config.tracking.enabled:
        return None
    from pipeline.tracking import Run, tracking_uri

    identity = {"uri": tracking_uri(config.tracking), "parent_run_id": parent_run_id,
                "settings": hashlib.sha1(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()}
    state = out_dir / RUN_FILE
    saved = json.loads(state.read_text()) if state.is_file() else {}
    if saved and {k: saved.get(k) for k in identity} == identity and _unfinished(identity["uri"], saved["run_id"]):
        run = Run(identity["uri"], saved["run_id"])
        run.client.update_run(run.run_id, status="RUNNING")  # an attempt that failed ended it as FAILED
        return run
    run = _start_run(config, stats, cache_reason, run_name=run_name, parent_run_id=parent_run_id)
    write_json_atomically({**identity, "run_id": run.run_id}, state)
    return run


def _unfinished(uri: str, run_id: str) -> bool:
    """Whether the run is still in the store and did not finish (a finished one is not logged into again: training
    from scratch after deleting its output gets a run of its own)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient(tracking_uri=uri).get_run(run_id)
    except MlflowException:  # the store was recreated since
        return False
    return run.info.lifecycle_stage == "active" and run.info.status != "FINISHED"


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


# ----------------------------------------------------------------------------------------------- without Ray


def _local_tracking(config: TrainConfig, stats: dict[str, Any], cache_reason: str):
    """The MLflow run of a local training run, or None when tracking is off or MLflow is not installed."""
    if not config.tracking.enabled:
        return None
    try:
        import mlflow  # noqa: F401
    except ImportError:
        print("[train] MLflow is not installed: metrics go to OUT/metrics.jsonl only", flush=True)
        return None
    return _start_run(config, stats, cache_reason, run_name=None, parent_run_id=None)


def _keep_logged_steps(metrics_file: Path, *, up_to: int) -> None:
    """Drops the logged lines of steps after `up_to` (the checkpoint a run resumes from; 0 for a run from scratch):
    a run that died between checkpoints logged steps its resumed run trains and logs again. A line cut off by the
    crash is dropped too."""
    if not metrics_file.is_file():
        return
    kept = []
    for line in metrics_file.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= up_to:
                kept.append(line)
        except json.JSONDecodeError:
            continue
    with atomic_path(metrics_file) as temporary:
        temporary.write_text("".join(f"{line}\n" for line in kept))


def run_train_local(config: TrainConfig, *, progress: bool = True) -> dict[str, Any]:
    """`koala train --no-ray`: the same training on one device in this process (CUDA when present).

    OUT/checkpoint holds the latest trainer state (a re-run of the same command resumes from it), OUT/head the
    exported head (the best validated epoch), OUT/metrics.jsonl every logged step, OUT/train_summary.json the
    result."""
    started = time.perf_counter()
    paths = data_shards(config)
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = "cpu" if config.use_gpu == "no" else ("cuda" if torch.cuda.is_available() else "cpu")
    if config.use_gpu == "yes" and device != "cuda":
        raise ConfigError("train.use_gpu: 'yes' but CUDA is not available; use 'auto' or 'no'")
    stats = data_stats(paths)
    train_rows, validation_rows = split_rows(read_rows(paths), config)  # a bad row fails before the target loads
    if device == "cpu":
        torch.set_num_threads(config.cpus_per_worker)
    else:
        # TF32 for the frozen target's feature pass: the head trains under bf16 autocast anyway.
        torch.set_float32_matmul_precision("high")
    target = load_target_from_config(config.target.replace(device=device))
    identity = target_identity_dict(target.model, target.name)
    check_data_target(stats, train_rows + validation_rows, vocab_size=identity["vocab_size"], target=config.target.spec)
    trained_tokens = sum(sum(r["loss_mask"]) for r in train_rows)
    all_tokens = sum(min(len(r["input_ids"]), config.max_seq_len) for r in train_rows + validation_rows)
    use_cache, cache_reason = choose_feature_cache(config, tokens=all_tokens, hidden_size=identity["hidden_size"])
    eos = sorted(target.eos_token_ids)
    draft_ids = draft_vocabulary(config, eos, train_rows) if config.head.draft_vocab_size and not config.init_head else None
    print(f"[train] {len(train_rows)} training rows ({trained_tokens} response tokens), {len(validation_rows)} "
          f"validation rows; device {device}; features: {cache_reason}", flush=True)

    total_steps = planned_steps(config, len(train_rows))
    trainer = _new_trainer(config, target, draft_ids, total_steps=total_steps)
    checkpoint_dir = out_dir / "checkpoint"
    config_file = out_dir / TRAIN_CONFIG_FILE
    if (checkpoint_dir / "trainer_state.json").is_file():
        saved = json.loads(config_file.read_text()) if config_file.is_file() else None
        if saved != json.loads(json.dumps(config.to_dict())):
            raise ConfigError(f"train.out_dir: {out_dir} holds a checkpoint of a run with other settings; "
                              "use a new out_dir or delete that one")
        trainer.load_state(checkpoint_dir)
        print(f"[train] resuming from step {trainer.step} ({checkpoint_dir})", flush=True)
    write_json_atomically(config.to_dict(), config_file)
    metrics_file = out_dir / METRICS_FILE
    _keep_logged_steps(metrics_file, up_to=trainer.step)

    features_started = time.perf_counter()
    train_features = _features(target.model, train_rows, config, cache=use_cache, progress=progress)
    validation_features = _features(target.model, validation_rows, config, cache=use_cache, progress=False)
    features_seconds = time.perf_counter() - features_started

    tracking = _local_tracking(config, {**stats, "train_rows": len(train_rows)}, cache_reason)

    def log(metrics: dict[str, float], step: int) -> None:
        with metrics_file.open("a") as handle:
            handle.write(json.dumps({k: v for k, v in metrics.items()}) + "\n")
        if tracking:
            tracking.log_metrics(training_metric_names(metrics), step=step)

    def checkpoint(metrics: dict[str, float]) -> None:
        with atomic_path(checkpoint_dir) as temporary:
            temporary.mkdir()
            trainer.save_state(temporary)
        export_head(trainer, out_dir / "head", target_identity=identity)

    validate = _validation(trainer, validation_rows, validation_features, config)
    try:
        metrics = run_training_loop(trainer, train_rows=train_rows, features=train_features, validate=validate,
                                    hooks=LoopHooks(log=log, checkpoint=checkpoint, progress=progress))
    except BaseException:
        if tracking:
            tracking.end("FAILED")
        raise
    head_dir = export_head(trainer, out_dir / "head", target_identity=identity)
    summary = {
        "metrics": metrics, "head_dir": str(head_dir), "best_val_tau": trainer.best_val_tau,
        "best_epoch": trainer.best_epoch, "feature_cache": cache_reason, "features_seconds": features_seconds,
        "data": {k: v for k, v in stats.items() if k != "distill_settings"},
        "train_rows": len(train_rows), "train_response_tokens": trained_tokens,
        "validation_rows": len(validation_rows), "device": device,
        "wall_time_s": time.perf_counter() - started,
        "mlflow_run_id": tracking.run_id if tracking else None,
    }
    write_json_atomically(summary, out_dir / TRAIN_SUMMARY_FILE)
    if tracking:
        tracking.log_metrics({"wall_time_s": summary["wall_time_s"]}, prefix="time/", step=trainer.step)
        tracking.log_artifact(head_dir, "head")
        tracking.log_artifact(out_dir / TRAIN_SUMMARY_FILE)
        tracking.log_dict(config.to_dict(), TRAIN_CONFIG_FILE)
        tracking.end()
    return summary
