"""KV-cache transfer for prefill/decode disaggregation: connector interface, registry, NIXL connector.

Importing this package does not import any transfer library (``nixl`` loads when a ``"nixl"``
connector is created), so it works on machines without one.
"""

from __future__ import annotations

from sglang.kv_transfer.base import (
    HANDSHAKE_VERSION,
    IncompatibleKVLayout,
    KVLayout,
    KVReceiver,
    KVSender,
    RoomResult,
    TransferDest,
    TransferStats,
    TransportInfo,
)
from sglang.kv_transfer.registry import (
    available_connectors,
    create_receiver,
    create_sender,
    register_connector,
)

__all__ = [
    "HANDSHAKE_VERSION",
    "IncompatibleKVLayout",
    "KVLayout",
    "KVReceiver",
    "KVSender",
    "RoomResult",
    "TransferDest",
    "TransferStats",
    "TransportInfo",
    "available_connectors",
    "create_receiver",
    "create_sender",
    "register_connector",
]
