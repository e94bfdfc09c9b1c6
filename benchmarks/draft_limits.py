"""What limits the shipped head's acceptance on MT-bench? Two diagnostics, acceptance only (tau does not depend on
the machine), each decoding the same prompts both ways and checking the outputs are equal:

- `vocab`: chains with the head's 8k draft vocabulary against the same head projecting onto the target's full
  vocabulary (its LM-head rows are the target's, frozen, so only the map changes), per category, with the share of
  the generated tokens the draft vocabulary holds. If out-of-vocabulary tokens were what the head misses, the full
  vocabulary would raise tau.
- `datastore`: the default tree with its prompt-lookup branch against the same tree whose lookup falls back to (or
  adds) an n-gram index over SmolLM2's own training answers (REST-style retrieval): if the misses were the
  target's stock phrases, its own earlier answers would predict them.

    python benchmarks/draft_limits.py vocab --per-category 4 --max-new-tokens 128
    python benchmarks/draft_limits.py datastore --data data/smollm2-selfinstruct --per-category 4

The datastore variant swaps `pipeline.decoding`'s lookup class for this process only; the core is unchanged.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import decoding  # noqa: E402
from pipeline.bench import load_questions  # noqa: E402
from pipeline.config import DecodeConfig  # noqa: E402
from pipeline.heads import LogitShape, _DraftVocabulary, _frozen_lm_head_rows, default_drafter_dir, load_head  # noqa: E402
from pipeline.lookup import PromptLookup, graft_chain  # noqa: E402
from pipeline.target import load_target  # noqa: E402

TOKEN_BITS = np.uint64(16)  # SmolLM2's 49,152 token ids fit; n-gram keys pack up to 4 of them into one uint64


def full_vocabulary_copy(head, target):
    """The same head drafting over the target's whole vocabulary."""
    full = copy.deepcopy(head)
    full.vocabulary = _DraftVocabulary(None)
    full.lm_head_weight = _frozen_lm_head_rows(target.model, None).float()
    full.logit_shape = LogitShape.of(target.model)  # the whole vocabulary's bias, if the LM head has one
    return full


class AnswerDatastore:
    """Sorted n-gram keys over answer tokens (answers separated by -1): the continuation most answers agree on."""

    def __init__(self, tokens: np.ndarray, ngram_sizes=(4, 3), *, min_support: int = 2, min_share: float = 0.3):
        self.tokens, self.ngram_sizes = tokens, ngram_sizes
        self.min_support, self.min_share = min_support, min_share
        self.index = {}
        for size in ngram_sizes:
            count = len(tokens) - size
            keys, valid = np.zeros(count, dtype=np.uint64), np.ones(count, dtype=bool)
            for offset in range(size):
                column = tokens[offset : offset + count]
                valid &= column >= 0
                keys = (keys << TOKEN_BITS) + np.where(column >= 0, column, 0).astype(np.uint64)
            starts = np.nonzero(valid)[0] + size
            order = np.argsort(keys[valid], kind="stable")
            self.index[size] = (keys[valid][order], starts[order])

    def propose(self, context: list[int], max_tokens: int) -> list[int]:
        for size in self.ngram_sizes:
            if len(context) < size:
                continue
            key = np.uint64(0)
            for token in context[-size:]:
                key = (key << TOKEN_BITS) + np.uint64(token)
            keys, starts = self.index[size]
            low, high = np.searchsorted(keys, key, "left"), np.searchsorted(keys, key, "right")
            if high - low < self.min_support:
                continue
            starts = starts[low:high][-256:]
            chain: list[int] = []
            for step in range(max_tokens):
                following = self.tokens[np.minimum(starts + step, len(self.tokens) - 1)]
                votes = Counter(following[following >= 0].tolist())
                if not votes:
                    break
                token, count = votes.most_common(1)[0]
                if count < self.min_support or count < self.min_share * len(starts):
                    break
                chain.append(token)
                starts = starts[following == token]
            return chain
        return []


