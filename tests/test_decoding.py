"""The decoder is lossless: greedy speculative output equals vanilla greedy, sampling keeps the target's distribution."""

from __future__ import annotations

import pytest
import torch

from conftest import TEST_DEVICE, make_tiny_target
from pipeline import decoding
from pipeline.config import ConfigError, DecodeConfig, HeadConfig
from pipeline.decoding import (
    GenerationStats,
    PromptTooLongError,
    accept_sampling,
    generate,
    sampling_probs,
    verify_greedy,
    verify_sampling,
)
from pipeline.heads import Proposal, build_head
from pipeline.metrics import acceptance_length, by_group, n_alpha

PROMPTS = ["hello world", "The quick brown fox jumps"]


def _prompt_ids(target, text):
    return target.encode_prompt(text)


def _greedy(max_new_tokens=40, **kwargs):
    """Greedy chain drafting (this file tests chains; tests/test_trees.py tests trees)."""
    return DecodeConfig(max_new_tokens=max_new_tokens, tree="chain", **kwargs)


class OracleDrafter:
    """Drafts exactly the target's greedy continuation, so every draft token must be accepted."""

    def __init__(self, target, prompt_ids):
        self.model = target.model
        self.first_token = prompt_ids[0, :1]
        self.config = HeadConfig(head_type="eagle", num_heads=3)
        self.vocabulary = None

    max_draft_length = 3

    def new_state(self):
        return {"tokens": self.first_token.clone()}

    def propose(self, state, features, next_token_ids, num_tokens, pick, *, min_chain_prob=0.0):
        state["tokens"] = torch.cat([state["tokens"], next_token_ids[0]])
        sequence, proposal = state["tokens"], Proposal(token_ids=[], draft_probs=[])
        for _ in range(num_tokens):
            token = int(self.model(sequence[None]).logits[0, -1].argmax())
            proposal.token_ids.append(token)
            proposal.draft_probs.append(None)
            sequence = torch.cat([sequence, torch.tensor([token], device=sequence.device)])
        return proposal


def test_vanilla_equals_hf_generate_greedy(tiny_target):
    for text in PROMPTS:
        prompt_ids = _prompt_ids(tiny_target, text)
        ours = generate(tiny_target, prompt_ids, config=_greedy())
        reference = tiny_target.model.generate(
            prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=40, do_sample=False,
            eos_token_id=2, pad_token_id=2,
        )[0, prompt_ids.shape[1]:].tolist()
        assert ours.token_ids == reference
        assert ours.stats.target_forward_passes == len(reference)
        assert ours.stats.acceptance_length == 1.0


@pytest.mark.parametrize("head_type", ["medusa", "eagle"])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_greedy_speculative_equals_vanilla(tiny_target, head_type, num_layers):
    torch.manual_seed(num_layers)
    head = build_head(HeadConfig(head_type=head_type, num_layers=num_layers, num_heads=3), tiny_target.model)
    if head_type == "eagle":
        # Random EAGLE layers with the default init: perturb fc too so drafts are neither constant nor perfect.
        torch.nn.init.normal_(head.fc.weight, std=0.2)
    all_stats = []
    for text in PROMPTS:
        prompt_ids = _prompt_ids(tiny_target, text)
        vanilla = generate(tiny_target, prompt_ids, config=_greedy())
        speculative = generate(tiny_target, prompt_ids, config=_greedy(), drafter=head)
        assert speculative.token_ids == vanilla.token_ids
        assert speculative.text == vanilla.text
        assert speculative.finish_reason == vanilla.finish_reason
        stats = speculative.stats
        assert stats.new_tokens == len(vanilla.token_ids)
        assert stats.draft_tokens == sum(stats.drafted) > 0
        all_stats.append(stats)
    rejected = sum(s.evaluated[0] - s.accepted[0] for s in all_stats)
    assert rejected > 0, "random heads should be rejected sometimes; the test would not exercise rollback"


