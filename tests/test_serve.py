"""The OpenAI-compatible endpoint: request parsing and streaming text without Ray, then real HTTP on 127.0.0.1
against Ray Serve started by the test (tiny random Llama + a random EAGLE head): answers, start-up (/health while
the model loads, a load that fails) and the Prometheus counters scraped from Ray's metrics port."""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml

from conftest import char_tokenizer, make_tiny_target, tiny_llama
from pipeline.config import ConfigError, DecodeConfig, HeadConfig
from pipeline.decoding import GenerationResult, generate
from pipeline.heads import HEAD_WEIGHTS_FILE, HeadLoadError, build_head, load_head, save_head, target_identity_dict
from pipeline.target import load_target
from serve.client import post_json, smoke_request
from serve.config import ServeConfig
from serve.engine import Engine, load_engine
from serve.openai_api import ApiError, ChatRequest, CompletionRequest, StreamText, parse_request

REPO = Path(__file__).resolve().parents[1]
API_KEY_ENV = "KOALA_TEST_API_KEY"
API_KEY = "test-key-123"
CONTEXT = 2048  # long enough that a disconnected stream would otherwise run for seconds
MAX_TOKENS_LIMIT = 1900


# ---------------------------------------------------------------------------------------------- without Ray


def test_smollm2_is_served_with_its_shipped_drafter_unless_told_otherwise(tmp_path):
    from pipeline.heads import default_drafter_dir

    shipped = default_drafter_dir("smollm2")
    assert ServeConfig().drafter_source == str(shipped) and ServeConfig().drafter_enabled
    assert ServeConfig(use_drafter=False).drafter_source == ""
    assert ServeConfig(drafter=str(tmp_path)).drafter_source == str(tmp_path)
    other = ServeConfig.from_dict({"target": {"spec": str(tmp_path)}})
    assert other.drafter_source == "" and not other.drafter_enabled  # no shipped drafter: plain decoding


def test_serve_config_validates_fields_and_loads_the_repo_serve_config():
    with pytest.raises(ConfigError, match="serve.max_replicas"):
        ServeConfig(min_replicas=3, max_replicas=2)
    with pytest.raises(ConfigError, match="serve.default_max_tokens"):
        ServeConfig(default_max_tokens=100, max_tokens_limit=10)
    with pytest.raises(ConfigError, match="serve.port"):
        ServeConfig.from_dict({"port": 0})
    with pytest.raises(ConfigError, match="target.dtype"):
        ServeConfig.from_dict({"target": {"dtype": "int3"}})
    with pytest.raises(ConfigError, match="serve.tree_max_temperature"):
        ServeConfig(tree_max_temperature=-1)
    with pytest.raises(ConfigError, match="serve.default_max_tokens: must be >= 1"):
        ServeConfig(default_max_tokens=0)
    with pytest.raises(ConfigError, match="serve.draft_dtype: unknown dtype 'fp8'"):
        ServeConfig.from_dict({"draft_dtype": "fp8"})
    assert ServeConfig().host == "127.0.0.1"
    deployed = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    app = deployed["applications"][0]
    assert app["import_path"] == "serve.app:build_app"
    assert ServeConfig.from_dict(app["args"]).drafter.startswith("models:/")
    assert deployed["http_options"]["host"] == "127.0.0.1"


@pytest.mark.parametrize(("body", "param"), [
    (b"{not json", None),
    (b"[1, 2]", None),
    (b'{"prompt": "hi"}', "model"),
    (b'{"model": "koala"}', "prompt"),
    (b'{"model": "koala", "prompt": ""}', "prompt"),
    (b'{"model": "koala", "prompt": 7}', "prompt"),
    (b'{"model": "koala", "prompt": "hi", "max_tokens": "10"}', "max_tokens"),
    (b'{"model": "koala", "prompt": "hi", "max_tokens": 0}', "max_tokens"),
    (b'{"model": "koala", "prompt": "hi", "temperature": -0.5}', "temperature"),
    (b'{"model": "koala", "prompt": "hi", "stream": "yes"}', "stream"),
    (b'{"model": "koala", "prompt": "hi", "n": 2}', "n"),
    (b'{"model": "koala", "prompt": "hi", "seed": 18446744073709551616}', "seed"),  # 2**64: a 500 before
])
def test_bad_completion_requests_name_the_problem(body, param):
    with pytest.raises(ApiError) as raised:
        parse_request(body, CompletionRequest)
    assert raised.value.status == 400 and raised.value.param == param
    if param:
        assert raised.value.message.startswith(param)


