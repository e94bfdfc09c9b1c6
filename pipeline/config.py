"""Stage configurations: frozen keyword-only dataclasses, loadable from dicts and YAML, validated on load.

Every validation error is a `ConfigError` whose message names the bad field and what it accepts, so a typo in a
YAML file never surfaces as a traceback from deep inside torch or Ray.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Self

import yaml

HEAD_TYPES = ("medusa", "eagle")
PROMPT_FORMATS = ("auto", "chat", "vicuna", "plain")
DTYPES = ("auto", "float32", "float16", "bfloat16")
CPU_LINEAR_KERNELS = ("onednn", "onednn-unpacked", "torch")
# Defaults shared by every stage that decodes, so heads are trained on the lengths they are evaluated and served at.
DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_DRAFT_THRESHOLD = 0.0
TREE_MODES = ("chain", "dynamic", "static")
# Greedy decoding drafts a static tree sized from the measured verify cost: the fastest shape measured on the CPU
# reference (README "Tree drafts").
DEFAULT_TREE = "static"
# Trees also get a branch of up to this many prompt-lookup tokens (pipeline/lookup.py): on the CPU reference it
# lifted the shipped head from tau 2.27 and 1.45x to 2.60 and 1.67x (README "Tree drafts").
DEFAULT_LOOKUP_TOKENS = 8
# Sampling drafts trees up to this temperature and chains above it: with the shipped head on the CPU reference, a
# static tree of drawn tokens + lookup beat chains at temperatures 0.3, 0.7 and 1.0 (1.80x vs 1.67x, 1.57x vs 1.49x,
# 1.45x vs 1.41x; README "Tree drafts"); top-k trees, before drawn ones, lost to chains from 0.7 on. Hotter
# sampling (OpenAI's range goes to 2) is not measured and keeps chains.
DEFAULT_TREE_MAX_TEMPERATURE = 1.0
SEED_RANGE = (-(2**63), 2**64 - 1)  # the seeds torch.Generator.manual_seed accepts
# With log_every_steps 0, training logs about this many points per run: a loss curve at every scale.
LOSS_CURVE_POINTS = 50


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def check_dtype(value: str, *, field: str) -> None:
    """Raises `ConfigError` naming `field` unless `value` is one of `DTYPES`."""
    if value not in DTYPES:
        raise ConfigError(f"{field}: unknown dtype {value!r}; choose one of {list(DTYPES)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Base class: typed construction from plain dicts with field-level errors."""

    section: ClassVar[str] = "config"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Subclasses raise `ConfigError` naming the field; called on every construction."""

    def fail(self, field: str, message: str) -> typing.NoReturn:
        raise ConfigError(f"{self.section}.{field}: {message}")

    def require_at_least(self, minimum: float, *fields: str, note: str = "") -> None:
        """Fails on the first of `fields` below `minimum`; `note` explains a special value (e.g. "0 = all")."""
        for field in fields:
            value = getattr(self, field)
            if value < minimum:
                self.fail(field, f"must be >= {minimum}{f' ({note})' if note else ''}, got {value}")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> Self:
        values = dict(values or {})
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{cls.section}: unknown field(s) {unknown}; known fields are {sorted(known)}")
        coerced = {name: _coerce(f"{cls.section}.{name}", value, hints[name]) for name, value in values.items()}
        return cls(**coerced)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Self:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{cls.section}: config file {path} does not exist")
        loaded = read_yaml(path, section=cls.section)
        if not isinstance(loaded, dict):
            raise ConfigError(f"{cls.section}: {path} must hold a mapping of field: value")
        return cls.from_dict(loaded)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)


def read_yaml(path: Path, *, section: str) -> Any:
    """A YAML file's content ({} when empty); a syntax error is a ConfigError naming the file and line."""
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{section}: {path} is not valid YAML ({_yaml_problem(error)})") from None


