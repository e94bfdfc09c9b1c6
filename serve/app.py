"""The Ray Serve app: an OpenAI-compatible FastAPI ingress in front of one `Engine` per replica.

`build_app(config)` returns the bound application (also the builder `serve run serve/config.yaml` imports);
`run_serve(config)` deploys it on the connected Ray cluster (a local one if none) and returns the API's base URL.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` class through Serve's method wrappers.

import contextlib
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.metrics import Counter, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.decoding import GenerationResult, PromptTooLongError
from serve.config import ServeConfig
from serve.engine import load_engine
from serve.openai_api import (
    SSE_DONE, ApiError, ChatRequest, CompletionRequest, ResponseShape, StreamText, parse_request, speculative_stats,
    sse, usage,
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
    """Operator metrics through Ray's Prometheus exporter (Serve adds deployment/replica/application tags)."""

    def __init__(self) -> None:
        self.requests = Counter("koala_requests", description="HTTP requests by endpoint and status code",
                                tag_keys=("endpoint", "status"))
        self.generated_tokens = Counter("koala_generated_tokens", description="Completion tokens returned",
                                        tag_keys=("endpoint",))
        self.drafted_tokens = Counter("koala_drafted_tokens", description="Draft tokens proposed by the drafter")
        self.accepted_tokens = Counter("koala_accepted_tokens", description="Draft tokens the target accepted")
        self.acceptance_length = Histogram("koala_acceptance_length", boundaries=TAU_BOUNDARIES,
                                           description="tau per request: tokens per target forward pass")
        self.latency = Histogram("koala_request_latency_s", boundaries=LATENCY_BOUNDARIES_S, tag_keys=("endpoint",),
                                 description="Request latency from arrival to last token (queueing included)")
        self.time_to_first_token = Histogram("koala_time_to_first_token_s", boundaries=LATENCY_BOUNDARIES_S,
                                             tag_keys=("endpoint",), description="Streaming: arrival to first token")

    def request(self, endpoint: str, status: int) -> None:
        self.requests.inc(tags={"endpoint": endpoint, "status": str(status)})

    def generation(self, endpoint: str, result: GenerationResult, started: float) -> None:
        stats = result.stats
        tags = {"endpoint": endpoint}
        if stats.new_tokens:
            self.generated_tokens.inc(stats.new_tokens, tags=tags)
        if stats.draft_tokens:
            self.drafted_tokens.inc(stats.draft_tokens)
        if sum(stats.accepted):
            self.accepted_tokens.inc(sum(stats.accepted))
        self.acceptance_length.observe(stats.acceptance_length)
        self.latency.observe(time.perf_counter() - started, tags=tags)


def read_api_key(env_name: str) -> str | None:
    """The API key from the named environment variable; naming an empty variable fails closed, not open."""
    if not env_name:
        return None
    key = os.environ.get(env_name, "")
    if not key:
        raise RuntimeError(f"serve.api_key_env: environment variable {env_name} is empty on this replica; "
                           "set it on the cluster nodes, or clear api_key_env to serve without a key")
    return key


