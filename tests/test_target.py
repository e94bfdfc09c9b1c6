"""Target loading: spec resolution, prompt formats and one-line errors."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
import transformers

from conftest import char_tokenizer, tiny_llama
from pipeline.config import ConfigError, DecodeConfig, HeadConfig, TargetConfig
from pipeline.decoding import generate
from pipeline.heads import build_head
from pipeline.target import (
    LAST_USED_FILE, STALE_COPY_DAYS, Target, TargetLoadError, _remove_stale_copies, approximate_parameters,
    choose_prompt_format, converted_gguf_dir, gguf_content_digest, load_target, pick_dtype, resolve_spec,
    text_only_model,
)


def test_unknown_local_paths_are_one_line_errors(tmp_path):
    with pytest.raises(TargetLoadError, match="no such model directory"):
        load_target(str(tmp_path / "missing-model"))
    with pytest.raises(TargetLoadError, match="GGUF file .* does not exist"):
        load_target(str(tmp_path / "model.gguf"))
    with pytest.raises(TargetLoadError, match="has no config.json"):
        load_target(str(tmp_path))


def test_hub_ids_are_passed_through():
    assert resolve_spec("lmsys/vicuna-7b-v1.3") == ("lmsys/vicuna-7b-v1.3", {})


@pytest.mark.slow
def test_a_gguf_target_is_converted_once_to_an_identical_safetensors_copy(tmp_path, monkeypatch):
    """De-quantising the GGUF file on every load cost ~15 s per Ray worker: the alias resolves to a copy made once,
    which loads fast and gives the same logits, tokenizer and chat template as the GGUF file itself."""
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.target import smollm2_gguf_path

    monkeypatch.setenv("KOALA_CACHE_DIR", str(tmp_path))
    location, extra = resolve_spec("smollm2")
    assert extra == {} and Path(location).parent == tmp_path / "gguf"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in Path(location).iterdir()}
    made = (Path(location) / "model.safetensors").stat().st_mtime_ns
    assert resolve_spec("smollm2")[0] == location and (Path(location) / "model.safetensors").stat().st_mtime_ns == made
    assert not [p for p in (tmp_path / "gguf").iterdir() if p.name.startswith(".")]  # no staging left behind
    # The same bytes elsewhere (a fresh virtual environment's wheel: new path, new mtime) reuse the copy: keyed by
    # path and mtime, every CI run on one machine added 0.5 GB to the cache.
    reinstalled = tmp_path / "venv2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    reinstalled.parent.mkdir()
    shutil.copyfile(smollm2_gguf_path(), reinstalled)
    assert str(converted_gguf_dir(reinstalled)) == location
    assert sorted(p.name for p in (tmp_path / "gguf").iterdir()) == sorted([Path(location).name, "sources"])

    started = time.perf_counter()
    # nn.Linear's own kernels, as the reference uses: the copy must give bit-identical logits.
    target = load_target("smollm2", dtype="float32", device="cpu", cpu_linear="torch")
    assert time.perf_counter() - started < 10
    gguf = smollm2_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    assert target.tokenizer.chat_template == tokenizer.chat_template and target.prompt_format == "chat"
    ids = target.encode_prompt("Explain what a hash table is.")
    assert ids.tolist() == tokenizer(target.format_messages([{"role": "user", "content": "Explain what a hash "
                                                                                       "table is."}]),
                                     return_tensors="pt", add_special_tokens=False).input_ids.tolist()
    with torch.inference_mode():
        assert torch.equal(target.model(ids).logits, reference(ids).logits)


def test_a_gguf_files_digest_is_read_once_per_path_and_forgotten_when_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("KOALA_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"weights v1")
    assert gguf_content_digest(gguf) == hashlib.sha256(b"weights v1").hexdigest()
    stamps = list((tmp_path / "cache" / "gguf" / "sources").iterdir())
    assert len(stamps) == 1

    def no_reading(*args, **kwargs):
        raise AssertionError("the file was hashed again")

    monkeypatch.setattr(hashlib, "file_digest", no_reading)
    assert gguf_content_digest(gguf) == hashlib.sha256(b"weights v1").hexdigest()
    monkeypatch.undo()
    monkeypatch.setenv("KOALA_CACHE_DIR", str(tmp_path / "cache"))
    gguf.write_bytes(b"weights v2, longer")  # a new size and mtime: hashed again, the old stamp dropped
    assert gguf_content_digest(gguf) == hashlib.sha256(b"weights v2, longer").hexdigest()
    assert [p.name for p in (tmp_path / "cache" / "gguf" / "sources").iterdir()] != [stamps[0].name]
    assert len(list((tmp_path / "cache" / "gguf" / "sources").iterdir())) == 1


def test_making_a_converted_copy_removes_the_stale_copies_of_the_same_file(tmp_path):
    def copy(name: str, *, age_days: float, marked: bool) -> Path:
        directory = tmp_path / name
        directory.mkdir()
        (directory / "config.json").write_text("{}")
        when = time.time() - age_days * 86400
        if marked:
            (directory / LAST_USED_FILE).touch()
            os.utime(directory / LAST_USED_FILE, (when, when))
        os.utime(directory, (when, when))
        return directory

    keep = copy("Model.Q4_1-000000000000", age_days=0, marked=True)
    stale = copy("Model.Q4_1-111111111111", age_days=STALE_COPY_DAYS + 1, marked=True)
    stale_unmarked = copy("Model.Q4_1-222222222222", age_days=STALE_COPY_DAYS + 1, marked=False)
    recent = copy("Model.Q4_1-333333333333", age_days=1, marked=True)
    used_lately = copy("Model.Q4_1-444444444444", age_days=STALE_COPY_DAYS + 1, marked=False)
    (used_lately / LAST_USED_FILE).touch()  # loaded today, made long ago
    other_file = copy("Other.Q4_1-555555555555", age_days=STALE_COPY_DAYS + 1, marked=True)
    not_a_copy = copy("Model.Q4_1-notes", age_days=STALE_COPY_DAYS + 1, marked=True)
    _remove_stale_copies(keep)
    assert not stale.exists() and not stale_unmarked.exists()
    assert all(p.exists() for p in (keep, recent, used_lately, other_file, not_a_copy))


def test_a_broken_gguf_file_fails_with_a_load_error(tmp_path, monkeypatch):
    monkeypatch.setenv("KOALA_CACHE_DIR", str(tmp_path / "cache"))
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file")
    with pytest.raises(TargetLoadError, match="could not read GGUF file"):
        load_target(str(broken))


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
    for device in ("tpu", "cuda:x", "cudax", "cpu:0"):
        with pytest.raises(ConfigError, match="target.device"):
            TargetConfig(device=device)
    assert TargetConfig(device="cuda:1").device == "cuda:1"


def test_a_gpu_this_machine_lacks_is_a_clear_error(monkeypatch):
    from pipeline.target import TargetLoadError, pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(TargetLoadError, match="'cuda:3' requested but this machine has 1 GPU"):
        pick_device("cuda:3")


def test_auto_dtype_is_fp32_on_cpus_and_for_small_targets_on_gpus(monkeypatch):
    """Small targets decode launch-bound on a GPU (fp32 measured fastest there, and exact); large ones in bf16."""
    import torch
    from transformers import LlamaConfig

    smollm2 = LlamaConfig(hidden_size=576, num_hidden_layers=30, vocab_size=49152)
    vicuna_7b = LlamaConfig(hidden_size=4096, num_hidden_layers=32, vocab_size=32000)
    assert 1.2e8 < approximate_parameters(smollm2) < 1.6e8 and 6e9 < approximate_parameters(vicuna_7b) < 7.5e9
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert pick_dtype("auto", cuda, smollm2) == torch.float32
    assert pick_dtype("auto", cuda, vicuna_7b) == torch.bfloat16
    assert pick_dtype("auto", cpu, vicuna_7b) == torch.float32
    assert pick_dtype("bfloat16", cpu, smollm2) == torch.bfloat16
    # a multimodal config keeps the sizes in its text config: a 27B Gemma-3 is not a 0-parameter model (fp32)
    from transformers import Gemma3Config

    gemma3_27b = Gemma3Config(text_config=dict(hidden_size=5376, num_hidden_layers=62, vocab_size=262208))
    assert approximate_parameters(gemma3_27b) > 2e10 and pick_dtype("auto", cuda, gemma3_27b) == torch.bfloat16


def test_a_target_with_neither_pad_nor_eos_token_still_pads():
    model = tiny_llama()
    model.generation_config.eos_token_id = None
    tokenizer = char_tokenizer()
    tokenizer.pad_token, tokenizer.eos_token = None, None
    target = Target(model=model, tokenizer=tokenizer, name="tiny", prompt_format="plain")
    assert target.eos_token_ids == frozenset() and target.pad_token_id == 0


def _tiny_gemma3_with_vision() -> transformers.Gemma3ForConditionalGeneration:
    """A multimodal checkpoint (a vision tower, a projector, a Gemma-3 text decoder and its LM head), built in memory."""
    text = transformers.Gemma3TextConfig(
        vocab_size=80, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], bos_token_id=1, eos_token_id=2, pad_token_id=2)
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       boi_token_index=77, eoi_token_index=78, image_token_index=79)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # peaked distributions, EOS out of reach (as tests/test_architectures.py's targets)
        model.lm_head.weight.mul_(20.0)
        model.lm_head.weight[2] = 0.0
    return model.eval().requires_grad_(False)


def test_a_multimodal_checkpoint_loads_as_its_text_model_and_decodes_losslessly_with_an_eagle_head(tmp_path):
    """Gemma-3 (and Llava-style) checkpoints load as `*ForConditionalGeneration`, whose config holds the text
    sizes in a sub-config: heads failed deep inside (`Gemma3Config has no attribute hidden_size`). The target is
    its text model instead: the same decoder and LM head modules, the same greedy output."""
    multimodal = _tiny_gemma3_with_vision()
    text_only = text_only_model(multimodal)
    assert type(text_only).__name__ == "Gemma3ForCausalLM"
    assert text_only.lm_head.weight.data_ptr() == multimodal.lm_head.weight.data_ptr()  # shared, not copied
    assert not any(t.is_meta for t in [*text_only.parameters(), *text_only.buffers()])
    multimodal.save_pretrained(tmp_path)
    char_tokenizer().save_pretrained(tmp_path)
    target = load_target(str(tmp_path), device="cpu", cpu_linear="torch")
    assert type(target.model).__name__ == "Gemma3ForCausalLM" and target.identity.hidden_size == 64
    original = Target(model=multimodal, tokenizer=char_tokenizer(), name="gemma3-vision", prompt_format="plain")
    ids = target.encode_prompt("hello there, general kenobi")
    config = DecodeConfig(max_new_tokens=24)
    expected = generate(original, ids, config=config).token_ids
    assert generate(target, ids, config=config).token_ids == expected
    head = build_head(HeadConfig(head_type="eagle", num_heads=3), target.model)
    result = generate(target, ids, config=config, drafter=head)
    assert result.token_ids == expected and result.stats.draft_tokens > 0


def test_a_multimodal_checkpoint_without_a_causal_text_model_is_a_one_line_error(monkeypatch):
    def no_causal_class(config):
        raise ValueError(f"Unrecognized configuration class {type(config)}")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", no_causal_class)
    with pytest.raises(TargetLoadError, match="Gemma3ForConditionalGeneration holds no text decoder.*text-only"):
        text_only_model(_tiny_gemma3_with_vision())
