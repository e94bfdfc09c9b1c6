"""Decoding with and without cuDNN attention, alternating per prompt: target step, draft step and verification times.

`pipeline.decoding` keeps cuDNN attention off while it decodes (`DECODING_ATTENTION_BACKENDS`), because cuDNN plans
per sequence length and decoding meets a new length every round. This measures that choice where it matters, on a
Hopper GPU in bf16 (elsewhere cuDNN attention is never picked, and both rows should match):

    python benchmarks/attention_backends.py --dtype bfloat16 --limit 4 --json runs/attention_backends.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from torch.nn.attention import SDPBackend

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import decoding  # noqa: E402
from pipeline.bench import load_questions  # noqa: E402
from pipeline.config import DecodeConfig  # noqa: E402
from pipeline.heads import default_drafter_dir, load_head  # noqa: E402
from pipeline.target import load_target  # noqa: E402

SETTINGS = {
    "without cuDNN (default)": decoding.DECODING_ATTENTION_BACKENDS,
    "with cuDNN": (SDPBackend.CUDNN_ATTENTION, *decoding.DECODING_ATTENTION_BACKENDS),
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--drafter", default="", help="head directory; default: the target's shipped drafter")
    parser.add_argument("--questions", default="")
    parser.add_argument("--limit", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)

    target = load_target(args.target, dtype=args.dtype)
    drafter = load_head(args.drafter or default_drafter_dir(args.target), target.model, target_name=args.target)
    decode = DecodeConfig(max_new_tokens=args.max_new_tokens)
    prompts = [target.encode_prompt(q.prompt) for q in load_questions(args.questions or None, limit=args.limit)]
    totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for index, prompt_ids in enumerate([prompts[0], *prompts]):  # the first prompt warms up, untimed
        for name, backends in SETTINGS.items():
            decoding.DECODING_ATTENTION_BACKENDS = backends
            for method, head in (("vanilla", None), ("speculative", drafter)):
                stats = decoding.generate(target, prompt_ids, config=decode, drafter=head).stats
                if index:
                    row = totals[f"{name} {method}"]
                    for field in ("new_tokens", "wall_time_s", "target_time_s", "draft_time_s", "draft_tokens"):
                        row[field] += getattr(stats, field)
                    row["rounds"] += stats.target_forward_passes - 1  # target_time_s leaves out the prefill
    report = {"device": str(target.device), "dtype": args.dtype, "prompts": len(prompts), "rows": {}}
    for name, row in totals.items():
        report["rows"][name] = {
            "tokens_per_s": row["new_tokens"] / row["wall_time_s"],
            "forward_ms": 1000 * row["target_time_s"] / row["rounds"],
            "draft_ms_per_token": 1000 * row["draft_time_s"] / row["draft_tokens"] if row["draft_tokens"] else None,
        }
        print(f"{name:38s} " + "  ".join(f"{k} {v:.2f}" for k, v in report["rows"][name].items() if v is not None))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
