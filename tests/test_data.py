"""Distillation data: prompt formats, skips, teacher-forced masks, batched responses, atomic resumable shards."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from conftest import make_tiny_target
from pipeline.config import ConfigError, DecodeConfig, DistillConfig
from pipeline.data import (
    Conversation,
    encode_teacher_forced,
    generate_responses,
    load_conversations,
    normalize_record,
    shard_metadata,
)
from pipeline.decoding import generate
from pipeline.target import PromptFormat

SHAREGPT = [
    {"id": "a", "conversations": [{"from": "human", "value": "hello there"}, {"from": "gpt", "value": "hi, friend"}]},
    {"id": "b", "conversations": [{"from": "human", "value": "hello there"}]},  # duplicate first turn
    {"id": "c", "conversations": [{"from": "gpt", "value": "i start"}, {"from": "human", "value": "odd"}]},
    {"id": "d", "conversations": [{"from": "human", "value": "   "}]},
    {"id": "e", "conversations": [{"from": "gpt", "value": "only me"}]},
    {"id": "f", "conversations": [{"from": "human", "value": "what is two plus two?"}]},
]


def test_normalize_accepts_sharegpt_openai_and_plain_prompts():
    assert normalize_record({"messages": [{"role": "user", "content": "x"}]}) == ([{"role": "user", "content": "x"}], None)
    assert normalize_record({"prompt": " y "}) == ([{"role": "user", "content": "y"}], None)
    assert normalize_record({"turns": ["q1", "q2"]})[0] == [{"role": "user", "content": "q1"}]
    assert normalize_record({"foo": 1}) == (None, "unknown_format")
    assert normalize_record({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]})[0][0]["role"] == "system"
    # Alpaca: the instruction's input is part of the prompt (two inputs are two prompts, not duplicates), and
    # the output is the answer teacher-forced mode trains on.
    alpaca = {"instruction": "Summarise.", "input": "The cat sat.", "output": "A cat sat."}
    assert normalize_record(alpaca) == ([{"role": "user", "content": "Summarise.\n\nThe cat sat."},
                                         {"role": "assistant", "content": "A cat sat."}], None)
    assert normalize_record({"instruction": "Name a colour.", "input": "", "output": ""}) == (
        [{"role": "user", "content": "Name a colour."}], None)


def test_load_conversations_counts_every_skip(tmp_path):
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(SHAREGPT))
    kept, skipped, total = load_conversations(str(path), keep_responses=False)
    assert total == 6
    assert [c.messages[0]["content"] for c in kept] == ["hello there", "what is two plus two?"]
    assert dict(skipped) == {"duplicate": 1, "first_turn_not_user": 1, "empty_text": 1, "no_user_turn": 1}
    with_responses, _, _ = load_conversations(str(path), keep_responses=True)
    assert with_responses[0].messages[-1] == {"role": "assistant", "content": "hi, friend"}


def test_bad_prompt_files_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_conversations(str(tmp_path / "missing.json"), keep_responses=False)
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(b"\xff\xfe not json")
    with pytest.raises(ConfigError, match="not readable JSON"):
        load_conversations(str(broken), keep_responses=False)
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text('{"foo": 1}\n{"bar": 2}\n')
    with pytest.raises(ConfigError, match="unknown dataset format"):
        load_conversations(str(unknown), keep_responses=False)


def test_teacher_forced_mask_covers_exactly_the_assistant_text(tiny_target):
    conversation = Conversation("x", ({"role": "user", "content": "hello there"},
                                      {"role": "assistant", "content": "hi, friend"},
                                      {"role": "user", "content": "more"},
                                      {"role": "assistant", "content": "ok"}))
    row = encode_teacher_forced(tiny_target.formatter, conversation)
    masked = [token for token, keep in zip(row.input_ids, row.loss_mask) if keep]
    assert tiny_target.tokenizer.decode(masked) == "hi, friendok"
    assert row.response_tokens == len(masked)


def test_teacher_forced_mask_finds_each_turn_where_the_template_puts_it(tiny_target):
    """A turn's text that also occurs in the template's own text before it (Vicuna's "ASSISTANT:" holds an answer
    "A", its system prompt the word "user") is masked at the turn, not inside the template."""
    vicuna = PromptFormat(tiny_target.tokenizer, "vicuna")
    answered = encode_teacher_forced(vicuna, Conversation("x", ({"role": "user", "content": "Pick one: A or B?"},
                                                               {"role": "assistant", "content": "A"})))
    first = answered.loss_mask.index(1)
    assert answered.response_tokens == 2  # the answer and its end of turn
    assert tiny_target.tokenizer.decode(answered.input_ids[first:]) == "A</s>"  # the answer, then its end of turn
    prompt_only = encode_teacher_forced(vicuna, Conversation("y", ({"role": "user", "content": "user"},)))
    first = prompt_only.loss_mask.index(1)
    assert tiny_target.tokenizer.decode(prompt_only.input_ids[first - len("USER: "):]) == "USER: user ASSISTANT:"


def test_teacher_forced_answers_end_with_their_end_of_turn_token_as_generated_ones_do(tiny_target):
    """A generated answer keeps the EOS that ended it under the mask (the head learns to draft the end of the
    answer); a teacher-forced answer does too: the template's end-of-turn token after each assistant turn. The
    turns between and a template without such a token are unchanged."""
    conversation = Conversation("x", ({"role": "user", "content": "hello there"},
                                      {"role": "assistant", "content": "hi, friend"},
                                      {"role": "user", "content": "more"},
                                      {"role": "assistant", "content": "ok"}))
    row = encode_teacher_forced(PromptFormat(tiny_target.tokenizer, "vicuna"), conversation)
    masked = [token for token, keep in zip(row.input_ids, row.loss_mask) if keep]
    assert tiny_target.tokenizer.decode(masked) == "hi, friend</s>ok</s>"
    assert row.response_tokens == len(masked) and row.prompt_tokens == row.loss_mask.index(1)
    plain = encode_teacher_forced(tiny_target.formatter, conversation)  # "\n\n" between turns, nothing after
    assert tiny_target.tokenizer.decode([t for t, keep in zip(plain.input_ids, plain.loss_mask) if keep]) == \
        "hi, friendok"


def test_batched_responses_equal_one_by_one_greedy_generation():
    target = make_tiny_target(seed=4)
    prompts = ["hi", "the quick brown fox", "a longer prompt with more words in it", "x"]
    conversations = [Conversation(str(i), ({"role": "user", "content": p},)) for i, p in enumerate(prompts)]
    rows = generate_responses(target, conversations, max_new_tokens=12, batch_size=3)
    for row, prompt in zip(rows, prompts):
        alone = generate(target, target.encode_prompt(prompt), config=DecodeConfig(max_new_tokens=12))
        assert row.input_ids[row.prompt_tokens:] == alone.token_ids
        assert row.loss_mask == [0] * row.prompt_tokens + [1] * row.response_tokens


def test_sampled_responses_follow_the_distribution_decoding_samples(monkeypatch):
    """temperature and top_p only: transformers' default top-50 cut would make the answers follow another
    distribution than the one speculative sampling reproduces."""
    target = make_tiny_target(seed=4)
    seen = {}
    original = target.model.generate
    monkeypatch.setattr(target.model, "generate", lambda **kwargs: seen.update(kwargs) or original(**kwargs))
    generate_responses(target, [Conversation("0", ({"role": "user", "content": "hi"},))], max_new_tokens=4,
                       temperature=0.7, top_p=0.9)
    assert (seen["do_sample"], seen["temperature"], seen["top_p"], seen["top_k"]) == (True, 0.7, 0.9, 0)


def _distill_config(tmp_path, prompts_path, model_dir, **overrides):
    values = {"prompts": str(prompts_path), "out_dir": str(tmp_path / "data"), "shard_size": 2, "batch_size": 2,
              "max_new_tokens": 8, "target": {"spec": str(model_dir), "device": "cpu"},
              "tracking": {"run_dir": str(tmp_path / "runs")}}
    values.update(overrides)
    return DistillConfig.from_dict(values)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    texts = ["hello there", "the quick brown fox", "what is two plus two?", "tell me a story", "why is the sky blue?"]
    path.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": t}]}) for t in texts) + "\n")
    return path


def test_interrupted_distillation_resumes_without_duplicates(tmp_path, prompts_file, tiny_model_dir):
    from pipeline.stages.distill import run_distill

    config = _distill_config(tmp_path, prompts_file, tiny_model_dir, tracking={"enabled": False})
    first = run_distill(config, use_ray=False)
    shards = sorted((tmp_path / "data").glob("shard-*.parquet"))
    assert first["shards"] == len(shards) == 3 and first["shards_reused"] == 0
    original = {p.name: pq.read_table(p).to_pylist() for p in shards}
    # Simulate a crash: one shard never renamed into place, a temporary file left behind.
    shards[1].unlink()
    (tmp_path / "data" / ".shard-00001.parquet.999.tmp").write_bytes(b"half a file")
    second = run_distill(config, use_ray=False)
    assert second["shards_reused"] == 2
    rows = [row for p in sorted((tmp_path / "data").glob("shard-*.parquet")) for row in pq.read_table(p).to_pylist()]
    ids = [row["prompt_id"] for row in rows]
    assert len(ids) == len(set(ids)) == 5
    assert pq.read_table(shards[1]).to_pylist() == original[shards[1].name]
    assert shard_metadata(shards[0])["settings"]["max_new_tokens"] == 8
    frequencies = json.loads((tmp_path / "data" / "token_freq.json").read_text())["counts"]
    assert sum(frequencies.values()) == sum(row["response_tokens"] for row in rows)
    with pytest.raises(ConfigError, match="different settings"):
        run_distill(config.replace(max_new_tokens=9), use_ray=False)


def test_distilling_without_ray_honours_use_gpu(tmp_path, prompts_file, tiny_model_dir, monkeypatch):
    """`koala distill --no-ray` places the target as `use_gpu` says, as the Ray actors and `koala train --no-ray` do
    (it ignored the setting: 'no' still loaded the target on a GPU, 'yes' ran on the CPU of a machine without one)."""
    import torch

    from pipeline.stages import distill

    loaded = []
    real_load = distill.load_target_from_config
    monkeypatch.setattr(distill, "load_target_from_config", lambda target: loaded.append(target.device) or
                        real_load(target.replace(device="cpu")))
    config = _distill_config(tmp_path, prompts_file, tiny_model_dir, tracking={"enabled": False},
                             target={"spec": str(tiny_model_dir), "device": "auto"})
    distill.run_distill(config.replace(use_gpu="no"), use_ray=False)
    assert loaded == ["cpu"]
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="distill.use_gpu: 'yes' but CUDA is not available"):
            distill.run_distill(config.replace(use_gpu="yes", out_dir=str(tmp_path / "yes")), use_ray=False)
        assert not (tmp_path / "yes").exists()


def test_teacher_forced_mode_uses_text_as_it_is(tmp_path, tiny_model_dir):
    from pipeline.stages.distill import run_distill

    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(SHAREGPT))
    config = _distill_config(tmp_path, path, tiny_model_dir, mode="teacher-forced", tracking={"enabled": False})
    summary = run_distill(config, use_ray=False)
    assert summary["prompts_kept"] == 3  # a (with response), b (same first turn, no response: distinct), f
    rows = [r for p in sorted((tmp_path / "data").glob("shard-*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert all(sum(r["loss_mask"]) == r["response_tokens"] > 0 for r in rows)


def test_one_prompt_with_several_answers_is_never_on_both_sides_of_the_split(tmp_path, tiny_model_dir):
    """Teacher-forced rows are keyed by the whole conversation (one row per answer), but split by the opening
    prompt: the same prompt's answers, and the same prompt distilled in generate mode, all land on one side."""
    from pipeline.config import TrainConfig
    from pipeline.stages.distill import run_distill
    from pipeline.stages.train import data_shards, read_rows, split_rows

    path = tmp_path / "answers.jsonl"
    prompts = [f"question {n}" for n in range(12)]
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": prompt},
                                                     {"role": "assistant", "content": f"answer {k} to {prompt}"}]}) + "\n"
                            for prompt in prompts for k in range(4)))
    run_distill(_distill_config(tmp_path / "tf", path, tiny_model_dir, mode="teacher-forced",
                                tracking={"enabled": False}), use_ray=False)
    run_distill(_distill_config(tmp_path / "gen", path, tiny_model_dir, tracking={"enabled": False}), use_ray=False)
    config = TrainConfig(data_dirs=(str(tmp_path / "tf" / "data"), str(tmp_path / "gen" / "data")), val_fraction=0.5)
    rows = read_rows(data_shards(config))
    assert len(rows) == 12 * 4 + 12 and len({r["prompt_id"] for r in rows}) == len(rows)
    assert len({r["split_id"] for r in rows}) == 12
    train, validation = split_rows(rows, config)
    assert train and validation
    assert not {r["split_id"] for r in train} & {r["split_id"] for r in validation}
    assert len(validation) % 5 == 0  # each held-out prompt: its 4 answers and its generated one


