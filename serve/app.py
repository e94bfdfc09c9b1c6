"""The Ray Serve app: an OpenAI-compatible FastAPI ingress in front of one `Engine` per replica.

`build_app(config)` checks the config and returns the bound application (also the builder `serve run
serve/config.yaml` imports); `run_serve(config)` deploys it on the connected Ray cluster (a local one if none), waits
until the model has loaded and returns the API's base URL. A replica loads its engine in a background thread, so
its ingress answers from the start: `/health` says 503 until the model is loaded.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` class through Serve's method wrappers.

import asyncio
import contextlib
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.metrics import Counter, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.config import ConfigError
from pipeline.decoding import GenerationResult
from pipeline.heads import HeadLoadError
from pipeline.target import TargetLoadError
from serve.checks import check_before_deploy, first_line
from serve.config import ServeConfig
from serve.engine import Engine, load_engine
from serve.openai_api import (
    SSE_DONE, ApiError, ChatRequest, CompletionRequest, ResponseShape, StreamText, fit_to_context, parse_request,
    speculative_stats, sse, usage,
)

log = logging.getLogger(__name__)

# Serve's ingress pattern: routes are declared on a module-level FastAPI app and bound to the deployment class.
api = FastAPI(title="koala", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(ApiError)
async def _api_error(_request: Request, error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
    # Unknown paths and methods answer in OpenAI's error shape too, not FastAPI's {"detail": ...}.
    return JSONResponse(ApiError(error.status_code, str(error.detail)).body(), status_code=error.status_code)


LATENCY_BOUNDARIES_S = [0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120]
TAU_BOUNDARIES = [1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 8]


class ServeMetrics:
    """Operator metrics through Ray's Prometheus exporter (Serve adds deployment/replica/application tags).

    tau is exact as a ratio of counters, generated tokens / target forward passes (and the acceptance rate as
    accepted / drafted tokens). The per-request tau histogram only shows the spread: Ray records each observation
    at its bucket's midpoint, so its `_sum` is not the sum of the observed values."""

    def __init__(self) -> None:
        self.requests = Counter("koala_requests", description="HTTP requests by endpoint and status code",
                                tag_keys=("endpoint", "status"))
        self.generated_tokens = Counter("koala_generated_tokens", description="Completion tokens returned",
                                        tag_keys=("endpoint",))
        self.target_forward_passes = Counter("koala_target_forward_passes", tag_keys=("endpoint",),
                                             description="Target forward passes (the prefill counts as one)")
        self.drafted_tokens = Counter("koala_drafted_tokens", description="Draft tokens proposed by the drafter",
                                      tag_keys=("endpoint",))
        self.accepted_tokens = Counter("koala_accepted_tokens", tag_keys=("endpoint",),
                                       description="Drafted tokens (the drafter's) the target accepted")
        self.lookup_accepted_tokens = Counter("koala_lookup_accepted_tokens", tag_keys=("endpoint",),
                                              description="Accepted tokens only the prompt-lookup branch drafted")
        self.acceptance_length = Histogram("koala_acceptance_length", boundaries=TAU_BOUNDARIES,
                                           description="tau per request, for its spread only (Ray records bucket "
                                                       "midpoints); mean tau = generated tokens / forward passes")
        self.latency = Histogram("koala_request_latency_s", boundaries=LATENCY_BOUNDARIES_S, tag_keys=("endpoint",),
                                 description="Request latency from arrival to last token (queueing included)")
        self.time_to_first_token = Histogram("koala_time_to_first_token_s", boundaries=LATENCY_BOUNDARIES_S,
                                             tag_keys=("endpoint",), description="Streaming: arrival to first token")

    def request(self, endpoint: str, status: int) -> None:
        self.requests.inc(tags={"endpoint": endpoint, "status": str(status)})

    def generation(self, endpoint: str, result: GenerationResult, started: float) -> None:
        stats = result.stats
        tags = {"endpoint": endpoint}
        # Ray's Counter.inc refuses 0, hence the guards.
        if stats.new_tokens:
            self.generated_tokens.inc(stats.new_tokens, tags=tags)
        if stats.target_forward_passes:
            self.target_forward_passes.inc(stats.target_forward_passes, tags=tags)
        if stats.draft_tokens:
            self.drafted_tokens.inc(stats.draft_tokens, tags=tags)
        if stats.drafter_accepted:
            self.accepted_tokens.inc(stats.drafter_accepted, tags=tags)
        if stats.lookup_accepted:
            self.lookup_accepted_tokens.inc(stats.lookup_accepted, tags=tags)
        self.acceptance_length.observe(stats.acceptance_length)
        self.latency.observe(time.perf_counter() - started, tags=tags)