def test_chat_request_parsing_and_limits():
    parsed = parse_request(json.dumps({"model": "m", "messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ], "stop": "x", "seed": 3}).encode(), ChatRequest)
    assert parsed.conversation() == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    config = parsed.decode_config(DecodeConfig(max_new_tokens=16), max_tokens_limit=32)
    assert config == DecodeConfig(max_new_tokens=16, temperature=1.0, stop=("x",), seed=3)
    # The server's drafting settings carry over; the request sets length, sampling, stops and seed.
    server = ServeConfig(default_max_tokens=16, draft_length=3, tree="dynamic", tree_nodes=5, lookup_tokens=2,
                         tree_max_temperature=1.0).request_defaults()
    assert parsed.decode_config(server, max_tokens_limit=32) == DecodeConfig(
        max_new_tokens=16, temperature=1.0, stop=("x",), seed=3, draft_length=3, tree="dynamic", tree_nodes=5,
        lookup_tokens=2, tree_max_temperature=1.0)
    for bad, param in [({"messages": []}, "messages"), ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
                       ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content")]:
        with pytest.raises(ApiError) as raised:
            parse_request(json.dumps({"model": "m", **bad}).encode(), ChatRequest)
        assert raised.value.param == param
    # An assistant turn with content null and no tool calls is an empty turn (tool calls are refused, below).
    replayed = parse_request(json.dumps({"model": "m", "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": None}, {"role": "user", "content": "and?"},
    ]}).encode(), ChatRequest)
    assert [m["content"] for m in replayed.conversation()] == ["hi", "", "and?"]
    with pytest.raises(ApiError, match="user message needs content"):
        parse_request(b'{"model": "m", "messages": [{"role": "user", "content": null}]}', ChatRequest).conversation()
    newer_name = parse_request(b'{"model": "m", "prompt": "p", "max_completion_tokens": 33}', CompletionRequest)
    with pytest.raises(ApiError) as raised:
        newer_name.decode_config(DecodeConfig(max_new_tokens=16), max_tokens_limit=32)
    assert raised.value.param == "max_completion_tokens"
    too_many = parse_request(b'{"model": "m", "prompt": "p", "max_tokens": 33}', CompletionRequest)
    with pytest.raises(ApiError, match="above this server's limit of 32"):
        too_many.decode_config(DecodeConfig(max_new_tokens=16), max_tokens_limit=32)


@pytest.mark.parametrize(("prefix", "match"), [
    ("api", "must start with '/'"), ("/my app", "no spaces"), ("/v1/", "must not end with '/'"),
    ("/{name}", "letters, digits"), ("/a?b=1", "letters, digits"), ("/a//b", "empty segment"),
])
def test_route_prefix_is_validated_naming_the_field(prefix, match):
    with pytest.raises(ConfigError, match=f"serve.route_prefix: {match}") as raised:
        ServeConfig(route_prefix=prefix)
    assert repr(prefix) in str(raised.value)
    for good in ("/", "/koala", "/team-a/koala_v2.1"):
        assert ServeConfig(route_prefix=good).route_prefix == good


def test_a_non_json_http_error_is_one_line_with_the_status_and_the_body(tmp_path):
    """A proxy in front of the endpoint answers 502 with an HTML page: the client says so, not JSONDecodeError."""
    import http.server
    import threading

    class BadGateway(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.send_response(502)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html>\n<head><title>502 Bad Gateway</title></head>\n<body>nginx</body></html>\n" * 20)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), BadGateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        for call in (lambda: post_json(f"{url}/completions", {"model": "m"}), lambda: smoke_request(url)):
            with pytest.raises(RuntimeError) as raised:
                call()
            message = str(raised.value)
            assert "HTTP 502" in message and "<html> <head><title>502 Bad Gateway" in message, message
            assert "\n" not in message and len(message) < 400, message
    finally:
        server.shutdown()
        server.server_close()


def test_prompt_plus_max_tokens_beyond_the_context_window_is_a_400_with_the_numbers():
    """Not a 500 and not an answer silently cut at the context window: OpenAI's `context_length_exceeded`."""
    from serve.openai_api import fit_to_context

    defaults = DecodeConfig(max_new_tokens=16)
    asked = parse_request(b'{"model": "m", "prompt": "p", "max_tokens": 30}', CompletionRequest)
    with pytest.raises(ApiError) as raised:
        fit_to_context(asked, asked.decode_config(defaults, max_tokens_limit=64), prompt_tokens=80, context_window=100)
    error = raised.value
    assert (error.status, error.code, error.param) == (400, "context_length_exceeded", "max_tokens")
    assert error.body()["error"]["type"] == "invalid_request_error"
    assert all(number in error.message for number in ("100", "110", "80", "30")), error.message
    chat = parse_request(b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 5}',
                         ChatRequest)
    with pytest.raises(ApiError) as raised:  # the prompt alone leaves no room: the prompt is what must change
        fit_to_context(chat, chat.decode_config(defaults, max_tokens_limit=64), prompt_tokens=100, context_window=100)
    assert (raised.value.code, raised.value.param) == ("context_length_exceeded", "messages")
    # Within the window the request is untouched; a server default (no max_tokens asked) shrinks to what fits.
    fits = fit_to_context(asked, asked.decode_config(defaults, max_tokens_limit=64), prompt_tokens=70,
                          context_window=100)
    assert fits.max_new_tokens == 30
    unasked = parse_request(b'{"model": "m", "prompt": "p"}', CompletionRequest)
    assert fit_to_context(unasked, unasked.decode_config(defaults, max_tokens_limit=64), prompt_tokens=90,
                          context_window=100).max_new_tokens == 10


@pytest.mark.parametrize("message", [
    {"role": "tool", "tool_call_id": "call_1", "content": "42"},
    {"role": "function", "name": "f", "content": "42"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                                                          "function": {"name": "f", "arguments": "{}"}}]},
    {"role": "assistant", "content": "let me check", "function_call": {"name": "f", "arguments": "{}"}},
])
def test_tool_calls_in_the_history_are_a_400_saying_tools_are_not_supported(message):
    """The chat template renders plain text: a tool turn must not be dropped (or crash the template) silently."""
    body = {"model": "m", "messages": [{"role": "user", "content": "what is 6 x 7?"}, message]}
    with pytest.raises(ApiError) as raised:
        parse_request(json.dumps(body).encode(), ChatRequest).conversation()
    assert raised.value.status == 400 and raised.value.param.startswith("messages.1")
    assert "tools are not supported" in raised.value.message, raised.value.message


