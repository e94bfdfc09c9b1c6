"""`ServeConfig`: everything `koala serve`, `serve run serve/config.yaml` and the pipeline job need to deploy."""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

from pipeline.config import (
    DEFAULT_LOOKUP_TOKENS, DEFAULT_MAX_NEW_TOKENS, DEFAULT_TREE, DEFAULT_TREE_MAX_TEMPERATURE, Config,
    ConfigError, DecodeConfig, TargetConfig, TrackingConfig, check_dtype,
)
from pipeline.heads import default_drafter_dir

REGISTRY_PREFIX = "models:/"
ROUTE_PREFIX_PATTERN = re.compile(r"/|(/[A-Za-z0-9._~-]+)+")  # "/" or /segment/segment, URL-safe characters


# ServeConfig fields the pipeline's serve stage sets itself (jobs/full_pipeline.py), each with why: its
# `serve_options` must not replace them, or the endpoint would serve something other than what the pipeline made.
PIPELINE_SET_FIELDS = {
    "target": "the target is set once, at the top level (target:), for every stage",
    "tracking": "tracking is set once, at the top level (tracking:), for every stage",
    "drafter": "the serve stage serves the head version the register stage registered",
    "use_drafter": "the serve stage serves the champion, or plain decoding without one (see serve_best_head_anyway)",
    **{field: "the champion is served with the drafting settings the sweep measured it with; set sweep.eval."
              f"{field}{' (measured at the default)' if field == 'lookup_tokens' else ''} instead"
       for field in ("draft_length", "tree", "tree_nodes", "lookup_tokens")},
}
# The drafting settings the serve stage copies from the sweep's evaluation (`EvalConfig.decode_config`).
MEASURED_DRAFTING_FIELDS = ("draft_length", "tree", "tree_nodes", "lookup_tokens")


