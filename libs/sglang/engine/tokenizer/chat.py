"""Chat message normalization: OpenAI-style messages into the shape HF chat templates expect.

OpenAI clients send ``content`` as a string or as a list of typed parts, and tool-call arguments as a
JSON string. Most HF templates concatenate ``message['content']`` as a string and serialize
``tool_call.arguments`` themselves (``| tojson``), so both need converting before rendering.
"""

from __future__ import annotations

import json
from typing import Any

TEXT_PART_SEPARATOR = "\n"
"""How the text parts of one message are joined when the message has only text parts."""


def _part_text(part: Any) -> str | None:
    """Text of a text-only content part, or None when the part is not text (image, audio, ...)."""
    if isinstance(part, str):
        return part
    if isinstance(part, dict) and part.get("type", "text") == "text":
        text = part.get("text")
        return text if isinstance(text, str) else ""
    return None


def _normalize_content(content: Any) -> Any:
    if not isinstance(content, list):
        return content
    texts = [_part_text(p) for p in content]
    if all(t is not None for t in texts):
        return TEXT_PART_SEPARATOR.join(t for t in texts if t is not None)
    return list(content)  # multimodal: the template handles typed parts itself


def _normalize_tool_call(call: Any) -> Any:
    if not isinstance(call, dict):
        return call
    call = dict(call)
    function = call.get("function")
    if isinstance(function, dict) and isinstance(function.get("arguments"), str):
        function = dict(function)
        try:
            parsed = json.loads(function["arguments"])
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            function["arguments"] = parsed
        call["function"] = function
    return call


def normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of ``messages`` ready for ``apply_chat_template``; the input is not modified.

    - Every message must be a dict with a string ``role``; otherwise ``ValueError``.
    - ``content`` lists made only of text parts become one string (parts joined by a newline);
      lists with other parts (images) are kept for multimodal templates.
    - ``content: None`` becomes ``""`` unless the message carries ``tool_calls``.
    - ``tool_calls[*].function.arguments`` given as a JSON object string becomes a dict.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"messages[{i}] must be a dict with a string 'role'")
        m = dict(message)
        content = _normalize_content(m.get("content"))
        if content is None and not m.get("tool_calls"):
            content = ""
        m["content"] = content
        if isinstance(m.get("tool_calls"), list):
            m["tool_calls"] = [_normalize_tool_call(c) for c in m["tool_calls"]]
        out.append(m)
    return out


# ---------------------------------------------------------------------- role markers

_SENTINEL = "\x00SGL{}\x00"
CHAT_ROLES = ("system", "user", "assistant")


def _between(text: str, before: str | None, after: str | None) -> str:
    start = 0 if before is None else text.index(before) + len(before)
    end = len(text) if after is None else text.index(after, start)
    return text[start:end]


def chat_role_markers(tokenizer: Any) -> dict[str, Any] | None:
    """The text a chat template writes around each role's content, for the frontend language.

    ``tokenizer`` is a :class:`~sglang.engine.tokenizer.Tokenizer`. Conversations with sentinel
    contents are rendered through the model's own chat template and split around the sentinels:

    - ``{"system"|"user"|"assistant": [begin, end], "stop_token_ids": [...]}``; a role the template
      refuses (some templates reject ``system``) is left out;
    - a leading BOS token is removed when ``encode`` adds it by itself (no double BOS);
    - ``stop_token_ids`` holds the assistant's end marker when it is one special token (the model
      may not list it as an end-of-sequence id, e.g. ``<|im_end|>`` for base-tokenizer models).

    None when the tokenizer has no chat template.
    """
    if tokenizer.chat_template is None:
        return None
    s, u, a = (_SENTINEL.format(k) for k in "SUA")

    def render(messages: list[dict[str, str]], gen: bool = False) -> str | None:
        try:
            out: str = tokenizer.apply_chat_template(messages, add_generation_prompt=gen)
            return out
        except Exception:  # noqa: BLE001 - templates raise anything (jinja errors, ValueError)
            return None

    conv = [{"role": "system", "content": s}, {"role": "user", "content": u}, {"role": "assistant", "content": a}]
    full = render(conv)
    head: list[dict[str, str]] = conv[:1]
    if full is None or s not in full:  # the template does not take a system message
        full, head = render(conv[1:]), []
    if full is None or u not in full or a not in full:
        raise ValueError(f"the chat template of {tokenizer.path!r} does not render user/assistant turns")
    user_alone = render([*head, conv[1]]) or ""
    user_end = user_alone[user_alone.index(u) + len(u):] if u in user_alone else ""
    roles: dict[str, Any] = {}
    if head:
        system_end = _between(render(head) or "", s, None)
        roles["system"] = [_between(full, None, s), system_end]
        between = _between(full, s, u)
        roles["user"] = [between[len(system_end):] if between.startswith(system_end) else between, user_end]
    else:
        roles["user"] = [_between(full, None, u), user_end]
    between = _between(full, u, a)
    roles["assistant"] = [between[len(user_end):] if between.startswith(user_end) else between, _between(full, a, None)]
    bos = tokenizer.hf.bos_token
    first = "system" if head else "user"
    ids = tokenizer.encode("a")
    if bos and roles[first][0].startswith(bos) and ids and ids[0] == tokenizer.bos_token_id:
        roles[first][0] = roles[first][0][len(bos):]
    end_ids = tokenizer.encode(roles["assistant"][1].strip(), add_special_tokens=False)
    special = set(tokenizer.all_special_ids)
    roles["stop_token_ids"] = end_ids if len(end_ids) == 1 and end_ids[0] in special else []
    return roles
