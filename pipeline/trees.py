"""Tree drafts: shapes, one-pass verification inputs, greedy acceptance and keeping the accepted path's cache.

A draft tree is a list of tokens with a parent index each (`-1`: the pending token, i.e. the root). A chain is the
degenerate tree `[-1, 0, 1, ...]`. The target scores the pending token and every node in one forward pass: each node
sits at the position of its depth and attends to the cache, the pending token, its ancestors and itself (a 4D
mask through the model's own attention). Greedy acceptance walks from the root along the child whose token equals
the target's argmax, so the emitted tokens are exactly vanilla greedy's; the cache then keeps only that path.

Tree shapes:
- dynamic (EAGLE-2): `TreeShape(top_k, depth, nodes)`: expand the top-k nodes of the frontier by cumulative draft
  log-probability for `depth` steps, then keep the best `nodes` (parents first).
- static: a fixed set of paths of ranks, e.g. (0, 1) = "the 2nd-best token after the best one" (Medusa's trees; also
  usable with EAGLE, as EAGLE-1 drafted). `build_static_tree` picks one for a node budget from measured per-depth
  top-k accuracies (Medusa's sparse-tree construction). `TreeBudget` learns from decoding which of a static
  tree's paths pay for themselves.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from pipeline.config import ConfigError

RankPath = tuple[int, ...]

# A default static tree of 15 nodes for 4 positions: wide near the root, where acceptance is likeliest.
DEFAULT_STATIC_TREE: tuple[RankPath, ...] = (
    (0,), (1,), (2,), (3,),
    (0, 0), (0, 1), (0, 2), (1, 0), (1, 1),
    (0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0),
    (0, 0, 0, 0), (0, 0, 0, 1),
)


@dataclasses.dataclass(frozen=True)
class TreeShape:
    """How a drafter builds its tree: `static` rank paths, or a dynamic tree (`top_k`, `depth`, `nodes`)."""

    nodes: int
    depth: int
    top_k: int = 4
    static: tuple[RankPath, ...] | None = None

    def __post_init__(self) -> None:
        if self.static is not None:
            check_static_tree(self.static)


def check_static_tree(paths: Sequence[RankPath]) -> None:
    """Every path's parent path is in the tree (parents before children is not required)."""
    present = set(map(tuple, paths))
    for path in present:
        if not path or any(rank < 0 for rank in path):
            raise ConfigError(f"decode.tree: {path} is not a path of non-negative ranks")
        if len(path) > 1 and path[:-1] not in present:
            raise ConfigError(f"decode.tree: path {path} has no parent {path[:-1]} in the tree")


def parents_first(paths: Iterable[Sequence[int]]) -> tuple[RankPath, ...]:
    """A static tree's paths as listed, each preceded by its ancestors where they are listed later (repeats
    dropped), so every prefix is a tree: a hand-written tree may list a child before its parent or not sort by
    depth, and decoding drafts the first `tree_nodes` paths. A child listed early brings its parent forward, the
    rest keeps the listed (best-first) order."""
    paths = [tuple(path) for path in paths]
    check_static_tree(paths)
    ordered = dict.fromkeys(path[:depth] for path in paths for depth in range(1, len(path) + 1))
    return tuple(ordered)


def static_tree_parents(paths: Sequence[RankPath]) -> tuple[list[RankPath], list[int]]:
    """Paths sorted parents-first and each one's parent index (-1 for depth 1)."""
    ordered = sorted(map(tuple, paths), key=lambda p: (len(p), p))
    index = {path: i for i, path in enumerate(ordered)}
    return ordered, [index[p[:-1]] if len(p) > 1 else -1 for p in ordered]


def build_static_tree(accuracy: Sequence[Sequence[float]], budget: int) -> tuple[RankPath, ...]:
    """The `budget` rank paths with the highest estimated chance to be accepted (Medusa's sparse tree).

    accuracy[d][r] is the measured probability that the rank-r draft at depth d is the target's token, given
    the path to it was right; a path's value is the product along it, so a child never beats its parent and the
    best `budget` paths always form a tree."""
    depth = len(accuracy)
    chosen: list[RankPath] = []
    frontier = [(-accuracy[0][r], (r,)) for r in range(len(accuracy[0]))]
    heapq.heapify(frontier)
    while frontier and len(chosen) < budget:
        negative, path = heapq.heappop(frontier)
        if -negative <= 0:
            break
        chosen.append(path)
        if len(path) < depth:
            for rank in range(len(accuracy[len(path)])):
                heapq.heappush(frontier, (negative * accuracy[len(path)][rank], path + (rank,)))
    return tuple(chosen)


