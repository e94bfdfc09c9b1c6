"""`koala self-prompts`: the target writes user prompts for its own distillation data (Magpie-style), Ray-free.

One process, one device (CUDA when present): sampling prompts is a few batched `generate` calls, and its output is
one JSONL file that `koala distill --prompts` (on Ray Data or `--no-ray`) then answers. Each batch is appended and
flushed as it completes, with its batch number: an interrupted run keeps every finished batch, and a re-run
continues from the next batch (a new seed, so no batch is drawn twice) until the file holds `count` prompts.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, SelfPromptConfig
from pipeline.data import content_hash, generate_self_prompts
from pipeline.target import load_target_from_config

log = logging.getLogger(__name__)

# A batch keeping nothing this many times in a row means the settings cannot work (the model never ends its turn
# within max_new_tokens, or min_chars is above what it writes): stop with the reason instead of looping.
EMPTY_BATCHES_TOLERATED = 3


def _read_existing(path: Path) -> tuple[set[str], int]:
    """Prompt texts already in the file and the next batch number. A torn last line (a crash mid-write) is cut."""
    if not path.is_file():
        return set(), 0
    texts, last_batch, good_bytes = set(), -1, 0
    with path.open("rb") as handle:
        for line in handle:
            try:
                record = json.loads(line)
                text, batch = record["messages"][0]["content"], int(record["batch"])
            except (ValueError, KeyError, IndexError, TypeError):
                break
            texts.add(text)
            last_batch = max(last_batch, batch)
            good_bytes += len(line)
    if good_bytes < path.stat().st_size:
        log.warning("self-prompts: %s ended in a partial line (an interrupted write); it is cut", path)
        with path.open("r+b") as handle:
            handle.truncate(good_bytes)
    return texts, last_batch + 1


def run_self_prompts(config: SelfPromptConfig) -> dict[str, Any]:
    """Samples prompts batch by batch until `config.out` holds `config.count` distinct ones; returns a summary."""
    started = time.perf_counter()
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    seen, batch = _read_existing(out)
    reused = len(seen)
    dropped: Counter[str] = Counter()
    if len(seen) >= config.count:
        log.warning("self-prompts: %s already holds %d prompts; nothing to do", out, len(seen))
        return _summary(config, len(seen), reused, dropped, 0, started)
    target = load_target_from_config(config.target)
    generated, empty_in_a_row = 0, 0
    with out.open("a") as handle:
        while len(seen) < config.count:
            batch_started = time.perf_counter()
            prompts, batch_dropped = generate_self_prompts(
                target, config.batch_size, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                top_p=config.top_p, top_k=config.top_k, min_chars=config.min_chars, seed=config.seed * 1_000_003 + batch,
            )
            generated += config.batch_size
            dropped.update(batch_dropped)
            fresh = [p for p in dict.fromkeys(prompts) if p not in seen]
            if len(fresh) < len(prompts):
                dropped["duplicate"] += len(prompts) - len(fresh)
            fresh = fresh[: config.count - len(seen)]
            for text in fresh:
                messages = [{"role": "user", "content": text}]
                handle.write(json.dumps({"prompt_id": content_hash(messages), "messages": messages,
                                         "batch": batch}) + "\n")
            handle.flush()
            seen.update(fresh)
            batch += 1
            log.warning("self-prompts: %d/%d prompts (batch %d kept %d of %d in %.1fs; dropped so far: %s)",
                        len(seen), config.count, batch - 1, len(fresh), config.batch_size,
                        time.perf_counter() - batch_started, dict(dropped) or "none")
            empty_in_a_row = 0 if fresh else empty_in_a_row + 1
            if empty_in_a_row >= EMPTY_BATCHES_TOLERATED:
                raise ConfigError(
                    f"self_prompts: {EMPTY_BATCHES_TOLERATED} batches in a row kept no prompt (dropped: "
                    f"{dict(dropped)}); raise max_new_tokens (unfinished) or lower min_chars (too_short)"
                )
    return _summary(config, len(seen), reused, dropped, generated, started)


def _summary(config: SelfPromptConfig, total: int, reused: int, dropped: Counter[str], generated: int,
             started: float) -> dict[str, Any]:
    return {
        "out": config.out,
        "prompts": total,
        "prompts_reused": reused,
        "sampled_this_run": generated,
        "dropped": dict(dropped),
        "wall_time_s": time.perf_counter() - started,
    }
