"""Tree drafts: shapes, one-pass verification, cache of the accepted path, lossless greedy decoding for both heads."""

from __future__ import annotations

import weakref

import pytest
import torch
from transformers import DynamicCache

from conftest import make_tiny_target
from pipeline import decoding
from pipeline.caches import keep_cache_positions
from pipeline.config import ConfigError, DecodeConfig, HeadConfig, TrainConfig
from pipeline.decoding import auto_tree_nodes, generate, score
from pipeline.heads import Proposal, build_head
from pipeline.metrics import n_alpha
from pipeline.trees import (
    DEFAULT_STATIC_TREE, TreeBudget, TreeShape, accept_greedy, ancestor_mask, best_nodes, build_static_tree,
    check_static_tree, evaluated_depth, node_depths, parents_first, static_tree_parents, verify_inputs,
)
from pipeline.training import KoalaTrainer, TrainBatch, pad_rows, target_features

PROMPTS = ["hello there", "the quick brown fox", "what is two plus two?", "tell me a story", "why is the sky blue?"]


def test_tree_bookkeeping():
    parents = [-1, -1, 0, 0, 2]  # two roots, node 0 has children 2 and 3, node 2 has child 4
    assert node_depths(parents) == [1, 1, 2, 2, 3]
    allowed = ancestor_mask(parents, device=torch.device("cpu"))
    assert allowed[5].tolist() == [True, True, False, True, False, True]  # node 4: pending, 0, 2, itself
    assert allowed[2].tolist() == [True, False, True, False, False, False]  # node 1: pending and itself
    for unordered in (node_depths, lambda parents: ancestor_mask(parents, device=torch.device("cpu"))):
        with pytest.raises(ValueError, match="parents must come before"):  # not a mask missing node 0's row
            unordered([1, -1])
    # choices[0] follows the pending token, choices[i + 1] node i: the second root, its first child, that one's
    # child, then the bonus token after it
    assert accept_greedy([7, 0, 9, 3, 0, 5], tokens=[5, 7, 9, 4, 3], parents=[-1, -1, 1, 1, 2]) == ([1, 2, 4], 5)
    assert accept_greedy([7, 0, 4, 8, 0, 0], tokens=[5, 7, 9, 4, 3], parents=[-1, -1, 1, 1, 2]) == ([1, 3], 0)
    assert accept_greedy([7, 1, 2, 3, 4, 5], tokens=[5, 6, 8, 4, 3], parents=parents) == ([], 7)
    # depths checked: the accepted path's, plus one where its last node has children
    assert evaluated_depth(parents, []) == 1
    assert evaluated_depth(parents, [1]) == 1  # node 1 is a leaf: depth 2 was not attempted
    assert evaluated_depth(parents, [0, 2]) == 3
    assert evaluated_depth(parents, [0, 2, 4]) == 3


def test_static_tree_builder_keeps_a_tree_and_the_likeliest_paths():
    accuracy = [[0.6, 0.2, 0.1], [0.7, 0.1, 0.05], [0.8, 0.1, 0.01]]
    tree = build_static_tree(accuracy, 5)
    assert tree == ((0,), (0, 0), (0, 0, 0), (1,), (1, 0))  # 0.6, 0.42, 0.336, 0.2, 0.14 (then (2,) 0.1)
    check_static_tree(tree)
    ordered, parents = static_tree_parents(tree)
    assert [len(p) for p in ordered] == sorted(len(p) for p in ordered)
    assert all(parent < index for index, parent in enumerate(parents))
    check_static_tree(DEFAULT_STATIC_TREE)
    with pytest.raises(ConfigError, match="no parent"):
        check_static_tree([(0,), (1, 0)])
    assert best_nodes([-0.1, -0.5, -0.2, -0.3], [-1, -1, 0, 0], 3) == [0, 2, 3]
    assert best_nodes([-0.1, -0.5, -0.5, -0.6], [-1, -1, 1, 0], 2) == [0, 1]  # a tied child never precedes its parent


def test_keeping_a_tree_path_equals_running_the_path(tiny_target):
    """After a tree verify pass the cache holds exactly what running the accepted path token by token gives."""
    model = tiny_target.model
    prefix = torch.tensor([[1, 5, 9, 14, 3]], device=model.device)
    tokens, parents = [7, 8, 20, 21, 22], [-1, -1, 1, 2, 1]  # the path 1 -> 2 -> 3 is in a non-first branch
    cache = DynamicCache(config=model.config)
    score(model, prefix, cache, last_logits_only=True, want_features=False)
    ids, positions, allowed = verify_inputs(30, tokens, parents, cached=prefix.shape[1], device=model.device)
    tree = score(model, ids, cache, last_logits_only=False, want_features=False, position_ids=positions,
                 allowed=allowed)
    keep_cache_positions(cache, prefix.shape[1] + 1, [1, 2, 3])

    reference = DynamicCache(config=model.config)
    linear = score(model, torch.tensor([[1, 5, 9, 14, 3, 30, 8, 20, 21]], device=model.device), reference, last_logits_only=False,
                   want_features=False)
    assert cache.get_seq_length() == reference.get_seq_length() == 9
    for ours, theirs in zip(cache.layers, reference.layers):
        torch.testing.assert_close(ours.keys, theirs.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours.values, theirs.values, atol=1e-5, rtol=1e-4)
    # the tree pass's rows for pending and the path equal the linear pass's last four rows
    torch.testing.assert_close(tree.logits[[0, 2, 3, 4]], linear.logits[-4:], atol=1e-4, rtol=1e-4)


