"""Draft heads: K distinct layers, identity init, cache consistency, save/load, target checks."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from conftest import char_tokenizer, make_tiny_target, tiny_llama
from pipeline.cli import main
from pipeline import heads as heads_module
from pipeline.config import ConfigError, HeadConfig
from pipeline.cpu_linear import use_onednn_linears
from pipeline.decoding import DecodeConfig, generate
from pipeline.heads import (
    HEAD_CONFIG_FILE,
    HeadLoadError,
    ResBlock,
    build_head,
    inference_dtype,
    load_head,
    save_head,
    target_identity_dict,
)
from pipeline.vocab import count_tokens, top_token_ids


def _features(target, length=6):
    ids = torch.randint(3, target.model.config.vocab_size, (1, length)).to(target.device)
    with torch.no_grad():
        return ids, target.model(ids, output_hidden_states=True).hidden_states[-1]


@pytest.mark.parametrize("head_type", ["medusa", "eagle"])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_k_layers_have_distinct_parameters(tiny_target, head_type, num_layers):
    head = build_head(HeadConfig(head_type=head_type, num_layers=num_layers, num_heads=2), tiny_target.model)
    if head_type == "medusa":
        blocks = [block for medusa_head in head.heads for block in medusa_head if isinstance(block, ResBlock)]
        assert len(blocks) == 2 * num_layers
    else:
        blocks = list(head.layers)
        assert len(blocks) == num_layers
        assert all(type(layer).__name__ == "LlamaDecoderLayer" for layer in blocks)
    pointers = {p.data_ptr() for block in blocks for p in block.parameters()}
    assert len(pointers) == sum(1 for block in blocks for _ in block.parameters())


def test_fresh_medusa_block_is_identity_and_head_is_target_lm_head(tiny_target):
    block = ResBlock(16)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(block(x), x)
    head = build_head(HeadConfig(head_type="medusa", num_layers=3, num_heads=2), tiny_target.model)
    _, features = _features(tiny_target)
    with torch.no_grad():
        logits = head(features)  # (num_heads, B, T, V)
        expected = tiny_target.model.lm_head(features)
    assert logits.shape == (2, *expected.shape)
    torch.testing.assert_close(logits[0], expected)
    torch.testing.assert_close(logits[1], expected)


def test_eagle_incremental_cache_matches_full_forward(tiny_target):
    """Feeding positions one by one through the head's KV cache equals one causal forward over all of them."""
    head = build_head(HeadConfig(head_type="eagle", num_layers=2), tiny_target.model)
    ids, features = _features(tiny_target, length=7)
    next_ids = torch.roll(ids, -1, dims=1)
    with torch.no_grad():
        full = head(features, next_ids)
        state = head.new_state()
        parts = [head(features[:, :3], next_ids[:, :3], cache=state.cache)]
        parts += [head(features[:, i : i + 1], next_ids[:, i : i + 1], cache=state.cache) for i in range(3, 7)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-4)


def test_eagle_uses_frozen_target_parts_not_copies(tiny_target):
    head = build_head(HeadConfig(head_type="eagle"), tiny_target.model)
    names = set(head.state_dict())
    assert not any("embed" in n or "lm_head" in n for n in names), names
    assert head.lm_head_weight.data_ptr() == tiny_target.model.lm_head.weight.data_ptr()


