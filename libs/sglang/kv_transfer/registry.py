"""KV connector registry with lazy imports: a connector's module (and its transfer library, e.g.
``nixl``) is imported only when that connector is created."""

from __future__ import annotations

from typing import Any

from sglang.kv_transfer.base import KVReceiver, KVSender
from sglang.utils.registry import LazyRegistry

_SENDERS: LazyRegistry[KVSender] = LazyRegistry("KV connector", {"nixl": "sglang.kv_transfer.nixl:NixlKVSender"})
_RECEIVERS: LazyRegistry[KVReceiver] = LazyRegistry(
    "KV connector", {"nixl": "sglang.kv_transfer.nixl:NixlKVReceiver"}
)


def register_connector(name: str, sender: str, receiver: str) -> None:
    """Register ``name`` -> ``("module:Sender", "module:Receiver")`` (imported on first use)."""
    _SENDERS.register(name, sender)
    _RECEIVERS.register(name, receiver)


def available_connectors() -> list[str]:
    return _SENDERS.names()


def create_sender(name: str = "nixl", **kwargs: Any) -> KVSender:
    """Prefill side: ``create_sender("nixl", kv_pool=..., layout=..., agent_name=..., redis_url=...)``."""
    return _SENDERS.create(name, **kwargs)


def create_receiver(name: str = "nixl", **kwargs: Any) -> KVReceiver:
    """Decode side, same arguments as ``create_sender``."""
    return _RECEIVERS.create(name, **kwargs)