def _yaml_problem(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def assign_dotted(values: dict[str, Any], dotted: str, value: Any) -> None:
    """values["a"]["b"] = value for "a.b", creating the nested mappings on the way (an empty one, None, too)."""
    *parents, leaf = dotted.split(".")
    path = []
    for parent in parents:
        path.append(parent)
        if values.get(parent) is None:
            values[parent] = {}
        if not isinstance(values[parent], dict):
            raise ConfigError(f"{'.'.join(path)}: is {values[parent]!r}, not a mapping of fields, so {dotted} cannot "
                              f"be set; write {'.'.join(path)} as a mapping (e.g. spec: {values[parent]!r})")
        values = values[parent]
    values[leaf] = value


def apply_overrides(values: dict[str, Any], items: typing.Iterable[str], *, section: str) -> dict[str, Any]:
    """Applies command-line `FIELD=VALUE` overrides (dotted fields, YAML values) to a config mapping."""
    for item in items:
        field, separator, raw = item.partition("=")
        if not separator:
            raise ConfigError(f"{section}: --set expects FIELD=VALUE, got {item!r}")
        try:
            parsed = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            raise ConfigError(f"{section}: --set {item!r}: the value is not valid YAML ({_yaml_problem(error)})") from None
        assign_dotted(values, field, parsed)
    return values


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Checks `value` against a simple type hint (int, float, str, bool, X | None, tuple[X, ...])."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(name, value, option)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if origin is tuple:
        if isinstance(value, str):
            value = [value]  # a single item where a list is expected
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        (item_hint, _ellipsis) = typing.get_args(hint)
        return tuple(_coerce(name, item, item_hint) for item in value)
    if isinstance(hint, type) and issubclass(hint, Config):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping of {hint.section} fields, got {value!r}")
        return hint.from_dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-3" (no dot) as a string
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class HeadConfig(Config):
    """Architecture of a KOALA draft head.

    `num_layers` is K: residual blocks per Medusa head, or decoder layers in the EAGLE head (K=1 is the original).
    `num_heads` is the number of Medusa heads, i.e. the longest chain Medusa can draft; EAGLE drafts
    autoregressively and uses `num_heads` only as its default draft length.
    `draft_vocab_size` = 0 means the full target vocabulary; N > 0 restricts the head's LM head to N token ids
    (FR-Spec style), whose map is stored with the head. `static_tree` holds rank paths, best first (training
    builds it from the head's measured top-k accuracy per draft step); `tree: static` decoding drafts its best
    `tree_nodes`. `extra_feature_layers` (EAGLE only) are target layers whose outputs the head reads besides the
    last hidden state, fused by a learned projection (EAGLE-3 reads a low, a middle and a high layer); indices
    as in `output_hidden_states` (0 = the embeddings, i = decoder layer i's output); () = the last state only.
    """

    section: ClassVar[str] = "head"

    head_type: str = "eagle"
    num_layers: int = 1
    num_heads: int = 4
    draft_vocab_size: int = 0
    static_tree: tuple[tuple[int, ...], ...] = ()
    extra_feature_layers: tuple[int, ...] = ()

    def validate(self) -> None:
        if self.head_type not in HEAD_TYPES:
            self.fail("head_type", f"unknown head type {self.head_type!r}; choose one of {list(HEAD_TYPES)}")
        if self.num_layers < 1:
            self.fail("num_layers", f"must be >= 1 (K=1 is the original head), got {self.num_layers}")
        if self.num_heads < 1:
            self.fail("num_heads", f"must be >= 1, got {self.num_heads}")
        if self.draft_vocab_size < 0:
            self.fail("draft_vocab_size", f"must be 0 (full vocabulary) or a positive size, got {self.draft_vocab_size}")
        paths = set(self.static_tree)
        for path in self.static_tree:
            if not path or min(path) < 0 or (len(path) > 1 and path[:-1] not in paths):
                self.fail("static_tree", f"{path} is not a path of ranks whose parent path is in the tree")
        layers = self.extra_feature_layers
        if layers and self.head_type != "eagle":
            self.fail("extra_feature_layers", f"only EAGLE heads fuse several target layers, not {self.head_type}")
        if any(layer < 0 for layer in layers) or len(set(layers)) != len(layers):
            self.fail("extra_feature_layers", f"must be distinct layer indices >= 0 (0 = the embeddings), got {layers}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeConfig(Config):
    """Generation settings shared by the vanilla baseline and the speculative decoder.

    `temperature` = 0 is greedy. `draft_length` = 0 means the head's default (`num_heads`); it is the longest
    chain drafted per round, and `draft_threshold` > 0 ends a chain earlier, after the first token at which the
    product of its tokens' draft probabilities falls below it (lossless either way). `tree` drafts a tree instead of
    a chain, verified in one target pass: `dynamic` (EAGLE-2: the `tree_top_k` best nodes expanded per step for
    draft_length steps, the best `tree_nodes` kept; Medusa: the best paths of its heads' top-k) or `static` (the
    drafter's tree, else a default of rank paths). Sampling up to `tree_max_temperature` drafts trees too (a static
    EAGLE tree's tokens drawn from the head's distribution without replacement, other trees' the top-k) and verifies
    them by `decoding.accept_sampling`; hotter sampling drafts chains (speculative sampling from the head's
    distribution), which pay more there (both lossless; measured in the README's "Tree drafts").
    `tree_nodes` 0 = auto: a static tree's paths are learnt from the rounds decoded (`trees.TreeBudget`: the
    prefix, in order of measured acceptance, with the most expected tokens per second on this device's measured
    draft and verify costs; a seeded sampled generation drafts a fixed prefix instead, `decoding.SEEDED_SAMPLING_TREE_NODES`
    paths, so its seed reproduces its text); a dynamic tree's size is the largest whose verify pass costs at most 1.2x the chain's.
    `lookup_tokens` > 0 adds up to that many prompt-lookup tokens (what followed the latest earlier occurrence of the context's last n-gram) to each
    tree as one more branch (pipeline/lookup.py), on top of its `tree_nodes`; 0 = the drafter's tree alone. `stop`
    holds stop strings; EOS tokens always stop.
    """

    section: ClassVar[str] = "decode"

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    draft_length: int = 0
    draft_threshold: float = DEFAULT_DRAFT_THRESHOLD
    tree: str = DEFAULT_TREE
    tree_nodes: int = 0
    tree_top_k: int = 4
    lookup_tokens: int = DEFAULT_LOOKUP_TOKENS
    tree_max_temperature: float = DEFAULT_TREE_MAX_TEMPERATURE
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            self.fail("max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            self.fail("temperature", f"must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            self.fail("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.draft_length < 0:
            self.fail("draft_length", f"must be >= 0 (0 = the head's default), got {self.draft_length}")
        if self.tree not in TREE_MODES:
            self.fail("tree", f"unknown tree mode {self.tree!r}; choose one of {list(TREE_MODES)}")
        if self.tree_nodes < 0:
            self.fail("tree_nodes", f"must be >= 0 (0 = auto: learnt from the rounds decoded), got {self.tree_nodes}")
        if self.tree_top_k < 1:
            self.fail("tree_top_k", f"must be >= 1, got {self.tree_top_k}")
        if self.tree_max_temperature < 0:
            self.fail("tree_max_temperature", f"must be >= 0 (0 = sampling always drafts chains), got {self.tree_max_temperature}")
        if self.lookup_tokens < 0:
            self.fail("lookup_tokens", f"must be >= 0 (0 = no prompt-lookup branch), got {self.lookup_tokens}")
        if not 0 <= self.draft_threshold < 1:
            self.fail("draft_threshold", f"must be in [0, 1) (0 = always draft draft_length tokens), got {self.draft_threshold}")
        if any(not s for s in self.stop):
            self.fail("stop", "stop strings must be non-empty")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            self.fail("seed", f"must be between {SEED_RANGE[0]} and {SEED_RANGE[1]} (a 64-bit seed), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class TargetConfig(Config):
    """Which target model to load and how to turn a user prompt into its input text."""

    section: ClassVar[str] = "target"

    spec: str = "smollm2"
    dtype: str = "auto"
    device: str = "auto"
    prompt_format: str = "auto"
    system_prompt: str | None = None
    trust_remote_code: bool = False
    # On a CPU, "onednn" runs the fp32 linear layers through oneDNN with weights packed once into its layout
    # (pipeline/cpu_linear.py: a target step 25 ms instead of 42 on the reference machine, verifying 8 tokens 31 ms
    # instead of 64, same results up to rounding) at the cost of a second copy of those weights; "onednn-unpacked"
    # keeps one copy (8 tokens 40 ms); "torch" keeps nn.Linear's MKL path.
    cpu_linear: str = "onednn"

    def validate(self) -> None:
        if not self.spec:
            self.fail("spec", "must name a target: 'smollm2', a hub id, a model directory or a .gguf file")
        check_dtype(self.dtype, field=f"{self.section}.dtype")
        if self.prompt_format not in PROMPT_FORMATS:
            self.fail("prompt_format", f"unknown prompt format {self.prompt_format!r}; choose one of {list(PROMPT_FORMATS)}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            self.fail("device", f"must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.cpu_linear not in CPU_LINEAR_KERNELS:
            self.fail("cpu_linear", f"unknown kernel {self.cpu_linear!r}; choose one of {list(CPU_LINEAR_KERNELS)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchConfig(Config):
    """`koala bench`: which prompts, how many, and the decode settings every method shares. `audit` runs the
    losslessness audit (pipeline/audit.py) on every greedy prompt."""

    section: ClassVar[str] = "bench"

    questions: str = ""
    limit: int = 0
    per_category: int = 0
    warmup_prompts: int = 1
    prompt_lookup_num_tokens: int = 10
    include_hf: bool = True
    audit: bool = False

    def validate(self) -> None:
        if self.limit < 0:
            self.fail("limit", f"must be >= 0 (0 = all), got {self.limit}")
        if self.per_category < 0:
            self.fail("per_category", f"must be >= 0 (0 = no per-category cap), got {self.per_category}")
        if self.limit and self.per_category:
            self.fail("limit", "use either limit or per_category, not both")
        if self.warmup_prompts < 0:
            self.fail("warmup_prompts", f"must be >= 0, got {self.warmup_prompts}")
        if self.prompt_lookup_num_tokens < 1:
            self.fail("prompt_lookup_num_tokens", f"must be >= 1, got {self.prompt_lookup_num_tokens}")


DATA_MODES = ("generate", "teacher-forced")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrackingConfig(Config):
    """MLflow: `uri` empty means the embedded default, a SQLite store `<run_dir>/mlflow.db`. `run_dir` empty (the
    default) is `runs` for a stage run on its own and the pipeline's `run_dir` in a pipeline."""

    section: ClassVar[str] = "tracking"

    uri: str = ""
    run_dir: str = ""
    experiment: str = "koala"
    enabled: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillConfig(Config):
    """`koala distill`: the target writes its own training data (or labels existing text) as Parquet shards.

    The data budget is explicit: `max_prompts` (0 = all), `max_new_tokens` per response, and `mode` —
    `generate` (the target answers each prompt; about 10x the cost per token of `teacher-forced`, which uses the
    text as it is). Mix modes by distilling into two directories and training on both. `max_new_tokens`
    defaults to the decoder's default, so heads train on the answer lengths they are served at.
    """

    section: ClassVar[str] = "distill"

    prompts: tuple[str, ...] = ()
    split: str = "train"
    mode: str = "generate"
    max_prompts: int = 0
    max_prompt_tokens: int = 1024
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 16
    shard_size: int = 64
    num_actors: int = 1
    cpus_per_actor: int = 2
    use_gpu: str = "auto"
    out_dir: str = "runs/data/distill"
    target: TargetConfig = dataclasses.field(default_factory=TargetConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)

    def validate(self) -> None:
        if not self.prompts:
            self.fail("prompts", "name prompt files (.json/.jsonl, ShareGPT or OpenAI messages) or HF datasets")
        if self.mode not in DATA_MODES:
            self.fail("mode", f"unknown mode {self.mode!r}; choose one of {list(DATA_MODES)}")
        self.require_at_least(1, "max_prompt_tokens", "max_new_tokens", "batch_size", "shard_size", "num_actors",
                              "cpus_per_actor")
        self.require_at_least(0, "max_prompts", note="0 = all")
        if self.temperature < 0:
            self.fail("temperature", f"must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            self.fail("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.use_gpu not in ("auto", "yes", "no"):
            self.fail("use_gpu", f"must be 'auto', 'yes' or 'no', got {self.use_gpu!r}")

    def generation_settings(self) -> dict[str, Any]:
        """Everything that changes the content of a shard: a different value means different data."""
        return {
            "target": self.target.spec, "prompt_format": self.target.prompt_format,
            "system_prompt": self.target.system_prompt, "mode": self.mode, "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed, "shard_size": self.shard_size,
            "max_prompt_tokens": self.max_prompt_tokens, "dtype": self.target.dtype,
        }


@dataclasses.dataclass(frozen=True, kw_only=True)
class SelfPromptConfig(Config):
    """`koala self-prompts`: the target writes user prompts itself (Magpie-style self-instruct).

    The target's prompt format is rendered up to where a user turn's text starts, and the target samples that text
    until it ends its turn. An instruction-tuned model then writes instructions like the ones it was tuned on, so
    distilling its answers to them gives training data from the target's own distribution at any volume, beyond
    the prompts a user happens to have. The prompts go to a JSONL file (OpenAI `messages`) that `koala distill
    --prompts` reads; it is appended batch by batch, so an interrupted run keeps what it wrote and continues.
    """

    section: ClassVar[str] = "self_prompts"

    count: int = 1024
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    # 0 samples the whole distribution; unset, transformers' `generate` would keep only its default top 50 tokens.
    top_k: int = 0
    min_chars: int = 16
    batch_size: int = 64
    seed: int = 0
    out: str = "runs/data/self_prompts.jsonl"
    target: TargetConfig = dataclasses.field(default_factory=TargetConfig)

    def validate(self) -> None:
        self.require_at_least(1, "count", "max_new_tokens", "batch_size")
        self.require_at_least(0, "min_chars", "top_k")
        if self.temperature <= 0:
            self.fail("temperature", f"must be > 0: prompts are sampled (greedy would write one prompt), "
                                     f"got {self.temperature}")
        if not 0 < self.top_p <= 1:
            self.fail("top_p", f"must be in (0, 1], got {self.top_p}")
        if not self.out.endswith(".jsonl"):
            self.fail("out", f"must be a .jsonl file (koala distill --prompts reads it), got {self.out!r}")


FEATURE_CACHE_MODES = ("auto", "on", "off")
LR_SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig(Config):
    """`koala train`: one KOALA head (type, K, lambda) trained on distilled data.

    The recipe (defaults are the best measured on SmolLM2; README "Training recipe"):
    - data budget: `max_train_tokens` response tokens (0 = all), rows cut at `max_seq_len`;
    - optimiser: AdamW (`head_lr`, `weight_decay`), `warmup_fraction` of the steps linear warm-up then
      `lr_schedule` decay to `min_lr_ratio` x lr, gradient clipping at `grad_clip` (0 = off); fp32 master weights
      under `precision` autocast (`auto`: bf16 on CUDA, fp32 on CPU; float16 uses a gradient scaler);
    - EAGLE training-time test: the head is unrolled `unroll_depth` drafting steps, reading its own predicted
      features, with a loss at every step weighted `depth_loss_decay`^step (1 = no unrolling: at equal training
      time it won; unrolling 4 steps costs ~5x per step and pays off as a fine-tune, see `init_head`);
      `feature_noise` adds U(-a, a) to the true input features (EAGLE); `feature_loss_weight` weighs EAGLE's
      feature regression;
    - selection: after every epoch a validation estimate of tau (greedy chain decoding with `val_draft_length`
      drafted tokens replayed round by round on the held-out answers); `select_best` exports the best epoch's head.
    `max_train_seconds` > 0 stops training after that much training time (then validates and exports).
    `init_head` names a head directory to start from (fine-tuning, e.g. with training-time test); its type, K and
    draft vocabulary must match `head`.

    `adv_weight` is lambda: 0 disables the discriminator (the plain distillation baseline). It ramps up linearly
    over `adv_warmup_steps`; the discriminator (`discriminator_layers` deep, 0 = the head's K) uses one-sided
    `adv_label_smoothing`. `feature_cache` `auto` caches the target's features (fp16) when the estimate stays
    below `cache_limit_gb`, otherwise every step recomputes them with the frozen target. `fail_once_at_step` is a
    test-only fault injection: the worker process exits once after that step.
    """

    section: ClassVar[str] = "train"

    data_dirs: tuple[str, ...] = ()
    out_dir: str = "runs/heads/koala"
    head: HeadConfig = dataclasses.field(default_factory=HeadConfig)
    init_head: str = ""
    adv_weight: float = 0.0
    adv_warmup_steps: int = 200
    adv_label_smoothing: float = 0.1
    discriminator_layers: int = 0
    discriminator_hidden_size: int = 256
    discriminator_lr: float = 1e-4
    head_lr: float = 1e-3
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    warmup_fraction: float = 0.03
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    precision: str = "auto"
    unroll_depth: int = 1
    depth_loss_decay: float = 0.8
    feature_noise: float = 0.0
    feature_loss_weight: float = 1.0
    val_draft_length: int = 6
    select_best: bool = True
    g_steps: int = 1
    d_steps: int = 1
    epochs: int = 1
    max_steps: int = 0
    max_train_seconds: float = 0.0
    max_train_tokens: int = 0
    batch_size: int = 32
    max_seq_len: int = 1024
    val_fraction: float = 0.05
    seed: int = 0
    num_workers: int = 1
    cpus_per_worker: int = 2
    use_gpu: str = "auto"
    feature_cache: str = "auto"
    cache_limit_gb: float = 4.0
    checkpoint_every_steps: int = 100
    log_every_steps: int = 0
    max_failures: int = 2
    fail_once_at_step: int = 0
    target: TargetConfig = dataclasses.field(default_factory=TargetConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)

    def validate(self) -> None:
        # data_dirs may be empty here: the pipeline fills it with the distillation output; run_train checks it.
        if self.adv_weight < 0:
            self.fail("adv_weight", f"lambda must be >= 0 (0 disables the adversarial loss), got {self.adv_weight}")
        if not 0 <= self.discriminator_layers <= 3:
            self.fail("discriminator_layers", f"must be 0 (the head's K), 1, 2 or 3, got {self.discriminator_layers}")
        for field in ("discriminator_lr", "head_lr"):
            if getattr(self, field) <= 0:
                self.fail(field, f"must be > 0, got {getattr(self, field)}")
        self.require_at_least(1, "g_steps", "d_steps", "epochs", "batch_size", "max_seq_len", "num_workers",
                              "cpus_per_worker", "checkpoint_every_steps", "discriminator_hidden_size",
                              "unroll_depth", "val_draft_length")
        self.require_at_least(0, "max_steps", "max_failures", "fail_once_at_step", "feature_loss_weight",
                              "cache_limit_gb", "weight_decay", "grad_clip", "feature_noise", "max_train_seconds",
                              "adv_warmup_steps", note="0 = off")
        self.require_at_least(0, "max_train_tokens", note="0 = all")
        self.require_at_least(0, "log_every_steps", note=f"0 = auto, about {LOSS_CURVE_POINTS} points per run")
        if not 0 <= self.val_fraction < 1:
            self.fail("val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        for field in ("warmup_fraction", "min_lr_ratio", "adv_label_smoothing"):
            if not 0 <= getattr(self, field) < 1 and not (field == "min_lr_ratio" and getattr(self, field) == 1):
                self.fail(field, f"must be in [0, 1), got {getattr(self, field)}")
        if not 0 < self.depth_loss_decay <= 1:
            self.fail("depth_loss_decay", f"must be in (0, 1], got {self.depth_loss_decay}")
        if self.lr_schedule not in LR_SCHEDULES:
            self.fail("lr_schedule", f"unknown schedule {self.lr_schedule!r}; choose one of {list(LR_SCHEDULES)}")
        if self.precision not in PRECISIONS:
            self.fail("precision", f"unknown precision {self.precision!r}; choose one of {list(PRECISIONS)}")
        if self.use_gpu not in ("auto", "yes", "no"):
            self.fail("use_gpu", f"must be 'auto', 'yes' or 'no', got {self.use_gpu!r}")
        if self.feature_cache not in FEATURE_CACHE_MODES:
            self.fail("feature_cache", f"unknown mode {self.feature_cache!r}; choose one of {list(FEATURE_CACHE_MODES)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig(Config):
    """How a sweep measures each trial: vanilla and speculative greedy decoding timed alternately in one process on
    the same prompts (MT-bench first turns by default), with `cpus` CPU threads (or one GPU) for every trial alike.
    Prompts that also occur in the training data are dropped and counted. An evaluation that generates fewer than
    `min_new_tokens` tokens per trial is flagged as too small to separate trials (timing noise dominates)."""

    section: ClassVar[str] = "eval"

    questions: str = ""
    per_category: int = 1
    limit: int = 0
    max_new_tokens: int = 128
    draft_length: int = 0
    tree: str = DEFAULT_TREE
    tree_nodes: int = 0
    warmup_prompts: int = 1
    cpus: int = 2
    use_gpu: str = "auto"
    min_new_tokens: int = 512

    def validate(self) -> None:
        self.bench_config()
        self.decode_config()
        self.require_at_least(0, "min_new_tokens", note="0 = never flag an evaluation as too small")
        if self.cpus < 1:
            self.fail("cpus", f"must be >= 1, got {self.cpus}")
        if self.use_gpu not in ("auto", "yes", "no"):
            self.fail("use_gpu", f"must be 'auto', 'yes' or 'no', got {self.use_gpu!r}")

    def bench_config(self) -> BenchConfig:
        try:
            return BenchConfig(questions=self.questions, per_category=self.per_category, limit=self.limit,
                               warmup_prompts=self.warmup_prompts, include_hf=False, audit=True)
        except ConfigError as error:
            raise ConfigError(f"eval.{str(error).removeprefix('bench.')}") from None

    def decode_config(self) -> DecodeConfig:
        try:
            return DecodeConfig(max_new_tokens=self.max_new_tokens, draft_length=self.draft_length, tree=self.tree,
                                tree_nodes=self.tree_nodes)
        except ConfigError as error:
            raise ConfigError(f"eval.{str(error).removeprefix('decode.')}") from None


# Fields a sweep grid must not vary: the sweep sets them for every trial.
SWEEP_CONTROLLED_FIELDS = ("data_dirs", "out_dir", "target", "tracking", "head")


def _flatten_grid(grid: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in grid.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten_grid(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _default_grid() -> dict[str, list[Any]]:
    return {"head.head_type": ["medusa", "eagle"], "head.num_layers": [1, 2], "adv_weight": [0.0, 0.1]}


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepConfig(Config):
    """`koala tune`: a grid over head/training fields (dotted names, e.g. `head.num_layers`, `adv_weight`,
    `head_lr`), each trial trained with `train` as the base config and measured with `eval`. The winner (best
    measured speedup, tau breaks ties) is registered as `model_name`; it gets the alias `champion` only when its
    speedup exceeds `champion_min_speedup` (default 1.0: it must beat plain decoding) with its losslessness check
    passing, else it is registered without the alias and tagged with why.
    `incumbent` is a head the trials must beat: measured with the same `eval` on the same prompts, it is a row of
    the table and wins (and is registered and served) when no trained head is faster. `auto` (the default) is the
    drafter the project ships for the target (`smollm2`), or none for other targets; `none` turns it off; anything
    else is a head directory (a registered `models:/` head: download it first).
    `max_concurrent_trials` = 0 runs as many trials at once as the cluster's CPUs (or GPUs) allow."""

    section: ClassVar[str] = "sweep"

    grid: dict[str, Any] = dataclasses.field(default_factory=_default_grid)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    max_concurrent_trials: int = 0
    max_trial_failures: int = 1
    model_name: str = "koala-drafter"
    register: bool = True
    champion_min_speedup: float = 1.0
    incumbent: str = "auto"
    out_dir: str = "runs/sweeps"

    def __post_init__(self) -> None:
        if isinstance(self.grid, dict):  # `head: {num_layers: [1, 2]}` is the same as `head.num_layers: [1, 2]`
            object.__setattr__(self, "grid", _flatten_grid(self.grid))
        super().__post_init__()

    def validate(self) -> None:
        if not isinstance(self.grid, dict) or not self.grid:
            self.fail("grid", "name at least one field with a list of values, e.g. {adv_weight: [0, 0.1]}")
        for key, values in self.grid.items():
            self._check_grid_entry(key, values)
        self.require_at_least(0, "max_concurrent_trials", note="0 = as resources allow")
        self.require_at_least(0, "max_trial_failures")
        if not self.model_name:
            self.fail("model_name", "must name the registered model, e.g. koala-drafter")
        if self.incumbent not in ("auto", "none"):
            from pipeline.heads import HeadLoadError, read_head_metadata  # heads imports this module

            try:
                if "head" not in read_head_metadata(self.incumbent):
                    raise HeadLoadError(f"{self.incumbent}/head_config.json has no 'head' settings")
            except HeadLoadError as error:
                self.fail("incumbent", f"{error}; give a head directory, 'auto' (the target's shipped drafter, if "
                                       "any) or 'none'")

    def _check_grid_entry(self, key: str, values: Any) -> None:
        head_fields = {f.name for f in dataclasses.fields(HeadConfig)}
        train_fields = {f.name for f in dataclasses.fields(TrainConfig)} - set(SWEEP_CONTROLLED_FIELDS)
        parent, _, leaf = key.partition(".")
        if not (key in train_fields or (parent == "head" and leaf in head_fields)):
            self.fail(f"grid.{key}", f"not a sweepable field; use head.<{'|'.join(sorted(head_fields))}> "
                                     f"or one of {sorted(train_fields)}")
        if not isinstance(values, (list, tuple)) or not values:
            self.fail(f"grid.{key}", f"expected a non-empty list of values, got {values!r}")
        for value in values:
            try:
                self.trial_config({key: value})
            except ConfigError as error:
                self.fail(f"grid.{key}", f"value {value!r} is invalid: {error}")

    def trial_overrides(self) -> list[dict[str, Any]]:
        """Every combination of the grid, as {dotted field: value}, in a stable order."""
        combinations: list[dict[str, Any]] = [{}]
        for key, values in self.grid.items():
            combinations = [{**c, key: v} for c in combinations for v in values]
        return combinations

    def trial_config(self, overrides: dict[str, Any], **fixed: Any) -> TrainConfig:
        values = self.train.to_dict()
        for dotted, value in {**overrides, **fixed}.items():
            *parents, leaf = dotted.split(".")
            node = values
            for parent in parents:
                node = node[parent]
            node[leaf] = value
        return TrainConfig.from_dict(values)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PipelineConfig(Config):
    """`jobs/full_pipeline.py` / `koala run`: distill -> sweep (train + evaluate each trial) -> register the
    winner -> serve it. `target` and `tracking` are set once here and apply to every stage; each stage's output
    lives under `run_dir`, keyed by a content hash of its inputs, so a re-run skips what is already done.
    `serve_options` holds ServeConfig fields (serve/config.py) for the last stage, e.g. {port: 8001}. When no head
    beats plain decoding (no champion), the target is served without a drafter unless `serve_best_head_anyway`."""

    section: ClassVar[str] = "pipeline"

    name: str = "koala"
    run_dir: str = "runs"
    target: TargetConfig = dataclasses.field(default_factory=TargetConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    distill: DistillConfig
    sweep: SweepConfig = dataclasses.field(default_factory=SweepConfig)
    serve: bool = True
    serve_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    serve_best_head_anyway: bool = False

    def validate(self) -> None:
        for stage, config in (("distill", self.distill), ("sweep.train", self.sweep.train)):
            for shared in ("target", "tracking"):
                value = getattr(config, shared)
                if value != type(value)() and value != getattr(self, shared):
                    self.fail(f"{stage}.{shared}", f"set {shared} once, at the top level ({shared}:), for every stage")
        if not self.name or "/" in self.name:
            self.fail("name", f"must be a non-empty name without '/', got {self.name!r}")
        if self.sweep.eval.max_new_tokens > self.distill.max_new_tokens:
            self.fail("sweep.eval.max_new_tokens", (
                f"{self.sweep.eval.max_new_tokens} exceeds distill.max_new_tokens {self.distill.max_new_tokens}: "
                "heads would be measured on answer lengths they were never trained on; raise "
                "distill.max_new_tokens or lower sweep.eval.max_new_tokens"))

    def distill_config(self, out_dir: str) -> DistillConfig:
        return self.distill.replace(target=self.target, tracking=self.tracking, out_dir=out_dir)

    def sweep_config(self, out_dir: str) -> SweepConfig:
        return self.sweep.replace(train=self.sweep.train.replace(target=self.target, tracking=self.tracking),
                                  out_dir=out_dir)
