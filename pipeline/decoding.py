"""Vanilla and speculative (chain-draft) generation through one code path.

`generate(target, prompt_ids, config=..., drafter=None)` is plain autoregressive decoding with the KV cache; with a
drafter, each round proposes a chain of draft tokens, the target scores them all in one forward pass, and the
longest acceptable prefix plus one target token is kept. Greedy verification reproduces vanilla greedy output
token for token; sampling uses speculative sampling with the residual distribution (Leviathan et al. 2023; Chen
et al. 2023), so the output distribution is the target's.

The loop is a chain of pure steps: `draft -> score -> verify -> commit`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import math
import time
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import DynamicCache, PreTrainedModel

from pipeline.config import DecodeConfig
from pipeline.caches import keep_cache_positions, new_cache, rollback_cache, tree_attention, tree_incapability
from pipeline.heads import DraftHead, Proposal, attention_mask_for, cache_argument, head_input_features
from pipeline.lookup import PromptLookup, graft_chain
from pipeline.trees import (
    DEFAULT_STATIC_TREE, RankPath, TreeBudget, TreeShape, accept_greedy, children_of, evaluated_depth, node_depths,
    parents_first, verify_inputs,
)
from pipeline.target import Target


_log = logging.getLogger(__name__)


class PromptTooLongError(ValueError):
    """The prompt does not fit the target's context window."""


# on_tokens(new_token_ids) sees the tokens each round commits, in order; returning False stops generation with
# finish_reason "cancelled" (a streaming client that went away should not keep the target busy).
TokenCallback = Callable[[list[int]], bool | None]


@dataclasses.dataclass
class GenerationStats:
    """Counters of one generation. Position lists are indexed by draft position (0 = first drafted token).

    `evaluated[i]` counts rounds in which draft token i was checked (all earlier ones accepted, and a token drafted
    at position i after them), so `accepted[i] / evaluated[i]` is the paper's (i+1)-alpha. For a tree, position i is
    depth i+1 and `drafted[i]` counts rounds whose tree reached that depth in any branch.
    """

    prompt_tokens: int = 0
    new_tokens: int = 0
    target_forward_passes: int = 0
    draft_tokens: int = 0
    drafted: list[int] = dataclasses.field(default_factory=list)
    evaluated: list[int] = dataclasses.field(default_factory=list)
    accepted: list[int] = dataclasses.field(default_factory=list)
    wall_time_s: float = 0.0
    target_time_s: float = 0.0
    draft_time_s: float = 0.0
    tree_nodes: int = 0  # the generation's tree size, 0 = chains (auto: learning, exploring rounds draft more)
    lookup_accepted: int = 0  # accepted tokens that only the prompt-lookup branch drafted (`lookup_tokens`)

    @property
    def acceptance_length(self) -> float:
        """tau: tokens produced per target forward pass (the prefill counts as one)."""
        return self.new_tokens / self.target_forward_passes if self.target_forward_passes else 0.0

    @property
    def drafter_accepted(self) -> int:
        """Accepted tokens the drafter drafted (of its `draft_tokens`): the prompt-lookup branch's own are not among
        them, and counting them overstated the accepted share of drafted tokens (above 1 on repetitive text)."""
        return sum(self.accepted) - self.lookup_accepted

    def record_round(self, num_drafted: int, num_accepted: int, *, num_evaluated: int | None = None) -> None:
        """One verified round: `num_drafted` positions (a tree's depth), `num_accepted` of them accepted, and the
        first `num_evaluated` checked. A chain checks the one after the accepted ones, if drafted (the default); a
        tree checks one only where the accepted path's last node has children (`trees.evaluated_depth`)."""
        if num_evaluated is None:
            num_evaluated = min(num_accepted + 1, num_drafted)
        _grow(self.drafted, num_drafted)
        _grow(self.evaluated, num_drafted)
        _grow(self.accepted, num_drafted)
        for position in range(num_drafted):
            self.drafted[position] += 1
            if position < num_evaluated:
                self.evaluated[position] += 1
            if position < num_accepted:
                self.accepted[position] += 1

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "acceptance_length": self.acceptance_length}


def _grow(counts: list[int], length: int) -> None:
    counts.extend([0] * (length - len(counts)))


@dataclasses.dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or stop string), "length", or "cancelled" (on_tokens returned False)
    stats: GenerationStats
    # With record_logits: the target's logits row that chose each emitted token, (len(token_ids), V) fp32 on the
    # CPU (the prefill's last row, a vanilla step's row, or the verify pass's row); pipeline.audit reads them.
    chosen_logits: torch.Tensor | None = None


