"""Shared fixtures: tiny random Llama targets (fast, offline) and the real SmolLM2 target (slow).

`KOALA_TEST_DEVICE=cuda` puts the fixtures' targets (tiny Llamas and SmolLM2) on the GPU, so the Ray-free core's
tests (decoding, heads, trees, audit, training, architectures) run on CUDA; CI leaves it unset (CPU).
"""

from __future__ import annotations

import os
import string
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pipeline.target import Target, load_target

SPECIALS = ["<unk>", "<s>", "</s>"]
SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
TEST_DEVICE = os.environ.get("KOALA_TEST_DEVICE", "cpu")


def pytest_configure(config) -> None:
    if TEST_DEVICE.startswith("cuda") and not torch.cuda.is_available():
        pytest.exit(f"KOALA_TEST_DEVICE={TEST_DEVICE} but CUDA is not available", returncode=4)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer (ids 0-2 are <unk>, <s>, </s>) built in memory: no hub access."""
    alphabet = SPECIALS + list(string.ascii_lowercase + string.ascii_uppercase + string.digits + " .,!?'\n-:")
    vocab = {token: index for index, token in enumerate(alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def tiny_llama(*, vocab_size: int = 80, hidden_size: int = 64, num_layers: int = 2, seed: int = 0,
               max_positions: int = 256) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    # Larger weights than the default init make the random model's distributions peaked, so greedy decoding is
    # not dominated by near-ties and sampled sequences have structure a draft head can disagree with.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model.eval().requires_grad_(False)


def make_tiny_target(**kwargs) -> Target:
    model = tiny_llama(**kwargs).to(TEST_DEVICE)
    return Target(model=model, tokenizer=char_tokenizer(), name="tiny-llama", prompt_format="plain")


@pytest.fixture(scope="session")
def tiny_target() -> Target:
    return make_tiny_target()


@pytest.fixture(scope="session")
def smollm2() -> Target:
    return load_target("smollm2", dtype="float32", device=TEST_DEVICE)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present next to the repository")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama saved as a local model directory (loadable by spec, like a user's own model)."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(directory)
    char_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster for one test module (4 logical CPUs, so a few actors or workers fit side by side)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, ignore_reinit_error=True)
    yield
    ray.shutdown()