class _OracleTree:
    """Knows the target's greedy continuation and puts it in the second branch of a wider tree."""

    config = HeadConfig(num_heads=3)
    max_draft_length = 3

    def __init__(self, continuation: list[int], vocab_size: int):
        self.continuation, self.vocab_size = continuation, vocab_size

    def new_state(self):
        return {"emitted": 0}

    def propose_tree(self, state, features, next_token_ids, shape, max_depth):
        state["emitted"] += next_token_ids.shape[1] if state["emitted"] else 1
        truth = self.continuation[state["emitted"]: state["emitted"] + max_depth]
        wrong = [(t + 1) % self.vocab_size for t in truth]
        if not truth:
            return Proposal(token_ids=[], draft_probs=[])
        tokens, parents = [wrong[0], truth[0]], [-1, -1]  # the right branch is the second child of the root
        for depth in range(1, len(truth)):
            tokens += [wrong[depth], truth[depth]]
            parents += [len(tokens) - 3, len(tokens) - 3]
        return Proposal(token_ids=tokens, draft_probs=[None] * len(tokens), parents=parents)


def test_an_oracle_path_in_a_non_first_branch_is_accepted_whole(tiny_target):
    config = DecodeConfig(max_new_tokens=25, draft_length=3, tree="static", tree_nodes=6)
    prompt_ids = tiny_target.encode_prompt(PROMPTS[0])
    vanilla = generate(tiny_target, prompt_ids, config=config)
    oracle = _OracleTree(vanilla.token_ids, tiny_target.model.config.vocab_size)
    speculative = generate(tiny_target, prompt_ids, config=config, drafter=oracle)
    assert speculative.token_ids == vanilla.token_ids
    stats = speculative.stats
    assert stats.accepted[:3] == stats.evaluated[:3] and stats.accepted[0] > 0  # every depth always accepted
    assert stats.target_forward_passes <= 1 + -(-len(vanilla.token_ids) // 4) + 1


class _LeafTruthTree:
    """Drafts the target's next `truth_depth` tokens as a branch that ends in a leaf (or, with `wrong_child`, in a
    wrong token), next to a wrong branch three deep: the accepted path never has a child past `truth_depth` other
    than the wrong one, so which depths are attempted and accepted is known exactly."""

    config = HeadConfig(num_heads=3)
    max_draft_length = 3

    def __init__(self, continuation: list[int], vocab_size: int, *, truth_depth: int, wrong_child: bool):
        self.continuation, self.vocab_size = continuation, vocab_size
        self.truth_depth, self.wrong_child = truth_depth, wrong_child
        self.trees = 0

    def new_state(self):
        return {"emitted": 0}

    def propose_tree(self, state, features, next_token_ids, shape, max_depth):
        state["emitted"] += next_token_ids.shape[1] if state["emitted"] else 1
        if max_depth < 3:  # only whole trees, so that every counted round has the same shape
            return Proposal(token_ids=[], draft_probs=[])
        self.trees += 1
        truth = self.continuation[state["emitted"]: state["emitted"] + self.truth_depth + 1]
        wrong = [(token + 1) % self.vocab_size for token in truth]
        tokens, parents = list(truth[:self.truth_depth]), [-1] + list(range(self.truth_depth - 1))
        if self.wrong_child:
            tokens, parents = tokens + [wrong[self.truth_depth]], parents + [self.truth_depth - 1]
        start = len(tokens)
        tokens += [wrong[0], 5, 6]  # the wrong branch: three deep, never reached past its rejected first token
        parents += [-1, start, start + 1]
        return Proposal(token_ids=tokens, draft_probs=[None] * len(tokens), parents=parents)


@pytest.mark.parametrize("truth_depth,wrong_child", [(1, False), (1, True), (2, False)])
def test_tree_n_alpha_counts_a_depth_only_where_the_accepted_path_has_a_child(tiny_target, truth_depth, wrong_child):
    """n-α under a tree means what it means for a chain: depth n counts as attempted only in rounds whose accepted
    path reached depth n-1 and has a drafted token at depth n; a deeper node in a rejected branch attempts nothing."""
    config = DecodeConfig(max_new_tokens=30, draft_length=3, tree="static", tree_nodes=6, lookup_tokens=0)
    prompt_ids = tiny_target.encode_prompt(PROMPTS[1])
    vanilla = generate(tiny_target, prompt_ids, config=config)
    drafter = _LeafTruthTree(vanilla.token_ids, tiny_target.model.config.vocab_size, truth_depth=truth_depth,
                             wrong_child=wrong_child)
    speculative = generate(tiny_target, prompt_ids, config=config, drafter=drafter)
    assert speculative.token_ids == vanilla.token_ids
    rounds, stats = drafter.trees, speculative.stats
    attempted_depths = truth_depth + wrong_child
    assert stats.drafted == [rounds] * 3
    assert stats.evaluated == [rounds] * attempted_depths + [0] * (3 - attempted_depths)
    assert stats.accepted == [rounds] * truth_depth + [0] * (3 - truth_depth)
    expected = [1.0] * truth_depth + ([0.0] if wrong_child else []) + [None] * (3 - attempted_depths)
    assert n_alpha([stats]) == expected


# One tree listed parents-first by depth, and the same paths shuffled: children before their parents, depths mixed.
SORTED_TREE = ((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0))
SHUFFLED_TREE = ((0, 0, 0), (1, 0), (0, 1), (0, 0), (1,), (0,))


def test_a_static_tree_in_any_order_is_put_parents_first_keeping_the_listed_order():
    # a path listed before its parent brings the parent forward; otherwise the listed (best-first) order is kept
    assert parents_first(SHUFFLED_TREE) == ((0,), (0, 0), (0, 0, 0), (1,), (1, 0), (0, 1))
    assert parents_first(SORTED_TREE) == SORTED_TREE
    assert parents_first([(0,), [1], (0,)]) == ((0,), (1,))  # duplicates drawn once
    for nodes in range(1, len(SHUFFLED_TREE) + 1):
        check_static_tree(parents_first(SHUFFLED_TREE)[:nodes])  # every prefix is a tree
    with pytest.raises(ConfigError, match="no parent"):
        parents_first([(0, 1)])


@pytest.mark.parametrize("head_type", ["eagle", "medusa"])
@pytest.mark.parametrize("tree_nodes", [2, 4, 6])
def test_a_shuffled_static_tree_decodes_like_the_sorted_one(tiny_target, head_type, tree_nodes):
    """A head whose static tree lists children before parents decodes exactly plain greedy output; the whole tree
    drafts and verifies the same nodes, mask and positions as the sorted listing, and any prefix is a tree."""
    torch.manual_seed(0)
    heads = {}
    for name, tree in (("sorted", SORTED_TREE), ("shuffled", SHUFFLED_TREE)):
        torch.manual_seed(0)
        heads[name] = build_head(HeadConfig(head_type=head_type, num_heads=3, static_tree=tree), tiny_target.model)
    config = DecodeConfig(max_new_tokens=30, draft_length=3, tree="static", tree_nodes=tree_nodes, lookup_tokens=0)
    prompt_ids = tiny_target.encode_prompt(PROMPTS[2])
    vanilla = generate(tiny_target, prompt_ids, config=config)
    shuffled = generate(tiny_target, prompt_ids, config=config, drafter=heads["shuffled"])
    assert shuffled.token_ids == vanilla.token_ids
    if tree_nodes == len(SORTED_TREE):
        ordered = generate(tiny_target, prompt_ids, config=config, drafter=heads["sorted"])
        assert shuffled.stats.to_dict() | {"wall_time_s": 0, "target_time_s": 0, "draft_time_s": 0} == \
            ordered.stats.to_dict() | {"wall_time_s": 0, "target_time_s": 0, "draft_time_s": 0}
        features = torch.randn(1, prompt_ids.shape[1], tiny_target.model.config.hidden_size,
                               device=tiny_target.model.device)
        proposals = [heads[name].propose_tree(heads[name].new_state(), features, prompt_ids.to(features.device),
                                              TreeShape(nodes=6, depth=3, static=tree), 3)
                     for name, tree in (("sorted", SORTED_TREE), ("shuffled", SHUFFLED_TREE))]
        assert proposals[0].token_ids == proposals[1].token_ids and proposals[0].parents == proposals[1].parents
        inputs = [verify_inputs(7, p.token_ids, p.parents, cached=5, device=torch.device("cpu")) for p in proposals]
        for ours, theirs in zip(*inputs):
            assert torch.equal(ours, theirs)


@pytest.mark.parametrize("temperature,seed", [(0.0, None), (0.7, 3)])
def test_tree_nodes_counts_only_paths_within_the_draft_length(tiny_target, monkeypatch, temperature, seed):
    """A trained tree is best first with depths mixed: `tree_nodes` takes the first paths the draft length can
    draft, not the first listed ones, some of which would be too deep and silently left out."""
    torch.manual_seed(0)
    tree = ((0,), (0, 0), (0, 0, 0), (1,), (1, 0), (2,))
    head = build_head(HeadConfig(head_type="eagle", num_heads=3, static_tree=tree), tiny_target.model)
    drafted = []
    verify_tree = decoding._verify_tree

    def recording(model, cache, pending, proposal, **kwargs):
        drafted.append(tuple(proposal.paths))
        return verify_tree(model, cache, pending, proposal, **kwargs)

    monkeypatch.setattr(decoding, "_verify_tree", recording)
    config = DecodeConfig(max_new_tokens=12, draft_length=2, tree="static", tree_nodes=3, lookup_tokens=0,
                          temperature=temperature, seed=seed)
    result = generate(tiny_target, tiny_target.encode_prompt(PROMPTS[0]), config=config, drafter=head)
    assert drafted and drafted[0] == ((0,), (1,), (0, 0))  # parents first, as drafted
    assert result.stats.tree_nodes == 3
    # asking for more nodes than the tree holds within the draft length reports those drafted
    drafted.clear()
    result = generate(tiny_target, tiny_target.encode_prompt(PROMPTS[0]), config=config.replace(tree_nodes=9),
                      drafter=head)
    assert set(drafted[0]) == {(0,), (0, 0), (1,), (1, 0), (2,)} and result.stats.tree_nodes == 5


def _train_briefly(target, head_type, num_layers, steps):
    """A head overfitted a little on the target's own greedy output: many acceptances and many rejections."""
    torch.manual_seed(0)
    head_config = HeadConfig(head_type=head_type, num_layers=num_layers, num_heads=3)
    head = build_head(head_config, target.model).requires_grad_(True)
    trainer = KoalaTrainer(TrainConfig(data_dirs=("x",), head=head_config, head_lr=3e-3), head=head,
                           target_model=target.model)
    rows = []
    for text in PROMPTS:
        prompt_ids = target.encode_prompt(text)
        output = generate(target, prompt_ids, config=DecodeConfig(max_new_tokens=40)).token_ids
        rows.append({"input_ids": prompt_ids[0].tolist() + output,
                     "loss_mask": [0] * prompt_ids.shape[1] + [1] * len(output)})
    input_ids, loss_mask = (t.to(target.device) for t in pad_rows(rows, max_seq_len=128))
    batch = TrainBatch(input_ids, loss_mask, target_features(target.model, input_ids, loss_mask))
    for _ in range(steps):
        trainer.train_step(batch)
    return head.eval().requires_grad_(False)


@pytest.mark.parametrize("head_type,num_layers", [("eagle", 1), ("eagle", 2), ("medusa", 1)])
@pytest.mark.parametrize("tree", ["dynamic", "static"])
@pytest.mark.parametrize("trained", [False, True])
def test_greedy_tree_decoding_equals_vanilla(tiny_target, head_type, num_layers, tree, trained):
    if trained:
        head = _train_briefly(tiny_target, head_type, num_layers, steps=30)
    else:
        torch.manual_seed(num_layers)
        head = build_head(HeadConfig(head_type=head_type, num_layers=num_layers, num_heads=3), tiny_target.model)
        if head_type == "eagle":
            torch.nn.init.normal_(head.fc.weight, std=0.2)
    config = DecodeConfig(max_new_tokens=40, draft_length=3, tree=tree, tree_nodes=10, tree_top_k=3)
    rejected = accepted_full = 0
    for text in PROMPTS:
        prompt_ids = tiny_target.encode_prompt(text)
        vanilla = generate(tiny_target, prompt_ids, config=config)
        speculative = generate(tiny_target, prompt_ids, config=config, drafter=head)
        assert speculative.token_ids == vanilla.token_ids
        assert speculative.finish_reason == vanilla.finish_reason
        stats = speculative.stats
        assert stats.tree_nodes == 10
        rejected += stats.evaluated[0] - stats.accepted[0]
        accepted_full += stats.accepted[2] if len(stats.accepted) > 2 else 0
    assert rejected > 0, "the test must exercise rejected branches"
    if trained:
        assert accepted_full > 0, "a trained head should get whole 3-deep paths accepted"


def test_sampled_static_trees_draw_their_tokens_and_dynamic_ones_keep_top_k(tiny_target):
    """With a drawer, a static EAGLE tree's children are draws without replacement from the head's distribution
    (distinct among siblings, each carrying the distribution it was drawn from), so the tree changes from draw to
    draw; a dynamic tree keeps its top-k tokens (no distributions)."""
    head = build_head(HeadConfig(head_type="eagle", num_heads=3), tiny_target.model)
    torch.nn.init.normal_(head.fc.weight, std=0.2)
    head.eval().requires_grad_(False)  # as decoding holds it
    prompt_ids = tiny_target.encode_prompt(PROMPTS[0])
    with torch.no_grad():
        features = tiny_target.model(prompt_ids, output_hidden_states=True).hidden_states[-1]
    next_tokens = torch.cat([prompt_ids[:, 1:], prompt_ids[:, :1]], dim=1)
    picker = decoding._Picker(DecodeConfig(temperature=1.0), torch.Generator().manual_seed(0))
    static = TreeShape(nodes=6, depth=2, static=((0,), (1,), (2,), (0, 0), (0, 1), (1, 0)))
    trees = []
    for _ in range(20):
        proposal = head.propose_tree(head.new_state(), features, next_tokens, static, 2, draw=picker.draw)
        assert len(proposal.token_ids) == 6 and all(q is not None for q in proposal.draft_probs)
        root_children = [t for t, parent in zip(proposal.token_ids, proposal.parents) if parent == -1]
        assert len(set(root_children)) == 3  # without replacement
        second = proposal.draft_probs[1]
        assert float(second[proposal.token_ids[0]]) == 0.0  # the first draw removed (a full-vocabulary head)
        trees.append(tuple(proposal.token_ids))
    assert len(set(trees)) > 1
    dynamic = TreeShape(nodes=6, depth=2, top_k=3)
    proposal = head.propose_tree(head.new_state(), features, next_tokens, dynamic, 2, draw=picker.draw)
    assert proposal.draft_probs == [None] * len(proposal.token_ids)


def test_sampling_drafts_trees_up_to_tree_max_temperature(tiny_target, caplog, monkeypatch):
    """Sampling hotter than `tree_max_temperature` drafts chains; up to it, trees verified by `accept_sampling`
    (whose distribution tests are in test_decoding.py), reproducibly for a seed."""
    calls, original = [], decoding.accept_sampling

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(decoding, "accept_sampling", counted)
    head = build_head(HeadConfig(head_type="eagle", num_heads=3), tiny_target.model)
    prompt_ids = tiny_target.encode_prompt(PROMPTS[0])
    config = DecodeConfig(max_new_tokens=12, temperature=1.0, seed=0, tree="dynamic", tree_nodes=8,
                          tree_max_temperature=0.5)
    with caplog.at_level("INFO", logger="pipeline.decoding"):
        chains = generate(tiny_target, prompt_ids, config=config, drafter=head)
    assert chains.stats.tree_nodes == 0 and "drafts chains" in caplog.text and not calls
    runs = [generate(tiny_target, prompt_ids, drafter=head, config=config.replace(seed=seed, temperature=0.5))
            for seed in (0, 0, 1)]
    assert all(len(run.token_ids) == 12 and run.stats.tree_nodes == 8 for run in runs)
    assert runs[0].token_ids == runs[1].token_ids
    assert len(calls) >= len(runs)  # each run verified its trees by accept_sampling


def test_auto_node_budget_comes_from_measured_verify_costs(tiny_target, monkeypatch):
    nodes = auto_tree_nodes(tiny_target.model, 4)
    assert nodes >= 4
    # The rule on costs like the 2-core CPU's through packed oneDNN weights (ms): the largest size within
    # AUTO_TREE_COST_SLACK (1.2) of the 5-token chain, minus its root.
    cpu = {5: 29.0, 8: 32.0, 12: 34.5, 16: 38.5, 24: 47.0, 32: 54.0, 48: 75.0, 64: 86.0}
    monkeypatch.setattr(decoding, "verify_costs", lambda model, sizes: {k: cpu[k] for k in sizes})
    assert auto_tree_nodes(tiny_target.model, 4) == 11
    cpu[12] = 35.5  # just over 1.2x: the next size down
    assert auto_tree_nodes(tiny_target.model, 4) == 7
    cpu[8] = 35.0
    assert auto_tree_nodes(tiny_target.model, 4) == 4  # no tree fits: the chain
    with pytest.raises(ConfigError, match="decode.tree"):
        DecodeConfig(tree="bushy")


def test_tree_budget_learns_acceptance_per_path_and_keeps_the_best_prefix():
    static = [(0,), (0, 0), (1,), (0, 0, 0), (2,)]
    budget = TreeBudget(static, 4, min_rounds=4, explore_every=3, prior_rounds=0)
    assert budget.paths == tuple(static[:4]) and budget.ceiling == budget.nodes == 4
    costs = {1: 1.2, 2: 1.4, 3: 1.6, 4: 1.8}
    assert budget.choose(costs.__getitem__) == 4 and budget.round_nodes() == 4  # learning: the ceiling
    for accepted in ([(0,), (0, 0)], [(0,)], [(0,), (0, 0)], [(1,)]):
        budget.record(static[:4], accepted, other_tokens=1)
    # per round: (0,) 3/4, (0, 0) 2/4, (1,) 1/4, (0, 0, 0) never; other branches 1 token
    assert budget.acceptance((0,)) == 0.75 and budget.acceptance((0, 0, 0)) == 0.0
    assert budget.expected_tokens(2) == pytest.approx(1 + 1 + 0.75 + 0.5)
    # tokens per second 2.75/1.2, 3.25/1.4, 3.5/1.6, 3.5/1.8: two nodes
    assert budget.choose(costs.__getitem__) == 2 and budget.nodes == 2
    assert budget.round_nodes() == 2  # round 5 drafts the choice
    budget.record(static[:2], [])
    budget.record(static[:2], [(0,)])
    assert budget.round_nodes() == 4  # every explore_every-th round drafts the ceiling again
    # a path the choice left out keeps its rate when reached, from the rounds that offered it ((1,): 1 of the 1
    # offered round that (0,) missed), times how often rounds reach it now ((0,) misses 2 of 6)
    assert budget.acceptance((0,)) == 4 / 6 and budget.acceptance((1,)) == pytest.approx(1 / 3)
    assert budget.choose(lambda nodes: 1.0) == 3  # equal costs: every node that is ever accepted pays
    # a hand-written tree need not list parents first: paths are taken parents first, then in the given order
    assert TreeBudget([(0,), (1, 0), (1,)], 3).paths == ((0,), (1,), (1, 0))
    assert TreeBudget([(0, 0), (0,), (1,)], 2).paths == ((0,), (0, 0))


def test_tree_budget_reorders_paths_by_measured_acceptance_keeping_every_prefix_a_tree():
    static = [(0,), (0, 0), (0, 0, 0), (1,), (0, 1), (2,)]
    budget = TreeBudget(static, 6, min_rounds=4, prior_rounds=0)
    for accepted in ([(0,), (0, 0)], [(2,)], [(2,)], [(1,)]):
        budget.record(static, accepted)
    budget.reorder()
    # (2,) is accepted most but follows its better sibling (1,); (0, 0) ties (1,) and was listed first; the
    # never-accepted paths keep their order, (0, 1) after (0, 0)
    assert budget.paths == ((0,), (0, 0), (1,), (2,), (0, 0, 0), (0, 1))
    assert budget.ceiling == 6
    for nodes in range(1, 7):
        check_static_tree(budget.paths[:nodes])
    assert budget.expected_tokens(4) == pytest.approx(1 + 0.25 + 0.25 + 0.25 + 0.5)
    # every path offered in every round: the estimates are the plain accepted/offered rates
    assert budget.acceptances() == pytest.approx({path: budget.accepted[path] / 4 for path in static})


def test_tree_budget_estimates_of_paths_left_out_do_not_keep_the_first_prompts_difficulty():
    """Paths left out of the choice are offered only while learning (the first, here hard, prompts) and on
    exploring rounds; their rate when reached carries over to the easier rounds that followed, where the plain
    accepted/offered rate (1/4 for (0, 0, 0)) kept the hard prompts' difficulty."""
    chain = [(0,), (0, 0), (0, 0, 0)]
    budget = TreeBudget(chain, 3, min_rounds=4, explore_every=1000, prior_rounds=0)
    for accepted in (chain, [], [], []):  # hard: one round in four accepts anything
        budget.record(chain, accepted)
    for accepted in ([(0,), (0, 0)], [(0,)]) * 10:  # easy rounds drafting the first two paths only
        budget.record(chain[:2], accepted)
    rates = budget.acceptances()
    assert rates[(0,)] == pytest.approx(21 / 24) and rates[(0, 0)] == pytest.approx(21 / 24 * 11 / 21)
    assert rates[(0, 0, 0)] == pytest.approx(rates[(0, 0)])  # accepted in the 1 offered round that reached it
    assert budget.accepted[(0, 0, 0)] / budget.offered[(0, 0, 0)] == 0.25
    # a better-ranked sibling's acceptance takes its share of the reach: (1,) is reached when (0,) is not
    budget = TreeBudget([(0,), (1,)], 2, min_rounds=1, prior_rounds=0)
    for accepted in ([(0,)], [(1,)], [], [(0,)]):
        budget.record([(0,), (1,)], accepted)
    assert budget.acceptances() == pytest.approx({(0,): 0.5, (1,): 0.25})


def test_tree_budget_rates_when_reached_start_from_their_ranks_pooled_rate():
    """A deep path reached in few rounds is not taken as never accepted: its rate when reached starts from the
    pooled rate of paths ending in its rank, worth `prior_rounds` rounds; a well-sampled path keeps its own."""
    tree = [(0,), (0, 0), (0, 0, 0), (1,)]
    budget = TreeBudget(tree, 4, min_rounds=1, prior_rounds=4)
    for accepted in [[(0,), (0, 0)], [(0,)]] * 50:  # 100 rounds drafting the first two paths
        budget.record(tree[:2], accepted)
    budget.record(tree, [(0,), (0, 0)])  # (0, 0, 0) reached once, not accepted
    budget.record(tree, [(1,)])  # (1,) reached once, accepted
    rank0 = (101 + 51) / (102 + 101 + 1)  # rank-0 paths: accepted over reached
    rates = budget.acceptances()
    assert rates[(0,)] == pytest.approx((101 + 4 * rank0) / (102 + 4))
    assert rates[(0, 0, 0)] == pytest.approx(rates[(0, 0)] * (0 + 4 * rank0) / (1 + 4))
    assert rates[(1,)] == pytest.approx((1 - rates[(0,)]) * (1 + 4 * 1.0) / (1 + 4))
    without = TreeBudget(tree, 4, min_rounds=1, prior_rounds=0)
    without.offered, without.accepted, without.reached = budget.offered, budget.accepted, budget.reached
    assert without.acceptances()[(0, 0, 0)] == 0.0


def test_auto_static_tree_learns_its_node_budget_and_stays_lossless(tiny_target, monkeypatch):
    monkeypatch.setattr(decoding, "_learnt_trees", weakref.WeakKeyDictionary())
    torch.manual_seed(3)
    head = build_head(HeadConfig(head_type="eagle", num_heads=3), tiny_target.model)
    torch.nn.init.normal_(head.fc.weight, std=0.2)
    verified_sizes = []  # the drafter's nodes in every verified round (timing rounds are not verified)
    verify_tree = decoding._verify_tree

    def recording(model, cache, pending, proposal, **kwargs):
        verified_sizes.append(sum(path is not None for path in proposal.paths))
        return verify_tree(model, cache, pending, proposal, **kwargs)

    monkeypatch.setattr(decoding, "_verify_tree", recording)
    config = DecodeConfig(max_new_tokens=40, draft_length=3)  # a static tree of `auto` nodes
    results = []
    for text in PROMPTS * 2:
        prompt_ids = tiny_target.encode_prompt(text)
        verified_sizes.clear()
        results.append(generate(tiny_target, prompt_ids, config=config, drafter=head))
        assert results[-1].token_ids == generate(tiny_target, prompt_ids, config=config).token_ids
    (learnt,) = decoding._learnt_trees[head].values()
    budget = learnt.budget
    # DEFAULT_STATIC_TREE's paths deeper than the draft length (4 deep) are left out
    shallow = [path for path in DEFAULT_STATIC_TREE if len(path) <= 3]
    assert budget.ceiling == min(auto_tree_nodes(tiny_target.model, 3), len(shallow))
    assert all(len(path) <= 3 for path in budget.paths)
    assert results[0].stats.tree_nodes == budget.ceiling and budget.ready
    # every prefix tree was timed (when the budget first chose, or last reordered)
    assert all(frozenset(budget.paths[:nodes]) in learnt.draft_costs for nodes in range(1, budget.ceiling + 1))
    # every accepted drafted token is counted once: for its path, or as prompt lookup's
    assert sum(budget.accepted.values()) + budget.other_tokens == sum(sum(r.stats.accepted) for r in results)
    rounds = sum(r.stats.target_forward_passes - 1 for r in results)
    assert rounds - len(results) <= budget.rounds <= rounds  # a last round with room for no draft is not counted
    # the last generation drafted its choice, and the ceiling every explore_every-th round
    assert results[-1].stats.tree_nodes == budget.nodes
    assert verified_sizes.count(budget.ceiling) >= len(verified_sizes) // budget.explore_every
    assert all(size in (budget.nodes, budget.ceiling) or size < budget.nodes for size in verified_sizes)
    # sampling learns its own budget: acceptance depends on the temperature
    generate(tiny_target, tiny_target.encode_prompt(PROMPTS[0]), drafter=head, config=config.replace(temperature=0.7))
    assert len(decoding._learnt_trees[head]) == 2
    for top_p in (0.9001, 0.9002):  # a client sending ever new top_p values does not grow a budget for each
        generate(tiny_target, tiny_target.encode_prompt(PROMPTS[0]), drafter=head,
                 config=config.replace(temperature=0.7, top_p=top_p, max_new_tokens=4))
    assert len(decoding._learnt_trees[head]) == 3


def test_a_seeded_sample_does_not_depend_on_what_the_budget_learnt(tiny_target, monkeypatch):
    """A replica's learnt budget changes its tree from request to request, and the tree decides which random
    numbers a sample draws: seeded sampling drafts a fixed tree, so the same seed gives the same text."""
    monkeypatch.setattr(decoding, "_learnt_trees", weakref.WeakKeyDictionary())
    torch.manual_seed(3)
    head = build_head(HeadConfig(head_type="eagle", num_heads=3), tiny_target.model)
    torch.nn.init.normal_(head.fc.weight, std=0.2)
    seeded = DecodeConfig(max_new_tokens=30, draft_length=3, temperature=0.7, seed=5)
    prompt_ids = tiny_target.encode_prompt(PROMPTS[0])
    first = generate(tiny_target, prompt_ids, config=seeded, drafter=head)
    for text in PROMPTS * 3:  # unseeded requests teach the budget (64 rounds), which then picks its own tree
        generate(tiny_target, tiny_target.encode_prompt(text), config=seeded.replace(seed=None), drafter=head)
    (learnt,) = decoding._learnt_trees[head].values()
    assert learnt.budget.ready
    again = generate(tiny_target, prompt_ids, config=seeded, drafter=head)
    assert again.token_ids == first.token_ids
    assert again.stats.tree_nodes == first.stats.tree_nodes == min(decoding.SEEDED_SAMPLING_TREE_NODES,
                                                                   sum(len(p) <= 3 for p in DEFAULT_STATIC_TREE))


def test_auto_static_tree_of_a_drafter_without_paths_drafts_its_ceiling(tiny_target, monkeypatch):
    """A protocol drafter need not report rank paths: nothing is learnt, decoding is unchanged."""
    monkeypatch.setattr(decoding, "_learnt_trees", weakref.WeakKeyDictionary())
    torch.manual_seed(3)
    head = build_head(HeadConfig(head_type="eagle", num_heads=3), tiny_target.model)
    propose_tree = head.propose_tree

    def without_paths(*args, **kwargs):
        proposal = propose_tree(*args, **kwargs)
        return Proposal(token_ids=proposal.token_ids, draft_probs=proposal.draft_probs, parents=proposal.parents)

    monkeypatch.setattr(head, "propose_tree", without_paths)
    config = DecodeConfig(max_new_tokens=40, draft_length=3)
    for text in PROMPTS[:3]:
        prompt_ids = tiny_target.encode_prompt(text)
        result = generate(tiny_target, prompt_ids, config=config, drafter=head)
        assert result.token_ids == generate(tiny_target, prompt_ids, config=config).token_ids
    (learnt,) = decoding._learnt_trees[head].values()
    assert learnt.budget.rounds == 0 and result.stats.tree_nodes == learnt.budget.ceiling


def test_tree_shape_on_a_tiny_target_with_eager_attention():
    target = make_tiny_target(seed=4)
    target.model.config._attn_implementation = "eager"
    torch.manual_seed(2)
    head = build_head(HeadConfig(head_type="eagle", num_layers=1, num_heads=3), target.model)
    torch.nn.init.normal_(head.fc.weight, std=0.2)
    config = DecodeConfig(max_new_tokens=30, draft_length=3, tree="dynamic", tree_nodes=6)
    for text in PROMPTS[:3]:
        prompt_ids = target.encode_prompt(text)
        assert (generate(target, prompt_ids, config=config, drafter=head).token_ids
                == generate(target, prompt_ids, config=config).token_ids)


@pytest.mark.parametrize("head_type", ["eagle", "medusa"])
def test_a_greedy_tree_is_drafted_with_two_host_transfers_per_level(tiny_target, monkeypatch, head_type):
    """On a GPU every transfer to the host waits for the device. Drafting took a top-k and two transfers per
    expanded node, and one more per node to map its draft index to a target id: most of a draft step's time on a
    GPU. Now each level (each Medusa tree) is one top-k over its rows, mapped on the device, then two transfers."""
    draft_ids = torch.arange(3, 43)
    head = build_head(HeadConfig(head_type=head_type, num_heads=4, draft_vocab_size=40), tiny_target.model,
                      draft_token_ids=draft_ids)
    torch.nn.init.normal_(head.fc.weight if head_type == "eagle" else head.heads[0][-1].weight, std=0.2)
    transfers: list[str] = []
    counting = [False]
    real_tolist, real_int, real_item = torch.Tensor.tolist, torch.Tensor.__int__, torch.Tensor.item

    def counted(name, real):
        def wrapper(self, *args):
            if counting[0]:
                transfers.append(name)
            return real(self, *args)
        return wrapper

    monkeypatch.setattr(torch.Tensor, "tolist", counted("tolist", real_tolist))
    monkeypatch.setattr(torch.Tensor, "__int__", counted("int", real_int))
    monkeypatch.setattr(torch.Tensor, "item", counted("item", real_item))
    real_propose = head.propose_tree
    rounds = []

    def propose_tree(*args, **kwargs):
        counting[0] = True
        try:
            proposal = real_propose(*args, **kwargs)
        finally:
            counting[0] = False
        if proposal.token_ids:  # (none when the answer's end leaves no room)
            rounds.append((len(transfers), max(map(len, proposal.paths))))
        transfers.clear()
        return proposal

    monkeypatch.setattr(head, "propose_tree", propose_tree)
    prompt = torch.tensor([[1, 5, 9, 14, 3, 22]], device=tiny_target.device)
    config = DecodeConfig(max_new_tokens=30, tree="static", tree_nodes=15, draft_length=4, lookup_tokens=0)
    result = generate(tiny_target, prompt, config=config, drafter=head)
    assert result.token_ids == generate(tiny_target, prompt, config=config).token_ids
    assert len(rounds) > 3 and sum(depth == 4 for _, depth in rounds) > 3
    # One level per depth for EAGLE; Medusa's heads score every depth at once.
    assert all(count == 2 * (depth if head_type == "eagle" else 1) for count, depth in rounds), rounds


def test_tree_budget_keeps_a_better_ranked_sibling_first_across_a_rank_gap_and_checks_its_settings():
    """A tree that skips a rank ((0,) and (2,), no (1,)) still drafts (2,) only after (0,), however often (2,) is
    accepted: the reach of (2,) assumes (0,) was offered beside it."""
    budget = TreeBudget([(0,), (2,)], 2, min_rounds=1, prior_rounds=0)
    for _ in range(3):
        budget.record([(0,), (2,)], [(2,)])
    budget.reorder()
    assert budget.paths == ((0,), (2,))
    with pytest.raises(ValueError, match="prior_rounds"):
        TreeBudget([(0,)], 1, prior_rounds=-1)
    empty = TreeBudget([], 0, min_rounds=1)  # nothing to draft: the choice stays at no node
    empty.record([], [])
    assert empty.choose(lambda nodes: 1.0) == 0
