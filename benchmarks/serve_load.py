"""Bounded load test of the HTTP endpoint: drafter on versus drafter off, measured in one run on 127.0.0.1.

For each mode the script deploys the app (one replica using all CPUs by default), sends one warm-up request, then
for each concurrency level sends `--requests` greedy chat completions from that many client threads, and reports
output tokens/s (all completion tokens / wall time), p50/p95 request latency and tau (tokens per target pass, pooled). The two modes run
one after the other so they never compete for the CPU.

    python benchmarks/serve_load.py --target smollm2 --drafter pipeline/drafters/smollm2-eagle \\
        --concurrency 1 8 --requests 16 --max-tokens 128 --json runs/serve_load.json

`--url http://127.0.0.1:8000/v1` measures an endpoint that is already running instead (one mode, as deployed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from serve.client import post_json  # noqa: E402
from serve.config import ServeConfig  # noqa: E402

DEFAULT_QUESTIONS = REPO / ".." / "shared" / "data" / "mt_bench" / "question.jsonl"
FALLBACK_PROMPTS = [
    "Explain why the sky is blue in two sentences.", "Write a haiku about autumn.",
    "List three uses of a paperclip.", "What is the capital of France, and why is it famous?",
    "Give me a short recipe for pancakes.", "Describe a cat to someone who has never seen one.",
    "Summarise the plot of Romeo and Juliet.", "How do I reverse a list in Python?",
]


def load_prompts(path: Path | None) -> list[str]:
    path = path or DEFAULT_QUESTIONS
    if not path.is_file():
        return FALLBACK_PROMPTS
    return [json.loads(line)["turns"][0] for line in path.read_text().splitlines() if line.strip()]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def run_level(url: str, prompts: list[str], *, model: str, concurrency: int, requests: int, max_tokens: int,
              api_key: str | None, timeout: float) -> dict:
    """`requests` greedy chat completions from `concurrency` threads; raises if any request fails."""

    def one(index: int) -> tuple[float, dict]:
        body = {"model": model, "messages": [{"role": "user", "content": prompts[index % len(prompts)]}],
                "max_tokens": max_tokens, "temperature": 0}
        started = time.perf_counter()
        status, answer = post_json(f"{url}/chat/completions", body, api_key=api_key, timeout=timeout)
        if status != 200:
            raise RuntimeError(f"request {index} failed with HTTP {status}: {answer}")
        return time.perf_counter() - started, answer

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    latencies = [latency for latency, _ in results]
    tokens = sum(answer["usage"]["completion_tokens"] for _, answer in results)
    # tau pooled over the requests (tokens / target passes), as koala bench and the Prometheus counters give it
    passes = sum(answer["speculative"]["target_forward_passes"] for _, answer in results)
    generated = sum(answer["speculative"]["acceptance_length"] * answer["speculative"]["target_forward_passes"]
                    for _, answer in results)
    return {"concurrency": concurrency, "requests": requests, "completion_tokens": tokens, "wall_s": round(wall, 3),
            "output_tokens_per_s": round(tokens / wall, 2), "p50_latency_s": round(percentile(latencies, 50), 3),
            "p95_latency_s": round(percentile(latencies, 95), 3), "mean_tau": round(generated / passes, 3)}


def measure(url: str, prompts: list[str], args: argparse.Namespace, api_key: str | None) -> list[dict]:
    run_level(url, prompts, model=args.model_name, concurrency=1, requests=1, max_tokens=args.max_tokens,
              api_key=api_key, timeout=args.timeout)  # warm-up: first-call allocations are not load
    return [run_level(url, prompts, model=args.model_name, concurrency=c, requests=args.requests,
                      max_tokens=args.max_tokens, api_key=api_key, timeout=args.timeout) for c in args.concurrency]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="smollm2")
    parser.add_argument("--drafter", help="head directory or models:/NAME@champion (needed unless --url)")
    parser.add_argument("--tracking-uri", default="", help="for models:/ drafters")
    parser.add_argument("--url", help="measure this running endpoint instead of deploying two")
    parser.add_argument("--api-key-env", default="", help="environment variable with the endpoint's API key")
    parser.add_argument("--model-name", default="koala")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--requests", type=int, default=16, help="requests per concurrency level (the bound)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--questions", type=Path, help="MT-bench-style JSONL (default ../shared/data/mt_bench)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--cpus-per-replica", type=float, default=float(os.cpu_count() or 1))
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.requests > 1000 or min(args.concurrency) < 1:
        parser.error("--requests must be in 1..1000 and every --concurrency >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prompts = load_prompts(args.questions)
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None

    report: dict = {"target": args.target, "drafter": args.drafter, "max_tokens": args.max_tokens,
                    "prompts": len(prompts), "cpu_count": os.cpu_count(), "modes": {}}
    if args.url:
        report["modes"]["as deployed"] = measure(args.url.rstrip("/"), prompts, args, api_key)
    else:
        if not args.drafter:
            parser.error("--drafter is required unless --url is given")
        import ray
        from ray import serve

        from serve.app import run_serve

        # PYTHONPATH: replicas run this checkout's code even where another copy of the project is installed.
        ray.init(include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
        base = ServeConfig.from_dict({
            "target": {"spec": args.target}, "drafter": args.drafter, "tracking": {"uri": args.tracking_uri},
            "port": args.port, "cpus_per_replica": args.cpus_per_replica, "max_ongoing_requests": 64,
            "max_tokens_limit": max(1024, args.max_tokens), "model_name": args.model_name,
        })
        try:
            for mode, use_drafter in (("drafter off", False), ("drafter on", True)):
                config = base.replace(use_drafter=use_drafter, app_name=mode.replace(" ", "-"))
                url = run_serve(config)
                report["modes"][mode] = measure(url, prompts, args, api_key)
                serve.delete(config.app_name)
        finally:
            serve.shutdown()
            ray.shutdown()

    print(f"{'mode':<12} {'conc':>4} {'reqs':>4} {'tokens':>6} {'tok/s':>8} {'p50 s':>7} {'p95 s':>7} {'tau':>5}")
    for mode, rows in report["modes"].items():
        for row in rows:
            print(f"{mode:<12} {row['concurrency']:>4} {row['requests']:>4} {row['completion_tokens']:>6} "
                  f"{row['output_tokens_per_s']:>8.2f} {row['p50_latency_s']:>7.3f} {row['p95_latency_s']:>7.3f} "
                  f"{row['mean_tau']:>5.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