@pytest.mark.parametrize("tree", ["chain", "dynamic"])
def test_fused_eagle_head_is_lossless(tiny_target, tree):
    """A head that fuses intermediate target layers (EAGLE-3 style) gets them in every verification, chain or tree."""
    torch.manual_seed(5)
    head = build_head(HeadConfig(head_type="eagle", num_heads=3, extra_feature_layers=(0, 1)), tiny_target.model)
    torch.nn.init.normal_(head.fc.weight, std=0.2)
    torch.nn.init.normal_(head.fuse.weight, std=0.2)
    accepted = 0
    for text in PROMPTS:
        prompt_ids = _prompt_ids(tiny_target, text)
        vanilla = generate(tiny_target, prompt_ids, config=_greedy())
        speculative = generate(tiny_target, prompt_ids, config=_greedy().replace(tree=tree), drafter=head)
        assert speculative.token_ids == vanilla.token_ids
        accepted += sum(speculative.stats.accepted)
    assert accepted > 0


def test_oracle_drafter_is_always_accepted(tiny_target):
    prompt_ids = _prompt_ids(tiny_target, PROMPTS[0])
    oracle = OracleDrafter(tiny_target, prompt_ids)
    config = DecodeConfig(max_new_tokens=33, draft_length=3, tree="chain")
    vanilla = generate(tiny_target, prompt_ids, config=config)
    speculative = generate(tiny_target, prompt_ids, config=config, drafter=oracle)
    assert speculative.token_ids == vanilla.token_ids
    stats = speculative.stats
    if vanilla.finish_reason == "length":
        # 1 token from the prefill, then 8 rounds of 3 accepted + 1 bonus = 33 tokens in 9 forward passes.
        assert stats.target_forward_passes == 9
        assert stats.acceptance_length == pytest.approx(33 / 9)
    assert stats.accepted == stats.evaluated
    assert n_alpha([stats]) == [1.0, 1.0, 1.0]


def test_stats_record_round_counts_conditional_acceptance():
    stats = GenerationStats()
    stats.record_round(3, 0)  # first draft rejected: only position 0 evaluated
    stats.record_round(3, 1)  # position 0 accepted, position 1 rejected
    stats.record_round(3, 3)  # all accepted
    assert stats.drafted == [3, 3, 3]
    assert stats.evaluated == [3, 2, 1]
    assert stats.accepted == [2, 1, 1]
    assert n_alpha([stats]) == [2 / 3, 1 / 2, 1.0]


def test_verify_greedy_accepts_longest_matching_prefix():
    logits = torch.full((4, 6), -1.0)
    for position, token in enumerate([3, 1, 5, 2]):
        logits[position, token] = 1.0
    assert verify_greedy(logits, torch.tensor([3, 1, 4])) == (2, 5)
    assert verify_greedy(logits, torch.tensor([3, 1, 5])) == (3, 2)
    assert verify_greedy(logits, torch.tensor([0, 1, 5])) == (0, 3)
    assert verify_greedy(logits[:1], torch.tensor([], dtype=torch.long)) == (0, 3)


def test_verify_sampling_single_position_matches_target_exactly():
    """With one draft token d ~ q, the emitted token is distributed as p (the residual makes up for q)."""
    generator = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    q = torch.tensor([0.1, 0.1, 0.2, 0.3, 0.3])
    draws = 20000
    counts = torch.zeros(5)
    for _ in range(draws):
        draft = torch.multinomial(q, 1, generator=generator)
        accepted, bonus = verify_sampling(torch.stack([p, p]), draft, q[None], generator)
        counts[int(draft) if accepted else bonus] += 1
    empirical = counts / draws
    torch.testing.assert_close(empirical, p, atol=0.015, rtol=0)
    assert counts[4] == 0, "a token with target probability 0 must never be emitted"


