"""The `koala` command line: `koala head init`, `koala bench`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from pipeline.config import BenchConfig, ConfigError, DecodeConfig, HeadConfig, TargetConfig

log = logging.getLogger("koala")


def _add_target_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="smollm2", help="'smollm2', a hub id, a model directory or a .gguf file")
    parser.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16/fp16 on CUDA), float32, float16, bfloat16")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--prompt-format", default="auto", help="auto, chat, vicuna or plain")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the target's own modeling code")


def _target_config(args: argparse.Namespace) -> TargetConfig:
    return TargetConfig(
        spec=args.target,
        dtype=args.dtype,
        device=args.device,
        prompt_format=args.prompt_format,
        trust_remote_code=args.trust_remote_code,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="koala", description="KOALA speculative decoding pipeline")
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)

    head = commands.add_parser("head", help="draft head utilities").add_subparsers(dest="head_command", required=True)
    init = head.add_parser("init", help="write a freshly initialised head for a target")
    init.add_argument("--type", dest="head_type", required=True, help="eagle or medusa")
    init.add_argument("--num-layers", type=int, default=1, help="K: decoder layers (EAGLE) or residual blocks (Medusa)")
    init.add_argument("--num-heads", type=int, default=4, help="Medusa heads / default draft length")
    init.add_argument("--draft-vocab-size", type=int, default=0, help="0 = full vocabulary")
    init.add_argument("--draft-vocab-corpus", type=Path, help="JSON/JSONL/text whose most frequent tokens form the draft vocabulary")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--out", type=Path, required=True)
    _add_target_arguments(init)

    bench = commands.add_parser("bench", help="measure speedup, tau and n-alpha against vanilla and HF decoding")
    _add_target_arguments(bench)
    bench.add_argument("--drafter", type=Path, required=True, help="head directory (koala head init / koala train)")
    bench.add_argument("--questions", help="MT-bench-style JSONL; default ../shared/data/mt_bench/question.jsonl")
    limits = bench.add_mutually_exclusive_group()
    limits.add_argument("--limit", type=int, default=0, help="first N questions")
    limits.add_argument("--per-category", type=int, default=0, help="first N questions of each category")
    bench.add_argument("--max-new-tokens", type=int, default=128)
    bench.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    bench.add_argument("--top-p", type=float, default=1.0)
    bench.add_argument("--draft-length", type=int, default=0, help="0 = the head's num_heads")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--warmup", type=int, default=1, help="prompts run once before timing")
    bench.add_argument("--no-hf", action="store_true", help="skip the HF generate and prompt-lookup baselines")
    bench.add_argument("--json", type=Path, help="write the full report here")
    return parser


def cmd_head_init(args: argparse.Namespace) -> int:
    from pipeline.heads import build_head, save_head, target_identity_dict
    from pipeline.target import load_target_from_config
    from pipeline.vocab import count_tokens, read_corpus_texts, top_token_ids

    head_config = HeadConfig(
        head_type=args.head_type, num_layers=args.num_layers, num_heads=args.num_heads,
        draft_vocab_size=args.draft_vocab_size,
    )
    if head_config.draft_vocab_size and not args.draft_vocab_corpus:
        raise ConfigError("head.draft_vocab_size: needs --draft-vocab-corpus FILE to choose the most frequent tokens")
    target = load_target_from_config(_target_config(args))
    draft_token_ids = None
    if head_config.draft_vocab_size:
        counts = count_tokens(read_corpus_texts(args.draft_vocab_corpus), target.tokenizer)
        draft_token_ids = top_token_ids(counts, head_config.draft_vocab_size, always_include=sorted(target.eos_token_ids))
    torch.manual_seed(args.seed)
    head = build_head(head_config, target.model, draft_token_ids=draft_token_ids)
    save_head(head, args.out, target_identity=target_identity_dict(target.model, target.name))
    parameters = sum(p.numel() for p in head.parameters())
    print(f"wrote {head_config.head_type} head (K={head_config.num_layers}, {parameters / 1e6:.1f}M parameters) to {args.out}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pipeline.bench import format_table, load_questions, run_bench, write_report
    from pipeline.heads import load_head, read_head_metadata
    from pipeline.target import load_target_from_config

    decode = DecodeConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        draft_length=args.draft_length, seed=args.seed,
    )
    bench = BenchConfig(
        questions=args.questions or "", limit=args.limit, per_category=args.per_category,
        warmup_prompts=args.warmup, include_hf=not args.no_hf,
    )
    questions = load_questions(bench.questions, limit=bench.limit, per_category=bench.per_category)
    read_head_metadata(args.drafter)  # fail on a bad drafter dir before the slow target load
    target = load_target_from_config(_target_config(args))
    drafter = load_head(args.drafter, target.model, target_name=target.name)
    settings = {
        "target": target.name,
        "drafter": str(args.drafter),
        "head": drafter.config.to_dict(),
        "questions": bench.questions or "default",
        "device": str(target.device),
        "dtype": str(target.model.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "prompt_format": target.prompt_format,
    }
    report = run_bench(target, drafter, questions, decode=decode, bench=bench, settings=settings)
    print(format_table(report))
    if args.json:
        print(f"report written to {write_report(report, args.json)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from pipeline.decoding import PromptTooLongError
    from pipeline.heads import HeadLoadError
    from pipeline.target import TargetLoadError

    handlers = {("head", "init"): cmd_head_init, ("bench", None): cmd_bench}
    handler = handlers[(args.command, getattr(args, "head_command", None))]
    try:
        return handler(args)
    except (ConfigError, TargetLoadError, HeadLoadError, PromptTooLongError) as error:
        print(f"koala {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