def _empty_key_message(env_name: str, where: str) -> str:
    return (f"serve.api_key_env: environment variable {env_name} is empty or unset {where}; export it before "
            "`ray start` / `koala serve` (or pass it in the job's runtime_env env_vars), or clear api_key_env to "
            "serve without a key")


def read_api_key(env_name: str) -> str | None:
    """The API key from the named environment variable; naming an empty variable fails closed, not open."""
    if not env_name:
        return None
    key = os.environ.get(env_name, "")
    if not key:
        raise ConfigError(_empty_key_message(env_name, "on this replica"))
    return key


def check_api_key_on_cluster(env_name: str, *, timeout_s: float = 60.0) -> None:
    """Fails (`ConfigError`) when the key variable is empty where the replicas will run: a zero-CPU task reads it,
    in the job's environment as the replicas do. Ray must be initialised. Only whether it is set comes back."""
    if not env_name:
        return

    def is_set(name: str) -> bool:
        import os

        return bool(os.environ.get(name))

    try:
        found = ray.get(ray.remote(num_cpus=0)(is_set).remote(env_name), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        log.warning("could not check %s on the cluster within %.0f s; the replicas check it themselves",
                    env_name, timeout_s)
        return
    if not found:
        raise ConfigError(_empty_key_message(env_name, "on the Ray cluster's workers"))


# Errors a driver shows as one line (`koala serve` prints these without a traceback).
ONE_LINE_ERRORS = (ConfigError, TargetLoadError, HeadLoadError)


@serve.deployment
@serve.ingress(api)
class KoalaServer:
    """One replica: the target and drafter loaded once, requests answered in OpenAI's format.

    The constructor returns at once and the engine loads in a background thread, so Serve routes to the replica
    while it loads: `/health` answers 503 (`"status": "loading"`) until the model is ready, and generation requests
    that arrive meanwhile wait for it. A failed load answers 503 with the reason, and Serve's health check then
    replaces the replica."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = ServeConfig.from_dict(config)
        self.request_defaults = self.config.request_defaults()
        self.api_key = read_api_key(self.config.api_key_env)
        self.metrics = ServeMetrics()
        self.engine: Engine | None = None
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="koala-load")
        self._loading = self._loader.submit(self._load)

    def _load(self) -> None:
        started = time.perf_counter()
        try:
            self.engine = load_engine(self.config)
        except Exception:
            log.exception("loading %s failed", self.config.target.spec)
            raise
        log.info("serving %s (target %s, drafter %s), loaded in %.1f s", self.config.model_name,
                 self.config.target.spec, self.config.drafter_source or "off", time.perf_counter() - started)

    def __del__(self) -> None:
        loader = getattr(self, "_loader", None)
        if loader is not None:
            loader.shutdown(wait=False, cancel_futures=True)
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()

    async def _wait_for_engine(self) -> Engine:
        """The engine once loaded (shielded: a client that leaves must not cancel the shared load)."""
        try:
            await asyncio.shield(asyncio.wrap_future(self._loading))
        except Exception as error:
            raise ApiError(503, f"the model failed to load on this replica ({first_line(error)}); see the replica log",
                           error_type="server_error", code="model_not_loaded") from error
        assert self.engine is not None
        return self.engine

    async def wait_until_loaded(self) -> Exception | None:
        """For `run_serve` (through the deployment handle): waits for the load and returns its error, None if it
        loaded. The error is rebuilt from its type and message (no traceback to pickle); known types keep theirs, so
        `koala serve` prints them as one line."""
        try:
            await asyncio.shield(asyncio.wrap_future(self._loading))
        except ONE_LINE_ERRORS as error:
            return type(error)(str(error))
        except Exception as error:
            return RuntimeError(f"the replica failed to load the model: {type(error).__name__}: {first_line(error)}")
        return None

    async def check_health(self) -> None:
        """Serve's periodic replica check: a replica whose load failed is replaced (a loading one is healthy)."""
        if self._loading.done() and self._loading.exception() is not None:
            raise RuntimeError(f"loading the model failed: {first_line(self._loading.exception())}")

    @api.get("/health")
    async def health(self) -> JSONResponse:
        """200 once the model is loaded; 503 while it loads or after its load failed. No API key needed."""
        if not self._loading.done():
            return JSONResponse({"status": "loading", "model": self.config.model_name}, status_code=503)
        if (error := self._loading.exception()) is not None:
            return JSONResponse({"status": "failed", "model": self.config.model_name, "error": first_line(error)},
                                status_code=503)
        assert self.engine is not None
        return JSONResponse({"status": "ok", "model": self.config.model_name,
                             "drafter": self.engine.drafter is not None,
                             "cancelled_generations": self.engine.cancelled_generations})

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return {"object": "list", "data": [{"id": self.config.model_name, "object": "model", "created": 0,
                                            "owned_by": "koala", "target": self.config.target.spec,
                                            "drafter": self.config.drafter_enabled}]}

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._answer(request, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._answer(request, chat=True)

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key", error_type="authentication_error")

    def _prompt_ids(self, engine: Engine, parsed: CompletionRequest | ChatRequest) -> list[int]:
        if not isinstance(parsed, ChatRequest):
            return engine.completion_prompt_ids(parsed.prompt)
        try:
            return engine.chat_prompt_ids(parsed.conversation())
        except ApiError:
            raise
        except Exception as error:  # chat templates raise their own errors for orders they do not support
            raise ApiError(400, f"messages: the target's chat template rejected them ({error})",
                           param="messages") from error

    async def _answer(self, request: Request, *, chat: bool):
        started = time.perf_counter()
        endpoint = "chat" if chat else "completions"
        try:
            self._authorize(request)
            parsed = parse_request(await request.body(), ChatRequest if chat else CompletionRequest)
            if parsed.model != self.config.model_name:
                raise ApiError(404, f"model: {parsed.model!r} is not served here; use {self.config.model_name!r} "
                               "(see GET /v1/models)", param="model", code="model_not_found")
            decode = parsed.decode_config(self.request_defaults, max_tokens_limit=self.config.max_tokens_limit)
            engine = await self._wait_for_engine()
            prompt_ids = self._prompt_ids(engine, parsed)
            decode = fit_to_context(parsed, decode, prompt_tokens=len(prompt_ids),
                                    context_window=engine.context_window)
        except ApiError as error:
            self.metrics.request(endpoint, error.status)
            return JSONResponse(error.body(), status_code=error.status)

        shape = ResponseShape(chat=chat, model=self.config.model_name)
        if parsed.stream:
            events = self._events(engine, shape, prompt_ids, decode, parsed.include_usage_chunk, endpoint, started)
            return StreamingResponse(events, media_type="text/event-stream")
        try:
            result = await engine.complete(prompt_ids, decode)
        except Exception:
            log.exception("generation failed")
            self.metrics.request(endpoint, 500)
            error = ApiError(500, "generation failed inside the server; see the replica log", error_type="server_error")
            return JSONResponse(error.body(), status_code=500)
        self.metrics.request(endpoint, 200)
        self.metrics.generation(endpoint, result, started)
        return shape.response(result.text, result.finish_reason, usage=usage(result.stats, len(result.token_ids)),
                              speculative=self._speculative(result))

    def _speculative(self, result: GenerationResult) -> dict[str, Any]:
        return speculative_stats(result.stats, drafter=self.config.drafter_enabled)

    async def _events(self, engine: Engine, shape: ResponseShape, prompt_ids: list[int], decode,
                      include_usage_chunk: bool, endpoint: str, started: float) -> AsyncIterator[str]:
        """Server-Sent Events: text deltas as rounds complete, a last chunk with finish_reason, usage and the
        speculative statistics, then [DONE]. Leaving early (client gone) closes the engine stream, which stops
        the generation."""
        text = StreamText(engine.decode_text, decode.stop)
        first = True  # no chunk sent yet (the chat API's first chunk carries the role)
        timed = False
        result = None
        try:
            async with contextlib.aclosing(engine.stream(prompt_ids, decode)) as rounds:
                async for item in rounds:
                    if isinstance(item, GenerationResult):
                        result = item
                        break
                    delta = text.add(item)
                    if not timed:
                        timed = True
                        self.metrics.time_to_first_token.observe(time.perf_counter() - started,
                                                                 tags={"endpoint": endpoint})
                    if delta or (first and shape.chat):
                        yield sse(shape.chunk(delta, first=first))
                        first = False
        except Exception:
            log.exception("generation failed mid-stream")
            self.metrics.request(endpoint, 500)
            yield sse(ApiError(500, "generation failed inside the server", error_type="server_error").body())
            return
        assert result is not None
        counts, speculative = usage(result.stats, len(result.token_ids)), self._speculative(result)
        # Usage once per stream: on the usage-only chunk when the client asked for it (as OpenAI sends it; clients
        # that add usage up over chunks would count it twice), else on the finishing chunk.
        yield sse(shape.chunk(text.finish(result.text), result.finish_reason, first=first,
                              usage=None if include_usage_chunk else counts, speculative=speculative))
        if include_usage_chunk:
            yield sse(shape.usage_chunk(counts, speculative))
        yield SSE_DONE
        self.metrics.request(endpoint, 200)
        self.metrics.generation(endpoint, result, started)


GPU_POLL_S = 5.0  # how often a deployment waiting for a GPU node looks at the cluster again


def _wants_gpus(config: ServeConfig) -> bool:
    if config.use_gpu == "no":
        return False
    if not ray.is_initialized():
        ray.init()
    if config.use_gpu == "yes":
        wait_for_gpu_node(timeout_s=config.gpu_wait_s)
        return True
    from pipeline.stages.resources import use_gpus

    return use_gpus(config.use_gpu, section="serve")


def _cluster_gpus() -> float:
    return ray.cluster_resources().get("GPU", 0)


def wait_for_gpu_node(*, timeout_s: float) -> None:
    """Returns once the Ray cluster has a GPU. An autoscaling cluster adds a GPU node only for pending demand, so
    one GPU is requested from its autoscaler while waiting; the request is withdrawn afterwards either way (once
    deployed, the replica's own demand keeps the node; after a timeout, no node should still be on its way).
    Raises `ConfigError` after `timeout_s` without one."""
    if _cluster_gpus() > 0:
        return
    from ray.autoscaler import sdk

    log.warning("serve.use_gpu is 'yes' and the Ray cluster has no GPU yet: asking the autoscaler for a GPU node "
                "and waiting up to %.0f s (serve.gpu_wait_s)", timeout_s)
    sdk.request_resources(bundles=[{"GPU": 1}])
    try:
        deadline = time.monotonic() + timeout_s
        while _cluster_gpus() <= 0:
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"serve.use_gpu: 'yes' but no GPU node joined the Ray cluster within {timeout_s:g} s "
                    "(serve.gpu_wait_s); check that the cluster's autoscaler has a GPU node type (`ray status`), "
                    "raise gpu_wait_s, or use 'auto' or 'no' to serve on CPUs")
            time.sleep(min(GPU_POLL_S, max(deadline - time.monotonic(), 0)))
    finally:
        sdk.request_resources(bundles=[])


def build_app(config: ServeConfig | dict[str, Any]) -> serve.Application:
    """The bound Serve application for `config` (a `ServeConfig` or its dict, as `serve run` passes `args`), after
    the checks that fail before deploying (`serve.checks`, then the API key on the cluster).

    One GPU per replica when the cluster has GPUs (`use_gpu: auto`), CPUs otherwise."""
    if not isinstance(config, ServeConfig):
        config = ServeConfig.from_dict(config)
    check_before_deploy(config)
    return _bind_checked(config)


def _bind_checked(config: ServeConfig) -> serve.Application:
    if config.api_key_env:
        if not ray.is_initialized():
            ray.init()
        check_api_key_on_cluster(config.api_key_env)
    gpus = _wants_gpus(config)
    if not gpus and config.target.device == "auto":
        config = config.replace(target=config.target.replace(device="cpu"))
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": config.cpus_per_replica, "num_gpus": 1 if gpus else 0},
        "max_ongoing_requests": config.max_ongoing_requests,
    }
    if config.autoscaling:
        options["autoscaling_config"] = {"min_replicas": config.min_replicas, "max_replicas": config.max_replicas,
                                         "target_ongoing_requests": config.target_ongoing_requests}
    else:
        options["num_replicas"] = config.num_replicas
    return KoalaServer.options(**options).bind(config.to_dict())