def test_a_tiny_temperature_samples_the_argmax_not_nan():
    logits = torch.tensor([[3.0, 9.5, -2.0, 9.0], [40.0, -1e4, 39.0, float("-inf")]])
    for top_p in (1.0, 0.9):
        probs = sampling_probs(logits, temperature=1e-38, top_p=top_p)
        assert torch.equal(probs, torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(sampling_probs(logits, temperature=0.7, top_p=1.0),
                               torch.softmax(logits / 0.7, dim=-1))


def test_verify_sampling_never_accepts_a_token_the_target_cannot_sample(monkeypatch):
    """torch.rand can return exactly 0: a draft token of target probability 0 (outside its top_p nucleus) must
    still be rejected, and a residual that rounding left empty falls back to the target's row, never NaN."""
    generator = torch.Generator().manual_seed(0)
    p = torch.tensor([0.6, 0.4, 0.0])
    q = torch.tensor([0.2, 0.2, 0.6])
    def constant(value):  # torch.rand(size, generator=...) always returning `value`
        return lambda size, **kwargs: torch.full(size if isinstance(size, tuple) else (size,), value)

    monkeypatch.setattr(torch, "rand", constant(0.0))
    accepted, replacement = verify_sampling(torch.stack([p, p]), torch.tensor([2]), q[None], generator)
    assert accepted == 0 and replacement in (0, 1)
    # p sums to just under 1 and is below q everywhere: max(0, p - q) is all zero. A uniform near 1 rejects.
    monkeypatch.setattr(torch, "rand", constant(0.9999999))
    p = torch.tensor([0.0, 0.3, 0.7 - 1e-6])
    q = torch.tensor([0.0, 0.3, 0.7])
    for _ in range(20):
        accepted, replacement = verify_sampling(torch.stack([p, p]), torch.tensor([2]), q[None], generator)
        assert accepted == 0 and replacement in (1, 2)


def test_unseeded_sampling_leaves_the_global_generator_alone(tiny_target):
    prompt_ids = _prompt_ids(tiny_target, PROMPTS[0])
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    generate(tiny_target, prompt_ids, config=DecodeConfig(max_new_tokens=4, temperature=1.0))
    torch.testing.assert_close(torch.rand(4), expected)


def test_hf_baseline_samples_the_distribution_our_decoders_sample(tiny_target, monkeypatch):
    """transformers adds a top-50 cut unless told not to; our decoders cut by top_p alone."""
    from pipeline.bench import _hf_generate

    seen = {}
    original = tiny_target.model.generate
    monkeypatch.setattr(tiny_target.model, "generate", lambda **kwargs: seen.update(kwargs) or original(**kwargs))
    _hf_generate(tiny_target, _prompt_ids(tiny_target, PROMPTS[0]), DecodeConfig(max_new_tokens=3, temperature=0.8,
                                                                                  top_p=0.9))
    assert (seen["temperature"], seen["top_p"], seen["top_k"]) == (0.8, 0.9, 0)


def test_accept_sampling_emits_the_target_distribution_through_a_tree():
    """A root with children [0, 2] (node 0 has child [1]): the first emitted token is distributed as p0 whichever
    child takes it, the second (after token 0) as p1, and a token of probability 0 is never emitted."""
    generator = torch.Generator().manual_seed(0)
    p0 = torch.tensor([0.4, 0.1, 0.3, 0.2, 0.0])
    p1 = torch.tensor([0.1, 0.6, 0.1, 0.2, 0.0])
    rows = {0: p0, 1: p1, 2: torch.full((5,), 0.2), 3: torch.full((5,), 0.2)}
    tokens, parents = [0, 2, 1], [-1, -1, 0]
    draws = 20000
    first, second_after_0 = torch.zeros(5), torch.zeros(5)
    for _ in range(draws):
        path, bonus = accept_sampling(rows.__getitem__, tokens, parents, generator)
        emitted = [tokens[node] for node in path] + [bonus]
        first[emitted[0]] += 1
        if emitted[0] == 0:
            second_after_0[emitted[1]] += 1
        assert path in ([], [0], [1], [0, 2]), path
    torch.testing.assert_close(first / draws, p0, atol=0.015, rtol=0)
    torch.testing.assert_close(second_after_0 / second_after_0.sum(), p1, atol=0.02, rtol=0)
    assert first[4] == 0 and second_after_0[4] == 0


def test_sample_draws_the_given_distribution_and_never_a_token_without_mass():
    generator = torch.Generator().manual_seed(0)
    weights = torch.tensor([0.0, 2.0, 0.0, 1.0, 0.5, 0.5, 0.0])  # unnormalised, zeros first, inside and last
    trials = 40000
    counts = torch.bincount(torch.tensor([decoding._sample(weights, generator) for _ in range(trials)]), minlength=7)
    torch.testing.assert_close(counts.float() / trials, weights / weights.sum(), atol=0.01, rtol=0)
    assert counts[[0, 2, 6]].sum() == 0
    assert decoding._sample(torch.tensor([0.0, 0.0, 1e-30]), generator) == 2


def test_accept_sampling_with_sampled_children_emits_the_target_distribution():
    """The root's first two children are drawn from q without replacement (each verified against the distribution
    it was drawn from), the third is a deterministic (prompt-lookup) draft; node 0 has one sampled child. The first
    emitted token is distributed as p0, the second after token-of-node-0 as p1, whatever q is."""
    generator = torch.Generator().manual_seed(0)
    draws = torch.Generator().manual_seed(1)
    p0 = torch.tensor([0.4, 0.1, 0.3, 0.2, 0.0])
    p1 = torch.tensor([0.1, 0.6, 0.1, 0.2, 0.0])
    q0 = torch.tensor([0.1, 0.5, 0.1, 0.1, 0.2])  # unlike p0, with mass on a token p0 never emits
    q1 = torch.tensor([0.3, 0.3, 0.2, 0.1, 0.1])
    uniform = torch.full((5,), 0.2)
    trials = 20000
    first, second = torch.zeros(5), torch.zeros(5)
    kinds = set()
    for _ in range(trials):
        a = int(torch.multinomial(q0, 1, generator=draws))
        q0_without_a = q0.clone()
        q0_without_a[a] = 0
        q0_without_a /= q0_without_a.sum()
        b = int(torch.multinomial(q0_without_a, 1, generator=draws))
        c = int(torch.multinomial(q1, 1, generator=draws))
        tokens, parents = [a, b, 3, c], [-1, -1, -1, 0]
        drawn_from = [q0, q0_without_a, None, q1]
        rows = {0: p0, 1: p1, 2: uniform, 3: uniform, 4: uniform}
        path, bonus = accept_sampling(rows.__getitem__, tokens, parents, generator, drawn_from.__getitem__)
        emitted = [tokens[node] for node in path] + [bonus]
        first[emitted[0]] += 1
        if path[:1] == [0]:
            second[emitted[1]] += 1
        kinds.add(tuple(path[:1]))
    torch.testing.assert_close(first / trials, p0, atol=0.015, rtol=0)
    torch.testing.assert_close(second / second.sum(), p1, atol=0.02, rtol=0)
    assert first[4] == 0 and second[4] == 0, "a token of target probability 0 was emitted"
    assert kinds == {(), (0,), (1,), (2,)}, "every child (and none) must be taken sometimes"
    # A draw from the target's own distribution is always accepted (min(1, p/q) = 1; as a point mass it would be
    # accepted with probability p(c) only): what sampled trees gain over top-k ones.
    for _ in range(200):
        drawn = int(torch.multinomial(p0, 1, generator=draws))
        assert accept_sampling(rows.__getitem__, [drawn], [-1], generator, [p0].__getitem__)[0] == [0]


def test_accept_sampling_takes_a_certain_child_and_never_a_rejected_one():
    generator = torch.Generator().manual_seed(1)
    certain = torch.tensor([0.0, 1.0, 0.0])
    assert accept_sampling(lambda row: certain, [1], [-1], generator)[0] == [0]
    never = torch.tensor([0.0, 0.5, 0.5])
    for _ in range(200):  # token 0 has no mass: rejected, and the bonus is drawn from the rest
        path, bonus = accept_sampling(lambda row: never, [0], [-1], generator)
        assert path == [] and bonus in (1, 2)


def test_sampling_probs_matches_reference_top_p():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0])
    probs = torch.softmax(logits / 0.7, dim=-1)
    # Reference: keep the most likely tokens until their mass reaches 0.8.
    keep = torch.zeros(4, dtype=torch.bool)
    mass = 0.0
    for index in probs.argsort(descending=True).tolist():
        keep[index] = True
        mass += float(probs[index])
        if mass >= 0.8:
            break
    expected = torch.where(keep, probs, torch.zeros_like(probs))
    torch.testing.assert_close(sampling_probs(logits, temperature=0.7, top_p=0.8), expected / expected.sum())
    torch.testing.assert_close(sampling_probs(logits, temperature=1.0, top_p=1.0), torch.softmax(logits, -1))


