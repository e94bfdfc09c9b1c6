"""Linear layers through oneDNN on the CPU: the same weights and results, a faster matrix product.

PyTorch's `nn.Linear` on a CPU calls MKL's sgemm. For the shapes decoding meets (1 to ~60 rows against weights that
stream from memory every step) PyTorch's own oneDNN kernel (`torch.ops.mkldnn._linear_pointwise`, what
`torch.compile` uses on CPUs) is much faster on the reference machine (AMD EPYC, 2 threads, fp32, SmolLM2-135M):

| rows scored | 1 | 5 | 8 | 16 | 25 | 32 |
|---|---|---|---|---|---|---|
| MKL (`nn.Linear`) | 41.9 ms | 60.5 | 62.5 | 77.0 | 95.0 | 103.1 |
| oneDNN | 27.7 ms | 36.1 | 39.2 | 47.8 | 52.9 | 61.2 |

and a 512-token prefill 0.96 s against 0.52 s. Logits differ from MKL's by rounding only (1e-4 at most there).

`use_onednn_linears(model)` turns every plain `nn.Linear` of a model into `OneDnnLinear`: the same module with the
same parameters (state dicts, tied weights and `.to()` are unchanged), whose forward takes the oneDNN kernel for
fp32 CPU inputs when no gradient is needed and is `nn.Linear`'s otherwise (GPUs, other dtypes, training).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


@functools.cache
def onednn_linear_available() -> bool:
    """Whether this PyTorch has the oneDNN linear kernel and it agrees with `F.linear` on a small product."""
    kernel = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if kernel is None or not torch.backends.mkldnn.is_available():
        return False
    generator = torch.Generator().manual_seed(0)
    inputs, weight, bias = (torch.randn(shape, generator=generator) for shape in ((3, 5, 64), (48, 64), (48,)))
    try:
        with torch.no_grad():
            agrees = torch.allclose(_onednn(inputs, weight, bias), F.linear(inputs, weight, bias), atol=1e-4, rtol=1e-4)
    except RuntimeError as error:  # a build whose oneDNN cannot run on this CPU
        log.info("oneDNN linear kernel unusable here (%s); keeping nn.Linear's", error)
        return False
    return agrees


def _onednn(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(inputs, weight, bias, "none", [], "")


def _takes_onednn(inputs: torch.Tensor, weight: torch.Tensor) -> bool:
    # Autograd has no derivative for the oneDNN kernel: anything that needs a gradient keeps nn.Linear's, and so
    # does a product under CPU autocast (which would have run it in bf16).
    needs_grad = torch.is_grad_enabled() and (inputs.requires_grad or weight.requires_grad)
    return (inputs.device.type == "cpu" and inputs.dtype == weight.dtype == torch.float32 and not needs_grad
            and not torch.is_autocast_enabled("cpu"))


def linear(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, through oneDNN for fp32 CPU inference. For modules `use_onednn_linears` swapped (it checked that
    the kernel works here), and for the weights such a module's owner holds outside an `nn.Linear`."""
    if _takes_onednn(inputs, weight):
        return _onednn(inputs, weight, bias)
    return F.linear(inputs, weight, bias)


class OneDnnLinear(nn.Linear):
    """`nn.Linear` whose fp32 CPU inference runs through oneDNN (see the module docstring)."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return linear(inputs, self.weight, self.bias)


def use_onednn_linears(model: nn.Module) -> int:
    """Turns `model`'s plain `nn.Linear` modules into `OneDnnLinear` in place (subclasses, e.g. quantised layers,
    are left alone); returns how many, 0 where the kernel is unavailable."""
    if not onednn_linear_available():
        return 0
    swapped = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDnnLinear
            swapped += 1
    return swapped


def uses_onednn_linears(model: nn.Module) -> bool:
    return any(isinstance(module, OneDnnLinear) for module in model.modules())
