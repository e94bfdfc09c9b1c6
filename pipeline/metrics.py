"""The paper's metrics over a set of generations: walltime speedup, acceptance length tau, and n-alpha."""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.decoding import GenerationStats


def total_tokens(stats: Sequence[GenerationStats]) -> int:
    return sum(s.new_tokens for s in stats)


def total_time(stats: Sequence[GenerationStats]) -> float:
    return sum(s.wall_time_s for s in stats)


def tokens_per_second(stats: Sequence[GenerationStats]) -> float:
    elapsed = total_time(stats)
    return total_tokens(stats) / elapsed if elapsed > 0 else 0.0


def speedup(speculative: Sequence[GenerationStats], vanilla: Sequence[GenerationStats]) -> float:
    """Walltime speedup: throughput of speculative decoding over vanilla decoding measured on the same prompts.

    For greedy decoding both produce the same tokens, so this is exactly total vanilla time / total speculative
    time; for sampling, output lengths differ and throughput is the comparable quantity.
    """
    baseline = tokens_per_second(vanilla)
    return tokens_per_second(speculative) / baseline if baseline > 0 else 0.0


def acceptance_length(stats: Sequence[GenerationStats]) -> float:
    """tau: generated tokens per target forward pass, pooled over all generations."""
    passes = sum(s.target_forward_passes for s in stats)
    return total_tokens(stats) / passes if passes else 0.0


def n_alpha(stats: Sequence[GenerationStats], *, max_n: int = 3) -> list[float | None]:
    """[1-alpha, ..., max_n-alpha]: acceptance rate of the n-th drafted token given the first n-1 were accepted and
    an n-th was drafted after them (for trees: at depth n under the accepted path). None where position n was never
    evaluated."""
    rates: list[float | None] = []
    for position in range(max_n):
        evaluated = sum(s.evaluated[position] for s in stats if len(s.evaluated) > position)
        accepted = sum(s.accepted[position] for s in stats if len(s.accepted) > position)
        rates.append(accepted / evaluated if evaluated else None)
    return rates


def draft_ms_per_token(stats: Sequence[GenerationStats]) -> float | None:
    """Mean time to draft one token (one EAGLE step, or one Medusa head)."""
    drafted = sum(s.draft_tokens for s in stats)
    return 1000 * sum(s.draft_time_s for s in stats) / drafted if drafted else None


def target_ms_per_forward(stats: Sequence[GenerationStats]) -> float | None:
    """Mean time of one target forward pass in the decode loop (prefill excluded from the count and the time)."""
    passes = sum(s.target_forward_passes - 1 for s in stats)
    return 1000 * sum(s.target_time_s for s in stats) / passes if passes else None


def by_group(
    groups: Sequence[str], speculative: Sequence[GenerationStats], vanilla: Sequence[GenerationStats] | None = None
) -> dict[str, dict[str, float | int]]:
    """tau (and the speedup, given the vanilla runs of the same prompts) per group of prompts, e.g. MT-bench's
    categories, in first-seen order: a head's average hides where it fails (knowledge prose vs maths)."""
    if len(groups) != len(speculative) or (vanilla is not None and len(vanilla) != len(speculative)):
        raise ValueError("by_group needs one group name per generation (and as many vanilla generations)")
    members: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    summary: dict[str, dict[str, float | int]] = {}
    for group, indices in members.items():
        entry: dict[str, float | int] = {
            "prompts": len(indices), "tau": acceptance_length([speculative[i] for i in indices])}
        if vanilla is not None:
            entry["speedup"] = speedup([speculative[i] for i in indices], [vanilla[i] for i in indices])
        summary[group] = entry
    return summary
