"""A minimal stdlib HTTP client for the endpoint: the pipeline job's smoke request and the load benchmark.

No Ray and no `openai` dependency, so it runs anywhere the endpoint is reachable.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


BODY_PREVIEW_CHARS = 200


class EndpointError(RuntimeError):
    """The endpoint (or a proxy in front of it) answered something that is not the API's JSON."""


def post_json(url: str, body: dict[str, Any], *, api_key: str | None = None, timeout: float = 120.0) -> tuple[int, dict]:
    """POSTs JSON and returns (HTTP status, decoded JSON body), for error statuses too. A body that is not JSON (a
    proxy's HTML error page, say) raises `EndpointError`: one line with the status and the start of the body."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, _json_body(url, response.status, response.read())
    except urllib.error.HTTPError as error:
        return error.code, _json_body(url, error.code, error.read() or b"{}")


def _json_body(url: str, status: int, raw: bytes) -> dict:
    try:
        return json.loads(raw)
    except ValueError:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not text
        preview = " ".join(raw.decode("utf-8", errors="replace").split())[:BODY_PREVIEW_CHARS]
        raise EndpointError(f"HTTP {status} from {url} with a body that is not JSON (a proxy or another server "
                            f"answered?): {preview!r}") from None


def smoke_request(base_url: str, *, model: str = "koala", api_key: str | None = None, max_tokens: int = 16,
                  timeout: float = 120.0) -> dict[str, Any]:
    """One greedy chat completion; returns the response JSON or raises `RuntimeError` with the server's error.

    `base_url` is what `run_serve` returns, e.g. http://127.0.0.1:8000/v1."""
    body = {"model": model, "messages": [{"role": "user", "content": "Say hello in one sentence."}],
            "max_tokens": max_tokens, "temperature": 0}
    status, answer = post_json(f"{base_url.rstrip('/')}/chat/completions", body, api_key=api_key, timeout=timeout)
    if status != 200:
        raise RuntimeError(f"smoke request to {base_url} failed with HTTP {status}: {answer.get('error', answer)}")
    if not answer.get("choices") or answer.get("usage", {}).get("completion_tokens", 0) < 1:
        raise RuntimeError(f"smoke request to {base_url} returned no tokens: {answer}")
    return answer
