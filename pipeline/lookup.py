"""Prompt lookup as a branch of the draft tree: the tokens that followed the latest earlier occurrence of the
context's last n-gram (prompt lookup decoding, Saxena 2023; HF `prompt_lookup_num_tokens`).

A draft head guesses from the target's features; prompt lookup copies from the context, which the head does badly
(a name, a code line or a sentence the answer repeats). `DecodeConfig.lookup_tokens` grafts the copied tokens onto
each round's tree: where they agree with the head's nodes they share them, the rest is a chain of new nodes.
Verification keeps decoding lossless whatever the branch holds.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pipeline.heads import Proposal

# Longest n-gram first: a longer match predicts its continuation better; 1-grams match almost anywhere.
LOOKUP_NGRAM_SIZES = (3, 2)


class PromptLookup:
    """An index of the context's n-grams (the latest occurrence of each whose next token is known), kept up to date
    as tokens are appended: a proposal costs a dictionary lookup, not a scan of the context."""

    def __init__(self, tokens: Iterable[int] = (), *, ngram_sizes: Sequence[int] = LOOKUP_NGRAM_SIZES) -> None:
        self.ngram_sizes = tuple(ngram_sizes)
        self.tokens: list[int] = []
        self._continuation: dict[tuple[int, ...], int] = {}  # n-gram -> where the tokens after it start
        self.extend(tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        for token in tokens:
            end = len(self.tokens)  # the n-grams ending just before this token now have a continuation
            for size in self.ngram_sizes:
                if end >= size:
                    self._continuation[tuple(self.tokens[end - size : end])] = end
            self.tokens.append(token)

    def propose(self, max_tokens: int) -> list[int]:
        """Up to `max_tokens` tokens that followed the latest earlier occurrence of the longest matching suffix."""
        if max_tokens <= 0:
            return []
        for size in self.ngram_sizes:
            if len(self.tokens) < size:
                continue
            start = self._continuation.get(tuple(self.tokens[-size:]))
            if start is not None:
                return self.tokens[start : start + max_tokens]
        return []


def graft_chain(proposal: Proposal, chain: Sequence[int]) -> Proposal:
    """The tree `proposal` with `chain` (tokens after the pending one) added as a path from the root: it follows the
    tree's nodes while their tokens agree, then continues as new nodes (appended, so parents stay first)."""
    token_ids, parents = list(proposal.token_ids), list(proposal.parents or [])
    children: dict[int, dict[int, int]] = {}
    for index, (token, parent) in enumerate(zip(token_ids, parents)):
        children.setdefault(parent, {}).setdefault(token, index)
    current = -1
    for token in chain:
        existing = children.get(current, {}).get(token)
        if existing is None:
            token_ids.append(token)
            parents.append(current)
            existing = len(token_ids) - 1
            children.setdefault(current, {})[token] = existing
        current = existing
    # The branch's own nodes are deterministic drafts (None); the tree's keep their draft distributions.
    added = len(token_ids) - len(proposal.token_ids)
    draft_probs = list(proposal.draft_probs) + [None] * added
    paths = list(proposal.paths) + [None] * added if proposal.paths is not None else None
    return Proposal(token_ids=token_ids, draft_probs=draft_probs, parents=parents, paths=paths)