class TreeBudget:
    """Which of a static tree's paths to draft, learnt from the rounds decoded with it.

    A node costs a draft step's share and a verified token, and pays only when the target accepts it: how often
    depends on the head, the prompts and the temperature, so a size chosen from costs alone misjudges it (the
    shipped SmolLM2 head on the 2-core CPU: its first 15 paths 1.59x, its first 7 1.74x), and so does an order
    measured on training data (on MT-bench that head's 3rd and 4th chained guesses are accepted in 8 % and 3 % of
    rounds, its 2nd-ranked first token in 14 %). A budget drafts its `ceiling` paths until it has seen `min_rounds`
    rounds; `reorder` then orders the paths by their measured acceptance (each after its parent and its
    next-better sibling, so every prefix is a tree), and `choose` keeps the prefix that promises the most tokens
    per second: 1 + its nodes' acceptance rates + the tokens other branches (prompt lookup) add per round, over a
    round's cost. Every `explore_every`-th round still drafts the ceiling, so the estimates of paths left out keep
    up with the prompts.

    A path's acceptance rate is estimated as the chance that the round reaches it (its parent accepted and none of
    its better-ranked siblings: at most one child of a node is accepted) times how often it was accepted when
    reached, over the rounds that offered it. A path left out of the choice is offered only while learning and on
    exploring rounds, so its plain accepted/offered rate keeps the difficulty of the first prompts: on MT-bench, whose
    first prompts are the hardest (writing), that rate put the shipped head's third chained guess at 0.046 where
    drafting every path in every round measured 0.122 (16 prompts, 2 per category). Conditioning on being reached
    takes most of that difficulty out (a hard prompt lowers the parent's rate, which is measured on every round):
    0.125 on the same prompts. The deep paths, reached in a few rounds each, would still mostly count as never
    accepted, so each rate when reached starts from the pooled rate of its rank, worth `prior_rounds` rounds.
    Where every path is offered every round and `prior_rounds` is 0, the estimate is the plain rate.

    Why it matters on a GPU, where the whole 41-path tree costs a round about 6 % more than 8 paths: with the plain
    rates the budget kept 7-8 paths (τ 2.46 on an H200, 16 MT-bench prompts, where the whole tree gave 2.97 and
    1.14x the speed). A CPU replay with the GPU's costs modelled (`benchmarks/tree_budget_replay.py`) reproduced
    it (8-9 paths, τ 2.48) and, with these estimates, kept 38-41 paths once past 261 rounds (τ 2.89)."""

    def __init__(self, static: Sequence[RankPath], ceiling: int, *, min_rounds: int = 64,
                 explore_every: int = 32, prior_rounds: float = 8.0) -> None:
        paths = [tuple(path) for path in static]
        position = {path: i for i, path in enumerate(paths)}
        # Parents first, else in the given order (a hand-written tree need not list parents first), so that every
        # prefix is a tree.
        self.paths = _ordered(paths, lambda path: -position[path], siblings_in_rank_order=False)[:ceiling]
        self.ceiling = len(self.paths)
        self.nodes = self.ceiling
        self.min_rounds = min_rounds
        self.explore_every = explore_every
        if prior_rounds < 0:
            raise ValueError(f"prior_rounds must be >= 0, got {prior_rounds}")
        self.prior_rounds = prior_rounds
        self.rounds = 0
        self.offered: Counter[RankPath] = Counter()
        self.accepted: Counter[RankPath] = Counter()
        self.reached: Counter[RankPath] = Counter()  # rounds that offered the path and reached it
        self.other_tokens = 0  # accepted tokens from nodes outside the static tree (prompt lookup)

    def round_nodes(self) -> int:
        """The node count to draft the next round with: the ceiling while learning and on exploring rounds."""
        if not self.ready or self.rounds % self.explore_every == 0:
            return self.ceiling
        return self.nodes

    def record(self, offered: Iterable[RankPath], accepted: Iterable[RankPath], *, other_tokens: int = 0) -> None:
        """One verified round: the tree's paths it drafted, those accepted, and accepted tokens from elsewhere."""
        offered, accepted = list(offered), set(accepted)
        self.rounds += 1
        self.offered.update(offered)
        self.accepted.update(accepted)
        self.reached.update(path for path in offered if _reached(path, accepted))
        self.other_tokens += other_tokens

    def acceptances(self) -> dict[RankPath, float]:
        """Every path's estimated acceptance rate per round (see the class)."""
        # A path's rate when reached starts from what paths ending in the same rank show (pooled over the tree:
        # the shipped head's rank-0 guesses are accepted about half the time when reached, at every depth), worth
        # `prior_rounds` rounds, so the rarely reached deep paths are not counted as never accepted.
        pooled_accepted: Counter[int] = Counter()
        pooled_reached: Counter[int] = Counter()
        for path in self.paths:
            pooled_accepted[path[-1]] += self.accepted[path]
            pooled_reached[path[-1]] += self.reached[path]
        rates: dict[RankPath, float] = {}
        for path in sorted(self.paths, key=lambda path: (len(path), path)):  # parents and better siblings first
            parent, rank = path[:-1], path[-1]
            reach = (rates.get(parent, 0.0) if parent else 1.0) - sum(
                rates.get(parent + (better,), 0.0) for better in range(rank))
            prior = pooled_accepted[rank] / pooled_reached[rank] if pooled_reached[rank] else 0.0
            weight = self.reached[path] + self.prior_rounds
            # At most 1 even for a caller that records an accepted path its round did not reach.
            when_reached = min((self.accepted[path] + self.prior_rounds * prior) / weight, 1.0) if weight else 0.0
            rates[path] = max(reach, 0.0) * when_reached
        return rates

    def acceptance(self, path: RankPath) -> float:
        """One path's estimate (`acceptances` computes them all at once)."""
        return self.acceptances().get(tuple(path), 0.0)

    def expected_by_size(self) -> list[float]:
        """Tokens a round emits on average with the first n paths, at index n = 0..ceiling (the target's own token
        included). Prompt lookup's share is averaged over all rounds: a lookup token that a larger tree also drafted
        counts for that tree's path there, so larger trees are, if anything, slightly favoured."""
        rates = self.acceptances()
        lookup = 1.0 + self.other_tokens / max(self.rounds, 1)
        return list(itertools.accumulate((rates[path] for path in self.paths), initial=lookup))

    def expected_tokens(self, nodes: int) -> float:
        """`expected_by_size` for the first `nodes` paths (all of them past the ceiling)."""
        return self.expected_by_size()[min(nodes, len(self.paths))]

    @property
    def ready(self) -> bool:
        return self.rounds >= self.min_rounds

    def reorder(self) -> None:
        """Orders the paths by measured acceptance (ties: the current order), each after its parent and its nearest
        better-ranked sibling in the tree: drawn children are verified in draw order."""
        position = {path: i for i, path in enumerate(self.paths)}
        rates = self.acceptances()
        self.paths = _ordered(self.paths, lambda path: (rates[path], -position[path]))

    def choose(self, round_seconds: Callable[[int], float]) -> int:
        """Sets `nodes` to the prefix size with the most expected tokens per second of `round_seconds(nodes)` (the
        smallest of equals) once `ready`, and returns it."""
        if self.ready and self.ceiling:
            expected = self.expected_by_size()
            self.nodes = max(range(1, self.ceiling + 1), key=lambda n: expected[n] / round_seconds(n))
        return self.nodes