def _exact_marginals(target, prompt, vocab, last=3):
    """Exact target distributions of generated tokens 2..last, by enumerating every prefix of last - 1 tokens."""
    model = target.model
    with torch.no_grad():
        p1 = torch.softmax(model(prompt[None]).logits[0, -1].double(), -1)  # (V,)
        prefixes = torch.cartesian_prod(*[torch.arange(vocab, device=prompt.device)] * (last - 1))  # (V^(n-1), n-1)
        sequences = torch.cat([prompt.expand(len(prefixes), -1), prefixes], dim=1)
        logits = model(sequences).logits.double()
    conditionals = torch.softmax(logits[:, -(last - 1):], -1)  # [:, j]: token j+2 given tokens 1..j+1
    joint = p1[prefixes[:, 0]]  # probability of each prefix's first j+1 tokens, grown step by step
    marginals = []
    for step in range(last - 1):
        next_given = conditionals[:, step]  # (prefixes, V)
        # A prefix's row stands for all its extensions; count each (t1..t_{step+1}) once via the first extension.
        first = (prefixes[:, step + 1:] == 0).all(dim=1)
        marginals.append((joint[first, None] * next_given[first]).sum(0))
        if step + 1 < last - 1:
            joint = joint * next_given.gather(1, prefixes[:, step + 1 : step + 2])[:, 0]
    return marginals