@pytest.mark.parametrize("head_type", ["medusa", "eagle"])
def test_save_load_round_trip_gives_identical_outputs(tiny_target, tmp_path, head_type):
    torch.manual_seed(0)
    head = build_head(HeadConfig(head_type=head_type, num_layers=2, num_heads=3), tiny_target.model)
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))  # not the fresh init, so loading really matters
    save_head(head, tmp_path, target_identity=target_identity_dict(tiny_target.model, "tiny-llama"))
    loaded = load_head(tmp_path, tiny_target.model, target_name="tiny-llama")
    ids, features = _features(tiny_target)
    with torch.no_grad():
        if head_type == "medusa":
            torch.testing.assert_close(loaded(features), head(features))
        else:
            torch.testing.assert_close(loaded(features, ids), head(features, ids))
    config = DecodeConfig(max_new_tokens=20)
    prompt = tiny_target.encode_prompt("round trip")
    first = generate(tiny_target, prompt, config=config, drafter=head)
    second = generate(tiny_target, prompt, config=config, drafter=loaded)
    assert first.stats.accepted == second.stats.accepted
    assert json.loads((tmp_path / HEAD_CONFIG_FILE).read_text())["target"]["hidden_size"] == 64


def test_loading_onto_a_mismatched_target_fails_clearly(tiny_target, tmp_path):
    head = build_head(HeadConfig(head_type="eagle"), tiny_target.model)
    save_head(head, tmp_path, target_identity=target_identity_dict(tiny_target.model, "tiny-llama"))
    other = make_tiny_target(hidden_size=32)
    with pytest.raises(HeadLoadError, match="hidden_size=64.*hidden_size=32"):
        load_head(tmp_path, other.model, target_name="other")
    other_vocab = make_tiny_target(vocab_size=70)
    with pytest.raises(HeadLoadError, match="vocab_size"):
        load_head(tmp_path, other_vocab.model, target_name="other")


def test_missing_drafter_directory_is_a_clear_error(tiny_target, tmp_path):
    with pytest.raises(HeadLoadError, match="does not exist.*koala head init"):
        load_head(tmp_path / "nope", tiny_target.model, target_name="tiny")
    with pytest.raises(HeadLoadError, match="must hold head_config.json"):
        load_head(tmp_path, tiny_target.model, target_name="tiny")


def _saved_head(target, directory, head_type="eagle"):
    head = build_head(HeadConfig(head_type=head_type), target.model)
    return save_head(head, directory, target_identity=target_identity_dict(target.model, "tiny-llama"))


def test_a_head_for_another_architecture_of_the_same_sizes_fails_in_one_line(tiny_target, tmp_path):
    """Same hidden size and vocabulary, another decoder (Qwen2's attention has biases): the head's weights do not
    fit, and the message names both targets instead of a state-dict traceback."""
    directory = _saved_head(tiny_target, tmp_path)
    config = transformers.Qwen2Config(vocab_size=80, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    qwen2 = transformers.Qwen2ForCausalLM(config).eval()
    with pytest.raises(HeadLoadError) as caught:
        load_head(directory, qwen2, target_name="tiny-qwen2")
    message = str(caught.value)
    assert "\n" not in message and "'tiny-llama' (llama)" in message and "'tiny-qwen2' (qwen2)" in message, message
    assert str(directory / "head.safetensors") in message


@pytest.mark.parametrize("missing", ["head_config.json", "head.safetensors"])
def test_a_missing_head_file_is_named(tiny_target, tmp_path, missing):
    directory = _saved_head(tiny_target, tmp_path)
    (directory / missing).unlink()
    with pytest.raises(HeadLoadError, match=f"has no {missing}.*koala head init"):
        load_head(directory, tiny_target.model, target_name="tiny-llama")


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"head": "eagle"}', '{"head": {"num_layers": "two"}}'])
def test_a_corrupt_head_config_is_one_line_naming_the_file(tiny_target, tmp_path, content):
    directory = _saved_head(tiny_target, tmp_path)
    (directory / HEAD_CONFIG_FILE).write_text(content)
    with pytest.raises(HeadLoadError) as caught:
        load_head(directory, tiny_target.model, target_name="tiny-llama")
    assert str(directory / HEAD_CONFIG_FILE) in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("corruption", ["garbage", "truncated", "other head type"])
