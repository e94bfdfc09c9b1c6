"""Replays an `auto` static tree's learnt budget on this machine with another device's round costs, and prints what
it learnt: the rounds seen, the expected tokens per round of every prefix size, the paths' estimated acceptance
rates next to their plain accepted/offered rates, and each choice the budget made (`--log-trees`).

Acceptance does not depend on the machine, so the budget's estimates and choices under a GPU's costs can be studied
on a CPU. The modelled round cost replaces the measured one:

    level_ms x the deepest drafted depth + verify_ms + per_token_ms x the tokens verified + overhead_ms

(defaults: an H200 with SmolLM2 fp32: a draft level 1.8 ms, a verification 21 ms + 0.03 ms per token, 4 ms
more per round) and the ceiling is the whole tree within the draft depth. `--always-ceiling` drafts the ceiling
every round instead, with no pooled prior, so every estimate is the plain rate over all rounds (the reference the
learnt ones aim at; the choices it logs are then never drafted).

    python benchmarks/tree_budget_replay.py --per-category 2 --head auto=pipeline/drafters/smollm2-eagle@4
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare_heads  # noqa: E402

from pipeline import decoding, trees  # noqa: E402


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--level-ms", type=float, default=1.8)
    parser.add_argument("--verify-ms", type=float, default=21.0)
    parser.add_argument("--per-token-ms", type=float, default=0.03)
    parser.add_argument("--overhead-ms", type=float, default=4.0)
    parser.add_argument("--ceiling", type=int, default=63, help="the verify-cost ceiling the device would give")
    parser.add_argument("--measured-costs", action="store_true", help="keep this machine's costs and ceiling")
    parser.add_argument("--always-ceiling", action="store_true", help="draft the ceiling every round")
    parser.add_argument("--json", default="runs/tree_budget_replay.json")
    return parser.parse_known_args(argv)


def modelled_costs(args: argparse.Namespace) -> None:
    """The device's costs in place of this machine's: the ceiling and every round's modelled seconds."""
    decoding.auto_tree_nodes = lambda model, draft_length: args.ceiling

    def round_seconds(learnt: decoding._LearntTree, model: object) -> Callable[[int], float]:
        def seconds(nodes: int) -> float:
            depth = max(map(len, learnt.budget.paths[:nodes]))
            return (args.level_ms * depth + args.verify_ms + args.per_token_ms * (nodes + 1) + args.overhead_ms) / 1e3
        return seconds

    decoding._LearntTree.round_seconds = round_seconds


def report(heads: list) -> None:
    for head in heads:
        for learnt in decoding._learnt_trees.get(head, {}).values():
            budget = learnt.budget
            rates = budget.acceptances()
            print(f"draft length {learnt.depth}: rounds {budget.rounds}, ceiling {budget.ceiling}, "
                  f"drafting {budget.nodes}, "
                  f"prompt-lookup tokens per round {budget.other_tokens / max(budget.rounds, 1):.3f}")
            print("expected tokens per round by size:",
                  " ".join(f"{n}:{tokens:.2f}" for n, tokens in enumerate(budget.expected_by_size()) if n))
            print("path, estimated rate, plain accepted/offered rate, offered, reached:")
            for path in budget.paths:
                plain = budget.accepted[path] / budget.offered[path] if budget.offered[path] else 0.0
                print(f"  {path}: {rates[path]:.3f} {plain:.3f} {budget.offered[path]} {budget.reached[path]}")


def main(argv: list[str] | None = None) -> int:
    args, rest = parse_args(argv)
    if not args.measured_costs:
        modelled_costs(args)
    if args.always_ceiling:
        trees.TreeBudget.round_nodes = lambda budget: budget.ceiling
        trees.TreeBudget.__init__.__kwdefaults__["prior_rounds"] = 0.0
    heads = []  # kept alive: learnt budgets live as long as their drafter
    load_head = compare_heads.load_head
    compare_heads.load_head = lambda *a, **k: heads.append(load_head(*a, **k)) or heads[-1]
    compare_heads.main(["--no-vanilla", "--no-prompt-lookup", "--log-trees", "--json", args.json, *rest])
    report(heads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