def _chi_square(counts, expected_probs):
    expected = expected_probs * counts.sum()
    mask = expected > 0
    assert counts[~mask].sum() == 0, "sampled a token the target gives probability 0"
    return float(((counts[mask] - expected[mask]) ** 2 / expected[mask]).sum())


@pytest.mark.parametrize("head_type", ["medusa", "eagle"])
def test_draft_threshold_shortens_chains_and_stays_lossless(tiny_target, head_type):
    torch.manual_seed(4)
    head = build_head(HeadConfig(head_type=head_type, num_layers=1, num_heads=5), tiny_target.model)
    if head_type == "eagle":
        torch.nn.init.normal_(head.fc.weight, std=0.2)
    drafted = {}
    for threshold in (0.0, 0.5):
        config = DecodeConfig(max_new_tokens=40, draft_length=5, draft_threshold=threshold, tree="chain")
        total = 0
        for text in PROMPTS:
            prompt_ids = _prompt_ids(tiny_target, text)
            vanilla = generate(tiny_target, prompt_ids, config=config)
            speculative = generate(tiny_target, prompt_ids, config=config, drafter=head)
            assert speculative.token_ids == vanilla.token_ids
            total += speculative.stats.draft_tokens
        drafted[threshold] = total
    assert 0 < drafted[0.5] < drafted[0.0], drafted