def sampling_probs(logits: torch.Tensor, *, temperature: float, top_p: float) -> torch.Tensor:
    """logits `(..., V)` -> the sampling distribution `(..., V)` after temperature and nucleus (top-p) filtering.

    Top-p keeps the smallest set of most likely tokens whose mass reaches `top_p` (at least one token).
    """
    logits = logits.float()
    # The max subtracted before dividing: a tiny temperature (1e-38 is valid) would overflow logits / t to inf,
    # and softmax of inf is NaN; this way the best logit is 0 and the others go to -inf at worst (probability 0).
    probs = torch.softmax((logits - logits.amax(dim=-1, keepdim=True)) / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    filtered = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return filtered / filtered.sum(dim=-1, keepdim=True)


def verify_greedy(target_logits: torch.Tensor, draft_tokens: torch.Tensor) -> tuple[int, int]:
    """target_logits `(k+1, V)` scored at [pending, d_1..d_k]; draft_tokens `(k,)`.

    Returns (number of accepted draft tokens a, the target's own next token after them).
    """
    choices = target_logits.argmax(dim=-1)  # (k+1,)
    num_accepted = int((choices[:-1] == draft_tokens).int().cumprod(dim=0).sum())
    return num_accepted, int(choices[num_accepted])


def verify_sampling(
    target_probs: torch.Tensor, draft_tokens: torch.Tensor, draft_probs: torch.Tensor, generator: torch.Generator
) -> tuple[int, int]:
    """Speculative sampling. target_probs `(k+1, V)`, draft_tokens `(k,)`, draft_probs `(k, V)` (full vocabulary).

    Draft token i is accepted with probability min(1, p_i(d)/q_i(d)); at the first rejection the replacement is
    drawn from the residual norm(max(0, p_i - q_i)); if all pass, a bonus token is drawn from p_k.
    """
    uniforms = torch.rand(len(draft_tokens), generator=generator, device=generator.device)
    for i, token in enumerate(draft_tokens.tolist()):
        p, q = target_probs[i, token], draft_probs[i, token]
        # Strictly less: torch.rand can return exactly 0, and `<=` would then accept a token with p = 0 (one the
        # target never samples, e.g. outside its top_p nucleus).
        if uniforms[i] * q < p:
            continue
        residual = (target_probs[i] - draft_probs[i]).clamp_min(0.0)
        if float(residual.sum()) <= 0:  # rounding left no mass (p <= q everywhere): the target's own row
            residual = target_probs[i]
        return i, _sample(residual / residual.sum(), generator)
    return len(draft_tokens), _sample(target_probs[-1], generator)


def _sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One index drawn from `probs` `(V,)` (non-negative, not necessarily normalised) by inverting its cumulative
    sum in fp64: a tenth of `torch.multinomial`'s time on a CPU (0.1 vs 1.3 ms over 49k tokens), which decoding
    pays for every sampled token and every draft draw."""
    cumulative = probs.double().cumsum(0)
    point = torch.rand((), generator=generator, device=probs.device, dtype=torch.float64) * cumulative[-1]
    index = int(torch.searchsorted(cumulative, point, right=True))
    if index >= len(cumulative):  # rounding put the point on the total: the last token with mass
        index = int((cumulative < cumulative[-1]).sum())
    return index


def accept_sampling(
    row_probs: Callable[[int], torch.Tensor], tokens: Sequence[int], parents: Sequence[int],
    generator: torch.Generator, draft_probs: Callable[[int], torch.Tensor | None] | None = None,
) -> tuple[list[int], int]:
    """Lossless verification of a draft tree under sampling (recursive rejection sampling). `row_probs(0)` is the
    target's sampling distribution after the pending token, `row_probs(i + 1)` after node i; `draft_probs(i)` is
    the distribution node i was drawn from (over the target vocabulary; its earlier-drawn siblings removed), or
    None for a deterministic draft (a head's top-k token, a prompt-lookup token), which is a point mass.

    At each node its children are tried in order against a residual r, which starts as the target distribution:
    child c, drawn from q, is accepted with probability min(1, r(c) / q(c)) (for a point mass, r(c)); on rejection
    r becomes norm(max(r - q, 0)) (for a point mass, r with c removed); when every child is rejected the next token
    is drawn from r. Each step is one speculative-sampling step whose target is the previous step's residual, and
    speculative sampling emits its target's distribution for any draft distribution, so each token is emitted with
    exactly the target's probability (multi-draft speculative sampling: SpecInfer; without replacement: Recursive
    Speculative Decoding). Returns (accepted node indices, the token after them).
    """
    children = children_of(parents)
    path: list[int] = []
    current = -1
    while True:
        candidates = children.get(current, [])
        # One transfer and one draw per depth: the loop below runs on the host, not a device sync per child.
        residual = row_probs(current + 1).float().cpu().clone()
        uniforms = torch.rand(len(candidates), generator=generator, device=generator.device).tolist()
        follow = None
        for child, uniform in zip(candidates, uniforms):
            mass = float(residual.sum())
            if mass <= 0:
                break
            token = tokens[child]
            drawn_from = draft_probs(child) if draft_probs is not None else None
            if drawn_from is None:  # a point mass: accepted with probability r(c)
                if uniform < float(residual[token]) / mass:
                    follow = child
                    break
                residual[token] = 0.0
            else:
                drawn_from = drawn_from.float().cpu()
                ratio = float(residual[token]) / mass / float(drawn_from[token])
                if uniform < ratio:
                    follow = child
                    break
                residual = (residual / mass - drawn_from).clamp_min(0.0)
        if follow is None:
            if float(residual.sum()) <= 0:  # rounding left no mass: only rejected tokens had any
                residual = row_probs(current + 1).float().cpu()
            return path, _sample((residual / residual.sum()).to(generator.device), generator)
        path.append(follow)
        current = follow


class StopChecker:
    """Decides after each new token whether generation ends: EOS, a stop string, max_new_tokens or the context."""

    def __init__(self, target: Target, *, config: DecodeConfig, max_total_tokens: int, prompt_tokens: int) -> None:
        self.tokenizer = target.tokenizer
        self.eos_token_ids = target.eos_token_ids
        self.stop_strings = config.stop
        self.max_new_tokens = min(config.max_new_tokens, max_total_tokens - prompt_tokens)
        # A stop string of n UTF-8 bytes spans at most n tokens, even with a byte-level tokenizer that spells a
        # character in up to 4 tokens; a few more cover a token that starts before it.
        self.tail_tokens = max((len(s.encode()) for s in self.stop_strings), default=0) + 4

    def check(self, output_ids: list[int]) -> str | None:
        if output_ids[-1] in self.eos_token_ids:
            return "stop"
        if self.stop_strings:
            tail = self.tokenizer.decode(output_ids[-self.tail_tokens :], skip_special_tokens=True)
            if any(stop in tail for stop in self.stop_strings):
                return "stop"
        if len(output_ids) >= self.max_new_tokens:
            return "length"
        return None

    def remaining(self, output_ids: list[int]) -> int:
        return self.max_new_tokens - len(output_ids)

    def final_text(self, output_ids: list[int]) -> str:
        text = self.tokenizer.decode(output_ids, skip_special_tokens=True)
        cut = min((text.find(s) for s in self.stop_strings if s in text), default=-1)
        return text[:cut] if cut >= 0 else text


@dataclasses.dataclass
class _ScoreResult:
    logits: torch.Tensor  # (T, V) or (1, V)
    features: torch.Tensor | None  # (1, T, H)


@functools.cache
def _accepts_logits_to_keep(model_class: type) -> bool:
    # Asked once per model class: signature inspection is too slow for the per-step path.
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def score(
    model: PreTrainedModel, input_ids: torch.Tensor, cache: DynamicCache, *, last_logits_only: bool, want_features: bool,
    position_ids: torch.Tensor | None = None, allowed: torch.Tensor | None = None,
    extra_feature_layers: Sequence[int] = (),
) -> _ScoreResult:
    """One target forward over `input_ids` `(1, T)` appended to `cache`; a tree pass adds its `position_ids`
    `(1, T)` and boolean attention pattern `allowed` `(1, 1, T, cached + T)`. `want_features` returns the drafter's
    input features (`head_input_features`: the last hidden state, plus `extra_feature_layers` for a fused head)."""
    # A sliding-window layer that records its past (caches.new_cache) goes back to its window before each forward:
    # after a verification the rollback did it, after a vanilla step nothing else does, and transformers before
    # 5.18 hands attention every recorded position while its mask covers only the window.
    cached = cache.get_seq_length()
    if cached:  # an empty cache has no layers to trim yet (and transformers 5.17 cannot crop them)
        rollback_cache(cache, cached)
    kwargs: dict[str, Any] = {}
    if last_logits_only and _accepts_logits_to_keep(type(model)):
        kwargs["logits_to_keep"] = 1
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    if allowed is not None:
        implementation = model.config._attn_implementation or "sdpa"
        patterns = tree_attention(model, allowed, position_ids, cached=cached, cache=cache)
        convert = functools.partial(attention_mask_for, implementation=implementation, dtype=model.dtype)
        kwargs["attention_mask"] = (
            {kind: convert(pattern) for kind, pattern in patterns.items()} if isinstance(patterns, dict)
            else convert(patterns)
        )
    kwargs[cache_argument(type(model).forward)] = cache
    output = model(input_ids=input_ids, use_cache=True, output_hidden_states=want_features, **kwargs)
    features = head_input_features(output.hidden_states, extra_feature_layers) if want_features else None
    return _ScoreResult(logits=output.logits[0], features=features)


class _Picker:
    """Chooses a token from logits: argmax when greedy, else a sample from the processed distribution."""

    def __init__(self, config: DecodeConfig, generator: torch.Generator | None) -> None:
        self.config = config
        self.generator = generator

    def __call__(self, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        if self.config.greedy:
            return int(logits.argmax()), None
        probs = sampling_probs(logits, temperature=self.config.temperature, top_p=self.config.top_p)
        return _sample(probs, self.generator), probs

    def draw(self, logits: torch.Tensor, count: int) -> list[tuple[int, torch.Tensor]]:
        """Up to `count` indices drawn one after another without replacement from the sampling distribution of
        `logits` (fewer when fewer have mass), each with the distribution it was drawn from: the earlier draws
        removed and the rest renormalised, which is what `accept_sampling` verifies that draw against."""
        probs = sampling_probs(logits, temperature=self.config.temperature, top_p=self.config.top_p)
        draws = []
        for _ in range(count):
            mass = probs.sum()
            if float(mass) <= 0:
                break
            probs = probs / mass
            index = _sample(probs, self.generator)
            draws.append((index, probs))
            probs = probs.clone()
            probs[index] = 0.0
        return draws


def _in_target_vocabulary(draft: torch.Tensor, token_ids: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """Draft distributions `(..., V_draft)` over the target vocabulary `(..., V)` (`token_ids`: the draft
    vocabulary's target ids, None when it is the whole vocabulary)."""
    if token_ids is None:
        return draft
    full = torch.zeros(*draft.shape[:-1], vocab_size, device=draft.device, dtype=draft.dtype)
    return full.index_copy_(-1, token_ids, draft)


def _notify(on_tokens: TokenCallback | None, output_ids: list[int], start: int, finish_reason: str | None) -> str | None:
    """Hands output_ids[start:] to the callback; a False answer ends an unfinished generation as "cancelled"."""
    if on_tokens is None:
        return finish_reason
    keep_going = on_tokens(output_ids[start:])
    if keep_going is False and finish_reason is None:
        return "cancelled"
    return finish_reason


def _verify_tree(
    model: PreTrainedModel, cache: DynamicCache, pending: int, proposal: Proposal, *, committed: int,
    want_features: bool, extra_feature_layers: Sequence[int], pick: _Picker, draft_token_ids: torch.Tensor | None,
) -> tuple[_ScoreResult, list[int], int]:
    """Scores the pending token and every tree node in one pass, accepts along the tree (greedily, or by
    `accept_sampling` with `pick`'s sampling settings and generator; `draft_token_ids` maps sampled nodes' draft
    distributions to the target vocabulary) and keeps only the accepted path in the cache. Returns (scores,
    accepted node indices, the target's next token)."""
    ids, positions, allowed = verify_inputs(pending, proposal.token_ids, proposal.parents, cached=committed,
                                            device=cache_device(model))
    scored = score(model, ids, cache, last_logits_only=False, want_features=want_features, position_ids=positions,
                   allowed=allowed, extra_feature_layers=extra_feature_layers)
    config = pick.config
    if config.greedy:
        accepted, bonus = accept_greedy(scored.logits.argmax(-1).tolist(), proposal.token_ids, proposal.parents)
    else:  # only the rows along the accepted path need a sampling distribution (top-p sorts the vocabulary)
        def row_probs(row: int) -> torch.Tensor:
            return sampling_probs(scored.logits[row], temperature=config.temperature, top_p=config.top_p)

        def node_probs(node: int) -> torch.Tensor | None:
            drawn_from = proposal.draft_probs[node]
            if drawn_from is None:
                return None
            return _in_target_vocabulary(drawn_from, draft_token_ids, scored.logits.shape[-1])

        accepted, bonus = accept_sampling(row_probs, proposal.token_ids, proposal.parents, pick.generator,
                                          node_probs)
    keep_cache_positions(cache, committed + 1, accepted)
    return scored, accepted, bonus


def cache_device(model: PreTrainedModel) -> torch.device:
    return model.get_output_embeddings().weight.device


# Verify sizes tried by an `auto` node budget, and how much dearer than verifying the chain a tree may be: about
# the acceptance a tree adds over the chain (the shipped SmolLM2 head, 16 MT-bench prompts on the 2-core CPU: tau
# 1.92 as a chain of 4, 2.05 with 7 nodes, 2.22 with 10; see the README's "Draft trees").
AUTO_TREE_SIZES = (8, 12, 16, 24, 32, 48, 64)
AUTO_TREE_COST_SLACK = 1.2
_verify_costs: dict[tuple[int, str, str], dict[int, float]] = {}


@torch.inference_mode()
def verify_costs(model: PreTrainedModel, sizes: tuple[int, ...], *, context: int = 128,
                 repeats: int = 5) -> dict[int, float]:
    """Seconds the target needs to score k tokens after `context` cached ones, per k (the best of `repeats`),
    measured once per model, device and dtype. A target with a short window (a learned position table, GPT-2's)
    is timed after at most half its window, and a k that does not fit after that costs infinity: it is never
    picked, and timing it would index past the table."""
    key = (id(model), str(cache_device(model)), str(model.dtype))
    known = _verify_costs.setdefault(key, {})
    window = getattr(model.config, "max_position_embeddings", None) or 1 << 20
    context = max(min(context, window // 2), 1)
    known.update({k: math.inf for k in sizes if context + k > window})
    missing = [k for k in sizes if k not in known]
    if missing:
        device = cache_device(model)
        generator = torch.Generator().manual_seed(0)
        vocab_size = model.config.vocab_size
        prefix = torch.randint(vocab_size, (1, context), generator=generator).to(device)
        cache = new_cache(model.config)
        score(model, prefix, cache, last_logits_only=True, want_features=False)
        inputs = {k: torch.randint(vocab_size, (1, k), generator=generator).to(device) for k in missing}
        timings: dict[int, list[float]] = {k: [] for k in missing}
        # Sizes take turns, so a drift in the machine's speed (another process, clocks) reaches all of them alike;
        # the first pass over the sizes warms their kernels up and is not counted.
        for _ in range(repeats + 1):
            for k in missing:
                _synchronize(device)
                started = time.perf_counter()
                score(model, inputs[k], cache, last_logits_only=False, want_features=True)
                _synchronize(device)
                timings[k].append(time.perf_counter() - started)
                rollback_cache(cache, context)
        known.update({k: min(timings[k][1:]) for k in missing})
    return {k: known[k] for k in sizes}


def auto_tree_nodes(model: PreTrainedModel, draft_length: int) -> int:
    """The node budget `auto` picks: the largest tree whose verify pass costs at most AUTO_TREE_COST_SLACK times
    verifying a chain of `draft_length` (measured on this device: a GPU scores ~60 tokens in about one step, a
    2-core CPU 8-12 tokens in 1.07-1.2 of the 5-token cost), and at least the chain's length."""
    chain = draft_length + 1
    costs = verify_costs(model, (chain, *AUTO_TREE_SIZES))
    limit = AUTO_TREE_COST_SLACK * costs[chain]
    fitting = [k for k in AUTO_TREE_SIZES if math.isfinite(costs[k]) and costs[k] <= limit]
    return max([draft_length] + [k - 1 for k in fitting])


class _LearntTree:
    """A static tree's `auto` budget (`TreeBudget`) and the round costs it weighs: the target's verify costs and the
    drafter's drafting costs, both measured on this device, shifted by what the observed rounds took beyond them
    (the acceptance walk, the cache updates, prompt lookup's extra verified tokens). The paths are reordered by
    measured acceptance when the rounds seen reach 64, 256, 1024, ...; every prefix tree is then timed anew."""

    def __init__(self, budget: TreeBudget, depth: int, verify_sizes: tuple[int, ...]) -> None:
        self.budget = budget
        self.depth = depth
        self.verify_sizes = verify_sizes  # verify costs measured at these sizes, interpolated between
        # Per tree, as its set of paths (the order they were chosen in does not change what is drafted)
        self.draft_costs: dict[frozenset[RankPath], float] = {}  # seconds of a drafting round
        self.seconds: Counter[frozenset[RankPath]] = Counter()  # observed round seconds
        self.rounds: Counter[frozenset[RankPath]] = Counter()
        self.next_reorder = budget.min_rounds
        self._shapes: dict[tuple[RankPath, ...], TreeShape] = {}

    def shape(self, nodes: int) -> TreeShape:
        """The tree of the budget's first `nodes` paths."""
        paths = self.budget.paths[:nodes]
        if paths not in self._shapes:
            self._shapes[paths] = TreeShape(nodes=nodes, depth=self.depth, static=paths)
        return self._shapes[paths]

    def record(self, proposal: Proposal, head_nodes: int, accepted: Sequence[int], *, shape: TreeShape,
               seconds: float) -> None:
        """A verified round drafted with `shape`, which took `seconds`; `accepted` indexes `proposal`, whose first
        `head_nodes` nodes are the drafter's (with their `paths`), the rest prompt lookup's."""
        offered = proposal.paths[:head_nodes]
        self.budget.record(offered, [offered[node] for node in accepted if node < head_nodes],
                           other_tokens=sum(node >= head_nodes for node in accepted))
        self.seconds[frozenset(shape.static)] += seconds
        self.rounds[frozenset(shape.static)] += 1

    def round_seconds(self, model: PreTrainedModel) -> Callable[[int], float]:
        """Modelled seconds of a round per node count `nodes` (the first `nodes` paths): drafting + verifying them,
        plus what the most observed timed tree's rounds took beyond its model (never less than nothing), which is
        worked out once per choice."""
        verify = _interpolated(verify_costs(model, self.verify_sizes))
        timed = [tree for tree in self.rounds if tree in self.draft_costs]
        offset = 0.0
        if timed:
            observed = max(timed, key=self.rounds.__getitem__)
            modelled = self.draft_costs[observed] + verify(len(observed) + 1)
            offset = max(self.seconds[observed] / self.rounds[observed] - modelled, 0.0)
        return lambda nodes: self.draft_costs[frozenset(self.budget.paths[:nodes])] + verify(nodes + 1) + offset


# Learnt budgets live as long as their drafter (a serving replica's learn from all its requests), one per target,
# draft length, sampling settings (acceptance falls as sampling gets hotter) and lookup branch.
_learnt_trees: weakref.WeakKeyDictionary[Any, dict[tuple, _LearntTree]] = weakref.WeakKeyDictionary()


def _learnt_tree(target: Target, drafter: DraftHead, config: DecodeConfig, draft_length: int,
                 static: tuple[RankPath, ...]) -> _LearntTree:
    ceiling = auto_tree_nodes(target.model, draft_length)
    # Sampling at any temperature draws its trees (greedy picks top-k): a separate budget even at 0.01.
    temperature = 0.0 if config.greedy else max(round(config.temperature, 1), 0.1)
    # top_p rounded as the temperature is: a client sending ever new values must not grow a budget for each.
    key = (id(target.model), draft_length, temperature, round(config.top_p, 2), config.lookup_tokens, static, ceiling)
    learnt = _learnt_trees.setdefault(drafter, {})
    if key not in learnt:
        verify_sizes = (2, 4, draft_length + 1, *AUTO_TREE_SIZES)
        verify_costs(target.model, verify_sizes)  # all sizes measured together, taking turns
        learnt[key] = _LearntTree(TreeBudget(static, ceiling), draft_length, verify_sizes)
    return learnt[key]


def _interpolated(costs: dict[int, float]) -> Callable[[int], float]:
    """A cost per size from costs measured at some sizes: linear between them, the nearest end's beyond them
    (sizes that cannot fit the target's window, at infinite cost, are left out: budgets never reach them)."""
    sizes = sorted(size for size, cost in costs.items() if math.isfinite(cost))
    values = [costs[size] for size in sizes]
    return lambda size: float(np.interp(size, sizes, values))


@torch.inference_mode()
def draft_costs(drafter: DraftHead, shapes: dict[int, TreeShape], features: torch.Tensor, tokens: torch.Tensor,
                draw: Callable | None, *, repeats: int = 3) -> dict[int, float]:
    """Seconds one drafting round takes per tree (the best of `repeats`), after the prompt's `features` and
    `tokens` (read once, untimed); each timed round appends the prompt's last position again."""
    sampled = {"draw": draw} if draw is not None else {}
    device = features.device
    state = drafter.new_state()
    first = next(iter(shapes.values()))
    drafter.propose_tree(state, features, tokens, first, first.depth, **sampled)
    timings: dict[int, list[float]] = {nodes: [] for nodes in shapes}
    # Trees take turns, as in `verify_costs`, so a drift in the machine's speed reaches all of them alike.
    for _ in range(repeats):
        for nodes, shape in shapes.items():
            _synchronize(device)
            started = time.perf_counter()
            drafter.propose_tree(state, features[:, -1:], tokens[:, -1:], shape, shape.depth, **sampled)
            _synchronize(device)
            timings[nodes].append(time.perf_counter() - started)
    return {nodes: min(times) for nodes, times in timings.items()}


def _choose_learnt_nodes(learnt: _LearntTree, target: Target, drafter: DraftHead, config: DecodeConfig,
                         features: torch.Tensor, tokens: torch.Tensor) -> int:
    """The learnt budget's node count for the next generation (when due, reordering its paths and timing every
    prefix tree on the prompt's `features` and `tokens`)."""
    budget = learnt.budget
    if not budget.ready:
        return budget.nodes
    if budget.rounds >= learnt.next_reorder:
        budget.reorder()
        learnt.next_reorder = 4 * budget.rounds
        # Its own seeded picker: timing must not consume the generation's random numbers.
        picker = None if config.greedy else _Picker(config, torch.Generator(device=features.device).manual_seed(0))
        shapes = {n: learnt.shape(n) for n in range(1, budget.ceiling + 1)}
        timed = draft_costs(drafter, shapes, features, tokens, picker.draw if picker else None)
        learnt.draft_costs = {frozenset(shapes[n].static): seconds for n, seconds in timed.items()}
    before = budget.paths[:budget.nodes]
    round_seconds = learnt.round_seconds(target.model)
    budget.choose(round_seconds)
    if budget.paths[:budget.nodes] != before:
        # The choice's grounds next to the ceiling's, so a choice that measurements contradict can be traced.
        _log.info("auto tree: %d nodes %s (%d rounds seen; expected tokens per round %.2f in a modelled %.1f ms; "
                  "all %d paths %.2f in %.1f ms)", budget.nodes, budget.paths[:budget.nodes], budget.rounds,
                  budget.expected_tokens(budget.nodes), 1e3 * round_seconds(budget.nodes), budget.ceiling,
                  budget.expected_tokens(budget.ceiling), 1e3 * round_seconds(budget.ceiling))
    return budget.nodes


def tree_capable(model: PreTrainedModel) -> bool:
    """Whether the target can verify a tree in one pass (see `pipeline.caches.tree_incapability`)."""
    return tree_incapability(model) is None


# The static tree's first paths that seeded sampling drafts (see `_tree_shape`): the learnt budget's usual choice on
# a CPU before it learnt from rounds (the verify-cost rule's 11-15).
SEEDED_SAMPLING_TREE_NODES = 12


def _tree_shape(
    target: Target, drafter: DraftHead, config: DecodeConfig, draft_length: int, features: torch.Tensor,
    tokens: torch.Tensor,
) -> tuple[TreeShape | None, _LearntTree | None]:
    """The tree to draft this generation, or None for chains (also when sampling above `tree_max_temperature`),
    and the learnt budget that sized it (an `auto` static tree's). `features` and `tokens` are the prompt's, for
    measuring drafting costs once."""
    if config.tree == "chain" or not hasattr(drafter, "propose_tree"):
        return None, None
    if config.temperature > config.tree_max_temperature:
        _log.info("sampling at temperature %s drafts chains (trees up to decode.tree_max_temperature %s)",
                  config.temperature, config.tree_max_temperature)
        return None, None
    reason = tree_incapability(target.model)
    if reason is not None:
        _log.warning("target %s cannot verify trees (%s); drafting chains", target.name, reason)
        return None, None
    if config.tree == "dynamic":
        nodes = config.tree_nodes or auto_tree_nodes(target.model, draft_length)
        return TreeShape(nodes=nodes, depth=draft_length, top_k=config.tree_top_k), None
    # Parents first, so that the first `tree_nodes` paths (or a learnt budget's prefix) always form a tree.
    static = parents_first(getattr(drafter, "static_tree", None) or DEFAULT_STATIC_TREE)
    # Paths deeper than the draft length are never drafted: left in, they would take the place of drafted ones in
    # the first `tree_nodes` (a trained tree is best first with depths mixed) and inflate the counts.
    static = tuple(p for p in static if len(p) <= draft_length)
    if config.tree_nodes:  # the stats then report the nodes drafted, not more than the tree holds
        static = static[:config.tree_nodes]
        return TreeShape(nodes=len(static), depth=draft_length, static=static), None
    if config.seed is not None and not config.greedy:
        # Which tokens a seeded sample draws depends on the tree drafted; a learnt budget changes the tree with
        # every request a replica serves, so the same seed would not give the same text. A fixed tree does.
        nodes = min(SEEDED_SAMPLING_TREE_NODES, len(static))
        return TreeShape(nodes=nodes, depth=draft_length, static=static[:nodes]), None
    learnt = _learnt_tree(target, drafter, config, draft_length, static)
    nodes = _choose_learnt_nodes(learnt, target, drafter, config, features, tokens)
    return learnt.shape(nodes), learnt


# On a CPU, PyTorch's MKL linear layers (TargetConfig.cpu_linear "torch") run 2 or 3 rows as that many
# matrix-vector products: verifying 2-3 tokens costs more than verifying 4 (SmolLM2 fp32, 2 threads: 1/2/3/4 tokens
# 42/68/80/62 ms; through oneDNN 28/34/34/35). Such verifications are padded to 4 positions whose outputs are ignored
# (attention is causal: they cannot change the real ones) and rolled back, where the measured costs say 4 is cheaper.
CPU_FAST_VERIFY_ROWS = 4


def _pad_for_cpu(model: PreTrainedModel, verify_ids: torch.Tensor, *, room: int) -> torch.Tensor:
    """verify_ids `(k,)` -> `(k,)`, or `(4,)` (the last token repeated) on a CPU when 1 < k < 4, `room` (the
    positions left in the context window) holds 4 and verifying 4 tokens is measured to cost less than k
    (`verify_costs`). A padded row past the window would index past a learned position table (GPT-2)."""
    rows = len(verify_ids)
    if verify_ids.device.type != "cpu" or rows < 2 or rows >= CPU_FAST_VERIFY_ROWS or room < CPU_FAST_VERIFY_ROWS:
        return verify_ids
    costs = verify_costs(model, (rows, CPU_FAST_VERIFY_ROWS))
    if costs[CPU_FAST_VERIFY_ROWS] >= costs[rows]:
        return verify_ids
    return torch.cat([verify_ids, verify_ids[-1:].repeat(CPU_FAST_VERIFY_ROWS - rows)])


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# The attention kernels decoding may use: every one but cuDNN's. cuDNN attention (which PyTorch prefers for bf16 and
# fp16 on Hopper GPUs) builds an execution plan for each new sequence length, and decoding meets a new length at
# every round and draft step. On an H200 in bf16 the passes that carry an attention mask took 5.0 ms per draft step
# (0.4 in fp32) and 54 ms per verification (26 in fp32); see the README's GPU section. fp32 never uses cuDNN, and
# the other kernels need no plan. The setting is process-wide while `generate` runs: one generation at a time.
DECODING_ATTENTION_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


def generate(
    target: Target,
    prompt_ids: torch.Tensor,
    *,
    config: DecodeConfig,
    drafter: DraftHead | None = None,
    on_tokens: TokenCallback | None = None,
    record_logits: bool = False,
) -> GenerationResult:
    """Generates a continuation of prompt_ids `(1, T)`. Without a drafter this is the vanilla baseline.

    `on_tokens`, when given, is called with each round's newly committed tokens (see `TokenCallback`); it never
    changes which tokens are generated, only when generation stops. `record_logits` keeps the logits row that chose
    every emitted token (`GenerationResult.chosen_logits`, for the losslessness audit).
    """
    with sdpa_kernel(list(DECODING_ATTENTION_BACKENDS)):
        return _generate(target, prompt_ids, config=config, drafter=drafter, on_tokens=on_tokens,
                         record_logits=record_logits)


@torch.inference_mode()
def _generate(
    target: Target, prompt_ids: torch.Tensor, *, config: DecodeConfig, drafter: DraftHead | None,
    on_tokens: TokenCallback | None, record_logits: bool,
) -> GenerationResult:
    model, device = target.model, target.device
    prompt_length = prompt_ids.shape[1]
    context = target.context_window
    if prompt_length >= context:
        raise PromptTooLongError(
            f"prompt has {prompt_length} tokens but the target's context window is {context}; shorten the prompt"
        )
    stats = GenerationStats(prompt_tokens=prompt_length)
    stopper = StopChecker(target, config=config, max_total_tokens=context, prompt_tokens=prompt_length)
    generator = None
    if not config.greedy:
        generator = torch.Generator(device=device)
        if config.seed is not None:
            generator.manual_seed(config.seed)
        else:
            generator.seed()  # a non-deterministic seed for this generator alone (torch.seed() would reseed the
            # process's global generator, breaking a caller's own torch.manual_seed)
    pick = _Picker(config, generator)
    want_features = drafter is not None
    # A fused (EAGLE-3 style) head reads intermediate target layers besides the last hidden state.
    extra_layers = tuple(getattr(getattr(drafter, "config", None), "extra_feature_layers", ()))
    draft_length = min(config.draft_length or drafter.config.num_heads, drafter.max_draft_length) if drafter else 0
    vocab_size = model.get_output_embeddings().weight.shape[0]
    # Sampled draft distributions are over the draft vocabulary; these are its target ids (None: all of them).
    draft_token_ids = drafter.vocabulary.draft_token_ids if drafter is not None and not config.greedy else None

    _synchronize(device)
    started = time.perf_counter()
    cache = new_cache(model.config)
    prefill = score(model, prompt_ids.to(device), cache, last_logits_only=True, want_features=want_features,
                    extra_feature_layers=extra_layers)
    stats.target_forward_passes += 1
    pending, _ = pick(prefill.logits[-1])
    output_ids = [pending]
    chosen_rows = [prefill.logits[-1:].detach().clone()] if record_logits else None
    finish_reason = _notify(on_tokens, output_ids, 0, stopper.check(output_ids))
    new_features = prefill.features
    next_tokens = torch.cat([prompt_ids[:, 1:].to(device), torch.tensor([[pending]], device=device)], dim=1)
    draft_state = drafter.new_state() if drafter else None
    tree_shape, learnt_tree = None, None
    if drafter is not None and finish_reason is None:
        tree_shape, learnt_tree = _tree_shape(target, drafter, config, draft_length, new_features, next_tokens)
    stats.tree_nodes = tree_shape.nodes if tree_shape is not None else 0
    lookup = None
    if config.lookup_tokens and tree_shape is not None:
        lookup = PromptLookup(prompt_ids[0].tolist() + output_ids)

    while finish_reason is None:
        committed = cache.get_seq_length()
        draft_started = time.perf_counter()
        proposal = Proposal(token_ids=[], draft_probs=[])
        head_nodes = 0  # the drafter's own nodes; a prompt-lookup branch adds nodes after them
        if drafter is not None:
            room = max(0, min(stopper.remaining(output_ids) - 1, context - committed - 2))  # drafted depth allowed
            budget = min(draft_length, room)
            if tree_shape is not None:
                # Sampling draws a static tree's tokens from the head's distribution (see propose_tree); passed
                # only then, so a drafter without sampled trees fits the protocol for greedy decoding.
                sampled = {} if config.greedy else {"draw": pick.draw}
                round_shape = tree_shape if learnt_tree is None else learnt_tree.shape(learnt_tree.budget.round_nodes())
                proposal = drafter.propose_tree(draft_state, new_features, next_tokens, round_shape, budget, **sampled)
                head_nodes = len(proposal.token_ids)
                if lookup is not None:
                    proposal = graft_chain(proposal, lookup.propose(min(config.lookup_tokens, room)))
            else:
                # The threshold is passed only when set, so a drafter without early stopping fits the protocol.
                early_stop = {"min_chain_prob": config.draft_threshold} if config.draft_threshold else {}
                proposal = drafter.propose(draft_state, new_features, next_tokens, budget, pick, **early_stop)
                head_nodes = len(proposal.token_ids)
            stats.draft_tokens += head_nodes  # what the drafter drafted (a lookup branch costs no draft steps)
        _synchronize(device)
        target_started = time.perf_counter()
        stats.draft_time_s += target_started - draft_started

        if proposal.parents is not None and proposal.token_ids:
            scored, accepted, pending = _verify_tree(model, cache, pending, proposal, committed=committed,
                                                     want_features=want_features, extra_feature_layers=extra_layers,
                                                     pick=pick, draft_token_ids=draft_token_ids)
            rows = [0] + [1 + node for node in accepted]
            if lookup is not None:
                stats.lookup_accepted += sum(node >= head_nodes for node in accepted)
            drafted_depth = max(node_depths(proposal.parents))
            num_evaluated = evaluated_depth(proposal.parents, accepted)
            emitted = [proposal.token_ids[node] for node in accepted] + [pending]
        else:
            draft_tokens = torch.tensor(proposal.token_ids, dtype=torch.long, device=device)
            verify_ids = torch.cat([torch.tensor([pending], device=device), draft_tokens])
            scored = score(model, _pad_for_cpu(model, verify_ids, room=context - committed)[None], cache,
                           last_logits_only=False, want_features=want_features, extra_feature_layers=extra_layers)
            scored.logits = scored.logits[: len(verify_ids)]
            if config.greedy:
                num_accepted, pending = verify_greedy(scored.logits, draft_tokens)
            else:
                target_probs = sampling_probs(scored.logits, temperature=config.temperature, top_p=config.top_p)
                if len(draft_tokens):
                    draft_probs = _in_target_vocabulary(torch.stack(proposal.draft_probs), draft_token_ids,
                                                        vocab_size)
                    num_accepted, pending = verify_sampling(target_probs, draft_tokens, draft_probs, generator)
                else:
                    num_accepted, pending = 0, _sample(target_probs[-1], generator)
            rollback_cache(cache, committed + 1 + num_accepted)
            rows = list(range(num_accepted + 1))
            drafted_depth = len(draft_tokens)
            num_evaluated = None  # a chain's: the accepted tokens and the next drafted one
            emitted = proposal.token_ids[:num_accepted] + [pending]
        stats.target_forward_passes += 1
        _synchronize(device)
        stats.target_time_s += time.perf_counter() - target_started
        stats.record_round(drafted_depth, len(emitted) - 1, num_evaluated=num_evaluated)
        if learnt_tree is not None and proposal.parents is not None and proposal.paths is not None and head_nodes:
            learnt_tree.record(proposal, head_nodes, accepted, shape=round_shape,
                               seconds=time.perf_counter() - draft_started)

        if chosen_rows is not None:  # these rows of the verify pass chose the emitted tokens
            chosen_rows.append(scored.logits[rows].detach().clone())
        committed_before = len(output_ids)
        for token in emitted:
            output_ids.append(token)
            finish_reason = stopper.check(output_ids)
            if finish_reason:
                break
        finish_reason = _notify(on_tokens, output_ids, committed_before, finish_reason)
        if lookup is not None:
            lookup.extend(output_ids[committed_before:])
        if want_features:
            new_features = scored.features[:, rows]
            next_tokens = torch.tensor([emitted], device=device)

    _synchronize(device)
    stats.wall_time_s = time.perf_counter() - started
    stats.new_tokens = len(output_ids)
    chosen_logits = None
    if chosen_rows is not None:
        chosen_logits = torch.cat(chosen_rows)[: len(output_ids)].float().cpu()
    return GenerationResult(
        token_ids=output_ids, text=stopper.final_text(output_ids), finish_reason=finish_reason, stats=stats,
        chosen_logits=chosen_logits,
    )
