"""``sgl.RuntimeEndpoint(url)``: programs run against the router's native API over HTTP.

    POST /generate  {text, sampling_params, stream, return_logprob, logprob_start_len, ...}
    GET  /get_model_info   (model name and ``chat_roles``: no local tokenizer is needed)

Plain ``urllib`` (no extra dependency); one HTTP connection per call, so many executor threads can
call at once. ``select`` sends two requests: the prefix alone with no new tokens (it caches the
prefix, routes the choices to the worker holding it and tells its token count), then all choices
in one batched ``/generate`` scored by prompt logprobs.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

from sglang.lang.backends.base import Backend, GenInput, choice_start, meta_of, select_meta, snapshot_deltas
from sglang.lang.choices import ChoiceDecision, choice_logprobs, decide
from sglang.lang.ir import GenParams


class ServerError(RuntimeError):
    """The server answered with an error (its HTTP status and message)."""

    def __init__(self, url: str, status: int, message: str) -> None:
        super().__init__(f"{url} answered {status}: {message}")
        self.status = status
        self.message = message


def _error_message(raw: bytes) -> str:
    try:
        body = json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")[:500]
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict) and "message" in err:
        return str(err["message"])
    return str(body)[:500]


class RuntimeEndpoint(Backend):
    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None,
                 timeout_s: float = 600.0) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL such as http://127.0.0.1:30000, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.model = model
        self.timeout_s = timeout_s
        query = f"?model={urllib.parse.quote(model)}" if model else ""
        self.model_info: dict[str, Any] = self._call("GET", "/get_model_info" + query)
        self.model_name = str(self.model_info.get("served_model_name") or self.model_info.get("model_path"))

    # ------------------------------------------------------------------ HTTP

    def _open(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        url = self.base_url + path
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            return urllib.request.urlopen(req, timeout=self.timeout_s)
        except urllib.error.HTTPError as e:
            raise ServerError(url, e.code, _error_message(e.read())) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ConnectionError(f"cannot reach the SGLang server at {self.base_url}: {reason}") from None

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        with self._open(method, path, body) as resp:
            return json.loads(resp.read())

    def _stream(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        with self._open("POST", "/generate", {**body, "stream": True}) as resp:
            for raw in resp:  # SSE: "data: {...}" lines, blank lines between, "data: [DONE]" last
                line = raw.decode().strip()
                if line == "data: [DONE]":
                    return
                event = json.loads(line[5:]) if line.startswith("data:") else None
                if isinstance(event, dict) and "error" in event:
                    raise ServerError(self.base_url + "/generate", 500, _error_message(line[5:].encode()))
                if event is not None:
                    yield event

    def _body(self, text: str | list[str], sampling: dict[str, Any], **extra: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"text": text, "sampling_params": sampling, **extra}
        if self.model:
            body["model"] = self.model
        return body

    # ------------------------------------------------------------------ Backend

    def chat_roles(self) -> dict[str, Any] | None:
        roles = self.model_info.get("chat_roles")
        return roles if isinstance(roles, dict) else None

    def generate(self, inp: GenInput, params: GenParams) -> tuple[str, dict[str, Any]]:
        out = self._call("POST", "/generate", self._body(inp.text, params.to_sampling_params()))
        return out["text"], meta_of(out["meta_info"])

    def generate_stream(self, inp: GenInput, params: GenParams) -> Iterator[tuple[str, dict[str, Any] | None]]:
        yield from snapshot_deltas(self._stream(self._body(inp.text, params.to_sampling_params())))

    def select(self, inp: GenInput, choices: list[str], temperature: float) -> ChoiceDecision:
        prefix_tokens = 0
        if inp.text:
            warm = self._call("POST", "/generate", self._body(inp.text, {"max_new_tokens": 0}))
            prefix_tokens = int(warm["meta_info"]["prompt_tokens"])
        outs = self._call("POST", "/generate", self._body(
            [inp.text + c for c in choices], {"max_new_tokens": 0, "temperature": 0.0},
            return_logprob=True, return_text_in_logprobs=True, logprob_start_len=choice_start(prefix_tokens),
        ))
        per_choice = [
            choice_logprobs(c, o["meta_info"]["input_token_logprobs"], o["meta_info"]["prompt_tokens"] - prefix_tokens)
            for c, o in zip(choices, outs, strict=True)
        ]
        return decide(choices, per_choice, temperature, select_meta(outs))

    def cache_prefix(self, text: str) -> None:
        if text:
            self._call("POST", "/generate", self._body(text, {"max_new_tokens": 0}))
