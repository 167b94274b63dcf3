"""``python -m sglang_router``: one flag per ``RouterSettings`` field (env ``SGLANG_ROUTER_*`` too).

    python -m sglang_router --port 30000 --redis-url redis://127.0.0.1:6379/0 --policy cache_aware \\
        [--shared-index] [--api-key KEY] [--grpc-port 30001]

Prints ``sglang_router ready http=http://HOST:PORT grpc=HOST:PORT|off`` once both servers listen
(readiness for traffic is ``GET /health``: 200 once a worker and its tokenizer are there).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError
from sglang.settings.router import RouterSettings


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _arg_type(annotation: Any) -> tuple[Any, list[str] | None]:
    """(argparse type, choices) for a field annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _arg_type(args[0])
    if origin is typing.Literal:
        return str, [str(a) for a in typing.get_args(annotation)]
    if annotation in (int, float, str):
        return annotation, None
    return str, None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sglang_router",
        description="SGLang router: OpenAI-compatible HTTP + gRPC front door over the workers in the Redis registry.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every flag also reads from the environment as SGLANG_ROUTER_<NAME> (e.g. SGLANG_ROUTER_API_KEY).",
    )
    for name, f in RouterSettings.model_fields.items():
        help_text = (f.description or "").replace("%", "%%")
        if f.annotation is bool:
            parser.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{help_text} (default: {f.default})")
            continue
        typ, choices = _arg_type(f.annotation)
        parser.add_argument(_flag(name), dest=name, type=typ, choices=choices, default=None,
                            help=f"{help_text} (default: {f.default})")
    return parser


def parse_settings(argv: Sequence[str] | None = None) -> RouterSettings:
    """Settings from the environment, overridden by the flags that were given."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    given = {k: v for k, v in vars(ns).items() if v is not None}
    try:
        return RouterSettings(**given)
    except ValidationError as e:
        first = e.errors()[0]
        loc = _flag(str(first["loc"][0])) if first["loc"] else "settings"
        parser.error(f"{loc}: {first['msg']}")
        raise  # unreachable: parser.error exits


def run(argv: Sequence[str] | None = None) -> None:
    settings = parse_settings(argv)
    from sglang_router.main import configure_logging, main

    configure_logging(settings.log_level)
    run_loop: Any = asyncio.run
    try:
        import uvloop  # faster event loop where installed (grpc.aio and aiohttp both run on it)

        run_loop = uvloop.run
    except ImportError:
        pass
    run_loop(main(settings))
    # Shut down already: a late repeated SIGTERM must not turn a clean exit into a kill.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


if __name__ == "__main__":
    run(sys.argv[1:])