def test_prompts_the_context_cannot_answer_or_the_template_refuses_are_skipped_and_counted(tmp_path, tiny_model_dir,
                                                                                            monkeypatch):
    """A prompt whose answer would run past the context window (the tiny model's is 256) is skipped, not a crash
    of the whole run (GPT-2's position table has no row past it); so is a conversation the chat template refuses."""
    from jinja2.exceptions import TemplateError

    from pipeline.stages import distill

    path = tmp_path / "prompts.jsonl"
    texts = ["short question", "x" * 120, "y" * 200, "bad: the template refuses this one"]
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": t}]}) + "\n" for t in texts))
    encode = distill.PromptFormat.encode

    def refusing(self, messages):
        if messages[-1]["content"].startswith("bad"):
            raise TemplateError("Conversation roles must alternate")
        return encode(self, messages)

    monkeypatch.setattr(distill.PromptFormat, "encode", refusing)
    config = _distill_config(tmp_path, path, tiny_model_dir, max_new_tokens=100, tracking={"enabled": False})
    kept, skipped, total = distill.select_prompts(config)
    assert total == 4 and [c.messages[0]["content"] for c in kept] == texts[:2]
    assert skipped == {"longer_than_context": 1, "template_error": 1}


def test_bad_prompt_input_writes_nothing(tmp_path, tiny_model_dir):
    from pipeline.stages.distill import run_distill

    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text('{"foo": 1}\n')
    config = _distill_config(tmp_path, unknown, tiny_model_dir, tracking={"enabled": False})
    with pytest.raises(ConfigError, match="unknown dataset format"):
        run_distill(config, use_ray=False)
    assert not (tmp_path / "data").exists()


def test_distill_config_errors_name_fields(tmp_path):
    with pytest.raises(ConfigError, match="distill.mode"):
        DistillConfig(prompts="x.json", mode="dream")
    with pytest.raises(ConfigError, match="distill.prompts"):
        DistillConfig()
    with pytest.raises(ConfigError, match="distill.max_new_tokens"):
        DistillConfig(prompts="x.json", max_new_tokens=0)
