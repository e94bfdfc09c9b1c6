"""Target loading: spec resolution, prompt formats and one-line errors."""

from __future__ import annotations

import logging

import pytest

from conftest import char_tokenizer, tiny_llama
from pipeline.config import ConfigError, TargetConfig
from pipeline.target import Target, TargetLoadError, choose_prompt_format, load_target, resolve_spec


def test_unknown_local_paths_are_one_line_errors(tmp_path):
    with pytest.raises(TargetLoadError, match="no such model directory"):
        load_target(str(tmp_path / "missing-model"))
    with pytest.raises(TargetLoadError, match="GGUF file .* does not exist"):
        load_target(str(tmp_path / "model.gguf"))
    with pytest.raises(TargetLoadError, match="has no config.json"):
        load_target(str(tmp_path))


def test_hub_ids_are_passed_through():
    assert resolve_spec("lmsys/vicuna-7b-v1.3") == ("lmsys/vicuna-7b-v1.3", {})


def test_smollm2_alias_resolves_to_the_shipped_gguf():
    location, extra = resolve_spec("smollm2")
    assert extra == {"gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}


def test_local_directory_loads_with_plain_fallback(tmp_path, caplog):
    tiny_llama().save_pretrained(tmp_path)
    char_tokenizer().save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        target = load_target(str(tmp_path), device="cpu")
    assert target.prompt_format == "plain"
    assert "ships no chat template" in caplog.text
    assert target.tokenizer.decode(target.encode_prompt("hi")[0]) == "hi"


def test_prompt_formats():
    tokenizer = char_tokenizer()
    with pytest.raises(TargetLoadError, match="no chat template"):
        choose_prompt_format("chat", tokenizer, "base-model")
    assert choose_prompt_format("auto", tokenizer, "lmsys/vicuna-7b-v1.3") == "vicuna"
    target = Target(model=tiny_llama(), tokenizer=tokenizer, name="vicuna", prompt_format="vicuna")
    text = target.format_messages([{"role": "user", "content": "Hello"}])
    assert text.startswith("A chat between a curious user") and text.endswith("USER: Hello ASSISTANT:")


def test_target_config_validation_names_fields():
    with pytest.raises(ConfigError, match="target.prompt_format"):
        TargetConfig(prompt_format="alpaca")
    with pytest.raises(ConfigError, match="target.dtype"):
        TargetConfig(dtype="fp8")
    with pytest.raises(ConfigError, match="target.device"):
        TargetConfig(device="tpu")