def test_corrupt_head_weights_are_one_line_naming_the_file(tiny_target, tmp_path, corruption):
    directory = _saved_head(tiny_target, tmp_path)
    weights = directory / "head.safetensors"
    if corruption == "garbage":
        weights.write_bytes(b"\x00" * 64)
    elif corruption == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:  # a Medusa head's weights under an EAGLE head's config
        _saved_head(tiny_target, tmp_path / "medusa", head_type="medusa")
        weights.write_bytes((tmp_path / "medusa" / "head.safetensors").read_bytes())
    with pytest.raises(HeadLoadError) as caught:
        load_head(directory, tiny_target.model, target_name="tiny-llama")
    assert str(weights) in str(caught.value) and "\n" not in str(caught.value), caught.value


def test_head_init_onto_an_existing_file_is_a_one_line_error(tmp_path, capsys):
    model_dir, out = tmp_path / "model", tmp_path / "taken"
    tiny_llama().save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    out.write_text("not a directory")
    assert main(["head", "init", "--type", "eagle", "--target", str(model_dir), "--out", str(out)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and f"--out {out} is a file" in errors[0], errors
    assert out.read_text() == "not a directory"


def test_bad_head_config_names_the_field():
    with pytest.raises(ConfigError, match="head.num_layers"):
        HeadConfig(num_layers=0)
    with pytest.raises(ConfigError, match="head.head_type.*medusa"):
        HeadConfig(head_type="hydra")
    with pytest.raises(ConfigError, match="head: unknown field"):
        HeadConfig.from_dict({"p_w": 1})
    with pytest.raises(ConfigError, match="head.num_layers: expected an integer"):
        HeadConfig.from_dict({"num_layers": "two"})


@pytest.mark.parametrize("head_type", ["medusa", "eagle"])
def test_draft_vocabulary_subset_is_lossless_and_smaller(tiny_target, tmp_path, head_type):
    counts = count_tokens(["hello world, the quick brown fox"] * 3, tiny_target.tokenizer)
    token_ids = top_token_ids(counts, 12, always_include=[2])
    assert 2 in token_ids.tolist() and len(token_ids) == 12
    config = HeadConfig(head_type=head_type, num_heads=3, draft_vocab_size=12)
    head = build_head(config, tiny_target.model, draft_token_ids=token_ids)
    _, features = _features(tiny_target)
    with torch.no_grad():
        logits = head(features) if head_type == "medusa" else head.logits(features)
    assert logits.shape[-1] == 12
    save_head(head, tmp_path, target_identity=target_identity_dict(tiny_target.model, "tiny-llama"))
    loaded = load_head(tmp_path, tiny_target.model, target_name="tiny-llama")
    assert loaded.vocabulary.draft_token_ids.tolist() == token_ids.tolist()
    prompt = tiny_target.encode_prompt("hello world")
    for decode in (DecodeConfig(max_new_tokens=24), DecodeConfig(max_new_tokens=24, temperature=0.8, seed=1)):
        vanilla = generate(tiny_target, prompt, config=decode)
        speculative = generate(tiny_target, prompt, config=decode, drafter=loaded)
        if decode.greedy:
            assert speculative.token_ids == vanilla.token_ids
        assert speculative.stats.draft_tokens > 0
    held = token_ids.tolist()
    outside = next(t for t in range(100) if t not in held)
    assert loaded.vocabulary.coverage([held[0], held[1], outside, held[0]]) == pytest.approx(0.75)
    assert loaded.vocabulary.coverage([]) is None


def test_full_vocabulary_has_no_coverage_to_report(tiny_target):
    assert build_head(HeadConfig(head_type="eagle"), tiny_target.model).vocabulary.coverage([1, 2]) is None


def test_draft_vocabulary_requires_a_map(tiny_target):
    with pytest.raises(ConfigError, match="draft_vocab_size.*token-id map"):
        build_head(HeadConfig(head_type="eagle", draft_vocab_size=8), tiny_target.model)
    with pytest.raises(ConfigError, match="holds 3 ids"):
        build_head(HeadConfig(head_type="eagle", draft_vocab_size=8), tiny_target.model,
                   draft_token_ids=torch.tensor([1, 2, 3]))


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_unrolled_training_forward_equals_step_by_step_drafting(num_layers, attention):
    """forward_unrolled's step-d output at position p is what drafting computes at step d+1 of a chain whose
    verified context ends at p - d (teacher-forced tokens), for every attention implementation."""
    target = make_tiny_target(seed=3)
    target.model.config._attn_implementation = attention
    torch.manual_seed(0)
    head = build_head(HeadConfig(head_type="eagle", num_layers=num_layers), target.model)
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
        ids, features = _features(target, length=12)
        unrolled = head.forward_unrolled(features[:, :-1], ids[:, 1:], depth=4)
        for start in (0, 3, 6):
            cache = head.new_state().cache
            predicted = head(features[:, : start + 1], ids[:, 1 : start + 2], cache=cache)[:, -1:]
            for step in range(4):
                position = start + step
                torch.testing.assert_close(predicted[0, 0], unrolled[step][0, position], atol=1e-5, rtol=1e-4)
                if position + 2 < ids.shape[1]:
                    predicted = head(predicted, ids[:, position + 2 : position + 3], cache=cache)


def test_eagle_rotary_stays_fp32_and_master_weights_are_fp32_on_a_bf16_target():
    """Defects 1 and 2: a head built for a bf16 target trains fp32 weights and its rotary angles stay exact even
    after the head is cast to bf16 for inference."""
    target = make_tiny_target(seed=1)
    target.model.to(torch.bfloat16)
    target.model.get_decoder().rotary_emb.inv_freq.data = target.model.get_decoder().rotary_emb.inv_freq.float()
    head = build_head(HeadConfig(head_type="eagle"), target.model)
    assert all(p.dtype == torch.float32 for p in head.parameters())
    medusa = build_head(HeadConfig(head_type="medusa"), target.model)
    assert all(p.dtype == torch.float32 for p in medusa.parameters())
    head.to(torch.bfloat16)
    rotary = head._target_parts[2]
    assert rotary.inv_freq.dtype == torch.float32
    positions = torch.tensor([[1024]], device=rotary.inv_freq.device)
    cos, _ = rotary(torch.zeros(1, 1, 8, dtype=torch.float32, device=positions.device), position_ids=positions)
    exact = torch.cos(1024 * rotary.inv_freq.double())
    assert (cos[0, 0, : exact.numel()].double() - exact).abs().max() < 1e-3


def test_saved_head_casts_to_the_requested_dtype_and_loads_in_the_target_dtype(tiny_target, tmp_path):
    head = build_head(HeadConfig(head_type="eagle"), tiny_target.model)
    save_head(head, tmp_path, target_identity=target_identity_dict(tiny_target.model, tiny_target.name),
              dtype=torch.float16)
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(tmp_path / "head.safetensors").values()} == {torch.float16}
    loaded = load_head(tmp_path, tiny_target.model, target_name=tiny_target.name)
    assert {p.dtype for p in loaded.parameters()} == {inference_dtype(tiny_target.model)}
    loaded = load_head(tmp_path, tiny_target.model, target_name=tiny_target.name, dtype="bfloat16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_heads_of_fp32_targets_draft_in_bf16_where_the_cpu_has_bf16_units(monkeypatch):
    model = tiny_llama()
    assert inference_dtype(model) == torch.float32  # nn.Linear's kernels: the head follows the target
    use_onednn_linears(model)
    monkeypatch.setattr(heads_module, "onednn_bf16_available", lambda: True)
    assert inference_dtype(model) == torch.bfloat16
    assert inference_dtype(model, "float32") == torch.float32
    assert inference_dtype(model.to(torch.float16)) == torch.float16  # low-precision targets keep their dtype
    monkeypatch.setattr(heads_module, "onednn_bf16_available", lambda: False)
    assert inference_dtype(model.float()) == torch.float32
    with pytest.raises(ConfigError, match="draft_dtype: unknown dtype 'fp8'"):
        inference_dtype(model, "fp8")


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["eagle", "fused", "medusa"])
def test_bf16_drafts_on_an_fp32_target_are_lossless(kind, attention, tmp_path):
    """The head drafts in bf16 while the target verifies in fp32: mixed dtypes meet in the head's inputs (target
    features, the target's embedding and final norm) and must change nothing but the drafts."""
    target = make_tiny_target()
    target.model.config._attn_implementation = attention
    use_onednn_linears(target.model)  # on a CPU with bf16 units the head's products then take the bf16 kernel
    config = HeadConfig(head_type="medusa" if kind == "medusa" else "eagle", num_heads=3,
                        extra_feature_layers=(0,) if kind == "fused" else ())
    head = build_head(config, target.model)
    save_head(head, tmp_path, target_identity=target_identity_dict(target.model, target.name))
    head = load_head(tmp_path, target.model, target_name=target.name, dtype="bfloat16")
    assert {p.dtype for p in head.parameters()} == {torch.bfloat16}
    prompt = target.encode_prompt("Hello there, how are you")
    vanilla = generate(target, prompt, config=DecodeConfig(max_new_tokens=24))
    for tree in ("chain", "static", "dynamic"):
        drafted = generate(target, prompt, config=DecodeConfig(max_new_tokens=24, tree=tree), drafter=head)
        assert drafted.token_ids == vanilla.token_ids, tree
        assert drafted.stats.draft_tokens > 0
    sampled = generate(target, prompt, config=DecodeConfig(max_new_tokens=24, temperature=0.8, seed=0), drafter=head)
    assert len(sampled.token_ids) == 24


def test_fused_layers_are_checked_against_the_head_type_and_the_target(tiny_target):
    with pytest.raises(ConfigError, match="head.extra_feature_layers: only EAGLE"):
        HeadConfig(head_type="medusa", extra_feature_layers=(1,))
    with pytest.raises(ConfigError, match="head.extra_feature_layers: must be distinct"):
        HeadConfig(head_type="eagle", extra_feature_layers=(1, 1))
    with pytest.raises(ConfigError, match="head.extra_feature_layers: .*past the target's 2 layers"):
        build_head(HeadConfig(head_type="eagle", extra_feature_layers=(2,)), tiny_target.model)


def test_fused_head_round_trips_and_plain_heads_keep_their_format(tiny_target, tmp_path):
    fused = build_head(HeadConfig(head_type="eagle", extra_feature_layers=(0, 1)), tiny_target.model)
    torch.nn.init.normal_(fused.fuse.weight, std=0.1)
    save_head(fused, tmp_path / "fused", target_identity=target_identity_dict(tiny_target.model, tiny_target.name))
    loaded = load_head(tmp_path / "fused", tiny_target.model, target_name=tiny_target.name)
    assert loaded.config.extra_feature_layers == (0, 1)
    torch.testing.assert_close(loaded.fuse.weight, fused.fuse.weight)
    plain = build_head(HeadConfig(head_type="eagle"), tiny_target.model)
    assert plain.fuse is None and not any(name.startswith("fuse") for name in plain.state_dict())


def test_the_shipped_drafters_card_states_its_parameter_count():
    """The model card's size line is the count of the stored (trainable) weights, not a guess."""
    from safetensors.torch import load_file

    drafter = heads_module.DRAFTERS_DIR / "smollm2-eagle"
    tensors = load_file(drafter / heads_module.HEAD_WEIGHTS_FILE)
    count = sum(t.numel() for name, t in tensors.items() if t.is_floating_point())
    card = (drafter / "README.md").read_text()
    assert f"| size | {count / 1e6:.1f}M trainable parameters ({count:,}" in card
