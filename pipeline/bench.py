"""`koala bench`: our vanilla decoder, our speculative decoder, HF `generate` and HF prompt-lookup decoding,
timed alternately on the same prompts in one process.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from pipeline import audit as losslessness
from pipeline import metrics
from pipeline.config import BenchConfig, ConfigError, DecodeConfig
from pipeline.decoding import GenerationStats, generate
from pipeline.heads import DraftHead
from pipeline.target import Target

log = logging.getLogger(__name__)

DEFAULT_QUESTIONS = Path("../shared/data/mt_bench/question.jsonl")
METHODS = ("vanilla", "speculative", "hf_generate", "hf_prompt_lookup")
WARMUP_TOKENS = 16


@dataclass(frozen=True)
class Question:
    question_id: str
    category: str
    prompt: str


def default_questions_path() -> Path | None:
    """MT-bench from ../shared/data, relative to the working directory or to the repository root."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        candidate = (base / DEFAULT_QUESTIONS).resolve()
        if candidate.is_file():
            return candidate
    return None


def load_questions(path: str | Path | None, *, limit: int = 0, per_category: int = 0) -> list[Question]:
    """MT-bench-style JSONL (`turns[0]` is the prompt); also accepts `prompt` or `question` fields."""
    if not path:
        path = default_questions_path()
        if path is None:
            raise ConfigError(f"bench.questions: no questions file given and {DEFAULT_QUESTIONS} is not present; pass --questions FILE")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"bench.questions: {path} does not exist")
    questions: list[Question] = []
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ConfigError(f"bench.questions: {path}:{line_number} is not JSON ({error.msg})") from error
        prompt = (record.get("turns") or [None])[0] or record.get("prompt") or record.get("question")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(f"bench.questions: {path}:{line_number} has no prompt (expected turns[0], prompt or question)")
        questions.append(
            Question(str(record.get("question_id", line_number)), str(record.get("category", "all")), prompt)
        )
    if per_category:
        taken: dict[str, int] = defaultdict(int)
        kept = []
        for question in questions:
            if taken[question.category] < per_category:
                taken[question.category] += 1
                kept.append(question)
        questions = kept
    if limit:
        questions = questions[:limit]
    if not questions:
        raise ConfigError(f"bench.questions: {path} holds no questions")
    return questions


def _hf_generate(target: Target, prompt_ids: torch.Tensor, decode: DecodeConfig, **extra: Any) -> GenerationStats:
    """Times HF `generate` with the same stopping rules (EOS, max_new_tokens) and sampling settings. `top_k=0`:
    transformers otherwise adds its default top-50 cut, which our decoders do not make."""
    sampling = {} if decode.greedy else {"temperature": decode.temperature, "top_p": decode.top_p, "top_k": 0}
    eos = sorted(target.eos_token_ids)
    pad = target.pad_token_id
    if target.device.type == "cuda":
        torch.cuda.synchronize(target.device)
    started = time.perf_counter()
    with torch.inference_mode():
        output = target.model.generate(
            input_ids=prompt_ids,
            attention_mask=torch.ones_like(prompt_ids),
            max_new_tokens=decode.max_new_tokens,
            do_sample=not decode.greedy,
            eos_token_id=eos,
            pad_token_id=pad,
            **sampling,
            **extra,
        )
    if target.device.type == "cuda":
        torch.cuda.synchronize(target.device)
    elapsed = time.perf_counter() - started
    new_tokens = output.shape[1] - prompt_ids.shape[1]
    return GenerationStats(prompt_tokens=prompt_ids.shape[1], new_tokens=new_tokens, wall_time_s=elapsed)


def _run_all_methods(
    target: Target, drafter: DraftHead, prompt_ids: torch.Tensor, decode: DecodeConfig, bench: BenchConfig, *,
    speculative_first: bool = False,
) -> dict[str, Any]:
    """Every method on one prompt. `speculative_first` swaps which of our two decoders runs first (the caller
    alternates it per prompt), so an effect of running order (caches, clocks) falls on both alike."""
    audit = bench.audit and decode.greedy  # the audit's argmax checks are about greedy decoding

    def vanilla_run():
        return generate(target, prompt_ids, config=decode, record_logits=audit)

    def speculative_run():
        return generate(target, prompt_ids, config=decode, drafter=drafter, record_logits=audit)

    if speculative_first:
        speculative = speculative_run()
        vanilla = vanilla_run()
    else:
        vanilla = vanilla_run()
        speculative = speculative_run()
    record: dict[str, Any] = {
        "vanilla": vanilla.stats,
        "speculative": speculative.stats,
        "exact_match": vanilla.token_ids == speculative.token_ids,
        "draft_vocab_coverage": drafter.vocabulary.coverage(vanilla.token_ids),
    }
    if audit:
        record["audit"] = losslessness.compare(target, prompt_ids, vanilla, speculative)
    if bench.include_hf:
        record["hf_generate"] = _hf_generate(target, prompt_ids, decode)
        record["hf_prompt_lookup"] = _hf_generate(
            target, prompt_ids, decode, prompt_lookup_num_tokens=bench.prompt_lookup_num_tokens
        )
    return record


