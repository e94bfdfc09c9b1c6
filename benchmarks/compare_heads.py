"""Several draft heads on the same prompts, in one process: our vanilla decoder, HF prompt lookup, and speculative
decoding with each head, alternating per prompt (so every method sees the same machine state), greedy or, with
`--temperature`, sampled (every method samples; exact_match is then not reported: the outputs differ by design).

    python benchmarks/compare_heads.py --target smollm2 --dtype float32 --per-category 4 --max-new-tokens 128 \
        --head eagle-k1=runs/train/eagle-k1/head --head medusa-k1=runs/train/medusa-k1/head --json runs/compare.json

`--no-vanilla` skips the timed baselines (acceptance only: tau and n-alpha do not depend on timing, so several of
these can share a machine); `--deadline S` stops starting new prompts after S seconds (the JSON, rewritten after
every prompt, then covers the prompts done). Reports per head: speedup over vanilla, tau, n-alpha (n = 1..draft
length), exact_match against vanilla, tokens/s, tau and speedup by category, the draft vocabulary's share of
vanilla's tokens; and HF prompt lookup's tokens/s and speedup. `--log-trees` logs why an `auto` static tree's
learnt budget drafts the paths it does.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import metrics  # noqa: E402
from pipeline.bench import WARMUP_TOKENS, _hf_generate, load_questions  # noqa: E402
from pipeline.config import DecodeConfig  # noqa: E402
from pipeline.decoding import generate  # noqa: E402
from pipeline.heads import drafting_dtype, load_head  # noqa: E402
from pipeline.target import load_target  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--head", action="append", required=True, metavar="NAME=DIR[@N[,T][,FIELD=VALUE...]]",
                        help="a head directory, named; @N drafts up to N tokens per round with it (else "
                             "--draft-length), ,T sets its draft threshold, ,FIELD=VALUE any decode field "
                             "(e.g. tree=dynamic,tree_nodes=8), ,draft_dtype=D the dtype it drafts in (default auto)")
    parser.add_argument("--questions", default="")
    parser.add_argument("--per-category", type=int, default=4)
    parser.add_argument("--limit", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--draft-length", type=int, default=0, help="0 = each head's default")
    parser.add_argument("--draft-threshold", type=float, default=None, help="default: DecodeConfig's")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; else every method samples")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed of every generation")
    parser.add_argument("--no-vanilla", action="store_true", help="acceptance only: no timed baselines")
    parser.add_argument("--no-prompt-lookup", action="store_true")
    parser.add_argument("--prompt-lookup-num-tokens", type=int, default=10)
    parser.add_argument("--deadline", type=float, default=0.0, help="stop starting prompts after this many seconds")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--log-trees", action="store_true",
                        help="log each learnt tree budget's choices (nodes, expected tokens, modelled round cost)")
    return parser.parse_args(argv)


def head_settings(decode: DecodeConfig, settings: str) -> tuple[DecodeConfig, str]:
    """`4`, `4,0.2` or `4,tree=dynamic,tree_nodes=8,draft_dtype=float32`: draft length, threshold, then any
    DecodeConfig field, and the dtype the head drafts in (`load_head`'s, default auto)."""
    values, draft_dtype = decode.to_dict(), "auto"
    for position, item in enumerate(filter(None, settings.split(","))):
        field, equals, value = item.partition("=")
        if field == "draft_dtype":
            draft_dtype = value
        elif equals:
            values[field] = yaml.safe_load(value)
        else:
            values["draft_length" if position == 0 else "draft_threshold"] = yaml.safe_load(field)
    return DecodeConfig.from_dict(values), draft_dtype


def summarize(per_method: dict[str, list], exact: dict[str, list[bool]], settings: dict,
              categories: list[str] | None = None, coverage: dict[str, float | None] | None = None) -> dict:
    """The report: per method its throughput, and per head tau, n-alpha, step costs, exact match, tau (and the
    speedup) by category of `categories` (one per prompt) and its draft vocabulary's `coverage` of vanilla's
    tokens."""
    vanilla = per_method.get("vanilla")
    report = {"settings": settings, "n_prompts": len(next(iter(per_method.values()))) if per_method else 0,
              "methods": {}}
    for name, stats in per_method.items():
        entry = {"tokens_per_s": metrics.tokens_per_second(stats), "new_tokens": metrics.total_tokens(stats),
                 "time_s": metrics.total_time(stats)}
        if vanilla and name != "vanilla":
            entry["speedup"] = metrics.speedup(stats, vanilla)
        if name in exact:
            longest = max((len(s.evaluated) for s in stats), default=0)
            entry.update(tau=metrics.acceptance_length(stats), alpha=metrics.n_alpha(stats, max_n=longest),
                         draft_ms_per_token=metrics.draft_ms_per_token(stats),
                         verify_ms=metrics.target_ms_per_forward(stats),
                         lookup_accepted=sum(s.lookup_accepted for s in stats),
                         tree_nodes=sorted({s.tree_nodes for s in stats}))
            if exact[name]:
                entry["exact_match"] = sum(exact[name]) / len(exact[name])
            if categories:
                entry["by_category"] = metrics.by_group(categories, stats, vanilla)
            if coverage and coverage.get(name) is not None:
                entry["draft_vocab_coverage"] = coverage[name]
        report["methods"][name] = entry
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.log_trees:
        logging.basicConfig(format="%(name)s: %(message)s")
        logging.getLogger("pipeline.decoding").setLevel(logging.INFO)
    target = load_target(args.target, dtype=args.dtype, device=args.device)
    decode = DecodeConfig(max_new_tokens=args.max_new_tokens, draft_length=args.draft_length,
                          temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    if args.draft_threshold is not None:
        decode = decode.replace(draft_threshold=args.draft_threshold)
    heads, head_decode = {}, {}
    for item in args.head:
        name, _, spec = item.partition("=")
        directory, _, settings = spec.partition("@")
        head_decode[name], draft_dtype = head_settings(decode, settings)
        heads[name] = load_head(directory, target.model, target_name=target.name, dtype=draft_dtype)
    questions = load_questions(args.questions or None, limit=args.limit, per_category=args.per_category)
    settings = {**vars(args), "json": str(args.json), "device": str(target.device),
                "dtype": str(target.model.dtype), "torch_threads": torch.get_num_threads(),
                "heads": {name: {**head.config.to_dict(), "decode": head_decode[name].to_dict(),
                                 "draft_dtype": drafting_dtype(head)}
                          for name, head in heads.items()}}

    def run_prompt(prompt_ids: torch.Tensor, config: DecodeConfig) -> tuple[dict, dict]:
        stats, outputs = {}, {}
        if not args.no_vanilla:
            vanilla = generate(target, prompt_ids, config=config)
            stats["vanilla"], outputs["vanilla"] = vanilla.stats, vanilla.token_ids
            if not args.no_prompt_lookup:
                stats["hf_prompt_lookup"] = _hf_generate(
                    target, prompt_ids, config, prompt_lookup_num_tokens=args.prompt_lookup_num_tokens)
        for name, head in heads.items():
            per_head = head_decode[name].replace(max_new_tokens=config.max_new_tokens)
            result = generate(target, prompt_ids, config=per_head, drafter=head)
            stats[name], outputs[name] = result.stats, result.token_ids
        return stats, outputs

    warmup = decode.replace(max_new_tokens=min(WARMUP_TOKENS, decode.max_new_tokens))
    run_prompt(target.encode_prompt(questions[0].prompt), warmup)
    started = time.perf_counter()
    per_method: dict[str, list] = defaultdict(list)
    exact: dict[str, list[bool]] = {name: [] for name in heads}
    categories: list[str] = []
    held = {name: 0.0 for name in heads}  # vanilla tokens so far that each head's draft vocabulary holds
    vanilla_count = 0
    report = summarize(per_method, exact, settings)
    for index, question in enumerate(questions):
        if args.deadline and time.perf_counter() - started > args.deadline:
            print(f"[compare] deadline reached after {index} prompts", flush=True)
            break
        stats, outputs = run_prompt(target.encode_prompt(question.prompt), decode)
        for name, value in stats.items():
            per_method[name].append(value)
        categories.append(question.category)
        for name in heads:
            if "vanilla" in outputs and decode.greedy:
                exact[name].append(outputs[name] == outputs["vanilla"])
        new_tokens = outputs.get("vanilla", [])
        vanilla_count += len(new_tokens)
        coverage = {}
        for name, head in heads.items():
            share = head.vocabulary.coverage(new_tokens)  # None for a full vocabulary or no tokens
            held[name] += (share or 0.0) * len(new_tokens)
            full = head.vocabulary.draft_token_ids is None
            coverage[name] = None if full or not vanilla_count else held[name] / vanilla_count
        report = summarize(per_method, exact, settings, categories, coverage)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
        line = "  ".join(f"{name} tau {entry['tau']:.2f}" + (f" x{entry['speedup']:.2f}" if "speedup" in entry else "")
                         for name, entry in report["methods"].items() if "tau" in entry)
        print(f"[compare] {index + 1}/{len(questions)} {time.perf_counter() - started:.0f}s  {line}", flush=True)
    print(json.dumps(report["methods"], indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
