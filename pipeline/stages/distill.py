"""`koala distill` on Ray Data: an actor pool of target replicas writes the distillation shards.

Work is planned on the driver in fixed shards of `shard_size` prompts. A shard that already exists (it was renamed
into place whole) is reused, so an interrupted run continues where it stopped and never duplicates a record. Only
pending shards go through Ray Data: `map_batches` over an actor pool, one target replica per actor, one GPU per
actor where the cluster has GPUs.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError

from pipeline.config import ConfigError, DistillConfig, TargetConfig
from pipeline.data import (
    FREQUENCY_FILE,
    MANIFEST_FILE,
    SUMMARY_FILE,
    Conversation,
    encode_teacher_forced,
    generate_responses,
    load_conversations,
    rows_to_table,
    shard_path,
    token_frequencies,
    write_json_atomically,
    write_table_atomically,
)
from pipeline.stages.resources import init_ray, use_gpus
from pipeline.target import (
    PromptFormat, choose_prompt_format, context_window, load_model_config, load_target_from_config, load_tokenizer,
)

log = logging.getLogger(__name__)


def select_prompts(config: DistillConfig) -> tuple[list[Conversation], Counter[str], int]:
    """Loads, deduplicates and length-filters prompts on the driver (tokenizer only, no model)."""
    conversations, skipped, total = load_conversations(
        config.prompts, split=config.split, keep_responses=config.mode == "teacher-forced",
        max_prompts=0,
    )
    tokenizer = load_tokenizer(config.target.spec, trust_remote_code=config.target.trust_remote_code)
    formatter = PromptFormat(
        tokenizer, choose_prompt_format(config.target.prompt_format, tokenizer, config.target.spec),
        config.target.system_prompt,
    )
    window = context_window(load_model_config(config.target.spec,
                                              trust_remote_code=config.target.trust_remote_code), tokenizer)
    kept = []
    for conversation in conversations:
        try:
            if config.mode == "generate":
                length = len(formatter.encode(list(conversation.messages)))
            else:
                length = len(encode_teacher_forced(formatter, conversation).input_ids)
        except TemplateError as error:  # e.g. a system turn where the template has none, roles not alternating
            if not skipped["template_error"]:
                log.warning("distill: the chat template refused a conversation (%s); skipping such ones", error)
            skipped["template_error"] += 1
            continue
        if length > config.max_prompt_tokens:
            skipped["prompt_too_long"] += 1
            continue
        # The answer must fit the context window too: past it a learned position table has no row (GPT-2 fails)
        # and rotary targets answer from positions they were never trained on.
        if length + (config.max_new_tokens if config.mode == "generate" else 0) > window:
            skipped["longer_than_context"] += 1
            continue
        kept.append(conversation)
        if config.max_prompts and len(kept) >= config.max_prompts:
            break
    return kept, skipped, total


def _check_manifest(out_dir: Path, settings: dict[str, Any], shard_ids: list[list[str]]) -> None:
    """Refuses to continue a directory written with other settings or another prompt plan."""
    manifest_path = out_dir / MANIFEST_FILE
    manifest = {"settings": settings, "shards": shard_ids}
    if manifest_path.is_file():
        existing = json.loads(manifest_path.read_text())
        if existing != manifest:
            changed = "settings" if existing.get("settings") != settings else "prompt plan"
            raise ConfigError(
                f"distill.out_dir: {out_dir} holds shards from a different {changed}; "
                "use a new out_dir (or delete it) to distill with these settings"
            )
        return
    write_json_atomically(manifest, manifest_path)


def distill_shard(target, conversations: list[Conversation], *, config: DistillConfig, index: int) -> dict[str, Any]:
    """Core of one shard, Ray-free: the target answers (or labels) the prompts; the shard is written whole."""
    started = time.perf_counter()
    if config.mode == "generate":
        rows = generate_responses(
            target, conversations, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
            top_p=config.top_p, batch_size=config.batch_size, seed=config.seed + index,
        )
    else:
        rows = [encode_teacher_forced(target.formatter, c) for c in conversations]
    metadata = {"target": target.identity.to_dict(), "settings": config.generation_settings(), "shard": index}
    write_table_atomically(rows_to_table(rows, metadata=metadata), shard_path(Path(config.out_dir), index))
    return {
        "shard": index,
        "prompts": len(rows),
        "response_tokens": sum(r.response_tokens for r in rows),
        "prompt_tokens": sum(r.prompt_tokens for r in rows),
        "seconds": time.perf_counter() - started,
    }


class DistillActor:
    """One target replica. Ray Data calls it with batches of pending shards (one shard per call)."""

    def __init__(self, config: dict[str, Any]) -> None:
        import torch

        self.config = DistillConfig.from_dict(config)
        torch.set_num_threads(self.config.cpus_per_actor)
        self.target = load_target_from_config(self.config.target)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        results = []
        for index, payload in zip(batch["shard"], batch["conversations"]):
            conversations = [Conversation.from_json(c) for c in json.loads(payload)]
            results.append(distill_shard(self.target, conversations, config=self.config, index=int(index)))
        return {key: [r[key] for r in results] for key in results[0]}


def run_distill(config: DistillConfig, *, use_ray: bool = True, parent_run_id: str | None = None) -> dict[str, Any]:
    """Plans shards, distils the pending ones (on Ray, or in-process with `use_ray=False`), writes the token
    frequency table and a summary, and logs the stage to MLflow."""
    started = time.perf_counter()
    out_dir = Path(config.out_dir)
    local_target = None if use_ray else _local_target_config(config)  # a bad use_gpu fails before any work
    conversations, skipped, total = select_prompts(config)
    if not conversations:
        raise ConfigError(f"distill.prompts: no usable prompts in {list(config.prompts)} (skipped: {dict(skipped)})")
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = [conversations[i : i + config.shard_size] for i in range(0, len(conversations), config.shard_size)]
    _check_manifest(out_dir, config.generation_settings(), [[c.prompt_id for c in shard] for shard in shards])
    pending = [i for i in range(len(shards)) if not shard_path(out_dir, i).is_file()]
    log.warning("distill: %d prompts in %d shards, %d to do, %d reused", len(conversations), len(shards),
                len(pending), len(shards) - len(pending))
    generation_started = time.perf_counter()
    results = _run_pending(config, shards, pending, local_target=local_target) if pending else []
    generation_seconds = time.perf_counter() - generation_started
    all_paths = [shard_path(out_dir, i) for i in range(len(shards))]
    counts = token_frequencies(all_paths)
    write_json_atomically({"counts": {str(k): v for k, v in counts.most_common()}}, out_dir / FREQUENCY_FILE)
    new_tokens = sum(r["response_tokens"] for r in results)
    summary = {
        "prompts_in": total,
        "prompts_kept": len(conversations),
        "prompts_skipped": dict(skipped),
        "shards": len(shards),
        "shards_reused": len(shards) - len(pending),
        "response_tokens_total": sum(counts.values()),
        "response_tokens_this_run": new_tokens,
        # End to end (actor start-up and model loading included) and per actor (generation time only).
        "tokens_per_s": new_tokens / generation_seconds if results else None,
        "actor_tokens_per_s": new_tokens / sum(r["seconds"] for r in results) if results else None,
        "wall_time_s": time.perf_counter() - started,
        "mode": config.mode,
        "settings": config.generation_settings(),
    }
    write_json_atomically(summary, out_dir / SUMMARY_FILE)
    _track(config, summary, parent_run_id=parent_run_id)
    return summary


def _local_target_config(config: DistillConfig) -> TargetConfig:
    """The target of a distillation without Ray, placed as `use_gpu` says, as the actors are (an actor without a GPU
    sees none): 'no' loads it on the CPU, 'yes' needs CUDA, 'auto' goes by target.device."""
    import torch

    if config.use_gpu == "yes" and not torch.cuda.is_available():
        raise ConfigError("distill.use_gpu: 'yes' but CUDA is not available; use 'auto' or 'no'")
    return config.target.replace(device="cpu") if config.use_gpu == "no" else config.target


def _run_pending(config: DistillConfig, shards: list[list[Conversation]], pending: list[int], *,
                 local_target: TargetConfig | None):
    """Distils the pending shards: in this process on `local_target` when given, else on Ray's actor pool."""
    if local_target is not None:
        target = load_target_from_config(local_target)
        return [distill_shard(target, shards[i], config=config, index=i) for i in pending]
    import ray

    init_ray()
    items = [{"shard": i, "conversations": json.dumps([c.to_json() for c in shards[i]])} for i in pending]
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        DistillActor,
        fn_constructor_kwargs={"config": config.to_dict()},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=min(config.num_actors, len(items))),
        num_cpus=config.cpus_per_actor,
        num_gpus=1 if use_gpus(config.use_gpu, section="distill") else 0,
    )
    return dataset.take_all()


def _track(config: DistillConfig, summary: dict[str, Any], *, parent_run_id: str | None) -> None:
    if not config.tracking.enabled:
        return
    from pipeline.tracking import Run, tracking_uri

    run = Run.start(
        tracking_uri(config.tracking), experiment=config.tracking.experiment, run_name="distill",
        params={**config.to_dict(), "data": {k: v for k, v in summary.items() if k != "settings"}},
        tags={"koala.stage": "distill"}, parent_run_id=parent_run_id,
        started_at=time.time() - summary["wall_time_s"],  # the run spans the work, not just its logging
    )
    run.log_metrics({k: summary[k] for k in ("prompts_kept", "response_tokens_total", "tokens_per_s",
                                             "actor_tokens_per_s", "wall_time_s")}, prefix="distill/")
    run.log_metrics({f"skipped_{reason}": n for reason, n in summary["prompts_skipped"].items()}, prefix="distill/")
    for name in (SUMMARY_FILE, FREQUENCY_FILE, MANIFEST_FILE):
        run.log_artifact(Path(config.out_dir) / name, "distill")
    run.end()
