"""The NIXL connector (registry name ``"nixl"``): ``NixlKVSender`` (prefill) and ``NixlKVReceiver``
(decode). Importing this module imports ``nixl``; the registry does so only on first use.

Options (keyword arguments of both, after the interface's): ``key_prefix="sglang"``,
``heartbeat_s=1.0``, ``peer_ttl_s=3.0``, ``liveness_period_s=0.5``,
``ucx_error_handling_mode=None``, ``capture_ucx_info=True``; the receiver also takes
``room_ttl_s`` (default ``max(60, 4 * timeout_s)``). See ``nixl_agent`` for the UCX environment.
"""

from __future__ import annotations

from sglang.kv_transfer.nixl_receiver import NixlKVReceiver
from sglang.kv_transfer.nixl_sender import NixlKVSender

__all__ = ["NixlKVReceiver", "NixlKVSender"]
