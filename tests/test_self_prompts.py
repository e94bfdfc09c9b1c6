"""`koala self-prompts`: the target writes user prompts (Magpie-style); filtering, resumable JSONL, distill reads it."""

from __future__ import annotations

import json
import types

import pytest
import torch

from conftest import char_tokenizer, make_tiny_target
from pipeline.config import ConfigError, SelfPromptConfig
from pipeline.data import generate_self_prompts, load_conversations, user_turn_frame
from pipeline.stages import self_prompts as stage
from pipeline.target import Target

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant: {% endif %}")


class ScriptedModel:
    """Stands in for a model whose `generate` samples the given continuations (one per row, cycling)."""

    def __init__(self, tokenizer, continuations: list[str]) -> None:
        self.tokenizer, self.continuations, self.calls = tokenizer, continuations, 0
        self.sampling: list[dict] = []  # the sampling settings of each generate call
        self.device = torch.device("cpu")
        self.generation_config = types.SimpleNamespace(eos_token_id=tokenizer.eos_token_id)

    def generate(self, *, input_ids, max_new_tokens, pad_token_id, **settings):
        self.sampling.append({k: settings.get(k) for k in ("temperature", "top_p", "top_k")})
        rows = []
        for row in range(input_ids.shape[0]):
            text = self.continuations[(self.calls * input_ids.shape[0] + row) % len(self.continuations)]
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][:max_new_tokens]
            # Like HF generate: a row that ended is padded after its EOS; one that did not runs to the limit.
            filler = pad_token_id if "</s>" in text else self.tokenizer.convert_tokens_to_ids("x")
            rows.append(input_ids[row].tolist() + ids + [filler] * (max_new_tokens - len(ids)))
        self.calls += 1
        return torch.tensor(rows)


def scripted_target(continuations: list[str], *, prompt_format: str = "chat") -> Target:
    tokenizer = char_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return Target(model=ScriptedModel(tokenizer, continuations), tokenizer=tokenizer, name="scripted",
                  prompt_format=prompt_format)


def test_user_turn_frame_splits_any_template_around_the_user_text():
    target = scripted_target([])
    assert user_turn_frame(target.formatter) == ("<s>user: ", "</s><s>assistant: ")
    vicuna = scripted_target([], prompt_format="vicuna")
    before, after = user_turn_frame(vicuna.formatter)
    assert before.endswith("USER: ") and after.strip() == "ASSISTANT:"


def test_prompts_keep_finished_turns_and_count_every_drop():
    target = scripted_target([
        "Write a short poem about rain.</s>",   # kept
        "Hi</s>",                              # too short
        "Explain how tides work and why the",  # never ends its turn within max_new_tokens: unfinished
        "  Give me three tips for sleep.  </s>",
    ])
    prompts, dropped = generate_self_prompts(target, 4, max_new_tokens=40, temperature=1.0, min_chars=8)
    assert prompts == ["Write a short poem about rain.", "Give me three tips for sleep."]
    assert dropped == {"too_short": 1, "unfinished": 1}


def test_formats_without_an_end_of_turn_token_end_at_the_reply_marker():
    target = scripted_target(["Name a color. ASSISTANT: blue, and then more text"], prompt_format="vicuna")
    prompts, dropped = generate_self_prompts(target, 1, max_new_tokens=60, temperature=1.0, min_chars=4)
    assert prompts == ["Name a color."] and not dropped


def test_plain_format_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="self_prompts.target.prompt_format"):
        generate_self_prompts(make_tiny_target(), 2, max_new_tokens=8, temperature=1.0)


def test_run_writes_distinct_prompts_resumes_and_distill_reads_the_file(tmp_path, monkeypatch):
    texts = [f"Question number {i}, please answer it.</s>" for i in range(5)] + ["Question number 0, please answer it.</s>"]
    target = scripted_target(texts)
    monkeypatch.setattr(stage, "load_target_from_config", lambda config: target)
    out = tmp_path / "prompts.jsonl"
    config = SelfPromptConfig.from_dict({"count": 4, "batch_size": 3, "out": str(out), "max_new_tokens": 60})
    summary = stage.run_self_prompts(config)
    assert summary["prompts"] == 4 and summary["prompts_reused"] == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["batch"] for r in lines] == [0, 0, 0, 1]
    # An interrupted write leaves a torn last line: a re-run cuts it and continues with the next batch.
    with out.open("a") as handle:
        handle.write('{"prompt_id": "x", "messa')
    summary = stage.run_self_prompts(SelfPromptConfig.from_dict({**config.to_dict(), "count": 5}))
    assert summary["prompts"] == 5 and summary["prompts_reused"] == 4
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    contents = [r["messages"][0]["content"] for r in lines]
    assert len(contents) == len(set(contents)) == 5
    assert lines[-1]["batch"] == 3  # batch 2 drew only prompts the file already held
    conversations, skipped, total = load_conversations(str(out), keep_responses=False)
    assert len(conversations) == 5 and total == 5 and not skipped


def test_sampling_settings_reach_generate_and_top_k_defaults_to_the_whole_vocabulary(tmp_path, monkeypatch):
    """HF `generate` applies top_k=50 unless told otherwise: the stage passes its own top_k (0 = off) every call."""
    target = scripted_target(["Write a short poem about rain.</s>", "Give me three tips for sleep.</s>"])
    monkeypatch.setattr(stage, "load_target_from_config", lambda config: target)
    stage.run_self_prompts(SelfPromptConfig.from_dict({"count": 2, "batch_size": 2, "top_p": 0.9,
                                                       "out": str(tmp_path / "p.jsonl")}))
    assert target.model.sampling == [{"temperature": 1.0, "top_p": 0.9, "top_k": 0}]
    stage.run_self_prompts(SelfPromptConfig.from_dict({"count": 2, "batch_size": 2, "top_k": 20,
                                                       "out": str(tmp_path / "other.jsonl")}))
    assert target.model.sampling[-1]["top_k"] == 20


def test_settings_that_keep_nothing_stop_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(stage, "load_target_from_config", lambda config: scripted_target(["never ending text"]))
    config = SelfPromptConfig.from_dict({"count": 2, "batch_size": 2, "out": str(tmp_path / "p.jsonl")})
    with pytest.raises(ConfigError, match="raise max_new_tokens"):
        stage.run_self_prompts(config)


@pytest.mark.parametrize("values, field", [({"temperature": 0}, "temperature"), ({"count": 0}, "count"),
                                           ({"out": "p.json"}, "out"), ({"top_p": 1.5}, "top_p"),
                                           ({"top_k": -1}, "top_k")])
def test_config_errors_name_the_field(values, field):
    with pytest.raises(ConfigError, match=f"self_prompts.{field}"):
        SelfPromptConfig.from_dict(values)


@pytest.mark.slow
def test_smollm2_writes_prompts_a_user_could_ask(smollm2):
    prompts, dropped = generate_self_prompts(smollm2, 6, max_new_tokens=64, temperature=1.0, seed=0)
    assert prompts, f"no prompt kept: {dict(dropped)}"
    assert all("<|im_" not in p and len(p) >= 16 for p in prompts)
