"""The `koala` command line: head init, bench, self-prompts, distill, train, tune, run, serve."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from pathlib import Path

import torch

from pipeline.config import (
    DTYPES, BenchConfig, ConfigError, DecodeConfig, DistillConfig, HeadConfig, SelfPromptConfig, SweepConfig,
    TargetConfig, TrainConfig,
    apply_overrides, assign_dotted, read_yaml,
)

log = logging.getLogger("koala")


def _add_target_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="smollm2", help="'smollm2', a hub id, a model directory or a .gguf file")
    parser.add_argument("--dtype", default="auto", help="auto (fp32 on CPU and for targets under 1B parameters on "
                        "CUDA, else bf16/fp16), float32, float16, bfloat16")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--prompt-format", default="auto", help="auto, chat, vicuna or plain")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the target's own modeling code")
    parser.add_argument("--cpu-linear", default="onednn",
                        help="on a CPU: onednn (fast fp32 linear layers; keeps a second, packed copy of their "
                             "weights), onednn-unpacked (one copy, slower verification) or torch (nn.Linear's MKL path)")


def _target_config(args: argparse.Namespace) -> TargetConfig:
    return TargetConfig(
        spec=args.target,
        dtype=args.dtype,
        device=args.device,
        prompt_format=args.prompt_format,
        trust_remote_code=args.trust_remote_code,
        cpu_linear=args.cpu_linear,
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

    tree = head.add_parser("tree", help="measure a head's static draft tree again on held-out rows, at any size")
    tree.add_argument("--head", type=Path, required=True, help="the head directory")
    tree.add_argument("--data", nargs="+", required=True, help="distilled data: its validation split is measured")
    tree.add_argument("--nodes", type=int, default=64, help="rank paths in the tree (decoding drafts a prefix)")
    tree.add_argument("--val-fraction", type=float,
                      help="the validation split by opening prompt (split_id, else prompt id); default: the held-out "
                           "fraction of the training run the head is in (OUT/head), else 0.05; a larger one is refused")
    tree.add_argument("--max-rows", type=int, default=400, help="validation rows measured, at most")
    tree.add_argument("--out", type=Path, help="write the head here (default: update --head in place)")
    _add_target_arguments(tree)

    bench = commands.add_parser("bench", help="measure speedup, tau and n-alpha against vanilla and HF decoding")
    _add_target_arguments(bench)
    bench.add_argument("--drafter", type=Path,
                       help="head directory (koala head init / koala train); default: the target's shipped drafter")
    bench.add_argument("--questions", help="MT-bench-style JSONL; default ../shared/data/mt_bench/question.jsonl")
    limits = bench.add_mutually_exclusive_group()
    limits.add_argument("--limit", type=int, default=0, help="first N questions")
    limits.add_argument("--per-category", type=int, default=0, help="first N questions of each category")
    bench.add_argument("--max-new-tokens", type=int, default=128)
    bench.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    bench.add_argument("--top-p", type=float, default=1.0)
    bench.add_argument("--draft-length", type=int, default=0, help="longest draft chain; 0 = the head's num_heads")
    bench.add_argument("--tree", default=None, help="chain, static or dynamic (default: the decoder's, static)")
    bench.add_argument("--tree-nodes", type=int, default=0, help="tree size; 0 = auto (learnt from the rounds decoded)")
    bench.add_argument("--tree-top-k", type=int, default=4, help="dynamic trees: nodes expanded per step")
    bench.add_argument("--lookup-tokens", type=int, default=None,
                       help="prompt-lookup tokens added to each draft tree as a branch; 0 = none (default: the decoder's)")
    bench.add_argument("--tree-max-temperature", type=float, default=None,
                       help="sampling up to this temperature drafts trees, hotter chains (default: the decoder's)")
    bench.add_argument("--draft-threshold", type=float, default=None,
                       help="end a chain once its draft probability falls below this (default: the decoder's)")
    bench.add_argument("--draft-dtype", default="auto", choices=DTYPES,
                       help="dtype the head drafts in: auto (the target's; bf16 for an fp32 target on a CPU with bf16 "
                            "units), float32, bfloat16 or float16")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--warmup", type=int, default=1, help="prompts run once before timing")
    bench.add_argument("--no-hf", action="store_true", help="skip the HF generate and prompt-lookup baselines")
    bench.add_argument("--audit", action="store_true",
                       help="losslessness audit: tell numerical near-ties from violations (greedy; pipeline/audit.py)")
    bench.add_argument("--json", type=Path, help="write the full report here")

    tune = commands.add_parser("tune", help="Ray Tune sweep over head type x K x lambda; registers the winner")
    _add_stage_arguments(tune)
    tune.add_argument("--data", action="append", help="distilled data directory (repeatable)")
    tune.add_argument("--out", help="sweep directory (default runs/sweeps)")

    run = commands.add_parser("run", help="the full pipeline: distill -> sweep -> register -> serve")
    run.add_argument("--config", default="cpu-demo", help="a preset (cpu-demo, smoke, paper-vicuna-7b) or a YAML file")
    run.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override any field, dotted")

    self_prompts = commands.add_parser(
        "self-prompts", help="the target writes user prompts for its own distillation data (Magpie-style)")
    _add_stage_arguments(self_prompts)
    self_prompts.add_argument("--count", type=int, help="distinct prompts to write")
    self_prompts.add_argument("--target", help="target spec (default smollm2)")
    self_prompts.add_argument("--out", help="JSONL file (appended; a re-run continues it)")

    distill = commands.add_parser("distill", help="the target writes distillation data (Ray Data)")
    _add_stage_arguments(distill)
    distill.add_argument("--prompts", nargs="+", help="ShareGPT/OpenAI-style .json/.jsonl files or HF dataset names")
    distill.add_argument("--mode", help="generate (the target answers) or teacher-forced (text as it is)")
    distill.add_argument("--max-prompts", type=int, help="data budget: prompts to use (0 = all)")
    distill.add_argument("--max-new-tokens", type=int, help="data budget: tokens per response")
    distill.add_argument("--target", help="target spec (default smollm2)")
    distill.add_argument("--out", help="output directory for the Parquet shards")
    distill.add_argument("--num-actors", type=int, help="target replicas (one GPU each where there are GPUs)")
    distill.add_argument("--no-ray", action="store_true", help="run in this process without Ray")

    train = commands.add_parser("train", help="train one KOALA head (Ray Train)")
    _add_stage_arguments(train)
    train.add_argument("--data", nargs="+", help="directories written by koala distill")
    train.add_argument("--out", help="run directory; the trained head is exported to OUT/head")
    train.add_argument("--head-type", help="eagle or medusa")
    train.add_argument("--num-layers", type=int, help="K")
    train.add_argument("--adv-weight", type=float, help="lambda (0 = plain distillation)")
    train.add_argument("--draft-vocab-size", type=int, help="0 = full vocabulary")
    train.add_argument("--epochs", type=int)
    train.add_argument("--max-steps", type=int)
    train.add_argument("--num-workers", type=int)
    train.add_argument("--unroll-depth", type=int, help="EAGLE training-time test steps (1 = no unrolling)")
    train.add_argument("--extra-feature-layers", type=int, nargs="+", metavar="LAYER",
                       help="EAGLE-3 style fusion: target layers the head reads besides the last hidden state")
    train.add_argument("--max-train-tokens", type=int, help="data budget: response tokens to train on (0 = all)")
    train.add_argument("--target", help="target spec (default smollm2)")
    train.add_argument("--no-ray", action="store_true",
                       help="train in this process on one device (CUDA when present), without Ray")

    serve = commands.add_parser("serve", help="serve target + drafter over an OpenAI-compatible HTTP API (Ray Serve)")
    _add_stage_arguments(serve)
    serve.add_argument("--target", help="target spec (default smollm2)")
    serve.add_argument("--drafter", help="head directory or registry URI, e.g. models:/koala-drafter@champion")
    serve.add_argument("--no-drafter", dest="use_drafter", action="store_const", const=False,
                       help="plain decoding (the drafter-off baseline)")
    serve.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ drafters (default runs/mlflow.db)")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="HTTP port (default 8000)")
    serve.add_argument("--model-name", help="the model id clients send (default koala)")
    serve.add_argument("--tree", help="chain, static or dynamic drafts (default static; sampled requests above --tree-max-temperature draft chains)")
    serve.add_argument("--lookup-tokens", type=int, help="prompt-lookup tokens added to each draft tree; 0 = none")
    serve.add_argument("--tree-max-temperature", type=float,
                       help="sampled requests up to this temperature draft trees, hotter ones chains")
    serve.add_argument("--draft-dtype", help="dtype the head drafts in (default auto: the target's, bf16 for an fp32 "
                                             "target on a CPU with bf16 units)")
    serve.add_argument("--num-replicas", type=int)
    serve.add_argument("--max-replicas", type=int, help="> 0 enables autoscaling between min and max replicas")
    serve.add_argument("--api-key-env", help="environment variable holding the API key (requests then need it)")
    return parser


def _add_stage_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML file with the stage's fields")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override any field, dotted for nested ones (e.g. --set target.dtype=float32)")


def _stage_values(args: argparse.Namespace, flags: dict[str, str]) -> dict:
    """YAML file, then dedicated flags, then --set overrides (later wins)."""
    values: dict = {}
    if args.config:
        if not args.config.is_file():
            raise ConfigError(f"{args.command}: config file {args.config} does not exist")
        values = read_yaml(args.config, section=args.command)
        if not isinstance(values, dict):
            raise ConfigError(f"{args.command}: {args.config} must hold a mapping of field: value")
    for attribute, field in flags.items():
        value = getattr(args, attribute, None)
        if value is not None:
            assign_dotted(values, field, value)
    return apply_overrides(values, args.set, section=args.command)


def cmd_distill(args: argparse.Namespace) -> int:
    from pipeline.stages.distill import run_distill

    flags = {"prompts": "prompts", "mode": "mode", "max_prompts": "max_prompts", "max_new_tokens": "max_new_tokens",
             "target": "target.spec", "out": "out_dir", "num_actors": "num_actors"}
    config = DistillConfig.from_dict(_stage_values(args, flags))
    summary = run_distill(config, use_ray=not args.no_ray)
    skipped = ", ".join(f"{reason} {n}" for reason, n in summary["prompts_skipped"].items()) or "none"
    rate = summary["tokens_per_s"]
    print(f"distill: {summary['prompts_in']} prompts in, {summary['prompts_kept']} kept, skipped: {skipped}")
    print(f"distill: {summary['shards']} shards ({summary['shards_reused']} reused), "
          f"{summary['response_tokens_this_run']} tokens generated this run"
          + (f" at {rate:.1f} tokens/s end to end ({summary['actor_tokens_per_s']:.1f} per actor while generating)"
             if rate else "") + f", wall time {summary['wall_time_s']:.1f}s")
    print(f"distill: data in {config.out_dir}")
    return 0


def cmd_self_prompts(args: argparse.Namespace) -> int:
    from pipeline.stages.self_prompts import run_self_prompts

    flags = {"count": "count", "target": "target.spec", "out": "out"}
    config = SelfPromptConfig.from_dict(_stage_values(args, flags))
    summary = run_self_prompts(config)
    dropped = ", ".join(f"{reason} {n}" for reason, n in summary["dropped"].items()) or "none"
    print(f"self-prompts: {summary['prompts']} prompts in {summary['out']} ({summary['prompts_reused']} from an "
          f"earlier run), {summary['sampled_this_run']} sampled this run, dropped: {dropped}, "
          f"wall time {summary['wall_time_s']:.1f}s")
    print(f"self-prompts: answer them with koala distill --prompts {summary['out']}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.stages.train import run_train

    flags = {"data": "data_dirs", "out": "out_dir", "head_type": "head.head_type", "num_layers": "head.num_layers",
             "adv_weight": "adv_weight", "draft_vocab_size": "head.draft_vocab_size", "epochs": "epochs",
             "max_steps": "max_steps", "num_workers": "num_workers", "target": "target.spec",
             "unroll_depth": "unroll_depth", "max_train_tokens": "max_train_tokens",
             "extra_feature_layers": "head.extra_feature_layers"}
    config = TrainConfig.from_dict(_stage_values(args, flags))
    if args.no_ray:
        from pipeline.stages.train import run_train_local

        if config.num_workers > 1:
            raise ConfigError("train.num_workers: --no-ray trains in one process; drop num_workers or use Ray")
        summary = run_train_local(config)
    else:
        summary = run_train(config)
    metrics = {k: v for k, v in summary["metrics"].items() if k.startswith(("val_", "loss_", "step"))}
    print(f"train: {json.dumps(metrics, default=float)}")
    print(f"train: head exported to {summary['head_dir']} (load it with koala bench --drafter)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from pipeline.heads import read_head_metadata
    from serve.config import REGISTRY_PREFIX, ServeConfig

    flags = {"target": "target.spec", "drafter": "drafter", "use_drafter": "use_drafter", "tree": "tree",
             "lookup_tokens": "lookup_tokens", "tree_max_temperature": "tree_max_temperature",
             "draft_dtype": "draft_dtype", "tracking_uri": "tracking.uri", "host": "host", "port": "port", "model_name": "model_name",
             "num_replicas": "num_replicas", "max_replicas": "max_replicas", "api_key_env": "api_key_env"}
    config = ServeConfig.from_dict(_stage_values(args, flags))
    if config.drafter_enabled and not config.drafter_source.startswith(REGISTRY_PREFIX):
        read_head_metadata(config.drafter_source)  # fail on a bad drafter dir before starting Ray
    from serve.app import run_serve

    run_serve(config, blocking=True)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from pipeline.tracking import tracking_uri
    from tune.sweep import register_winner, run_sweep

    values = _stage_values(args, {"out": "out_dir"})
    data_dirs = args.data or list((values.get("train") or {}).get("data_dirs") or [])
    if not data_dirs:
        raise ConfigError("tune: name the distilled data with --data DIR (or train.data_dirs in the YAML)")
    config = SweepConfig.from_dict(values)
    summary = run_sweep(config, data_dirs=data_dirs)
    print(Path(summary["table"]).read_text())
    uri = tracking_uri(config.train.tracking) if config.train.tracking.enabled else None
    if config.register:
        registered = register_winner(summary, model_name=config.model_name, tracking_uri=uri, target=config.train.target)
        if registered:
            print(f"tune: best head {registered['trial']} registered as {registered['model_uri']}")
    if summary["no_champion_reason"]:
        print(f"tune: no champion: {summary['no_champion_reason']}")
    return 0 if summary["winner"] else 1


def cmd_run(args: argparse.Namespace) -> int:
    from jobs.full_pipeline import main as run_pipeline_main

    return run_pipeline_main(["--config", args.config, *(f"--set={item}" for item in args.set)])


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
    if args.out.exists() and not args.out.is_dir():  # checked before the slow target load
        raise ConfigError(f"head init: --out {args.out} is a file; give a directory to write the head to (a new one, "
                          "or a head directory to overwrite)")
    corpus = read_corpus_texts(args.draft_vocab_corpus) if head_config.draft_vocab_size else []  # before the target
    target = load_target_from_config(_target_config(args))
    draft_token_ids = None
    if head_config.draft_vocab_size:
        counts = count_tokens(corpus, target.tokenizer)
        draft_token_ids = top_token_ids(counts, head_config.draft_vocab_size, always_include=sorted(target.eos_token_ids))
    torch.manual_seed(args.seed)
    head = build_head(head_config, target.model, draft_token_ids=draft_token_ids)
    try:
        save_head(head, args.out, target_identity=target_identity_dict(target.model, target.name))
    except OSError as error:  # e.g. a read-only place, or a file in --out's path
        raise ConfigError(f"head init: cannot write the head to --out {args.out} ({error.strerror or error})") from error
    parameters = sum(p.numel() for p in head.parameters())
    print(f"wrote {head_config.head_type} head (K={head_config.num_layers}, {parameters / 1e6:.1f}M parameters) to {args.out}")
    return 0


def cmd_head_tree(args: argparse.Namespace) -> int:
    from pipeline.stages.head_tree import measure_static_tree

    result = measure_static_tree(args.head, args.data, nodes=args.nodes, target=_target_config(args),
                                 val_fraction=args.val_fraction, max_rows=args.max_rows, out_dir=args.out)
    depths = Counter(len(path) for path in result["static_tree"])
    if len(result["static_tree"]) < args.nodes:
        print(f"head tree: only {len(result['static_tree'])} of {args.nodes} paths were ever right on these rows; "
              "measure more rows (--max-rows, more data) for a larger tree")
    print(f"head tree: {len(result['static_tree'])} paths (by depth {dict(sorted(depths.items()))}) from "
          f"{result['rows']} held-out rows ({result['answer_tokens']} answer tokens; validation tau "
          f"{result['metrics'].get('val_tau', 0):.3f}) written to {result['head_dir']} in {result['wall_time_s']:.0f} s")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pipeline.bench import check_report_path, format_table, load_questions, run_bench, write_report
    from pipeline.heads import default_drafter_dir, drafting_dtype, load_head, read_head_metadata
    from pipeline.target import load_target_from_config

    if args.json:
        check_report_path(args.json)

    decode = DecodeConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        draft_length=args.draft_length, seed=args.seed,
    )
    if args.draft_threshold is not None:
        decode = decode.replace(draft_threshold=args.draft_threshold)
    decode = decode.replace(tree=args.tree or decode.tree, tree_nodes=args.tree_nodes, tree_top_k=args.tree_top_k)
    if args.lookup_tokens is not None:
        decode = decode.replace(lookup_tokens=args.lookup_tokens)
    if args.tree_max_temperature is not None:
        decode = decode.replace(tree_max_temperature=args.tree_max_temperature)
    bench = BenchConfig(
        questions=args.questions or "", limit=args.limit, per_category=args.per_category,
        warmup_prompts=args.warmup, include_hf=not args.no_hf, audit=args.audit,
    )
    questions = load_questions(bench.questions, limit=bench.limit, per_category=bench.per_category)
    if args.drafter is None:
        args.drafter = default_drafter_dir(args.target)
        if args.drafter is None:
            raise ConfigError(f"bench: no drafter is shipped for target {args.target!r}; pass --drafter DIR "
                              "(koala train writes one)")
    read_head_metadata(args.drafter)  # fail on a bad drafter dir before the slow target load
    target = load_target_from_config(_target_config(args))
    drafter = load_head(args.drafter, target.model, target_name=target.name, dtype=args.draft_dtype)
    settings = {
        "target": target.name,
        "drafter": str(args.drafter),
        "draft_dtype": drafting_dtype(drafter),
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

    handlers = {("head", "init"): cmd_head_init, ("head", "tree"): cmd_head_tree, ("bench", None): cmd_bench,
                ("distill", None): cmd_distill, ("self-prompts", None): cmd_self_prompts,
                ("train", None): cmd_train, ("tune", None): cmd_tune, ("run", None): cmd_run,
                ("serve", None): cmd_serve}
    handler = handlers[(args.command, getattr(args, "head_command", None))]
    try:
        return handler(args)
    except (ConfigError, TargetLoadError, HeadLoadError, PromptTooLongError) as error:
        print(f"koala {args.command}: error: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        if type(error).__name__ != "SweepInterrupted":  # tune/ is imported lazily: no Ray import for other commands
            raise
        print(f"koala {args.command}: {error}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
