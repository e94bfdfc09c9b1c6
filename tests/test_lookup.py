"""The prompt-lookup branch: the n-gram index proposes what followed the latest match, grafting shares the tree's
nodes, and decoding with the branch stays exactly vanilla greedy while accepting copied tokens."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ConfigError, DecodeConfig, HeadConfig
from pipeline.decoding import generate
from pipeline.heads import Proposal, build_head
from pipeline.lookup import PromptLookup, graft_chain
from serve.openai_api import speculative_stats


def test_lookup_proposes_what_followed_the_latest_longest_match():
    assert PromptLookup([5, 6, 7, 8, 1, 6, 7, 9, 2, 5, 6, 7]).propose(3) == [8, 1, 6]  # the 3-gram beats "6 7 9"
    assert PromptLookup([6, 7, 9, 2, 6, 7, 3, 5, 6, 7]).propose(3) == [3, 5, 6]  # no 3-gram: the latest "6 7"
    lookup = PromptLookup([5, 6, 7, 8, 1, 6, 7, 9, 2, 4, 5, 6, 7])
    assert lookup.propose(2) == [8, 1]  # the 3-gram "5 6 7" matches at the start
    lookup.extend([8, 1])
    assert lookup.propose(4) == [6, 7, 9, 2]
    assert PromptLookup([1, 2, 3]).propose(4) == []  # the suffix never occurred before
    assert PromptLookup([4, 4, 4]).propose(3) == [4]  # an overlapping match is fine
    assert PromptLookup([1, 2, 1, 2]).propose(0) == []


def test_graft_follows_agreeing_nodes_then_adds_a_chain():
    # Tree: root -> 10 (0) -> 11 (2); root -> 20 (1)
    tree = Proposal(token_ids=[10, 20, 11], draft_probs=[None] * 3, parents=[-1, -1, 0])
    grafted = graft_chain(tree, [10, 11, 12, 13])
    assert grafted.token_ids == [10, 20, 11, 12, 13]
    assert grafted.parents == [-1, -1, 0, 2, 3]
    other = graft_chain(tree, [30, 31])
    assert other.token_ids[3:] == [30, 31] and other.parents[3:] == [-1, 3]
    assert graft_chain(tree, []).parents == tree.parents
    empty = graft_chain(Proposal(token_ids=[], draft_probs=[], parents=[]), [7, 8])
    assert empty.token_ids == [7, 8] and empty.parents == [-1, 0]


def test_bad_lookup_setting_names_the_field():
    with pytest.raises(ConfigError, match="decode.lookup_tokens"):
        DecodeConfig(lookup_tokens=-1)


@pytest.mark.parametrize("tree", ["static", "dynamic"])
def test_decoding_with_a_lookup_branch_is_lossless_and_accepts_copied_tokens(tiny_target, tree):
    """A random head rarely guesses the tiny target; its greedy output repeats itself, which the lookup branch
    copies. Tokens equal vanilla greedy's, and more come per target pass than without the branch."""
    torch.manual_seed(0)
    head = build_head(HeadConfig(head_type="eagle", num_heads=3), tiny_target.model)
    torch.nn.init.normal_(head.fc.weight, std=0.2)
    base = DecodeConfig(max_new_tokens=60, tree=tree, tree_nodes=6, draft_length=3, lookup_tokens=0)
    prompt = torch.tensor([[1, 5, 9, 14, 3, 22, 5, 9, 14]], device=tiny_target.device)
    vanilla = generate(tiny_target, prompt, config=base)
    alone = generate(tiny_target, prompt, config=base, drafter=head)
    with_lookup = generate(tiny_target, prompt, config=base.replace(lookup_tokens=6), drafter=head)
    assert alone.token_ids == vanilla.token_ids == with_lookup.token_ids
    assert with_lookup.stats.lookup_accepted > 0 and alone.stats.lookup_accepted == 0
    assert with_lookup.stats.acceptance_length > alone.stats.acceptance_length
    assert with_lookup.stats.draft_tokens <= alone.stats.draft_tokens  # lookup nodes are not draft steps
    # The API's accepted share is of the drafter's own tokens (it counted the branch's too, overstating it).
    reported = speculative_stats(with_lookup.stats, drafter=True)
    assert reported["lookup_accepted_tokens"] == with_lookup.stats.lookup_accepted
    assert reported["accepted_tokens"] == sum(with_lookup.stats.accepted) - with_lookup.stats.lookup_accepted
    assert 0 <= reported["accepted_tokens"] <= reported["drafted_tokens"]
