"""oneDNN linear layers on the CPU (pipeline/cpu_linear.py): same results and parameters as nn.Linear, the fast
kernel exactly where no gradient, GPU, autocast or other dtype needs nn.Linear's own, and decoding still lossless."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline import cpu_linear
from pipeline.config import ConfigError, DecodeConfig, HeadConfig, TargetConfig
from pipeline.cpu_linear import (
    OneDnnLinear, onednn_linear_available, packs_weights, use_onednn_linears, uses_onednn_linears,
)
from pipeline.decoding import generate
from pipeline.heads import build_head
from pipeline.target import Target, load_target

from conftest import char_tokenizer, tiny_llama

pytestmark = pytest.mark.skipif(not onednn_linear_available(),
                                reason="this PyTorch build has no usable oneDNN linear kernel")


@pytest.fixture
def kernel_calls(monkeypatch) -> list[tuple[int, ...]]:
    """The input shapes the oneDNN kernel was called with."""
    calls: list[tuple[int, ...]] = []
    real = cpu_linear._onednn

    def spy(inputs, weight, bias, *, pack):
        calls.append(tuple(inputs.shape))
        return real(inputs, weight, bias, pack=pack)

    monkeypatch.setattr(cpu_linear, "_onednn", spy)
    return calls


def _pair(bias: bool) -> tuple[nn.Linear, OneDnnLinear]:
    torch.manual_seed(0)
    plain = nn.Linear(48, 96, bias=bias)
    fast = nn.Linear(48, 96, bias=bias)
    fast.load_state_dict(plain.state_dict())
    assert use_onednn_linears(fast) == 1
    return plain, fast


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 48), (5, 48), (2, 7, 48), (0, 48)])
def test_onednn_linear_matches_nn_linear_and_uses_the_kernel(shape, bias, kernel_calls):
    plain, fast = _pair(bias)
    inputs = torch.randn(shape)
    with torch.inference_mode():
        expected, actual = plain(inputs), fast(inputs)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    assert kernel_calls == [shape]


def test_training_keeps_nn_linear_and_its_gradients(kernel_calls):
    plain, fast = _pair(True)
    inputs = torch.randn(4, 48)
    plain(inputs).square().sum().backward()
    fast(inputs).square().sum().backward()
    torch.testing.assert_close(fast.weight.grad, plain.weight.grad)
    torch.testing.assert_close(fast.bias.grad, plain.bias.grad)
    frozen = _pair(False)[1].requires_grad_(False)
    wanted = torch.randn(4, 48, requires_grad=True)
    frozen(wanted).sum().backward()  # a gradient for the input, through a frozen layer
    assert wanted.grad is not None
    assert kernel_calls == []
    with torch.no_grad():
        fast(inputs)
    assert kernel_calls == [(4, 48)]


def test_fp16_and_autocast_keep_nn_linear(kernel_calls):
    _, fast = _pair(True)
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert fast(torch.randn(3, 48)).dtype == torch.bfloat16
        half = _pair(True)[1].to(torch.float16)
        assert half(torch.randn(3, 48, dtype=torch.float16)).dtype == torch.float16
    assert kernel_calls == []


def test_bf16_keeps_nn_linear_without_bf16_units(kernel_calls, monkeypatch):
    monkeypatch.setattr(cpu_linear, "onednn_bf16_available", lambda: False)
    plain, fast = (module.to(torch.bfloat16) for module in _pair(True))
    inputs = torch.randn(3, 48, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(fast(inputs), plain(inputs))
    assert kernel_calls == []


@pytest.mark.skipif(not cpu_linear.onednn_bf16_available(), reason="this CPU has no bf16 units for oneDNN")
def test_bf16_takes_the_kernel_with_bf16_units(kernel_calls):
    plain, fast = (module.to(torch.bfloat16) for module in _pair(True))
    inputs = torch.randn(2, 5, 48, dtype=torch.bfloat16)
    with torch.inference_mode():
        expected, actual = plain(inputs), fast(inputs)
    assert actual.dtype == torch.bfloat16
    torch.testing.assert_close(actual.float(), expected.float(), atol=0.05, rtol=0.02)  # bf16 rounding
    assert kernel_calls == [(2, 5, 48)]


def test_swapping_keeps_parameters_tied_weights_and_subclasses():
    model = tiny_llama()
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as SmolLM2's are
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    class Quantised(nn.Linear):
        pass

    model.model.layers[0].mlp.down_proj.__class__ = Quantised
    linears = sum(type(m) is nn.Linear for m in model.modules())
    assert use_onednn_linears(model) == linears
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert type(model.model.layers[0].mlp.down_proj) is Quantised
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)


def test_load_target_chooses_the_kernel_from_the_config(tiny_model_dir):
    fast = load_target(str(tiny_model_dir), device="cpu")
    assert uses_onednn_linears(fast.model) and packs_weights(fast.model)
    lean = load_target(str(tiny_model_dir), device="cpu", cpu_linear="onednn-unpacked")
    assert uses_onednn_linears(lean.model) and not packs_weights(lean.model)
    head = build_head(HeadConfig(head_type="eagle", num_heads=2), lean.model)
    assert uses_onednn_linears(head) and not packs_weights(head)  # the head follows the target's choice
    with torch.inference_mode():
        lean.model(torch.tensor([[1, 2, 3]]))
        head.logits(torch.randn(2, lean.model.config.hidden_size))
    lean_weights = [p for p in [*lean.model.parameters(), *head.buffers()] if p.dim() == 2]
    assert not any(weight in cpu_linear._packed_weights for weight in lean_weights)  # no second copy made
    plain = load_target(str(tiny_model_dir), device="cpu", cpu_linear="torch")
    assert not uses_onednn_linears(plain.model)
    with pytest.raises(ConfigError, match="cpu_linear"):
        TargetConfig.from_dict({"cpu_linear": "mkl"})


@pytest.mark.parametrize("head_type", ["eagle", "medusa"])
def test_speculative_decoding_through_onednn_equals_vanilla(head_type, kernel_calls):
    model = tiny_llama()
    use_onednn_linears(model)
    target = Target(model=model, tokenizer=char_tokenizer(), name="tiny-llama", prompt_format="plain")
    head = build_head(HeadConfig(head_type=head_type, num_heads=3, num_layers=1), model).eval()
    assert uses_onednn_linears(head)  # the head follows the target's kernels
    prompt = target.encode_prompt("Hello there, how are you")
    vanilla = generate(target, prompt, config=DecodeConfig(max_new_tokens=24))
    calls_in_vanilla = len(kernel_calls)
    speculative = generate(target, prompt, config=DecodeConfig(max_new_tokens=24), drafter=head)
    assert speculative.token_ids == vanilla.token_ids
    assert calls_in_vanilla > 0 and len(kernel_calls) > calls_in_vanilla


def test_each_weight_is_packed_once_and_repacked_when_it_changes():
    plain, fast = _pair(True)
    inputs = torch.randn(3, 48)
    with torch.inference_mode():
        first = cpu_linear.packed_weight(fast.weight)
        fast(inputs)
        assert cpu_linear.packed_weight(fast.weight) is first  # reused, not reordered per call
    # An optimiser step changes the weight in place: inference afterwards must see the new values.
    optimizer = torch.optim.SGD(fast.parameters(), lr=0.5)
    fast(inputs).square().sum().backward()
    optimizer.step()
    with torch.no_grad():
        plain.load_state_dict(fast.state_dict())
        torch.testing.assert_close(fast(inputs), plain(inputs), atol=1e-5, rtol=1e-5)
        assert cpu_linear.packed_weight(fast.weight) is not first
        fast.load_state_dict(_pair(True)[0].state_dict() | {"bias": fast.bias * 0})  # and after load_state_dict
        plain.load_state_dict(fast.state_dict())
        torch.testing.assert_close(fast(inputs), plain(inputs), atol=1e-5, rtol=1e-5)


def test_packed_copies_do_not_outlive_their_weights():
    _, fast = _pair(False)
    with torch.inference_mode():
        fast(torch.randn(2, 48))
    weight = fast.weight
    assert weight in cpu_linear._packed_weights
    entries = len(cpu_linear._packed_weights)
    del fast, weight
    assert len(cpu_linear._packed_weights) == entries - 1


def test_weights_made_under_inference_mode_stay_dense_and_correct(kernel_calls):
    with torch.inference_mode():
        plain = nn.Linear(48, 96)  # inference tensors: no version counter to tell a change
        fast = nn.Linear(48, 96)
        fast.load_state_dict(plain.state_dict())
        use_onednn_linears(fast)
        inputs = torch.randn(4, 48)
        assert cpu_linear.packed_weight(fast.weight) is fast.weight
        torch.testing.assert_close(fast(inputs), plain(inputs), atol=1e-5, rtol=1e-5)
        fast.weight.add_(1.0)
        plain.weight.add_(1.0)
        torch.testing.assert_close(fast(inputs), plain(inputs), atol=1e-5, rtol=1e-5)
    assert kernel_calls == [(4, 48), (4, 48)]