def _reached(path: RankPath, accepted: set[RankPath]) -> bool:
    """Whether a round whose accepted paths are `accepted` reached `path`: its parent accepted (the root always is)
    and none of its better-ranked siblings."""
    parent = path[:-1]
    return (not parent or parent in accepted) and all(parent + (better,) not in accepted for better in range(path[-1]))


def _ordered(paths: Sequence[RankPath], key: Callable[[RankPath], Any], *,
             siblings_in_rank_order: bool = True) -> tuple[RankPath, ...]:
    """`paths` (a tree) ordered by descending `key`, each after its parent and, with `siblings_in_rank_order`, after
    its nearest better-ranked sibling in the tree; paths whose parent is missing are dropped."""
    present = set(paths)
    ordered: list[RankPath] = []
    taken: set[RankPath] = set()

    def elders_taken(path: RankPath) -> bool:
        # The nearest better-ranked sibling the tree has (a tree may skip a rank): a prefix must not draft a rank
        # without the better ones, which the acceptance estimates assume were offered alongside it.
        better = next((path[:-1] + (rank,) for rank in range(path[-1] - 1, -1, -1) if path[:-1] + (rank,) in present),
                      None)
        sibling_first = siblings_in_rank_order and better is not None
        return (len(path) == 1 or path[:-1] in taken) and not (sibling_first and better not in taken)

    while eligible := [path for path in paths if path not in taken and elders_taken(path)]:
        ordered.append(max(eligible, key=key))
        taken.add(ordered[-1])
    return tuple(ordered)