def check_pipeline_serve_options(options: dict, *, section: str = "pipeline.serve_options") -> None:
    """Refuses, by name, a `serve_options` key that would override a field the pipeline sets (`PIPELINE_SET_FIELDS`)."""
    for key in options:
        if key in PIPELINE_SET_FIELDS:
            raise ConfigError(f"{section}.{key}: set by the pipeline ({PIPELINE_SET_FIELDS[key]}); remove it")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServeConfig(Config):
    """A Ray Serve deployment of one target and (optionally) one draft head.

    `drafter` is a head directory or a registry URI (`models:/koala-drafter@champion`, resolved through
    `tracking.uri`); empty means the drafter shipped for the target (`smollm2` has one) or, for a target without
    one, plain decoding; `use_drafter: false` serves plain (vanilla) decoding. Replicas are fixed at
    `num_replicas` unless `max_replicas` > 0, which autoscales between `min_replicas` and `max_replicas` aiming at
    `target_ongoing_requests` per replica. Each replica decodes one request at a time (CPU decoding of one model
    does not get faster by interleaving); `max_ongoing_requests` bounds how many wait inside a replica.
    `api_key_env` names an environment variable holding the API key; when set, the variable must be non-empty
    on the replicas and requests need `Authorization: Bearer <key>`. `draft_length`, `tree`, `tree_nodes`,
    `lookup_tokens` and `tree_max_temperature` are DecodeConfig's drafting settings for every request (greedy
    requests and those sampled up to `tree_max_temperature` draft trees, hotter ones chains; `request_defaults`);
    `draft_dtype` is the dtype the head drafts in (`heads.inference_dtype`; auto: bf16 for an fp32 target on a CPU
    with bf16 units, else the target's).
    `use_gpu`: `auto` gives each replica a GPU when the cluster has GPUs; `yes` requires one: on a cluster without
    a GPU node yet, the autoscaler is asked for one and the deployment waits up to `gpu_wait_s` for it to join
    (then fails, withdrawing the request); `no` runs on CPUs.
    `metrics_port` is the Prometheus port of the Ray cluster that `koala serve` starts when none is running
    (0: Ray picks a free one and `koala serve` prints it); a running cluster keeps the port it was started with.
    """

    section: ClassVar[str] = "serve"

    target: TargetConfig = dataclasses.field(default_factory=TargetConfig)
    drafter: str = ""
    use_drafter: bool = True
    draft_length: int = 0
    tree: str = DEFAULT_TREE
    tree_nodes: int = 0
    lookup_tokens: int = DEFAULT_LOOKUP_TOKENS
    tree_max_temperature: float = DEFAULT_TREE_MAX_TEMPERATURE
    draft_dtype: str = "auto"
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    model_name: str = "koala"
    app_name: str = "koala"
    route_prefix: str = "/"
    host: str = "127.0.0.1"
    port: int = 8000
    metrics_port: int = 0
    api_key_env: str = ""
    num_replicas: int = 1
    min_replicas: int = 1
    max_replicas: int = 0
    target_ongoing_requests: float = 2.0
    max_ongoing_requests: int = 16
    use_gpu: str = "auto"
    gpu_wait_s: float = 900.0
    cpus_per_replica: float = 1.0
    default_max_tokens: int = DEFAULT_MAX_NEW_TOKENS
    max_tokens_limit: int = 1024

    def validate(self) -> None:
        if self.use_drafter and self.drafter.startswith(REGISTRY_PREFIX) and len(self.drafter) == len(REGISTRY_PREFIX):
            self.fail("drafter", "a registry URI needs a model name, e.g. models:/koala-drafter@champion")
        if self.draft_length < 0:
            self.fail("draft_length", f"must be >= 0 (0 = the head's default), got {self.draft_length}")
        check_dtype(self.draft_dtype, field=f"{self.section}.draft_dtype")
        for field in ("model_name", "app_name", "host"):
            if not getattr(self, field):
                self.fail(field, "must not be empty")
        self._check_route_prefix()
        if not 0 < self.port < 65536:
            self.fail("port", f"must be a TCP port in 1..65535, got {self.port}")
        if not 0 <= self.metrics_port < 65536:
            self.fail("metrics_port", f"must be 0 (Ray picks one) or a TCP port in 1..65535, got {self.metrics_port}")
        for field in ("num_replicas", "min_replicas", "max_ongoing_requests", "default_max_tokens", "max_tokens_limit"):
            if getattr(self, field) < 1:
                self.fail(field, f"must be >= 1, got {getattr(self, field)}")
        try:  # the drafting settings, after default_max_tokens (which becomes the defaults' max_new_tokens)
            self.request_defaults()
        except ConfigError as error:
            raise ConfigError(f"serve.{str(error).removeprefix('decode.')}") from None
        if self.max_replicas and self.max_replicas < self.min_replicas:
            self.fail("max_replicas", f"must be 0 (no autoscaling) or >= min_replicas ({self.min_replicas}), got {self.max_replicas}")
        if self.target_ongoing_requests <= 0:
            self.fail("target_ongoing_requests", f"must be > 0, got {self.target_ongoing_requests}")
        if self.cpus_per_replica <= 0:
            self.fail("cpus_per_replica", f"must be > 0, got {self.cpus_per_replica}")
        if self.use_gpu not in ("auto", "yes", "no"):
            self.fail("use_gpu", f"must be 'auto', 'yes' or 'no', got {self.use_gpu!r}")
        if self.gpu_wait_s < 0:
            self.fail("gpu_wait_s", f"must be >= 0 (0 = fail at once without a GPU), got {self.gpu_wait_s}")
        if self.default_max_tokens > self.max_tokens_limit:
            self.fail("default_max_tokens", f"must be <= max_tokens_limit ({self.max_tokens_limit}), got {self.default_max_tokens}")

    def _check_route_prefix(self) -> None:
        """A URL path Ray Serve accepts and clients can type: checked here, not by Serve after the cluster started."""
        prefix = self.route_prefix
        problem = None
        if not prefix.startswith("/"):
            problem = "must start with '/'"
        elif any(c.isspace() for c in prefix):
            problem = "no spaces allowed in a URL path"
        elif prefix != "/" and prefix.endswith("/"):
            problem = "must not end with '/' (Ray Serve refuses it)"
        elif "//" in prefix:
            problem = "empty segment ('//')"
        elif not ROUTE_PREFIX_PATTERN.fullmatch(prefix):
            problem = "letters, digits and - . _ ~ between slashes only"
        if problem:
            self.fail("route_prefix", f"{problem}, e.g. '/' or '/koala'; got {prefix!r}")

    def request_defaults(self) -> DecodeConfig:
        """The DecodeConfig every request starts from: this deployment's drafting settings and default length (a
        request sets its own length, sampling, stops and seed on top, `_Request.decode_config`)."""
        return DecodeConfig(max_new_tokens=self.default_max_tokens, draft_length=self.draft_length, tree=self.tree,
                            tree_nodes=self.tree_nodes, lookup_tokens=self.lookup_tokens,
                            tree_max_temperature=self.tree_max_temperature)

    @property
    def drafter_source(self) -> str:
        """The drafter to load: `drafter`, else the target's shipped drafter; empty when decoding is plain."""
        if not self.use_drafter:
            return ""
        if self.drafter:
            return self.drafter
        shipped = default_drafter_dir(self.target.spec)
        return str(shipped) if shipped else ""

    @property
    def drafter_enabled(self) -> bool:
        return bool(self.drafter_source)

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas > 0