@pytest.mark.parametrize("head_type,draft_threshold,tree", [
    ("eagle", 0.0, "chain"), ("medusa", 0.0, "chain"), ("eagle", 0.3, "chain"),
    ("eagle", 0.0, "static"), ("eagle-v6", 0.0, "static"), ("eagle", 0.0, "dynamic"), ("medusa", 0.0, "static"),
])
def test_speculative_sampling_keeps_target_distribution(head_type, draft_threshold, tree):
    """Marginals of generated tokens 2 and 3 (both produced by draft-and-verify rounds) match the exact target
    marginals: chi-square with 7 degrees of freedom below 24.3 (p = 0.001), fixed seeds, 3000 generations. Trees
    (with the prompt-lookup branch, which the 8-token vocabulary makes match often) go through `accept_sampling`:
    EAGLE's static trees with tokens drawn from the head (`eagle-v6`: from a 6-token draft vocabulary), dynamic and
    Medusa trees with top-k tokens."""
    vocab = 8
    target = make_tiny_target(vocab_size=vocab, hidden_size=32, num_layers=1, seed=3)
    with torch.no_grad():
        target.model.lm_head.weight.mul_(0.1)  # softer than the greedy fixture: every token has real mass
    target.model.generation_config.eos_token_id = 99  # no EOS inside the 8-token vocabulary: runs give every token
    torch.manual_seed(1)
    draft_vocab = torch.tensor([0, 2, 3, 4, 6, 7], device=target.device) if head_type == "eagle-v6" else None
    head_config = HeadConfig(head_type=head_type.removesuffix("-v6"), num_layers=1, num_heads=2,
                             draft_vocab_size=0 if draft_vocab is None else len(draft_vocab))
    head = build_head(head_config, target.model, draft_token_ids=draft_vocab)
    if head_type == "medusa":
        torch.nn.init.normal_(head.heads[1][0].linear.weight, std=1.0)
    else:
        torch.nn.init.normal_(head.fc.weight, std=1.0)
    prompt = torch.tensor([1, 5, 3], device=target.device)
    # Trees: 5 tokens, so the first round may accept a 2-deep path (tokens 2-3) and a later round reads the caches
    # that acceptance left (token 4); chains: tokens 2 and 3.
    last = 3 if tree == "chain" else 4
    marginals = [m.cpu().float() for m in _exact_marginals(target, prompt, vocab, last=last)]
    counts = torch.zeros(len(marginals), vocab)
    drafted = accepted = deep = 0
    for seed in range(3000):
        config = DecodeConfig(max_new_tokens=3 if tree == "chain" else 5, temperature=1.0, draft_length=2,
                              seed=seed, draft_threshold=draft_threshold, tree=tree, tree_nodes=6, lookup_tokens=2,
                              tree_max_temperature=1.0)
        result = generate(target, prompt[None], config=config, drafter=head)
        assert len(result.token_ids) == config.max_new_tokens
        assert result.stats.tree_nodes == (0 if tree == "chain" else 6)  # the default static tree's 6: 2 deep
        for index, token in enumerate(result.token_ids[1:last]):
            counts[index, token] += 1
        drafted += result.stats.evaluated[0] if result.stats.evaluated else 0
        accepted += result.stats.accepted[0] if result.stats.accepted else 0
        deep += result.stats.accepted[1] if len(result.stats.accepted) > 1 else 0
    assert 0 < accepted < drafted, "the test needs both accepted and rejected drafts"
    assert tree == "chain" or deep > 0, "the test needs 2-deep accepted paths"
    for token_counts, marginal in zip(counts, marginals):
        assert _chi_square(token_counts, marginal) < 24.3


def test_stop_string_and_max_new_tokens(tiny_target):
    prompt_ids = _prompt_ids(tiny_target, PROMPTS[1])
    full = generate(tiny_target, prompt_ids, config=_greedy(max_new_tokens=30))
    assert full.finish_reason in ("length", "stop")
    assert len(full.token_ids) <= 30
    stop = full.text[5:7]
    assert stop.strip(), "need a visible stop string"
    config = _greedy(max_new_tokens=30, stop=(stop,))
    head = build_head(HeadConfig(head_type="medusa", num_heads=3), tiny_target.model)
    for drafter in (None, head):
        stopped = generate(tiny_target, prompt_ids, config=config, drafter=drafter)
        assert stopped.finish_reason == "stop"
        assert stop not in stopped.text
        assert full.text.startswith(stopped.text)
        assert len(stopped.token_ids) < len(full.token_ids)


def test_a_stop_string_of_multi_token_characters_stops_generation():
    """A byte-level tokenizer spells "日本語" in 9 tokens; the decoded tail was sized by characters (3 + 4 tokens),
    so the stop string never appeared in it and generation ran on to max_new_tokens."""
    from types import SimpleNamespace

    byte_level = SimpleNamespace(decode=lambda ids, skip_special_tokens=True: bytes(ids).decode(errors="replace"))
    target = SimpleNamespace(tokenizer=byte_level, eos_token_ids=(0,))
    checker = decoding.StopChecker(target, config=_greedy(max_new_tokens=100, stop=("日本語",)),
                                   max_total_tokens=1000, prompt_tokens=5)
    output = list("ok, 日本語 and more".encode())
    reasons = [checker.check(output[:end]) for end in range(1, len(output) + 1)]
    assert reasons.index("stop") + 1 == len("ok, 日本語".encode())