def test_fields_that_would_change_the_answer_are_refused_unless_they_ask_for_nothing():
    """logprobs, tools, JSON mode, penalties...: a 400 naming the field, not a 200 that silently lacks them."""
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    for field, value in [("logprobs", True), ("top_logprobs", 2), ("tools", [{"type": "function"}]),
                         ("response_format", {"type": "json_object"}), ("presence_penalty", 0.5),
                         ("logit_bias", {"5": 10}), ("echo", True)]:
        with pytest.raises(ApiError) as raised:
            parse_request(json.dumps({**base, field: value}).encode(), ChatRequest)
        assert raised.value.status == 400 and raised.value.param == field
    no_ops = {"logprobs": False, "presence_penalty": 0.0, "frequency_penalty": 0, "tools": [], "tool_choice": "none",
              "response_format": {"type": "text"}, "user": "someone", "metadata": {"k": "v"}}
    assert parse_request(json.dumps({**base, **no_ops}).encode(), ChatRequest).conversation()[0]["content"] == "hi"
    with pytest.raises(ApiError, match="logprobs"):
        parse_request(b'{"model": "m", "prompt": "p", "logprobs": 1}', CompletionRequest)


def test_stream_text_never_sends_what_a_stop_string_may_cut():
    pieces = ["Hel", "lo E", "N", "D and more"]
    stream = StreamText(lambda ids: "".join(pieces[i] for i in ids), stop=("END",))
    deltas = [stream.add([i]) for i in range(len(pieces))]
    assert deltas == ["Hel", "lo ", "", ""]  # "E" and "EN" are held back, "END" cuts
    assert stream.finish("Hello ") == ""
    half_char = StreamText(lambda ids: "ab\ufffd" if len(ids) == 1 else "abé", stop=())
    assert half_char.add([0]) == "ab" and half_char.add([1]) == "é"
    # A stop string's first character, then half of the next one: the start of the stop is held back too.
    texts = ["价格是一百元。结\ufffd", "价格是一百元。结束"]
    multibyte_stop = StreamText(lambda ids: texts[len(ids) - 1], stop=("结束",))
    assert multibyte_stop.add([0]) == "价格是一百元。"
    assert multibyte_stop.add([1]) == "" and multibyte_stop.finish("价格是一百元。") == ""