def run_bench(
    target: Target,
    drafter: DraftHead,
    questions: list[Question],
    *,
    decode: DecodeConfig,
    bench: BenchConfig,
    settings: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs every method on every question (alternating, same process; our two decoders swap order on every other
    prompt) and returns the report dict."""
    if not questions:  # every rate and share below would divide by zero prompts (or report 0 tokens/s)
        raise ConfigError("bench: no prompts to benchmark (the question list is empty, e.g. after --limit, "
                          "--per-category or the training-overlap filter); pass at least one question")
    warmup = decode.replace(max_new_tokens=min(WARMUP_TOKENS, decode.max_new_tokens))
    for question in questions[: bench.warmup_prompts]:
        _run_all_methods(target, drafter, target.encode_prompt(question.prompt), warmup, bench)

    per_method: dict[str, list[GenerationStats]] = defaultdict(list)
    per_prompt = []
    audits: list[losslessness.PromptAudit] = []
    for index, question in enumerate(tqdm(questions, desc="koala bench", unit="prompt", disable=not progress)):
        prompt_ids = target.encode_prompt(question.prompt)
        record = _run_all_methods(target, drafter, prompt_ids, decode, bench, speculative_first=index % 2 == 1)
        for method in METHODS:
            if method in record:
                per_method[method].append(record[method])
        spec: GenerationStats = record["speculative"]
        per_prompt.append({
            "question_id": question.question_id,
            "category": question.category,
            "prompt_tokens": spec.prompt_tokens,
            "new_tokens": spec.new_tokens,
            "tau": spec.acceptance_length,
            "tree_nodes": spec.tree_nodes,
            "lookup_accepted": spec.lookup_accepted,
            "exact_match": record["exact_match"],
            "draft_vocab_coverage": record["draft_vocab_coverage"],
            **{f"{m}_s": round(record[m].wall_time_s, 4) for m in METHODS if m in record},
        })
        if "audit" in record:
            audits.append(record["audit"])
    report = build_report(per_method, per_prompt, decode=decode, settings=settings or {})
    if audits:
        losslessness.classify(audits)
        for row, audit in zip(per_prompt, audits):
            row["audit"] = audit.to_dict()
        report["audit"] = losslessness.summarize(audits)
        report.update(near_tie_divergences=report["audit"]["near_tie_divergences"],
                      lossless_violations=report["audit"]["lossless_violations"])
    return report


def build_report(
    per_method: dict[str, list[GenerationStats]],
    per_prompt: list[dict[str, Any]],
    *,
    decode: DecodeConfig,
    settings: dict[str, Any],
) -> dict[str, Any]:
    vanilla, speculative = per_method["vanilla"], per_method["speculative"]
    tokens_per_s = {method: metrics.tokens_per_second(stats) for method, stats in per_method.items()}
    target_step = metrics.target_ms_per_forward(vanilla)
    draft_step = metrics.draft_ms_per_token(speculative)
    exact = [p["exact_match"] for p in per_prompt]
    return {
        "n_prompts": len(per_prompt),
        "speedup": metrics.speedup(speculative, vanilla),
        "tau": metrics.acceptance_length(speculative),
        # n-alpha for every drafted position (at least 1..3, so reports of short drafts keep their columns).
        "alpha": metrics.n_alpha(speculative, max_n=max(3, max((len(s.evaluated) for s in speculative), default=0))),
        # Token-for-token equality is the guarantee only for greedy decoding.
        "exact_match": sum(exact) / len(exact) if decode.greedy else None,
        # The draft tree's node budgets the speculative runs used (an `auto` budget resolved; 0 = chains).
        "tree_nodes": sorted({s.tree_nodes for s in speculative}),
        # Of the speculative run's tokens, the share only the prompt-lookup branch had drafted (`lookup_tokens`).
        "lookup_share": (sum(s.lookup_accepted for s in speculative) / max(1, metrics.total_tokens(speculative))
                         if decode.lookup_tokens else None),
        # The share of vanilla's tokens the draft vocabulary holds (None: the full vocabulary), pooled over tokens.
        "draft_vocab_coverage": _pooled_coverage(per_prompt, [s.new_tokens for s in vanilla]),
        "by_category": metrics.by_group([p["category"] for p in per_prompt], speculative, vanilla),
        "tokens_per_s": tokens_per_s,
        "vanilla_vs_hf_generate": (
            tokens_per_s["vanilla"] / tokens_per_s["hf_generate"] if tokens_per_s.get("hf_generate") else None
        ),
        "step_cost": {
            "target_step_ms": target_step,
            "draft_ms_per_token": draft_step,
            "draft_to_target_ratio": draft_step / target_step if draft_step and target_step else None,
            "verify_forward_ms": metrics.target_ms_per_forward(speculative),
        },
        "total_new_tokens": {method: metrics.total_tokens(stats) for method, stats in per_method.items()},
        "total_time_s": {method: metrics.total_time(stats) for method, stats in per_method.items()},
        "settings": {**settings, **decode.to_dict()},
        "per_prompt": per_prompt,
    }


def _pooled_coverage(per_prompt: list[dict[str, Any]], vanilla_tokens: list[int]) -> float | None:
    shares = [(p["draft_vocab_coverage"], n) for p, n in zip(per_prompt, vanilla_tokens)
              if p.get("draft_vocab_coverage") is not None]
    total = sum(n for _, n in shares)
    return sum(share * n for share, n in shares) / total if total else None


def format_table(report: dict[str, Any]) -> str:
    rows = [("method", "tokens/s", "vs vanilla")]
    base = report["tokens_per_s"]["vanilla"]
    for method in METHODS:
        if method in report["tokens_per_s"]:
            rate = report["tokens_per_s"][method]
            rows.append((method, f"{rate:.2f}", f"{rate / base:.3f}x" if base else "-"))
    width = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(width[i]) for i, cell in enumerate(row)) for row in rows]
    alpha = ", ".join("-" if a is None else f"{a:.3f}" for a in report["alpha"])
    exact = "n/a (sampling)" if report["exact_match"] is None else f"{report['exact_match']:.3f}"
    cost = report["step_cost"]
    ratio = "-" if cost["draft_to_target_ratio"] is None else f"{cost['draft_to_target_ratio']:.3f}"
    target_ms = "-" if cost["target_step_ms"] is None else f"{cost['target_step_ms']:.1f}"
    draft_ms = "-" if cost["draft_ms_per_token"] is None else f"{cost['draft_ms_per_token']:.1f}"
    lines += [
        "",
        f"prompts {report['n_prompts']}  speedup {report['speedup']:.3f}x  tau {report['tau']:.3f}  "
        f"alpha(1..{len(report['alpha'])}) [{alpha}]  exact_match {exact}",
        f"target step {target_ms} ms  draft step {draft_ms} ms/token  draft/target {ratio}  "
        f"tree nodes {_describe_trees(report.get('tree_nodes', []))}"
        + (f"  lookup branch {report['lookup_share']:.1%} of tokens" if report.get("lookup_share") is not None
           else ""),
    ]
    categories = report.get("by_category") or {}
    if len(categories) > 1:
        lines.append("by category (tau, speedup): " + ", ".join(
            f"{name} {entry['tau']:.2f} {entry['speedup']:.2f}x" for name, entry in categories.items()))
    if report.get("draft_vocab_coverage") is not None:
        lines.append(f"draft vocabulary holds {report['draft_vocab_coverage']:.1%} of the generated tokens")
    if "audit" in report:
        audit = report["audit"]
        exact_prompts = round(audit["exact_match"] * report["n_prompts"])
        lines.append(f"audit: {exact_prompts} exact, {audit['near_tie_divergences']} near-tie divergences, "
                     f"{audit['lossless_violations']} lossless violations (reference noise "
                     f"{audit['reference_noise']:.3g})")
    return "\n".join(lines)


def _describe_trees(budgets: list[int]) -> str:
    return ", ".join(str(nodes) if nodes else "none (chains)" for nodes in budgets) or "-"


def check_report_path(path: str | Path) -> None:
    """Fails before a benchmark runs, not after, when its report could not be written to `path`."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"bench: --json {path} is a directory; name a file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.with_name(f".{path.name}.{os.getpid()}.probe")
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"bench: --json {path} cannot be written ({error.strerror or error})") from None


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def drop_training_overlap(questions: list[Question], training_prompt_ids: set[str]) -> tuple[list[Question], int]:
    """Evaluation prompts must be unseen: drops questions whose prompt (as a one-turn conversation, hashed the way
    the distillation data hashes prompts) is in the training data. Returns (kept, dropped count)."""
    from pipeline.data import content_hash

    kept = [q for q in questions
            if content_hash([{"role": "user", "content": q.prompt.strip()}]) not in training_prompt_ids]
    return kept, len(questions) - len(kept)


def evaluate_head(target: Target, drafter: DraftHead, questions: list[Question], *, decode: DecodeConfig,
                  bench: BenchConfig) -> dict[str, Any]:
    """A trial's measurement: speculative vs vanilla on the same prompts, flattened to scalar metrics."""
    report = run_bench(target, drafter, questions, decode=decode, bench=bench.replace(include_hf=False, audit=True),
                       progress=False)
    alpha = {f"alpha_{n}": a for n, a in enumerate(report["alpha"], start=1)}
    return {
        "speedup": report["speedup"],
        "tau": report["tau"],
        **alpha,
        "exact_match": report["exact_match"],
        "near_tie_divergences": report.get("near_tie_divergences"),
        "lossless_violations": report.get("lossless_violations"),
        "eval_dtype": str(target.model.dtype).removeprefix("torch."),
        "vanilla_tokens_per_s": report["tokens_per_s"]["vanilla"],
        "speculative_tokens_per_s": report["tokens_per_s"]["speculative"],
        "draft_to_target_ratio": report["step_cost"]["draft_to_target_ratio"],
        "eval_prompts": report["n_prompts"],
        "eval_new_tokens": report["total_new_tokens"]["speculative"],
    }
