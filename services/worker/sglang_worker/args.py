"""Command line -> settings. Every flag is a settings field (``--page-size`` is ``page_size``), built
from the settings classes so the two cannot drift; a flag not given leaves the field to its
environment variable (``SGLANG_WORKER_*`` for the worker, ``SGLANG_*`` for the engine) or default.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError
from pydantic_settings import BaseSettings
from sglang.settings import CacheSettings, ModelSettings, SchedulerSettings
from sglang.settings.disagg import DisaggSettings
from sglang.settings.worker import WorkerSettings

ENGINE_SETTINGS: tuple[type[BaseSettings], ...] = (ModelSettings, CacheSettings, SchedulerSettings, DisaggSettings)
# Engine fields that the worker sets itself: ``--role`` decides the disaggregation mode.
NOT_FLAGS = {"disaggregation_mode"}


@dataclass
class WorkerArgs:
    settings: WorkerSettings
    engine_kwargs: dict[str, Any]  # only the engine fields given on the command line


def _attribute_docstrings(cls: type) -> dict[str, str]:
    """``field -> docstring`` from the string literal that follows each annotated attribute."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass.__module__.startswith(("pydantic", "builtins")):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                out[node.target.id] = " ".join(nxt.value.value.split())
    return out


def _add_field(group: argparse._ArgumentGroup, name: str, annotation: Any, default: Any, doc: str, env: str) -> None:
    flag = "--" + name.replace("_", "-")
    help_text = f"{doc} [env {env}; default {default!r}]".replace("%", "%%")
    args = typing.get_args(annotation)
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args
    base = next((a for a in args if a is not type(None)), annotation) if optional else annotation
    kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
    if base is bool:
        group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        return
    if typing.get_origin(base) is Literal:
        kw["choices"] = list(typing.get_args(base))
    elif base in (int, float):
        kw["type"] = base
    kw["metavar"] = name.upper() if "choices" not in kw else None
    group.add_argument(flag, **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sglang_worker",
        description=(
            "SGLang worker: one engine behind the sglang.v1.Worker gRPC service, registered in Redis. "
            "Prints 'sglang_worker ready grpc=HOST:PORT metrics=HOST:PORT|off worker_id=ID' on stdout "
            "when it serves; SIGTERM drains and exits 0."
        ),
    )
    groups = [("worker", WorkerSettings)] + [(cls.__name__.removesuffix("Settings").lower(), cls) for cls in ENGINE_SETTINGS]
    for title, cls in groups:
        group = parser.add_argument_group(f"{title} settings")
        docs = _attribute_docstrings(cls)
        prefix = cls.model_config.get("env_prefix", "")
        for name, field in cls.model_fields.items():
            if name in NOT_FLAGS:
                continue
            default = field.get_default(call_default_factory=False) if field.default_factory is None else "<generated>"
            _add_field(group, name, field.annotation, default, field.description or docs.get(name, ""), f"{prefix}{name.upper()}")
    return parser


def parse_args(argv: list[str] | None) -> WorkerArgs:
    """Parse and validate; exits with status 2 and a one-line reason on bad input (argparse style)."""
    parser = build_parser()
    ns = vars(parser.parse_args(argv))
    worker_kw = {k: v for k, v in ns.items() if k in WorkerSettings.model_fields}
    engine_kw = {k: v for k, v in ns.items() if k not in worker_kw}
    try:
        settings = WorkerSettings(**worker_kw)
        for cls in ENGINE_SETTINGS:  # validate now, so that a bad flag fails before loading a model
            cls(**{k: v for k, v in engine_kw.items() if k in cls.model_fields})
    except ValidationError as e:
        reasons = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg']}" for err in e.errors())
        parser.error(reasons)
    engine_kw.update(pd_engine_kwargs(settings, engine_kw))
    return WorkerArgs(settings=settings, engine_kwargs=engine_kw)


def pd_engine_kwargs(settings: WorkerSettings, given: dict[str, Any]) -> dict[str, Any]:
    """What ``--role prefill|decode`` means for the engine: ``disaggregation_mode`` = the role, the
    KV agent named after the worker and meeting its peers in the worker's Redis (unless the
    ``--kv-transfer-*`` flags say otherwise)."""
    if settings.role == "unified":
        return {"disaggregation_mode": "null"}  # whatever SGLANG_DISAGGREGATION_MODE says
    return {
        "disaggregation_mode": settings.role,
        "kv_transfer_redis_url": given.get("kv_transfer_redis_url") or settings.redis_url,
        "kv_transfer_agent_name": given.get("kv_transfer_agent_name") or settings.worker_id,
    }
