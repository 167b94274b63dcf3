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
