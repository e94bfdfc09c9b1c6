"""Times one CPU linear product per kernel and dtype: what `pipeline/cpu_linear.py` chooses between.

    python benchmarks/linear_kernels.py [--rows 1 4] [--repeats 200]

Shapes are SmolLM2's and its draft head's (576 -> 1536 MLP, 1152 -> 576 EAGLE fc, 576 -> 8192 LM head over an 8k
draft vocabulary). Each timing cycles through 8 copies of the weight (about 2-150 MB), so weights stream from
memory as they do in decoding, where the target's 0.5 GB passes through the caches between two draft steps.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cpu_linear import _onednn, onednn_bf16_available, onednn_linear_available  # noqa: E402

SHAPES = ((1536, 576), (576, 1152), (8192, 576))  # (out, in)
COPIES = 8


def _time(product, repeats: int) -> float:
    for _ in range(10):
        product()
    started = time.perf_counter()
    for _ in range(repeats):
        product()
    return (time.perf_counter() - started) / repeats * 1e6


def _cycling(function, weights, inputs):
    state = {"index": 0}

    def product():
        state["index"] = (state["index"] + 1) % len(weights)
        return function(inputs, weights[state["index"]])
    return product


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=200)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not onednn_linear_available():
        raise SystemExit("this PyTorch has no usable oneDNN linear kernel")
    kernels = {
        "fp32 F.linear (MKL)": (torch.float32, F.linear),
        "fp32 oneDNN packed": (torch.float32, lambda x, w: _onednn(x, w, None, pack=True)),
        "bf16 F.linear": (torch.bfloat16, F.linear),
    }
    if onednn_bf16_available():
        kernels["bf16 oneDNN packed"] = (torch.bfloat16, lambda x, w: _onednn(x, w, None, pack=True))
    print(f"threads {torch.get_num_threads()}, bf16 oneDNN {'available' if onednn_bf16_available() else 'unavailable'}")
    print("| rows | out x in | " + " | ".join(kernels) + " |")
    print("|---" * (len(kernels) + 2) + "|")
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode(False), torch.no_grad():
        for rows in args.rows:
            for out_features, in_features in SHAPES:
                master = [torch.randn(out_features, in_features, generator=generator) for _ in range(COPIES)]
                inputs = torch.randn(1, rows, in_features, generator=generator)
                cells = []
                for dtype, function in kernels.values():
                    weights = [weight.to(dtype) for weight in master]
                    cells.append(f"{_time(_cycling(function, weights, inputs.to(dtype)), args.repeats):.0f} us")
                print(f"| {rows} | {out_features} x {in_features} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