def node_depths(parents: Sequence[int]) -> list[int]:
    """Depth of every node (children of the root have depth 1); parents must come before children."""
    depths: list[int] = []
    for index, parent in enumerate(parents):
        if parent >= index:
            raise ValueError(f"node {index} has parent {parent}: parents must come before their children")
        depths.append(1 if parent < 0 else depths[parent] + 1)
    return depths


def ancestor_mask(parents: Sequence[int], *, device: torch.device) -> torch.Tensor:
    """`(n+1, n+1)` bool: row/column 0 is the pending token, row i+1 node i; True where the row may attend."""
    node_depths(parents)  # a row copies its parent's, so parents must come first (else a ValueError, not a bad mask)
    size = len(parents) + 1
    allowed = torch.zeros(size, size, dtype=torch.bool)
    allowed[:, 0] = True
    for index, parent in enumerate(parents):
        row = index + 1
        allowed[row, row] = True
        if parent >= 0:
            allowed[row] |= allowed[parent + 1]
    allowed[0, 0] = True
    return allowed.to(device)


def verify_inputs(
    pending: int, tokens: Sequence[int], parents: Sequence[int], *, cached: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The target's one-pass inputs for [pending, nodes...]: ids `(1, n+1)`, position ids `(1, n+1)` (the cache length
    plus depth) and the boolean attention pattern `(1, 1, n+1, cached+n+1)`."""
    depths = [0] + node_depths(parents)
    ids = torch.tensor([[pending, *tokens]], device=device)
    positions = (cached + torch.tensor(depths, device=device))[None]
    within = ancestor_mask(parents, device=device)
    allowed = torch.cat([torch.ones(len(depths), cached, dtype=torch.bool, device=device), within], dim=1)
    return ids, positions, allowed[None, None]


def children_of(parents: Sequence[int]) -> dict[int, list[int]]:
    """Node index -> its children's indices in order (-1: the pending token's children)."""
    children: dict[int, list[int]] = {}
    for index, parent in enumerate(parents):
        children.setdefault(parent, []).append(index)
    return children


def evaluated_depth(parents: Sequence[int], accepted: Sequence[int]) -> int:
    """How many depths a verification checked: those of the `accepted` path (node indices, root first), plus the
    next one where the path's last node (or the root) has children. A deeper node in a rejected branch was never
    checked, so it is no attempt at its depth: n-alpha then means what it means for a chain."""
    last = accepted[-1] if accepted else -1
    return len(accepted) + (last in parents)


def accept_greedy(choices: Sequence[int], tokens: Sequence[int], parents: Sequence[int]) -> tuple[list[int], int]:
    """choices[0] is the target's token after pending, choices[i+1] after node i. Returns (accepted node indices
    along the longest path whose tokens equal the target's choices, the target's token after the path)."""
    children = children_of(parents)
    path: list[int] = []
    current = -1
    while True:
        wanted = choices[current + 1]
        follow = next((c for c in children.get(current, ()) if tokens[c] == wanted), None)
        if follow is None:
            return path, wanted
        path.append(follow)
        current = follow


def best_nodes(scores: Sequence[float], parents: Sequence[int], budget: int) -> list[int]:
    """The `budget` highest-scoring nodes whose parents are kept too (scores never grow along a path, so this only
    matters for ties), returned parents-first (by depth, then score)."""
    depths = node_depths(parents)
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], depths[i]))
    kept: set[int] = set()
    for node in order:
        if len(kept) == budget:
            break
        if parents[node] < 0 or parents[node] in kept:
            kept.add(node)
    return sorted(kept, key=lambda i: (depths[i], -scores[i]))
