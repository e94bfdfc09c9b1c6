"""Sampled decoding at one temperature, in one process, alternating per prompt: vanilla, the head's chain, its
static tree with top-k tokens (how sampled trees drafted before they drew their tokens) and its static tree with
tokens drawn from the head (the decoder's way), both trees with the prompt-lookup branch. Seeds are per prompt.

    python benchmarks/sampled_trees.py --temperature 0.7 --per-category 4 --json runs/cpu/sampled-trees-T0.7-32.json

Prints running speedups over vanilla and tau (tokens per verification round) and writes the totals (tokens, seconds,
rounds, the tree sizes the auto budget chose) as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.bench import load_questions  # noqa: E402
from pipeline.config import DecodeConfig  # noqa: E402
from pipeline.decoding import generate  # noqa: E402
from pipeline.heads import default_drafter_dir, load_head  # noqa: E402
from pipeline.target import load_target  # noqa: E402


class TopKTrees:
    """The same head, drafting its trees' top-k tokens even when sampling (it ignores the decoder's drawer)."""

    def __init__(self, head) -> None:
        self.head = head

    def __getattr__(self, name):
        return getattr(self.head, name)

    def propose_tree(self, *args, draw=None):
        return self.head.propose_tree(*args)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--temperature", type=float, required=True)
    parser.add_argument("--per-category", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--drafter", type=Path, default=None, help="head directory (default: the shipped one)")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.temperature <= 0:
        parser.error("--temperature must be > 0 (greedy decoding has no sampled trees)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    target = load_target("smollm2", dtype="float32")
    head = load_head(args.drafter or default_drafter_dir("smollm2"), target.model, target_name=target.name)
    questions = load_questions(None, per_category=args.per_category)
    base = DecodeConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, draft_length=4)
    methods = {
        "vanilla": (None, base),
        "chain": (head, base.replace(tree="chain", lookup_tokens=0)),
        "topk_tree": (TopKTrees(head), base.replace(tree_max_temperature=2.0)),
        "sampled_tree": (head, base.replace(tree_max_temperature=2.0)),
    }
    warmup = target.encode_prompt(questions[0].prompt)
    for drafter, config in methods.values():
        generate(target, warmup, config=config.replace(max_new_tokens=16, seed=0), drafter=drafter)
    totals = {name: {"new": 0, "wall": 0.0, "rounds": 0, "tree_nodes": []} for name in methods}
    for index, question in enumerate(questions):
        prompt_ids = target.encode_prompt(question.prompt)
        for name, (drafter, config) in methods.items():
            stats = generate(target, prompt_ids, config=config.replace(seed=index), drafter=drafter).stats
            total = totals[name]
            total["new"] += stats.new_tokens
            total["wall"] += stats.wall_time_s
            total["rounds"] += stats.target_forward_passes - 1  # the prefill's token is not drafted
            total["tree_nodes"] = sorted({*total["tree_nodes"], stats.tree_nodes})  # the auto budget, per run
        vanilla = totals["vanilla"]["new"] / totals["vanilla"]["wall"]
        line = "  ".join(f"{name} x{total['new'] / total['wall'] / vanilla:.3f} tau "
                         f"{total['new'] / max(total['rounds'], 1):.2f}"
                         for name, total in totals.items() if name != "vanilla")
        print(f"[{index + 1}/{len(questions)}] vanilla {vanilla:.2f} tok/s  {line}", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"temperature": args.temperature, "prompts": len(questions), "totals": totals},
                                    indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