def _as_running(config: ServeConfig) -> ServeConfig:
    """`config` with the host and port Serve really listens on: a Serve instance already running on the cluster
    keeps its HTTP options, and the URL this returns must be the one that answers."""
    try:  # the running proxy's options are only reachable through Serve's client
        from ray.serve.context import _get_global_client

        running = _get_global_client().http_config
    except Exception:  # noqa: BLE001 - an older or newer Serve without it: trust the config
        return config
    if (running.host, running.port) != (config.host, config.port):
        log.warning("Serve already runs on this cluster at %s:%s; the app is served there, not at %s:%s",
                    running.host, running.port, config.host, config.port)
        return config.replace(host=running.host, port=running.port)
    return config


def base_url(config: ServeConfig) -> str:
    """The OpenAI base URL of an app, e.g. http://127.0.0.1:8000/v1 (what `openai.OpenAI(base_url=...)` takes)."""
    prefix = config.route_prefix.rstrip("/")
    return f"http://{config.host}:{config.port}{prefix}/v1"


def metrics_url() -> str | None:
    """Where this node's Ray exports Prometheus metrics (Ray must be initialised)."""
    node_ip = ray.util.get_node_ip_address()
    for node in ray.nodes():
        if node["Alive"] and node["NodeManagerAddress"] == node_ip and node.get("MetricsExportPort"):
            return f"http://{node_ip}:{node['MetricsExportPort']}/metrics"
    return None