def test_eos_stops_generation_for_both_decoders():
    target = make_tiny_target(seed=0)
    prompt_ids = _prompt_ids(target, PROMPTS[0])
    full = generate(target, prompt_ids, config=_greedy(max_new_tokens=30))
    # Declare a token the model really emits to be EOS: generation must end right after its first occurrence.
    eos = full.token_ids[6]
    first = full.token_ids.index(eos)
    target.model.generation_config.eos_token_id = eos
    head = build_head(HeadConfig(head_type="eagle", num_heads=3), target.model)
    for drafter in (None, head):
        stopped = generate(target, prompt_ids, config=_greedy(max_new_tokens=30), drafter=drafter)
        assert stopped.token_ids == full.token_ids[: first + 1]
        assert stopped.finish_reason == "stop"


def test_prompt_longer_than_context_is_a_clear_error():
    target = make_tiny_target(max_positions=16)
    with pytest.raises(PromptTooLongError, match="context window is 16"):
        generate(target, _prompt_ids(target, "x" * 40), config=_greedy())


def test_generation_stops_at_context_window():
    target = make_tiny_target(max_positions=32)
    head = build_head(HeadConfig(head_type="eagle", num_heads=4), target.model)
    prompt_ids = _prompt_ids(target, "abcdefghij")  # 11 tokens with BOS
    for drafter in (None, head):
        result = generate(target, prompt_ids, config=_greedy(max_new_tokens=100), drafter=drafter)
        assert prompt_ids.shape[1] + len(result.token_ids) <= 32


def test_bad_decode_settings_name_the_field():
    with pytest.raises(ConfigError, match="decode.temperature"):
        DecodeConfig(temperature=-0.5)
    with pytest.raises(ConfigError, match="decode.max_new_tokens"):
        DecodeConfig(max_new_tokens=0)
    with pytest.raises(ConfigError, match="decode.top_p"):
        DecodeConfig(top_p=1.5)
    with pytest.raises(ConfigError, match="decode.seed"):  # torch's generator overflowed mid-generation
        DecodeConfig(temperature=1.0, seed=2**64)
    assert DecodeConfig(temperature=1.0, seed=2**64 - 1).seed == 2**64 - 1


def test_metrics_pool_over_generations():
    a = GenerationStats(new_tokens=10, target_forward_passes=5, wall_time_s=1.0)
    b = GenerationStats(new_tokens=30, target_forward_passes=10, wall_time_s=1.0)
    assert acceptance_length([a, b]) == pytest.approx(40 / 15)


def test_metrics_by_group_pool_within_each_group():
    spec = [GenerationStats(new_tokens=10, target_forward_passes=5, wall_time_s=1.0),
            GenerationStats(new_tokens=30, target_forward_passes=10, wall_time_s=1.0),
            GenerationStats(new_tokens=12, target_forward_passes=12, wall_time_s=2.0)]
    vanilla = [GenerationStats(new_tokens=n, target_forward_passes=n, wall_time_s=n / 10) for n in (10, 30, 12)]
    groups = by_group(["prose", "maths", "prose"], spec, vanilla)
    assert list(groups) == ["prose", "maths"]  # first-seen order
    assert groups["prose"] == {"prompts": 2, "tau": pytest.approx(22 / 17), "speedup": pytest.approx((22 / 3) / 10)}
    assert groups["maths"] == {"prompts": 1, "tau": pytest.approx(3.0), "speedup": pytest.approx(3.0)}
    assert by_group(["a"], spec[:1]) == {"a": {"prompts": 1, "tau": 2.0}}
    with pytest.raises(ValueError, match="one group name per generation"):
        by_group(["a"], spec)