def answer_tokens(data_dirs: list[str]) -> np.ndarray:
    tokens: list[int] = []
    for directory in data_dirs:
        for path in sorted(Path(directory).glob("*.parquet")):
            table = pq.read_table(path, columns=["input_ids", "loss_mask"]).to_pydict()
            for ids, mask in zip(table["input_ids"], table["loss_mask"]):
                tokens += [token for token, keep in zip(ids, mask) if keep] + [-1]
    return np.array(tokens, dtype=np.int64)


def run_vocab(target, head, questions, max_new_tokens: int) -> None:
    full = full_vocabulary_copy(head, target)
    chain = DecodeConfig(max_new_tokens=max_new_tokens, draft_length=5, tree="chain", lookup_tokens=0)
    rows = defaultdict(lambda: {"tokens": 0, "passes": 0, "full_passes": 0, "held": 0})
    for question in questions:
        ids = target.encode_prompt(question.prompt)
        subset, whole = (decoding.generate(target, ids, config=chain, drafter=d) for d in (head, full))
        assert subset.token_ids == whole.token_ids, "both must reproduce the target's greedy output"
        for key in (question.category, "all"):
            row = rows[key]
            row["tokens"] += len(subset.token_ids)
            row["passes"] += subset.stats.target_forward_passes
            row["full_passes"] += whole.stats.target_forward_passes
            share = head.vocabulary.coverage(subset.token_ids)  # None: the full vocabulary holds everything
            row["held"] += round((1.0 if share is None else share) * len(subset.token_ids))
    print("category     chain tau (8k)  chain tau (full)  draft vocabulary holds")
    for name, row in sorted(rows.items(), key=lambda item: item[0] == "all"):  # the total last
        print(f"{name:12} {row['tokens'] / row['passes']:14.3f}  {row['tokens'] / row['full_passes']:16.3f}  "
              f"{row['held'] / row['tokens']:.1%}")


def run_datastore(target, head, questions, max_new_tokens: int, data_dirs: list[str]) -> None:
    store = AnswerDatastore(answer_tokens(data_dirs))
    print(f"datastore: {len(store.tokens):,} answer tokens", flush=True)
    mode = {"name": "off"}
    store_chain: list[list[int]] = [[]]

    class LookupWithDatastore(PromptLookup):
        def propose(self, max_tokens: int) -> list[int]:
            own = super().propose(max_tokens)
            store_chain[0] = store.propose(self.tokens, max_tokens) if mode["name"] != "off" else []
            if mode["name"] == "fallback":
                return own or store_chain[0]
            return own

    def graft_both(proposal, chain):
        grafted = graft_chain(proposal, chain)
        return graft_chain(grafted, store_chain[0]) if mode["name"] == "both" and store_chain[0] else grafted

    decoding.PromptLookup, decoding.graft_chain = LookupWithDatastore, graft_both
    config = DecodeConfig(max_new_tokens=max_new_tokens)
    totals = {name: [0, 0] for name in ("off", "fallback", "both")}
    for question in questions:
        ids = target.encode_prompt(question.prompt)
        outputs = []
        for name, total in totals.items():
            mode["name"] = name
            result = decoding.generate(target, ids, config=config, drafter=head)
            outputs.append(result.token_ids)
            total[0] += len(result.token_ids)
            total[1] += result.stats.target_forward_passes
        assert all(output == outputs[0] for output in outputs)
    for name, (tokens, passes) in totals.items():
        print(f"datastore {name:8} tree tau {tokens / passes:.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=("vocab", "datastore"))
    parser.add_argument("--drafter", default="", help="default: the shipped smollm2 head")
    parser.add_argument("--per-category", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--data", nargs="+", default=["data/smollm2-selfinstruct"], help="datastore answers (Parquet)")
    args = parser.parse_args(argv)
    target = load_target("smollm2", dtype="float32")
    head = load_head(args.drafter or default_drafter_dir("smollm2"), target.model, target_name=target.name)
    questions = load_questions(None, per_category=args.per_category)
    if args.experiment == "vocab":
        run_vocab(target, head, questions, args.max_new_tokens)
    else:
        run_datastore(target, head, questions, args.max_new_tokens, args.data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
