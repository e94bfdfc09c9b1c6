"""Distillation throughput: `koala distill` (Ray Data actor) against a plain batched HF `generate` loop.

Both answer the same prompts with the same target, batch size and max_new_tokens; generated tokens per second of
generation time are compared. The plain loop takes prompts in file order (no length sorting), as a simple script
would.

    .venv/bin/python benchmarks/distill_throughput.py --prompts ../shared/data/sharegpt_prompts/ShareGPT_V3_filtered_500.json \
        --max-prompts 64 --max-new-tokens 128 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from pipeline.config import DistillConfig
from pipeline.stages.distill import run_distill, select_prompts
from pipeline.target import load_target


def plain_hf_loop(target, conversations, *, batch_size: int, max_new_tokens: int) -> tuple[int, float]:
    tokenizer = target.tokenizer
    tokenizer.padding_side = "left"
    texts = [target.format_messages(list(c.messages)) for c in conversations]
    generated, started = 0, time.perf_counter()
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            output = target.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                           pad_token_id=tokenizer.pad_token_id)
        new = output[:, batch["input_ids"].shape[1]:]
        generated += int((new != tokenizer.pad_token_id).sum())
    return generated, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--max-prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--target", default="smollm2")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out_dir:
        config = DistillConfig.from_dict({
            "prompts": args.prompts, "max_prompts": args.max_prompts, "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size, "shard_size": args.max_prompts, "out_dir": out_dir,
            "target": {"spec": args.target}, "tracking": {"enabled": False},
        })
        conversations, _, _ = select_prompts(config)
        target = load_target(args.target)
        torch.set_num_threads(config.cpus_per_actor)
        plain_tokens, plain_seconds = plain_hf_loop(target, conversations, batch_size=args.batch_size,
                                                    max_new_tokens=args.max_new_tokens)
        del target
        summary = run_distill(config)
    result = {
        "prompts": len(conversations),
        "plain_hf_tokens": plain_tokens, "plain_hf_seconds": plain_seconds,
        "plain_hf_tokens_per_s": plain_tokens / plain_seconds,
        "koala_distill_tokens": summary["response_tokens_this_run"],
        "koala_distill_tokens_per_s": summary["tokens_per_s"],
        "koala_distill_actor_tokens_per_s": summary["actor_tokens_per_s"],
        "koala_distill_wall_time_s": summary["wall_time_s"],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
