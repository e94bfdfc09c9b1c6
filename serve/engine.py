"""One replica's decoder: a target and an optional drafter, one generation at a time, off the event loop.

Generation runs in a single worker thread, so requests queue in arrival order and each owns its KV cache and
draft state (`pipeline.decoding.generate` creates both per call); the asyncio loop stays free to accept requests,
answer health checks and stream tokens. A request whose client has gone away is skipped if still queued, and
stops at the next decoding round if running.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from pipeline.config import DecodeConfig
from pipeline.decoding import GenerationResult, TokenCallback, generate
from pipeline.heads import DraftHead, HeadLoadError, load_head, read_head_metadata
from pipeline.target import Target, load_target_from_config
from pipeline.tracking import download_registered_head, tracking_uri
from serve.checks import first_line
from serve.config import REGISTRY_PREFIX, ServeConfig

log = logging.getLogger(__name__)


class CancelledGeneration(Exception):
    """The request was cancelled before it reached the decoder."""


class Engine:
    """Runs `generate` for one request at a time in a worker thread."""

    def __init__(self, target: Target, drafter: DraftHead | None) -> None:
        self.target = target
        self.drafter = drafter
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="koala-decode")
        self.cancelled_generations = 0  # generations stopped early because their client went away

    @property
    def context_window(self) -> int:
        return self.target.context_window

    def completion_prompt_ids(self, prompt: str) -> list[int]:
        """/v1/completions continues raw text: no chat template, the tokenizer's usual special tokens."""
        return self.target.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def chat_prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return self.target.formatter.encode(messages)

    def decode_text(self, token_ids: list[int]) -> str:
        return self.target.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _run(self, prompt_ids: list[int], config: DecodeConfig, on_tokens: TokenCallback,
             cancelled: threading.Event) -> GenerationResult:
        if cancelled.is_set():
            raise CancelledGeneration()
        ids = torch.tensor([prompt_ids], device=self.target.device)
        result = generate(self.target, ids, config=config, drafter=self.drafter, on_tokens=on_tokens)
        if result.finish_reason == "cancelled":
            self.cancelled_generations += 1
        return result

    async def stream(self, prompt_ids: list[int], config: DecodeConfig) -> AsyncIterator[list[int] | GenerationResult]:
        """Yields each decoding round's new token ids, then the `GenerationResult`. Closing the iterator early (a
        disconnected client) cancels the generation."""
        loop = asyncio.get_running_loop()
        rounds: asyncio.Queue[list[int] | None] = asyncio.Queue()
        cancelled = threading.Event()

        def on_tokens(new_ids: list[int]) -> bool:
            if cancelled.is_set():
                return False
            try:
                loop.call_soon_threadsafe(rounds.put_nowait, new_ids)
            except RuntimeError:  # the event loop is gone, so is the reader
                return False
            return True

        # Token batches are queued with call_soon_threadsafe before the future resolves (also through the loop),
        # so the None sentinel from the done-callback always comes after the last batch.
        future = loop.run_in_executor(self._worker, self._run, prompt_ids, config, on_tokens, cancelled)
        future.add_done_callback(lambda _: rounds.put_nowait(None))
        try:
            while (new_ids := await rounds.get()) is not None:
                yield new_ids
            yield await future
        finally:
            cancelled.set()
            future.cancel()  # a request still queued never reaches the decoder

    async def complete(self, prompt_ids: list[int], config: DecodeConfig) -> GenerationResult:
        """The whole generation at once; cancelling the awaiting task cancels the generation."""
        result = None
        async for item in self.stream(prompt_ids, config):
            if isinstance(item, GenerationResult):
                result = item
        assert result is not None
        return result

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)


def resolve_drafter_dir(config: ServeConfig, download_dir: str | Path) -> Path | None:
    """The head directory to serve: None without a drafter, the directory itself, or a download of the registered
    model version (`models:/NAME@alias` or `models:/NAME/VERSION`) into `download_dir`."""
    source = config.drafter_source
    if not source:
        return None
    if not source.startswith(REGISTRY_PREFIX):
        return Path(source).expanduser()
    path = download_registered_head(tracking_uri(config.tracking), source, Path(download_dir))
    log.info("downloaded %s to %s", source, path)
    return path


def load_engine(config: ServeConfig) -> Engine:
    """Loads the target and the drafter (failing on a bad drafter before the slow target load). A head that cannot
    be loaded raises `HeadLoadError` whatever the cause (`load_head` raises it for a missing, malformed or corrupt
    head; anything else it raises is wrapped in one). A
    registered head is downloaded to a temporary directory that is gone once it is in memory (a replica restarted
    by Serve would otherwise leave a copy behind each time)."""
    with tempfile.TemporaryDirectory(prefix="koala-drafter-") as download_dir:
        head_dir = resolve_drafter_dir(config, download_dir)
        if head_dir is not None:
            read_head_metadata(head_dir)
        target = load_target_from_config(config.target)
        drafter = None
        if head_dir is not None:
            try:
                drafter = load_head(head_dir, target.model, target_name=target.name, dtype=config.draft_dtype)
            except HeadLoadError:
                raise
            except Exception as error:
                raise HeadLoadError(
                    f"drafter {config.drafter_source}: cannot load the head in {head_dir} ({type(error).__name__}: "
                    f"{first_line(error)}); export it again or use another drafter") from error
            drafter.to(target.device)
    return Engine(target, drafter)