def run_serve(config: ServeConfig, *, blocking: bool = False) -> str:
    """Deploys `config` on the connected Ray cluster (starting a local one if needed), waits until the model has
    loaded and returns the OpenAI base URL. `blocking` keeps serving until Ctrl-C, then deletes the app.

    Mistakes in the config (`serve.checks`, the API key) raise a one-line error before anything is deployed, and
    before Ray starts where they need no cluster. The key is checked on the cluster; when this call starts Ray
    (no `RAY_ADDRESS`), it is first checked here, since a local cluster inherits this environment and starting one
    takes a while (a `ray start` cluster on this machine then needs the variable in this shell too). A load that
    still fails in the replica raises here too, after the app is deleted. With several replicas this returns once
    one has loaded; requests that reach a replica still loading wait for it. The HTTP host and port apply when this
    call starts Serve; a Serve instance already running keeps its own, and a running Ray cluster keeps its own
    metrics port."""
    check_before_deploy(config)
    if not ray.is_initialized():
        if config.api_key_env and not os.environ.get("RAY_ADDRESS") and not os.environ.get(config.api_key_env):
            raise ConfigError(_empty_key_message(config.api_key_env, "in this shell"))
        ray.init(_metrics_export_port=config.metrics_port or None)
    app = _bind_checked(config)
    serve.start(http_options={"host": config.host, "port": config.port})
    config = _as_running(config)
    handle = serve.run(app, name=config.app_name, route_prefix=config.route_prefix)
    if blocking:
        print(f"koala serve: loading {config.target.spec} (drafter {config.drafter_source or 'off'})", flush=True)
    error = handle.wait_until_loaded.remote().result()
    if error is not None:
        serve.delete(config.app_name)
        raise error
    url = base_url(config)
    if blocking:
        metrics = metrics_url()
        print(f"koala serve: {config.model_name!r} at {url}" + (f", Prometheus metrics at {metrics}" if metrics else "")
              + " (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            serve.delete(config.app_name)
    return url