@pytest.mark.parametrize("with_drafter", [False, True])
def test_on_tokens_sees_every_token_once_and_changes_nothing(tiny_target, with_drafter):
    torch.manual_seed(0)
    head = build_head(HeadConfig(head_type="eagle", num_layers=1, num_heads=3), tiny_target.model) if with_drafter else None
    prompt_ids = _prompt_ids(tiny_target, PROMPTS[1])
    for config in (_greedy(), DecodeConfig(max_new_tokens=40, temperature=0.8, seed=3)):
        plain = generate(tiny_target, prompt_ids, config=config, drafter=head)
        rounds: list[list[int]] = []
        streamed = generate(tiny_target, prompt_ids, config=config, drafter=head, on_tokens=rounds.append)
        assert streamed.token_ids == plain.token_ids
        assert streamed.finish_reason == plain.finish_reason
        assert [t for r in rounds for t in r] == streamed.token_ids
        assert all(rounds), "every call carries at least one new token"


def test_on_tokens_returning_false_cancels_generation(tiny_target):
    head = build_head(HeadConfig(head_type="medusa", num_layers=1, num_heads=3), tiny_target.model)
    prompt_ids = _prompt_ids(tiny_target, PROMPTS[0])
    full = generate(tiny_target, prompt_ids, config=_greedy(60), drafter=head)
    calls = []

    def stop_after_three_rounds(new_ids):
        calls.append(new_ids)
        return len(calls) < 3

    cancelled = generate(tiny_target, prompt_ids, config=_greedy(60), drafter=head, on_tokens=stop_after_three_rounds)
    assert len(calls) == 3
    assert cancelled.finish_reason == "cancelled"
    assert cancelled.token_ids == full.token_ids[: len(cancelled.token_ids)]
    assert len(cancelled.token_ids) < len(full.token_ids)


def test_decoding_never_uses_cudnn_attention(tiny_target, monkeypatch):
    """cuDNN attention plans per sequence length, and decoding meets a new length every round (slow on Hopper GPUs
    in bf16): every attention call of vanilla and speculative decoding, target and head, runs with cuDNN off, and
    the process's setting is restored afterwards."""
    cudnn_at_calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(*args, **kwargs):
        cudnn_at_calls.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    head = build_head(HeadConfig(head_type="eagle", num_heads=3), tiny_target.model)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    prompt_ids = _prompt_ids(tiny_target, PROMPTS[0])
    generate(tiny_target, prompt_ids, config=_greedy(max_new_tokens=12))
    generate(tiny_target, prompt_ids, config=_greedy(max_new_tokens=12), drafter=head)
    assert len(cudnn_at_calls) > 20 and not any(cudnn_at_calls)
    assert torch.backends.cuda.cudnn_sdp_enabled()


@pytest.mark.skipif(TEST_DEVICE != "cpu", reason="the padding is a CPU kernel choice")
@pytest.mark.parametrize("four_is_cheaper", [True, False])
def test_short_cpu_verifications_are_padded_only_where_measured_cheaper(tiny_target, monkeypatch, four_is_cheaper):
    import pipeline.decoding as decoding

    costs = {2: 2.0, 3: 3.0, 4: 1.0 if four_is_cheaper else 5.0}
    monkeypatch.setattr(decoding, "verify_costs", lambda model, sizes: {k: costs[k] for k in sizes})
    scored_lengths = []
    real_score = decoding.score

    def spy(model, input_ids, cache, **kwargs):
        scored_lengths.append(input_ids.shape[1])
        return real_score(model, input_ids, cache, **kwargs)

    monkeypatch.setattr(decoding, "score", spy)
    head = build_head(HeadConfig(head_type="eagle", num_layers=1, num_heads=2), tiny_target.model).eval()
    prompt = _prompt_ids(tiny_target, PROMPTS[1])
    vanilla = generate(tiny_target, prompt, config=_greedy(max_new_tokens=20))
    scored_lengths.clear()
    speculative = generate(tiny_target, prompt, config=_greedy(max_new_tokens=20), drafter=head)
    assert speculative.token_ids == vanilla.token_ids
    verifications = scored_lengths[1:]  # after the prefill
    assert verifications and set(verifications) <= {1, 2, 3, 4}
    assert (4 in verifications) == four_is_cheaper and (3 in verifications) != four_is_cheaper
