"""Linear layers through oneDNN on the CPU: the same weights and results, a faster matrix product.

PyTorch's `nn.Linear` on a CPU calls MKL's sgemm. For the shapes decoding meets (1 to ~60 rows against weights that
stream from memory every step) PyTorch's own oneDNN kernel (`torch.ops.mkldnn._linear_pointwise`, what
`torch.compile` uses on CPUs) is much faster. Given a plain dense weight, that kernel reorders it into oneDNN's
blocked layout on every call, and for a few rows the reorder costs as much as the product, so each weight is
reordered once (`packed_weight`, outputs bit-identical) and the copy kept until the weight changes. The price is
memory: a second copy of every linear weight that runs through oneDNN (SmolLM2 fp32: +515 MB resident, 1.47 GB
against 0.96); `pack_weights=False` (`cpu_linear: onednn-unpacked`) keeps one copy. On the reference machine (AMD
EPYC, 2 threads, SmolLM2-135M fp32, a 300-token context, best of 5, the three measured back to back):

| rows scored | 1 | 2 | 5 | 8 | 12 | 16 | 25 | 32 | 512-token prefill |
|---|---|---|---|---|---|---|---|---|---|
| MKL (`nn.Linear`) | 41.8 ms | 70.3 | 59.8 | 63.7 | 69.6 | 78.8 | 97.5 | 104.2 | 0.74 s |
| oneDNN, dense weights | 26.1 ms | 34.3 | 37.5 | 39.8 | 43.0 | 47.0 | 52.9 | 58.8 | 0.43 s |
| oneDNN, packed weights | 25.1 ms | 28.0 | 28.4 | 31.4 | 33.8 | 36.6 | 45.0 | 50.6 | 0.42 s |

Logits differ from MKL's by rounding only (1e-4 at most).

On a CPU with bf16 units (`onednn_bf16_available`) bf16 products take the same kernel with packed weights, about
twice as fast as fp32 for the few rows of a draft step, where PyTorch's own bf16 `F.linear` gains a quarter
(`python benchmarks/linear_kernels.py`: one product of 1 row, weights streaming from memory, the reference machine):

| out x in | fp32 MKL | fp32 oneDNN packed | bf16 `F.linear` | bf16 oneDNN packed |
|---|---|---|---|---|
| 576 -> 1536 (MLP) | 295 us | 97 | 78 | 46 |
| 576 -> 8192 (an 8k draft vocabulary's LM head) | 1577 us | 760 | 541 | 350 |

Draft heads of fp32 targets draft in bf16 for that reason (`heads.inference_dtype`); a target loaded in bf16 takes
the kernel too.

`use_onednn_linears(model)` turns every plain `nn.Linear` of a model into `OneDnnLinear`: the same module with the
same parameters (state dicts, tied weights and `.to()` are unchanged), whose forward takes the oneDNN kernel for
fp32 (and, with bf16 units, bf16) CPU inputs when no gradient is needed and is `nn.Linear`'s otherwise (GPUs,
other dtypes, training).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

log = logging.getLogger(__name__)


@functools.cache
def onednn_linear_available() -> bool:
    """Whether this PyTorch has the oneDNN linear kernel and weight packing, and they agree with `F.linear` on a
    small product."""
    kernels = getattr(torch.ops, "mkldnn", None)
    if not all(hasattr(kernels, name) for name in ("_linear_pointwise", "_reorder_linear_weight")):
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    generator = torch.Generator().manual_seed(0)
    inputs, weight, bias = (torch.randn(shape, generator=generator) for shape in ((3, 5, 64), (48, 64), (48,)))
    try:
        with torch.no_grad():
            expected = F.linear(inputs, weight, bias)
            agrees = all(torch.allclose(_onednn(inputs, weight, bias, pack=pack), expected, atol=1e-4, rtol=1e-4)
                         for pack in (False, True))
    except RuntimeError as error:  # a build whose oneDNN cannot run on this CPU
        log.info("oneDNN linear kernel unusable here (%s); keeping nn.Linear's", error)
        return False
    return agrees


@functools.cache
def onednn_bf16_available() -> bool:
    """Whether the oneDNN kernel also takes bf16 products here: a CPU with bf16 units (AVX512-BF16, AMX), on which
    it agrees with `F.linear` in bf16. Elsewhere oneDNN would emulate bf16, slower than fp32."""
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if not onednn_linear_available() or supported is None or not supported():
        return False
    generator = torch.Generator().manual_seed(0)
    inputs, weight = (torch.randn(shape, generator=generator).bfloat16() for shape in ((3, 64), (48, 64)))
    try:
        with torch.no_grad():
            agrees = torch.allclose(_onednn(inputs, weight, None, pack=True).float(),
                                    F.linear(inputs, weight).float(), atol=0.1, rtol=0.02)
    except RuntimeError as error:
        log.info("oneDNN bf16 linear kernel unusable here (%s); keeping nn.Linear's for bf16", error)
        return False
    return agrees


def _onednn(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, pack: bool) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(inputs, packed_weight(weight) if pack else weight, bias, "none", [], "")


# The row count oneDNN lays a packed weight out for. Products of any row count take the packed copy; 8 (a CPU
# verify pass) and 32 were equally good from 1 to 64 rows, and a layout for 1 row made 2-8 rows twice as dear.
PACKED_FOR_ROWS = 8
_packed_weights: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight -> ((data_ptr, version), packed copy)


def packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """`weight` reordered into oneDNN's blocked layout, made on first use and again whenever the weight's storage or
    version counter changes (an optimiser step, `load_state_dict`, `.to()`), so a stale copy is never used. A weight
    created under inference mode has no version counter: it stays dense, and the kernel reorders it per call."""
    if weight.is_inference():
        return weight
    stamp = (weight.data_ptr(), weight._version)
    entry = _packed_weights.get(weight)
    if entry is None or entry[0] != stamp:
        entry = (stamp, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACKED_FOR_ROWS))
        _packed_weights[weight] = entry
    return entry[1]


def _takes_onednn(inputs: torch.Tensor, weight: torch.Tensor) -> bool:
    # Autograd has no derivative for the oneDNN kernel: anything that needs a gradient keeps nn.Linear's, and so
    # does a product under CPU autocast (which would have run it in bf16).
    needs_grad = torch.is_grad_enabled() and (inputs.requires_grad or weight.requires_grad)
    if inputs.device.type != "cpu" or inputs.dtype != weight.dtype or needs_grad or torch.is_autocast_enabled("cpu"):
        return False
    return inputs.dtype == torch.float32 or (inputs.dtype == torch.bfloat16 and onednn_bf16_available())


def linear(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           pack: bool = True) -> torch.Tensor:
    """`F.linear`, through oneDNN for fp32 or bf16 CPU inference (with the weight's packed copy if `pack`). For modules
    `use_onednn_linears` swapped (it checked that the kernel works here), and for the weights such a module's owner
    holds outside an `nn.Linear`."""
    if _takes_onednn(inputs, weight):
        return _onednn(inputs, weight, bias, pack=pack)
    return F.linear(inputs, weight, bias)


class OneDnnLinear(nn.Linear):
    """`nn.Linear` whose fp32 (or bf16) CPU inference runs through oneDNN (see the module docstring)."""

    pack_weight: bool = True  # set per module by use_onednn_linears

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return linear(inputs, self.weight, self.bias, pack=self.pack_weight)


def use_onednn_linears(model: nn.Module, *, pack_weights: bool = True) -> int:
    """Turns `model`'s plain `nn.Linear` modules into `OneDnnLinear` in place (subclasses, e.g. quantised layers,
    are left alone), packing their weights on first use unless `pack_weights` is False; returns how many, 0 where
    the kernel is unavailable."""
    if not onednn_linear_available():
        return 0
    swapped = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDnnLinear
            module.pack_weight = pack_weights
            swapped += 1
    return swapped


def uses_onednn_linears(model: nn.Module) -> bool:
    return any(isinstance(module, OneDnnLinear) for module in model.modules())


def packs_weights(model: nn.Module) -> bool:
    """Whether `model`'s oneDNN linears use packed weights (False when it has none)."""
    return any(isinstance(module, OneDnnLinear) and module.pack_weight for module in model.modules())
