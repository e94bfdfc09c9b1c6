"""Draft-vocabulary subsets (FR-Spec style): the N most frequent target tokens in some text."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from pipeline.config import ConfigError

# Fields whose string values are conversation or prompt text in the JSON shapes we accept.
TEXT_FIELDS = ("value", "content", "text", "prompt", "question", "answer", "response", "turns")


def _strings(record: Any) -> Iterator[str]:
    if isinstance(record, str):
        yield record
    elif isinstance(record, list):
        for item in record:
            yield from _strings(item)
    elif isinstance(record, dict):
        for key, value in record.items():
            if key in TEXT_FIELDS or key in ("conversations", "messages"):
                yield from _strings(value)


def read_corpus_texts(path: str | Path) -> list[str]:
    """Texts from a JSON array, a JSONL file (ShareGPT, OpenAI messages, MT-bench, GSM8K shapes) or plain text."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"draft vocabulary corpus {path} does not exist")
    raw = path.read_text()
    if path.suffix == ".json":
        return list(_strings(_parse(raw, path, "")))
    if path.suffix == ".jsonl":
        return [text for number, line in enumerate(raw.splitlines(), 1) if line.strip()
                for text in _strings(_parse(line, path, f" line {number}"))]
    return [line for line in raw.splitlines() if line.strip()]


def _parse(text: str, path: Path, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"draft vocabulary corpus {path}:{where} is not valid JSON ({error.msg})") from None


def count_tokens(texts: Iterable[str], tokenizer: PreTrainedTokenizerBase) -> Counter[int]:
    counts: Counter[int] = Counter()
    for text in texts:
        counts.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    return counts


def top_token_ids(counts: Counter[int], size: int, *, always_include: Iterable[int] = ()) -> torch.Tensor:
    """The `size` most frequent ids `(size,)`, always including `always_include` (EOS must stay draftable).

    Ties go to the lower id, so the choice depends on the counts alone, not on the order they were counted in
    (token_freq.json, the shards, or several data directories in another order give the same vocabulary)."""
    forced = list(dict.fromkeys(always_include))
    if size < len(forced):
        raise ConfigError(f"head.draft_vocab_size: {size} is smaller than the {len(forced)} ids that must be kept")
    ranked = [token for token, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])) if token not in forced]
    chosen = forced + ranked[: size - len(forced)]
    if len(chosen) < size:
        raise ConfigError(
            f"head.draft_vocab_size: the corpus has only {len(chosen)} distinct tokens, fewer than {size}; "
            "use a larger corpus or a smaller size"
        )
    return torch.tensor(sorted(chosen), dtype=torch.long)
