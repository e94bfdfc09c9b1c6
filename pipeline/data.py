"""Distillation data, Ray-free: prompt loading, the target's responses, teacher-forced encoding, Parquet shards.

A distilled record is one conversation as token ids (`input_ids`, prompt + response) with a `loss_mask` over the
tokens whose next-token distributions train the head (the response). Labels are never stored: training asks the
target for its own next-token distribution on these tokens, so `generate` and `teacher-forced` data feed the same
training stage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from jinja2.exceptions import TemplateError

from pipeline.config import ConfigError
from pipeline.target import PromptFormat, Target

ROLE_ALIASES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
    "model": "assistant",
    "system": "system",
}
SHARD_SCHEMA = pa.schema([
    ("prompt_id", pa.string()),
    ("split_id", pa.string()),
    ("first_turn_id", pa.string()),
    ("input_ids", pa.list_(pa.int32())),
    ("loss_mask", pa.list_(pa.int8())),
    ("prompt_tokens", pa.int32()),
    ("response_tokens", pa.int32()),
])
MANIFEST_FILE = "manifest.json"
FREQUENCY_FILE = "token_freq.json"
SUMMARY_FILE = "summary.json"


@dataclasses.dataclass(frozen=True)
class Conversation:
    """Normalised messages (`role` in user/assistant/system, non-empty `content`); `prompt_id` is a content hash."""

    prompt_id: str
    messages: tuple[dict[str, str], ...]

    @property
    def opening_id(self) -> str:
        """The content hash of the opening prompt (system prompt and first user turn): what training splits
        train from validation by, so one prompt with several answers, or kept both with and without responses,
        is never on both sides. For a conversation cut to its opening it is `prompt_id`."""
        messages = list(self.messages)
        first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), len(messages) - 1)
        return content_hash(messages[: first_user + 1])

    @property
    def first_turn_id(self) -> str:
        """The hash of the first user turn alone, as a one-turn conversation: what an evaluation prompt hashes to.
        The sweep drops evaluation prompts the data trains on by it, which `opening_id` misses behind a system
        prompt."""
        first_user = next(m for m in self.messages if m["role"] == "user")
        return content_hash([{"role": "user", "content": first_user["content"]}])

    def to_json(self) -> str:
        return json.dumps({"prompt_id": self.prompt_id, "messages": list(self.messages)})

    @classmethod
    def from_json(cls, text: str) -> Conversation:
        record = json.loads(text)
        return cls(record["prompt_id"], tuple(record["messages"]))


def _read_raw_records(source: str, *, split: str) -> Iterator[Any]:
    """Records from a .json array, a .jsonl file, or a Hugging Face dataset name."""
    path = Path(source).expanduser()
    if path.suffix in (".json", ".jsonl") or path.exists():
        if not path.is_file():
            raise ConfigError(f"distill.prompts: {path} does not exist")
        try:
            text = path.read_text()
            if path.suffix == ".jsonl":
                yield from (json.loads(line) for line in text.splitlines() if line.strip())
            else:
                loaded = json.loads(text)
                if not isinstance(loaded, list):
                    raise ConfigError(f"distill.prompts: {path} must hold a JSON array of records")
                yield from loaded
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ConfigError(f"distill.prompts: {path} is not readable JSON/JSONL ({error})") from error
        return
    import datasets  # deferred: slow import, needed only for hub datasets

    try:
        yield from datasets.load_dataset(source, split=split)
    except Exception as error:  # datasets raises many types; the user needs one line either way
        raise ConfigError(
            f"distill.prompts: {source!r} is neither a .json/.jsonl file nor a loadable dataset "
            f"(split {split!r}): {str(error).splitlines()[0] if str(error) else type(error).__name__}"
        ) from error


def normalize_record(record: Any) -> tuple[list[dict[str, str]] | None, str | None]:
    """A raw record -> (messages, None) or (None, skip reason).

    Accepts ShareGPT (`conversations` with `from`/`value`), OpenAI (`messages` with `role`/`content`), and single
    prompts (`prompt`, `instruction`, `question`, `text`, or MT-bench `turns`), with Alpaca's `input` added to its
    `instruction` and an answer (`output`, `response` or `completion`) as the assistant turn.
    """
    if not isinstance(record, dict):
        return None, "unknown_format"
    if "conversations" in record or "messages" in record:
        turns = record.get("conversations") or record.get("messages") or []
        messages = []
        for turn in turns if isinstance(turns, list) else []:
            if not isinstance(turn, dict):
                return None, "unknown_format"
            role = ROLE_ALIASES.get(str(turn.get("from", turn.get("role", ""))).lower())
            content = turn.get("value", turn.get("content"))
            if role is None or not isinstance(content, str):
                return None, "unknown_format"
            messages.append({"role": role, "content": content.strip()})
    else:
        prompt = next((record[k] for k in ("prompt", "instruction", "question", "text") if k in record), None)
        if prompt is None and isinstance(record.get("turns"), list) and record["turns"]:
            prompt = record["turns"][0]
        if not isinstance(prompt, str):
            return None, "unknown_format"
        context = record.get("input")
        if "instruction" in record and isinstance(context, str) and context.strip():
            prompt = f"{prompt.strip()}\n\n{context.strip()}"  # Alpaca: the text the instruction is about
        messages = [{"role": "user", "content": prompt.strip()}]
        answer = next((record[k] for k in ("output", "response", "completion") if k in record), None)
        if isinstance(answer, str) and answer.strip():  # what teacher-forced mode trains on
            messages.append({"role": "assistant", "content": answer.strip()})
    while messages and messages[0]["role"] == "system":
        if not messages[0]["content"]:
            messages.pop(0)
        else:
            break
    if not any(m["role"] == "user" for m in messages):
        return None, "no_user_turn"
    first_turn = next(m for m in messages if m["role"] != "system")
    if first_turn["role"] != "user":
        return None, "first_turn_not_user"
    if any(not m["content"] for m in messages):
        return None, "empty_text"
    return messages, None


def content_hash(messages: Iterable[dict[str, str]]) -> str:
    return hashlib.sha1(json.dumps(list(messages), sort_keys=True).encode()).hexdigest()[:16]


def load_conversations(
    sources: str | Iterable[str], *, split: str = "train", keep_responses: bool, max_prompts: int = 0
) -> tuple[list[Conversation], Counter[str], int]:
    """Reads, normalises and deduplicates conversations from one or more sources, in order.
    Returns (kept, skip counts by reason, records read).

    Without `keep_responses` a conversation is cut to its opening user turn (plus system prompt): the target will
    answer it. Deduplication is by content hash of what is kept.
    """
    kept: list[Conversation] = []
    seen: set[str] = set()
    skipped: Counter[str] = Counter()
    total = 0
    sources = [sources] if isinstance(sources, str) else list(sources)
    records = (record for source in sources for record in _read_raw_records(source, split=split))
    for record in records:
        total += 1
        messages, reason = normalize_record(record)
        if messages is None:
            skipped[reason] += 1
            continue
        if not keep_responses:
            first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
            messages = messages[: first_user + 1]
        prompt_id = content_hash(messages)
        if prompt_id in seen:
            skipped["duplicate"] += 1
            continue
        seen.add(prompt_id)
        kept.append(Conversation(prompt_id, tuple(messages)))
        if max_prompts and len(kept) >= max_prompts:
            break
    if total and skipped["unknown_format"] == total:
        raise ConfigError(
            f"distill.prompts: unknown dataset format in {sources}: expected ShareGPT records with "
            "'conversations' (from/value), OpenAI records with 'messages' (role/content), or 'prompt' fields"
        )
    return kept, skipped, total


@dataclasses.dataclass
class Row:
    prompt_id: str
    split_id: str  # Conversation.opening_id
    first_turn_id: str  # Conversation.first_turn_id
    input_ids: list[int]
    loss_mask: list[int]
    prompt_tokens: int
    response_tokens: int


def generate_responses(
    target: Target,
    conversations: list[Conversation],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
) -> list[Row]:
    """The target answers every conversation with batched, left-padded HF `generate`.

    Prompts are sorted by length inside the call so batches carry little padding; rows come back in input order.
    """
    formatter = target.formatter
    encoded = [formatter.encode(list(c.messages)) for c in conversations]
    order = sorted(range(len(conversations)), key=lambda i: len(encoded[i]))
    eos = sorted(target.eos_token_ids)
    pad_id = target.pad_token_id
    rows: dict[int, Row] = {}
    generator_seed = torch.Generator().manual_seed(seed)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, index in enumerate(batch):
            ids = encoded[index]
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention_mask[row, width - len(ids):] = 1
        sampling = {}
        if temperature > 0:
            torch.manual_seed(int(torch.randint(1 << 30, (1,), generator=generator_seed)))
            # top_k=0: the answers follow the distribution decoding samples (temperature, top_p), without
            # transformers' default top-50 cut.
            sampling = {"temperature": temperature, "top_p": top_p, "top_k": 0}
        with torch.inference_mode():
            output = target.model.generate(
                input_ids=input_ids.to(target.device), attention_mask=attention_mask.to(target.device),
                max_new_tokens=max_new_tokens, do_sample=temperature > 0, eos_token_id=eos, pad_token_id=pad_id,
                **sampling,
            )
        for row, index in enumerate(batch):
            response = _trim_response(output[row, width:].tolist(), eos)
            prompt = encoded[index]
            rows[index] = Row(
                prompt_id=conversations[index].prompt_id,
                split_id=conversations[index].opening_id,
                first_turn_id=conversations[index].first_turn_id,
                input_ids=prompt + response,
                loss_mask=[0] * len(prompt) + [1] * len(response),
                prompt_tokens=len(prompt),
                response_tokens=len(response),
            )
    return [rows[i] for i in range(len(conversations))]


_SENTINEL = "\x00KOALA-USER-TEXT\x00"


def user_turn_frame(formatter: PromptFormat) -> tuple[str, str]:
    """The target's prompt text around a user turn's content: (everything before it, what follows it).

    Found by rendering a one-turn conversation around a sentinel, so any chat template (and its system prompt)
    works without knowing its syntax."""
    text = formatter.render([{"role": "user", "content": _SENTINEL}])
    before, _, after = text.partition(_SENTINEL)
    return before, after


def generate_self_prompts(
    target: Target,
    count: int,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    min_chars: int = 16,
    seed: int = 0,
) -> tuple[list[str], Counter[str]]:
    """`count` user prompts sampled by the target from its own user-turn prefix (Magpie-style self-instruct).

    Returns the kept prompt texts and counts of the dropped ones by reason: `unfinished` (no end of turn within
    `max_new_tokens`: a cut-off question is not one a user asks), `too_short` (under `min_chars` characters).
    `top_k` 0 samples from every token (passed explicitly: `generate` would otherwise apply its default of 50).
    """
    prefix, suffix = user_turn_frame(target.formatter)
    prefix_ids = target.tokenizer(prefix, add_special_tokens=target.formatter.adds_special_tokens)["input_ids"]
    if not prefix_ids:
        raise ConfigError(
            "self_prompts.target.prompt_format: the plain format has no user turn to start; self-instruct prompts "
            "need a chat template (or the vicuna format)"
        )
    eos = sorted(target.eos_token_ids)
    pad_id = target.pad_token_id
    # Formats without an end-of-turn token (vicuna) end a user turn with the text that opens the reply.
    turn_end = suffix.strip()
    input_ids = torch.tensor([prefix_ids] * count, device=target.device)
    torch.manual_seed(seed)
    with torch.inference_mode():
        output = target.model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
            do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k, eos_token_id=eos, pad_token_id=pad_id,
        )
    prompts: list[str] = []
    dropped: Counter[str] = Counter()
    for row in output[:, len(prefix_ids):].tolist():
        tokens = _trim_response(row, eos)
        text = target.tokenizer.decode(tokens, skip_special_tokens=True)
        ended = bool(tokens) and tokens[-1] in eos
        if turn_end and turn_end in text:
            text, ended = text[: text.index(turn_end)], True
        text = text.strip()
        if not ended:
            dropped["unfinished"] += 1
        elif len(text) < min_chars:
            dropped["too_short"] += 1
        else:
            prompts.append(text)
    return prompts, dropped


def _trim_response(tokens: list[int], eos: list[int]) -> list[int]:
    """Cuts a generated row after its first EOS (what follows is padding)."""
    for position, token in enumerate(tokens):
        if token in eos:
            return tokens[: position + 1]
    return tokens


def encode_teacher_forced(formatter: PromptFormat, conversation: Conversation) -> Row:
    """Existing text as it is: the full conversation through the prompt format, with the loss on assistant turns
    and the end-of-turn token after each (or, for a plain prompt without responses, on the prompt text itself)."""
    messages = list(conversation.messages)
    has_responses = any(m["role"] == "assistant" for m in messages)
    text = formatter.render(messages, add_generation_prompt=not has_responses)
    encoding = formatter.tokenizer(
        text, add_special_tokens=formatter.adds_special_tokens, return_offsets_mapping=True
    )
    spans = _content_spans(formatter, text, messages, role="assistant" if has_responses else "user")
    loss_mask = [int(any(start < end_span and end > start_span for start_span, end_span in spans))
                 for start, end in encoding["offset_mapping"]]
    if has_responses:
        _mark_turn_ends(loss_mask, encoding["input_ids"], special_ids=set(formatter.tokenizer.all_special_ids))
    first_loss = loss_mask.index(1) if 1 in loss_mask else len(loss_mask)
    return Row(
        prompt_id=conversation.prompt_id,
        split_id=conversation.opening_id,
        first_turn_id=conversation.first_turn_id,
        input_ids=list(encoding["input_ids"]),
        loss_mask=loss_mask,
        prompt_tokens=first_loss,
        response_tokens=sum(loss_mask),
    )


def _mark_turn_ends(loss_mask: list[int], input_ids: list[int], *, special_ids: set[int]) -> None:
    """Puts the special token right after each answer (its end-of-turn token: <|im_end|>, </s>, <|eot_id|>) under
    the mask: the target emits it to end the answer, and a generated answer keeps it (its EOS) under the mask too."""
    ends = [position + 1 for position in range(len(loss_mask) - 1)
            if loss_mask[position] and not loss_mask[position + 1] and input_ids[position + 1] in special_ids]
    for position in ends:
        loss_mask[position] = 1


def _content_spans(formatter: PromptFormat, text: str, messages: list[dict[str, str]], *,
                   role: str) -> list[tuple[int, int]]:
    """Character spans of each `role` message's content inside the rendered `text`, found in order.

    Each turn is looked for where the template puts it (`_content_start`), not at the first match after the previous
    turn: that could be the template's own text (an answer "A" inside Vicuna's "ASSISTANT:", a prompt "user" inside
    its system prompt) and mask the wrong tokens. The first match is the fallback for templates that rewrite turns."""
    spans, cursor = [], 0
    for index, message in enumerate(messages):
        content = message["content"]
        position = _content_start(formatter, text, messages, index)
        if position is None or position < cursor or not text.startswith(content, position):
            position = text.find(content, cursor)
        if position < 0:
            continue
        cursor = position + len(content)
        if message["role"] == role:
            spans.append((position, cursor))
    return spans


def _content_start(formatter: PromptFormat, text: str, messages: list[dict[str, str]], index: int) -> int | None:
    """Where message `index`'s content starts in `text`: the conversation up to it rendered with a sentinel as its
    content puts the sentinel there, when the text before the sentinel is the start of `text` (None otherwise)."""
    probe = [*messages[:index], {**messages[index], "content": _SENTINEL}]
    try:
        before, found, _ = formatter.render(probe, add_generation_prompt=False).partition(_SENTINEL)
    except TemplateError:  # a template refusing the partial conversation: the fallback finds the turn
        return None
    return len(before) if found and text.startswith(before) else None


def rows_to_table(rows: list[Row], *, metadata: dict[str, Any]) -> pa.Table:
    columns = {field.name: [getattr(r, field.name) for r in rows] for field in SHARD_SCHEMA}
    table = pa.Table.from_pydict(columns, schema=SHARD_SCHEMA)
    return table.replace_schema_metadata({"koala": json.dumps(metadata)})


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields a temporary path in the same directory to write to, renamed to `path` only when the block succeeds:
    readers (and a resumed run) see the whole file or none of it, never a half-written one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        if temporary.is_dir() and path.is_dir():
            # A directory cannot replace a non-empty one in one rename: the old one steps aside first (a crash
            # between the two renames leaves it as .NAME.old, never a half-written directory at `path`).
            retired = path.with_name(f".{path.name}.{os.getpid()}.old")
            os.replace(path, retired)
            os.replace(temporary, path)
            shutil.rmtree(retired)
        else:
            os.replace(temporary, path)
    finally:
        if temporary.is_dir():
            shutil.rmtree(temporary)
        else:
            temporary.unlink(missing_ok=True)


def write_table_atomically(table: pa.Table, path: Path) -> None:
    with atomic_path(path) as temporary:
        pq.write_table(table, temporary)


def write_json_atomically(data: Any, path: Path) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, default=str) + "\n")


def shard_path(directory: Path, index: int) -> Path:
    return directory / f"shard-{index:05d}.parquet"


def shard_metadata(path: Path) -> dict[str, Any]:
    return json.loads(pq.read_schema(path).metadata[b"koala"])


def token_frequencies(shard_paths: Iterable[Path]) -> Counter[int]:
    """Counts of the tokens under the loss mask (the responses) across shards."""
    counts: Counter[int] = Counter()
    for path in shard_paths:
        table = pq.read_table(path, columns=["input_ids", "loss_mask"])
        for ids, mask in zip(table.column("input_ids").to_pylist(), table.column("loss_mask").to_pylist()):
            counts.update(token for token, keep in zip(ids, mask) if keep)
    return counts


def read_token_frequencies(path: str | Path) -> Counter[int]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"token frequency table {path} does not exist (koala distill writes {FREQUENCY_FILE})")
    return Counter({int(token): count for token, count in json.loads(path.read_text())["counts"].items()})
