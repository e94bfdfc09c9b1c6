"""Losslessness audit of greedy speculative decoding, in any dtype.

In exact arithmetic greedy speculative decoding emits exactly vanilla greedy's tokens. In low precision it need not:
the target scores k drafted tokens in one pass with other kernels and shapes than a one-token step, and near-tied
logits flip (bf16 values between 16 and 32 are 0.125 apart). So a bare `exact_match` cannot tell a numerical
near-tie from a real bug. The audit can, from the logits row that chose every emitted token
(`generate(..., record_logits=True)`):

1. Self-consistency: every emitted token is the argmax of its own row, in both runs. A failure is a bookkeeping bug
   whatever the dtype.
2. Reference noise: the vanilla output is scored again in one multi-token forward pass; the largest difference
   between those rows and vanilla's one-token rows is how far the target's two kernel paths drift apart in this
   dtype on this context. It does not involve the speculative decoder, so a broken decoder cannot inflate it.
3. At the first position where the speculative output differs from vanilla (same context up to there), the two
   rows that chose the different tokens are compared: a *near-tie* when they differ by no more than
   `noise_factor` x the reference noise (the flip is within the kernels' drift), a *violation* otherwise (a wrong
   context, position or cache shows up as rows far apart).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from pipeline.decoding import GenerationResult
from pipeline.target import Target

NOISE_FACTOR = 2.0
# Rows compared in chunks so the reference pass's (T, V) logits never sit next to a second copy.
ROW_CHUNK = 256


@dataclasses.dataclass
class PromptAudit:
    """One prompt's audit: the facts; `classify` turns them into exact / near_tie / violation."""

    exact_match: bool
    self_consistent: bool
    reference_noise: float  # max |one-token row - multi-token row| over the vanilla output's positions
    divergence: int | None = None  # index of the first output token that differs
    row_difference: float | None = None  # max |vanilla row - speculative row| at the divergence
    vanilla_margin: float | None = None  # vanilla row: logit of vanilla's token - logit of speculative's token
    speculative_margin: float | None = None  # speculative row: the reverse
    verdict: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def self_consistent(token_ids: Sequence[int], rows: torch.Tensor) -> bool:
    """Every token is the argmax of the row that chose it: token_ids `(N,)`, rows `(N, V)`."""
    return len(token_ids) == rows.shape[0] and bool((rows.argmax(-1).cpu() == torch.tensor(token_ids)).all())


@torch.inference_mode()
def reference_noise(target: Target, prompt_ids: torch.Tensor, vanilla: GenerationResult) -> float:
    """Largest difference between vanilla's one-token rows and the same positions scored in one forward pass."""
    sequence = torch.cat([prompt_ids[0].to(target.device),
                          torch.tensor(vanilla.token_ids[:-1], device=target.device, dtype=torch.long)])
    logits = target.model(input_ids=sequence[None]).logits[0, prompt_ids.shape[1] - 1 :]  # (N, V)
    rows = vanilla.chosen_logits
    noise = 0.0
    for start in range(0, rows.shape[0], ROW_CHUNK):
        chunk = slice(start, start + ROW_CHUNK)
        noise = max(noise, float((logits[chunk].float().cpu() - rows[chunk].float()).abs().max()))
    return noise


def compare(target: Target, prompt_ids: torch.Tensor, vanilla: GenerationResult,
            speculative: GenerationResult) -> PromptAudit:
    """The audit facts for one prompt (greedy runs generated with `record_logits=True`)."""
    if vanilla.chosen_logits is None or speculative.chosen_logits is None:
        raise ValueError("the audit needs both runs generated with record_logits=True")
    audit = PromptAudit(
        exact_match=vanilla.token_ids == speculative.token_ids,
        self_consistent=(self_consistent(vanilla.token_ids, vanilla.chosen_logits)
                         and self_consistent(speculative.token_ids, speculative.chosen_logits)),
        reference_noise=reference_noise(target, prompt_ids, vanilla),
    )
    if audit.exact_match:
        return audit
    common = min(len(vanilla.token_ids), len(speculative.token_ids))
    differing = [i for i in range(common) if vanilla.token_ids[i] != speculative.token_ids[i]]
    if not differing:  # one output is a strict prefix of the other: the stopping rules disagreed, not the logits
        audit.divergence, audit.row_difference = common, float("inf")
        return audit
    index = differing[0]
    vanilla_row = vanilla.chosen_logits[index].float()
    speculative_row = speculative.chosen_logits[index].float()
    vanilla_token, speculative_token = vanilla.token_ids[index], speculative.token_ids[index]
    audit.divergence = index
    audit.row_difference = float((vanilla_row - speculative_row).abs().max())
    audit.vanilla_margin = float(vanilla_row[vanilla_token] - vanilla_row[speculative_token])
    audit.speculative_margin = float(speculative_row[speculative_token] - speculative_row[vanilla_token])
    return audit


def classify(audits: Sequence[PromptAudit], *, noise_factor: float = NOISE_FACTOR) -> list[PromptAudit]:
    """Sets each audit's verdict against the largest reference noise of the set (one dtype, one target)."""
    noise = max((a.reference_noise for a in audits), default=0.0)
    for audit in audits:
        if not audit.self_consistent:
            audit.verdict = "violation"
        elif audit.divergence is None:
            audit.verdict = "exact"
        elif audit.row_difference <= noise_factor * noise:
            # Both margins are then small too: a flip needs margin <= 2 x row difference in each row.
            audit.verdict = "near_tie"
        else:
            audit.verdict = "violation"
    return list(audits)


def summarize(audits: Sequence[PromptAudit]) -> dict[str, Any]:
    """Totals for reports: exact_match (share of prompts), near_tie_divergences, lossless_violations."""
    return {
        "exact_match": sum(a.exact_match for a in audits) / len(audits) if audits else None,
        "near_tie_divergences": sum(a.verdict == "near_tie" for a in audits),
        "lossless_violations": sum(a.verdict == "violation" for a in audits),
        "reference_noise": max((a.reference_noise for a in audits), default=None),
    }