@serve.deployment
@serve.ingress(api)
class KoalaServer:
    """One replica: the target and drafter loaded once, requests answered in OpenAI's format."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = ServeConfig.from_dict(config)
        self.api_key = read_api_key(self.config.api_key_env)
        self.engine = load_engine(self.config)
        self.metrics = ServeMetrics()
        log.info("serving %s (target %s, drafter %s)", self.config.model_name, self.config.target.spec,
                 self.config.drafter_source or "off")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()

    @api.get("/health")
    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.config.model_name, "drafter": self.engine.drafter is not None,
                "cancelled_generations": self.engine.cancelled_generations}

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return {"object": "list", "data": [{"id": self.config.model_name, "object": "model", "created": 0,
                                            "owned_by": "koala", "target": self.config.target.spec,
                                            "drafter": self.engine.drafter is not None}]}

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

    def _prompt_ids(self, parsed: CompletionRequest | ChatRequest) -> list[int]:
        chat = isinstance(parsed, ChatRequest)
        if chat:
            try:
                prompt_ids = self.engine.chat_prompt_ids(parsed.conversation())
            except ApiError:
                raise
            except Exception as error:  # chat templates raise their own errors for orders they do not support
                raise ApiError(400, f"messages: the target's chat template rejected them ({error})",
                               param="messages") from error
        else:
            prompt_ids = self.engine.completion_prompt_ids(parsed.prompt)
        try:
            self.engine.check_prompt_length(prompt_ids)
        except PromptTooLongError as error:
            raise ApiError(400, str(error), param="messages" if chat else "prompt",
                           code="context_length_exceeded") from error
        return prompt_ids

    async def _answer(self, request: Request, *, chat: bool):
        started = time.perf_counter()
        endpoint = "chat" if chat else "completions"
        try:
            self._authorize(request)
            parsed = parse_request(await request.body(), ChatRequest if chat else CompletionRequest)
            if parsed.model != self.config.model_name:
                raise ApiError(404, f"model: {parsed.model!r} is not served here; use {self.config.model_name!r} "
                               "(see GET /v1/models)", param="model", code="model_not_found")
            decode = parsed.decode_config(default_max_tokens=self.config.default_max_tokens,
                                          max_tokens_limit=self.config.max_tokens_limit,
                                          draft_length=self.config.draft_length, tree=self.config.tree,
                                          tree_nodes=self.config.tree_nodes)
            prompt_ids = self._prompt_ids(parsed)
        except ApiError as error:
            self.metrics.request(endpoint, error.status)
            return JSONResponse(error.body(), status_code=error.status)

        shape = ResponseShape(chat=chat, model=self.config.model_name)
        if parsed.stream:
            events = self._events(shape, prompt_ids, decode, parsed.include_usage_chunk, endpoint, started)
            return StreamingResponse(events, media_type="text/event-stream")
        try:
            result = await self.engine.complete(prompt_ids, decode)
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
        return speculative_stats(result.stats, drafter=self.engine.drafter is not None)

    async def _events(self, shape: ResponseShape, prompt_ids: list[int], decode, include_usage_chunk: bool,
                      endpoint: str, started: float) -> AsyncIterator[str]:
        """Server-Sent Events: text deltas as rounds complete, a last chunk with finish_reason, usage and the
        speculative statistics, then [DONE]. Leaving early (client gone) closes the engine stream, which stops
        the generation."""
        text = StreamText(self.engine.decode_text, decode.stop)
        first = True  # no chunk sent yet (the chat API's first chunk carries the role)
        timed = False
        result = None
        try:
            async with contextlib.aclosing(self.engine.stream(prompt_ids, decode)) as rounds:
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
        yield sse(shape.chunk(text.finish(result.text), result.finish_reason, first=first, usage=counts,
                              speculative=speculative))
        if include_usage_chunk:
            yield sse(shape.usage_chunk(counts, speculative))
        yield SSE_DONE
        self.metrics.request(endpoint, 200)
        self.metrics.generation(endpoint, result, started)


def _wants_gpus(config: ServeConfig) -> bool:
    if config.use_gpu == "no":
        return False
    from pipeline.stages.resources import use_gpus

    if not ray.is_initialized():
        ray.init()
    return use_gpus(config.use_gpu, section="serve")


def build_app(config: ServeConfig | dict[str, Any]) -> serve.Application:
    """The bound Serve application for `config` (a `ServeConfig` or its dict, as `serve run` passes `args`).

    One GPU per replica when the cluster has GPUs (`use_gpu: auto`), CPUs otherwise."""
    if not isinstance(config, ServeConfig):
        config = ServeConfig.from_dict(config)
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


def base_url(config: ServeConfig) -> str:
    """The OpenAI base URL of an app, e.g. http://127.0.0.1:8000/v1 (what `openai.OpenAI(base_url=...)` takes)."""
    prefix = config.route_prefix.rstrip("/")
    return f"http://{config.host}:{config.port}{prefix}/v1"


def run_serve(config: ServeConfig, *, blocking: bool = False) -> str:
    """Deploys `config` on the connected Ray cluster (starting a local one if needed), waits until its replicas
    are ready and returns the OpenAI base URL. `blocking` keeps serving until Ctrl-C, then deletes the app.

    The HTTP host and port apply when this call starts Serve; a Serve instance already running keeps its own."""
    if not ray.is_initialized():
        ray.init()
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_app(config), name=config.app_name, route_prefix=config.route_prefix)
    url = base_url(config)
    if blocking:
        print(f"koala serve: {config.model_name!r} at {url} (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            serve.delete(config.app_name)
    return url
