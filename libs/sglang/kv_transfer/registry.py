"""KV connector registry with lazy imports: a connector's module (and its transfer library, e.g.
``nixl``) is imported only when that connector is created."""

from __future__ import annotations

import importlib
from typing import Any

from sglang.kv_transfer.base import KVReceiver, KVSender

# name -> ("module:SenderClass", "module:ReceiverClass")
_CONNECTORS: dict[str, tuple[str, str]] = {
    "nixl": ("sglang.kv_transfer.nixl:NixlKVSender", "sglang.kv_transfer.nixl:NixlKVReceiver"),
}


def register_connector(name: str, sender: str, receiver: str) -> None:
    """Register ``name`` -> ``("module:Sender", "module:Receiver")`` (imported on first use)."""
    _CONNECTORS[name] = (sender, receiver)


def available_connectors() -> list[str]:
    return sorted(_CONNECTORS)


def _load(name: str, which: int) -> Any:
    if name not in _CONNECTORS:
        raise ValueError(f"unknown KV connector {name!r}; choose one of {available_connectors()}")
    module, cls = _CONNECTORS[name][which].split(":")
    return getattr(importlib.import_module(module), cls)


def create_sender(name: str = "nixl", **kwargs: Any) -> KVSender:
    """Prefill side: ``create_sender("nixl", kv_pool=..., layout=..., agent_name=..., redis_url=...)``."""
    sender: KVSender = _load(name, 0)(**kwargs)
    return sender


def create_receiver(name: str = "nixl", **kwargs: Any) -> KVReceiver:
    """Decode side, same arguments as ``create_sender``."""
    receiver: KVReceiver = _load(name, 1)(**kwargs)
    return receiver