def test_engine_cancels_a_stream_that_is_closed_early():
    target = make_tiny_target(max_positions=1024)
    with torch.no_grad():
        target.model.lm_head.weight[2].zero_()  # never EOS: the full generation would run all 900 tokens
    engine = Engine(target, drafter=None)
    prompt_ids = engine.completion_prompt_ids("hello")

    async def read_two_rounds_then_leave() -> int:
        rounds = engine.stream(prompt_ids, DecodeConfig(max_new_tokens=900))
        seen = [await anext(rounds), await anext(rounds)]
        await rounds.aclose()
        return len(seen)

    assert asyncio.run(read_two_rounds_then_leave()) == 2
    engine._worker.submit(lambda: None).result(timeout=60)  # wait until the worker thread is idle again
    assert engine.cancelled_generations == 1

    async def complete() -> GenerationResult:
        return await engine.complete(prompt_ids, DecodeConfig(max_new_tokens=5))

    assert asyncio.run(complete()).token_ids == generate(target, torch.tensor([prompt_ids]), config=DecodeConfig(max_new_tokens=5)).token_ids
    engine.close()


def test_request_layer_does_not_import_ray():
    code = ("import sys, serve.config, serve.openai_api, serve.engine, serve.checks, serve.client; "
            "print('ray' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert result.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------- Ray Serve over HTTP


@pytest.fixture(scope="module")
def served_model(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Llama with a 2048-token context that never emits EOS, and a random EAGLE head for it."""
    root = tmp_path_factory.mktemp("serve")
    model = tiny_llama(max_positions=CONTEXT)
    with torch.no_grad():
        model.lm_head.weight[2].zero_()  # EOS logit 0 never beats the (peaked) best token: generations run to max_tokens
    model.save_pretrained(root / "model")
    char_tokenizer().save_pretrained(root / "model")
    torch.manual_seed(0)
    head = build_head(HeadConfig(head_type="eagle", num_layers=1, num_heads=3), model)
    torch.nn.init.normal_(head.fc.weight, std=0.2)  # drafts that are neither constant nor always right
    save_head(head, root / "head", target_identity=target_identity_dict(model, str(root / "model")))
    return root / "model", root / "head"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _common_settings(model_dir: Path, port: int) -> dict:
    return {"target": {"spec": str(model_dir), "device": "cpu"}, "port": port, "default_max_tokens": 16,
            "max_tokens_limit": MAX_TOKENS_LIMIT, "use_gpu": "no", "cpus_per_replica": 1}


@pytest.fixture(scope="module")
def endpoint(served_model):
    """Ray + Serve on this machine with two apps: `/` (drafter on) and `/auth` (drafter off, API key required).
    `metrics` is the URL of Ray's Prometheus export, `port` Serve's HTTP port."""
    import ray
    from ray import serve

    from serve.app import run_serve

    model_dir, head_dir = served_model
    metrics_port = _free_port()
    # PYTHONPATH: replicas import this checkout's `serve` and `pipeline`, not an installed copy.
    ray.init(num_cpus=4, include_dashboard=False, _metrics_export_port=metrics_port,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), API_KEY_ENV: API_KEY}})
    port = _free_port()
    common = _common_settings(model_dir, port)
    main = ServeConfig.from_dict({**common, "drafter": str(head_dir), "app_name": "main", "max_ongoing_requests": 64})
    guarded = ServeConfig.from_dict({**common, "drafter": str(head_dir), "use_drafter": False, "app_name": "auth",
                                     "route_prefix": "/auth", "api_key_env": API_KEY_ENV})
    urls = {"main": run_serve(main), "auth": run_serve(guarded), "port": port,
            "metrics": f"http://127.0.0.1:{metrics_port}/metrics"}
    yield urls
    serve.shutdown()
    ray.shutdown()


def test_engine_loads_the_drafter_in_the_configured_dtype(served_model):
    model_dir, head_dir = served_model
    for dtype, expected in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        config = ServeConfig.from_dict({"target": {"spec": str(model_dir)}, "drafter": str(head_dir),
                                        "draft_dtype": dtype})
        assert {p.dtype for p in load_engine(config).drafter.parameters()} == {expected}


@pytest.fixture(scope="module")
def reference(served_model):
    """The same target and head in this process: what the core decoder outputs for a request."""
    model_dir, head_dir = served_model
    target = load_target(str(model_dir), device="cpu")
    return target, load_head(head_dir, target.model, target_name=target.name)


def _vanilla(target, prompt_ids: list[int], max_tokens: int) -> GenerationResult:
    return generate(target, torch.tensor([prompt_ids]), config=DecodeConfig(max_new_tokens=max_tokens))


def _completion_ids(target, prompt: str) -> list[int]:
    return target.tokenizer(prompt, add_special_tokens=True)["input_ids"]


def _get(url: str, api_key: str | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _post_raw(url: str, raw: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=raw, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.slow
def test_greedy_completion_over_http_equals_core_vanilla_greedy(endpoint, reference):
    target, _ = reference
    for prompt in ["hello world", "The quick brown fox"]:
        status, answer = post_json(f"{endpoint['main']}/completions",
                                   {"model": "koala", "prompt": prompt, "max_tokens": 24, "temperature": 0})
        assert status == 200, answer
        expected = _vanilla(target, _completion_ids(target, prompt), 24)
        assert answer["object"] == "text_completion"
        assert answer["choices"][0]["text"] == expected.text
        assert answer["choices"][0]["finish_reason"] == "length"
        assert answer["usage"] == {"prompt_tokens": len(_completion_ids(target, prompt)), "completion_tokens": 24,
                                   "total_tokens": len(_completion_ids(target, prompt)) + 24}
        speculative = answer["speculative"]
        assert speculative["drafter"] is True and speculative["drafted_tokens"] > 0
        assert 0 <= speculative["accepted_tokens"] <= speculative["drafted_tokens"]
        assert speculative["acceptance_length"] == pytest.approx(24 / speculative["target_forward_passes"], abs=1e-3)


@pytest.mark.slow
def test_openai_client_chat_and_completions_streaming_and_not(endpoint, reference):
    openai = pytest.importorskip("openai")
    target, _ = reference
    client = openai.OpenAI(base_url=endpoint["main"], api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["koala"]

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Name a color."}]
    chat = client.chat.completions.create(model="koala", messages=messages, max_tokens=20, temperature=0)
    expected = _vanilla(target, target.formatter.encode(messages), 20)
    assert chat.choices[0].message.content == expected.text
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens == 20
    assert chat.model_extra["speculative"]["drafter"] is True

    chunks = list(client.chat.completions.create(model="koala", messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert [c.usage for c in chunks[:-1]] == [None] * (len(chunks) - 1)  # usage once: clients may add it up

    completion = client.completions.create(model="koala", prompt="hello world", max_tokens=12, temperature=0)
    assert completion.choices[0].text == _vanilla(target, _completion_ids(target, "hello world"), 12).text
    pieces = list(client.completions.create(model="koala", prompt="hello world", max_tokens=12, temperature=0,
                                            stream=True))
    assert "".join(p.choices[0].text for p in pieces) == completion.choices[0].text
    assert pieces[-1].usage.completion_tokens == 12


@pytest.mark.slow
def test_raw_sse_stream_has_openai_chunks_usage_and_stats(endpoint):
    body = json.dumps({"model": "koala", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10,
                       "temperature": 0.7, "seed": 5, "stream": True, "stop": ["zz"]}).encode()
    request = urllib.request.Request(f"{endpoint['main']}/chat/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.read().decode().split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] in ("stop", "length")
    assert last["usage"]["completion_tokens"] >= 1 and set(last["speculative"]) >= {"drafted_tokens", "accepted_tokens",
                                                                                   "acceptance_length"}
    # seeded sampling is reproducible, streamed or not
    status, again = post_json(f"{endpoint['main']}/chat/completions", {**json.loads(body), "stream": False})
    assert status == 200
    assert again["choices"][0]["message"]["content"] == "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)


@pytest.mark.slow
def test_every_bad_input_gets_a_4xx_and_the_next_request_succeeds(endpoint):
    url = endpoint["main"]
    good = {"model": "koala", "prompt": "hello", "max_tokens": 4}
    cases = [
        ("/completions", b"{not json", 400, None, None),
        ("/completions", b'"just a string"', 400, None, None),
        ("/completions", json.dumps({"prompt": "hi"}).encode(), 400, "model", None),
        ("/completions", json.dumps({"model": "koala"}).encode(), 400, "prompt", None),
        ("/completions", json.dumps({**good, "prompt": ""}).encode(), 400, "prompt", None),
        ("/completions", json.dumps({**good, "max_tokens": "4"}).encode(), 400, "max_tokens", None),
        ("/completions", json.dumps({**good, "max_tokens": 0}).encode(), 400, "max_tokens", None),
        ("/completions", json.dumps({**good, "max_tokens": -3}).encode(), 400, "max_tokens", None),
        ("/completions", json.dumps({**good, "max_tokens": MAX_TOKENS_LIMIT + 1}).encode(), 400, "max_tokens", None),
        ("/completions", json.dumps({**good, "temperature": -1}).encode(), 400, "temperature", None),
        ("/completions", json.dumps({**good, "prompt": "a" * (CONTEXT + 10)}).encode(), 400, "prompt",
         "context_length_exceeded"),
        ("/completions", json.dumps({**good, "prompt": "a" * (CONTEXT - 10), "max_tokens": 20}).encode(), 400,
         "max_tokens", "context_length_exceeded"),
        ("/chat/completions", json.dumps({"model": "koala", "messages": [
            {"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "c", "content": "42"}]}).encode(), 400,
         "messages.1.role", None),
        ("/completions", json.dumps({**good, "model": "gpt-4"}).encode(), 404, "model", "model_not_found"),
        ("/chat/completions", json.dumps({"model": "koala", "messages": []}).encode(), 400, "messages", None),
        ("/chat/completions", json.dumps({"model": "koala", "messages": "hi"}).encode(), 400, "messages", None),
        ("/chat/completions", json.dumps({"model": "koala", "messages": [{"role": "user"}]}).encode(), 400,
         "messages.0.content", None),
    ]
    for path, raw, status, param, code in cases:
        got_status, answer = _post_raw(url + path, raw)
        assert got_status == status, (raw[:80], answer)
        error = answer["error"]
        assert error["param"] == param and error["message"], (raw[:80], error)
        if code:
            assert error["code"] == code
    assert _get(url.removesuffix("/v1") + "/nope")[0] == 404
    status, answer = post_json(url + "/completions", good)
    assert status == 200 and answer["usage"]["completion_tokens"] == 4
    assert _get(url.removesuffix("/v1") + "/health") == (200, {"status": "ok", "model": "koala", "drafter": True,
                                                               "cancelled_generations": 0})


@pytest.mark.slow
def test_32_concurrent_requests_each_get_their_solo_output(endpoint, reference):
    target, _ = reference
    prompts = [f"request {i}: {'abcdefghij'[i % 10] * (1 + i % 4)} go" for i in range(32)]

    def ask(prompt: str) -> tuple[int, dict]:
        return post_json(f"{endpoint['main']}/completions",
                         {"model": "koala", "prompt": prompt, "max_tokens": 12, "temperature": 0})

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, prompts))
    assert [status for status, _ in answers] == [200] * 32
    expected = [_vanilla(target, _completion_ids(target, p), 12).text for p in prompts]
    assert [a["choices"][0]["text"] for _, a in answers] == expected
    assert len(set(expected)) > 16, "prompts should lead to different outputs, or the test proves little"


@pytest.mark.slow
def test_api_key_is_required_when_configured(endpoint):
    url = endpoint["auth"]
    body = {"model": "koala", "prompt": "hello", "max_tokens": 3}
    status, answer = post_json(f"{url}/completions", body)
    assert status == 401 and answer["error"]["code"] == "invalid_api_key"
    assert post_json(f"{url}/completions", body, api_key="wrong")[0] == 401
    assert _get(f"{url}/models")[0] == 401
    status, answer = post_json(f"{url}/completions", body, api_key=API_KEY)
    assert status == 200 and answer["speculative"]["drafter"] is False and answer["speculative"]["drafted_tokens"] == 0
    assert _get(f"{url}/models", api_key=API_KEY)[0] == 200
    assert _get(url.removesuffix("/v1") + "/health")[0] == 200  # load balancers probe without a key
    assert smoke_request(url, api_key=API_KEY)["usage"]["completion_tokens"] >= 1


@pytest.mark.slow
def test_client_disconnect_mid_stream_stops_the_generation(endpoint):
    host, port = endpoint["main"].removeprefix("http://").split("/")[0].split(":")
    health = endpoint["main"].removesuffix("/v1") + "/health"
    before = _get(health)[1]["cancelled_generations"]
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    body = json.dumps({"model": "koala", "prompt": "go", "max_tokens": MAX_TOKENS_LIMIT, "temperature": 0, "stream": True})
    connection.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")  # generation is under way
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    deadline = time.monotonic() + 60
    while _get(health)[1]["cancelled_generations"] == before:
        assert time.monotonic() < deadline, "the generation kept running after the client left"
        time.sleep(0.2)
    status, answer = post_json(f"{endpoint['main']}/completions", {"model": "koala", "prompt": "hi", "max_tokens": 3})
    assert status == 200


def test_koala_serve_rejects_bad_settings_before_starting_ray(tmp_path):
    from pipeline.cli import main

    assert main(["serve", "--drafter", str(tmp_path / "missing")]) == 2
    assert main(["serve", "--set", "port=0"]) == 2
    assert main(["serve", "--set", "max_tokens_limit=8", "--set", "default_max_tokens=9"]) == 2


# ------------------------------------------------------------------------------ start-up and Prometheus metrics


@pytest.mark.slow
def test_health_answers_503_while_the_model_loads_and_requests_wait_for_it(endpoint, served_model, tmp_path):
    """The replica's load is held until the test opens a gate, so "still loading" lasts as long as the test needs."""
    from ray import serve

    from serve.app import KoalaServer

    model_dir, head_dir = served_model
    gate = tmp_path / "gate"

    class GatedServer(KoalaServer.func_or_class):  # defined here: Ray pickles it, with `gate`, by value
        def _load(self) -> None:
            deadline = time.monotonic() + 120
            while not gate.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            super()._load()

    config = ServeConfig.from_dict({**_common_settings(model_dir, endpoint["port"]), "drafter": str(head_dir),
                                    "app_name": "gated", "route_prefix": "/gated"})
    app = serve.deployment(GatedServer).options(ray_actor_options={"num_cpus": 1}).bind(config.to_dict())
    serve.run(app, name="gated", route_prefix="/gated")  # returns once the replica is constructed, still loading
    base = f"http://127.0.0.1:{endpoint['port']}/gated"
    try:
        assert _get(f"{base}/health") == (503, {"status": "loading", "model": "koala"})
        assert _get(f"{base}/v1/models")[0] == 200  # needs no model
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(post_json, f"{base}/v1/completions",
                                  {"model": "koala", "prompt": "hello", "max_tokens": 5, "temperature": 0})
            time.sleep(1.0)
            assert not waiting.done()  # held until the model is there, not failed
            assert _get(f"{base}/health")[0] == 503  # and health still answers meanwhile
            gate.touch()
            status, answer = waiting.result(timeout=120)
        assert status == 200 and answer["usage"]["completion_tokens"] == 5
        assert _get(f"{base}/health") == (200, {"status": "ok", "model": "koala", "drafter": True,
                                                "cancelled_generations": 0})
    finally:
        gate.touch()
        serve.delete("gated")


@pytest.mark.slow
def test_a_load_that_fails_in_the_replica_fails_run_serve_with_one_line(endpoint, served_model, tmp_path):
    """A head whose JSON config passes the checks but whose weights are corrupt: run_serve raises the replica's
    error (one line, a type `koala serve` prints without a traceback) and removes the app, instead of retrying
    replicas for a minute."""
    from ray import serve

    from serve.app import run_serve

    model_dir, head_dir = served_model
    broken = shutil.copytree(head_dir, tmp_path / "broken-head")
    (broken / HEAD_WEIGHTS_FILE).write_bytes(b"not a safetensors file")
    config = ServeConfig.from_dict({**_common_settings(model_dir, endpoint["port"]), "drafter": str(broken),
                                    "app_name": "broken", "route_prefix": "/broken"})
    started = time.perf_counter()
    with pytest.raises(HeadLoadError, match=f"{broken / HEAD_WEIGHTS_FILE} is not a readable safetensors file "
                                            r"\(.*\); export the head again") as raised:
        run_serve(config)
    assert time.perf_counter() - started < 60
    assert "\n" not in str(raised.value)
    assert "broken" not in serve.status().applications


def _scrape(url: str, application: str) -> dict[str, float]:
    """Ray's Prometheus export over HTTP: each sample name's total over the series of one Serve application."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("application") == application:
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


@pytest.mark.slow
def test_prometheus_counters_give_the_exact_tau_of_the_requests(endpoint, served_model):
    """generated tokens / target forward passes, both scraped from Ray's metrics port, equals tau pooled over the
    requests (tokens per forward pass, as the `speculative` fields report them), and the drafted and accepted
    counters equal the sums of those fields."""
    from ray import serve

    from serve.app import run_serve

    model_dir, head_dir = served_model
    config = ServeConfig.from_dict({**_common_settings(model_dir, endpoint["port"]), "drafter": str(head_dir),
                                    "app_name": "metered", "route_prefix": "/metered"})
    url = run_serve(config)
    try:
        bodies = [("/completions", {"prompt": "hello world", "max_tokens": 24, "temperature": 0}),
                  ("/completions", {"prompt": "The quick brown fox", "max_tokens": 17, "temperature": 0}),
                  ("/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20,
                                         "temperature": 0.7, "seed": 3}),
                  ("/completions", {"prompt": "abc", "max_tokens": 9, "temperature": 0.5, "seed": 1})]
        answers = []
        for path, body in bodies:
            status, answer = post_json(url + path, {"model": "koala", **body})
            assert status == 200, answer
            answers.append(answer)
        tokens = sum(a["usage"]["completion_tokens"] for a in answers)
        passes = sum(a["speculative"]["target_forward_passes"] for a in answers)
        drafted = sum(a["speculative"]["drafted_tokens"] for a in answers)
        accepted = sum(a["speculative"]["accepted_tokens"] for a in answers)
        for a in answers:
            assert a["speculative"]["acceptance_length"] == pytest.approx(
                a["usage"]["completion_tokens"] / a["speculative"]["target_forward_passes"], abs=1e-4)
        assert accepted > 0 and passes < tokens, "some drafts should be accepted, or tau = 1 proves little"

        deadline = time.monotonic() + 90  # Ray reports metrics to the exporter every few seconds
        while True:
            scraped = _scrape(endpoint["metrics"], "metered")
            if scraped.get("ray_koala_generated_tokens_total") == tokens:
                break
            assert time.monotonic() < deadline, f"counters never reached {tokens} tokens: {scraped}"
            time.sleep(1)
        assert scraped["ray_koala_target_forward_passes_total"] == passes
        assert scraped["ray_koala_drafted_tokens_total"] == drafted
        assert scraped["ray_koala_accepted_tokens_total"] == accepted
        lookup = sum(a["speculative"]["lookup_accepted_tokens"] for a in answers)
        assert scraped.get("ray_koala_lookup_accepted_tokens_total", 0) == lookup  # (not exported while 0)
        tau = scraped["ray_koala_generated_tokens_total"] / scraped["ray_koala_target_forward_passes_total"]
        assert tau == tokens / passes  # exact: both sides are the same ratio of integers
        assert tau > 1
    finally:
        serve.delete("metered")


class _AutoscalingCluster:
    """Stands in for a Ray cluster whose autoscaler adds a GPU node after `gpu_after` polls (never: None), and
    records the resource requests made to its autoscaler."""

    def __init__(self, monkeypatch, gpu_after: int | None) -> None:
        import ray
        import ray.autoscaler.sdk

        self.polls = 0
        self.gpu_after = gpu_after
        self.requests: list[list[dict]] = []
        monkeypatch.setattr(ray, "is_initialized", lambda: True)
        monkeypatch.setattr(ray, "cluster_resources", self.resources)
        monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", lambda bundles: self.requests.append(bundles))
        monkeypatch.setattr("serve.app.GPU_POLL_S", 0.01)

    def resources(self) -> dict[str, float]:
        self.polls += 1
        joined = self.gpu_after is not None and self.polls > self.gpu_after
        return {"CPU": 4.0, **({"GPU": 1.0} if joined else {})}


def test_use_gpu_yes_waits_for_the_autoscaler_to_add_a_gpu_node(monkeypatch):
    """On an autoscaling cluster the GPU node joins once something asks for it: `use_gpu: yes` asks and waits."""
    from serve.app import _wants_gpus

    cluster = _AutoscalingCluster(monkeypatch, gpu_after=3)
    assert _wants_gpus(ServeConfig(use_gpu="yes", gpu_wait_s=30))
    assert cluster.polls == 4
    assert cluster.requests == [[{"GPU": 1}], []]  # asked for one GPU, then withdrew the request (the replica holds it)


def test_use_gpu_yes_gives_up_after_gpu_wait_s_and_withdraws_its_request(monkeypatch):
    from serve.app import _wants_gpus

    cluster = _AutoscalingCluster(monkeypatch, gpu_after=None)
    started = time.perf_counter()
    with pytest.raises(ConfigError) as raised:
        _wants_gpus(ServeConfig(use_gpu="yes", gpu_wait_s=0.2))
    assert time.perf_counter() - started < 5
    message = str(raised.value)
    assert message.startswith("serve.use_gpu: 'yes' but no GPU node joined the Ray cluster within 0.2 s"), message
    assert "gpu_wait_s" in message and "\n" not in message
    assert cluster.requests == [[{"GPU": 1}], []]  # the pending request is withdrawn: no GPU node appears later
    with pytest.raises(ConfigError, match="serve.gpu_wait_s"):
        ServeConfig(gpu_wait_s=-1)
