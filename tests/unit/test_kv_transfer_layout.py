"""sglang.kv_transfer without a transfer library: layout hash and diff, wire formats, UCX table
parsing, peer liveness, registry and lazy imports."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from sglang.engine.memory import KVPool
from sglang.kv_transfer import base
from sglang.kv_transfer.base import HANDSHAKE_VERSION, IncompatibleKVLayout, KVLayout, TransferDest
from sglang.kv_transfer.metadata import AgentRecord, PeerLiveness, agent_key, room_key
from sglang.kv_transfer.notifications import ABORT, CHUNK, CLAIM, Notification, decode
from sglang.kv_transfer.registry import available_connectors, create_sender
from sglang.kv_transfer.ucx_info import UcxLogReader

pytestmark = pytest.mark.unit

LAYOUT = KVLayout(model="llama", num_layers=2, page_size=16, num_kv_heads=8, head_dim=128, dtype="bfloat16")
OTHER_VALUES: dict[str, Any] = {
    "model": "qwen2", "num_layers": 3, "page_size": 1, "num_kv_heads": 4, "head_dim": 64, "dtype": "float32",
    "memory_layout": "layer_major",
}


def test_compat_hash_is_stable_across_processes_and_versions_of_this_code() -> None:
    # A literal: if this changes, old and new workers stop pairing; bump HANDSHAKE_VERSION on purpose.
    assert LAYOUT.compat_hash() == "d6356f70ba2c5c5e2e40ac3f25991d31"
    assert KVLayout(**LAYOUT.to_dict()).compat_hash() == LAYOUT.compat_hash()
    assert HANDSHAKE_VERSION == 2 and LAYOUT.memory_layout == "page_major"


@pytest.mark.parametrize("name", sorted(OTHER_VALUES))
def test_compat_hash_changes_with_every_field_and_diff_names_it(name: str) -> None:
    other = dataclasses.replace(LAYOUT, **{name: OTHER_VALUES[name]})
    assert other.compat_hash() != LAYOUT.compat_hash()
    assert LAYOUT.diff(other) == [name]
    assert other.diff(LAYOUT) == [name]


def test_compat_hash_covers_the_handshake_version(monkeypatch: pytest.MonkeyPatch) -> None:
    before = LAYOUT.compat_hash()
    monkeypatch.setattr(base, "HANDSHAKE_VERSION", 3)
    assert LAYOUT.compat_hash() != before


def test_diff_lists_fields_in_declaration_order() -> None:
    other = dataclasses.replace(LAYOUT, dtype="float16", page_size=1, model="x")
    assert LAYOUT.diff(other) == ["model", "page_size", "dtype"]
    assert LAYOUT.diff(LAYOUT) == []


def test_incompatible_message_names_fields_and_both_values() -> None:
    decode = dataclasses.replace(LAYOUT, page_size=1, dtype="float32")
    err = IncompatibleKVLayout.between(LAYOUT, decode, context="(room 5)")
    assert isinstance(err, ValueError)
    assert err.fields == ["page_size", "dtype"]
    assert str(err) == (
        "incompatible KV layout (room 5): page_size: prefill 16 != decode 1; "
        "dtype: prefill 'bfloat16' != decode 'float32'"
    )


def test_layout_from_pool_and_check_pool() -> None:
    pool = KVPool(num_pages=4, page_size=16, num_layers=2, num_kv_heads=8, head_dim=128,
                  dtype=torch.bfloat16, device="cpu")
    assert KVLayout.from_pool(pool, "llama") == LAYOUT
    LAYOUT.check_pool(pool)
    with pytest.raises(ValueError, match="memory_layout: layout 'layer_major' != pool 'page_major'"):
        dataclasses.replace(LAYOUT, memory_layout="layer_major").check_pool(pool)
    with pytest.raises(ValueError, match="page_size: layout 1 != pool 16"):
        dataclasses.replace(LAYOUT, page_size=1).check_pool(pool)


def test_transfer_dest_json_round_trip() -> None:
    d = TransferDest(room=2**62 + 3, agent_name="dec-1", pages=[5, 9, 2], layout_hash="ab", version=1,
                     agent_instance="i1")
    assert TransferDest.from_json(d.to_json()) == d
    old = '{"room": 1, "agent_name": "a", "pages": [1], "layout_hash": "h", "version": 1}'
    assert TransferDest.from_json(old).agent_instance == ""


def test_agent_record_round_trip_and_keys() -> None:
    rec = AgentRecord(agent="a", instance="i", role="decode", layout=LAYOUT.to_dict(),
                      layout_hash=LAYOUT.compat_hash(), mem_type="DRAM", device_id=0, num_pages=7,
                      page_bytes=4096, buffers=[1 << 40], metadata=b"\x00\xffbinary")
    back = AgentRecord.from_json(rec.to_json())
    assert back == rec and back.kv_layout == LAYOUT
    assert agent_key("sglang", "a") == "sglang:nixl:agent:a"
    assert room_key("sglang", 42) == "sglang:nixl:room:42"


@pytest.mark.parametrize("n", [
    Notification(CHUNK, 2**63 - 1, chunk=0, last=False),
    Notification(CHUNK, 7, chunk=2, last=True, num_chunks=3, aux={"first_token": 11, "logprob": -0.5}),
    Notification(CLAIM, 7),
    Notification(ABORT, 7, error="cancelled"),
])
def test_notifications_round_trip(n: Notification) -> None:
    assert decode(n.encode(), "peer") == n


def test_notifications_of_other_versions_and_garbage_are_ignored(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert decode(b'{"v":99,"t":"chunk","room":1,"chunk":0,"last":false}', "p") is None
        assert decode(b"1_kv_0_true", "p") is None
        assert decode(b'{"v":2,"t":"chunk","room":1}', "p") is None
        assert decode(b'{"v":2,"t":"mystery","room":1}', "p") is None
    assert len(caplog.records) == 4


def test_abort_of_another_version_still_fails_the_room_naming_the_versions() -> None:
    """An old (v1, layer-major) worker's abort must end the room now, not after the timeout."""
    got = decode(b'{"v":1,"t":"abort","room":9,"error":"incompatible KV handshake"}', "pre-old")
    assert got is not None and (got.kind, got.room) == (ABORT, 9)
    assert got.error.startswith("KV handshake_version: this side 2 != pre-old 1 (version 2 moved the KV pool "
                                "to the page-major layout; run the same version on both sides)")
    assert got.error.endswith(": incompatible KV handshake")


# Shapes as UCX 1.2x prints them on an H200 (two processes, one GPU, UCX_PROTO_INFO=y).
UCX_LOG = """\
[1.1] [vm:1:0]   +--------+-------------+-------------+
[1.1] [vm:1:0]   | pre self cfg#0                      |
[1.1] [vm:1:0]   | remote memory write by ucp_put* from host memory to host |
[1.1] [vm:1:0]   +--------+-------------+-------------+
[1.1] [vm:1:0]   | Range  | Description |   Config    |
[1.1] [vm:1:0]   | 0..inf | zero-copy   | cma/memory  |
[1.2] [vm:1:0]   | pre intra-node cfg#1                |
[1.2] [vm:1:0]   | remote memory write by ucp_put* from host memory to cuda/dev[1] |
[1.2] [vm:1:0]   | Range  | Description |   Config    |
[1.2] [vm:1:0]   | 0..inf | software emulation | tcp/lo |
[1.3] [vm:1:0]   | pre intra-node cfg#1                |
[1.3] [vm:1:0]   | active message by ucp_am_send* from host memory |
[1.3] [vm:1:0]   |          0 | short   | tcp/lo      |
[1.4] [vm:1:0]   | other intra-node cfg#2              |
[1.4] [vm:1:0]   | remote memory write by ucp_put* from host memory to host |
[1.4] [vm:1:0]   | 0..inf | zero-copy   | sysv/memory |
[1.5] [vm:1:0]      sock.c:355  UCX  ERROR connect(fd=28, dest_addr=127.0.0.1:51811) failed
[1.6] [vm:1:0]      ucp_ep.c:1  UCX  WARN  something odd
[1.7] [vm:1:0]   | pre intra-node cfg#2                |
[1.7] [vm:1:0]   | remote memory write by ucp_put*(multi) from cuda/GPU0 to cuda/dev[1] |
[1.7] [vm:1:0]   | 0..8k  | zero-copy   | tcp/lo      |
[1.7] [vm:1:0]   | 8k..inf| zero-copy   | cuda_ipc/cuda |
"""


def test_ucx_log_reader_parses_selected_transports(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "ucx.log"
    path.write_text(UCX_LOG[:200])  # a partial first line is kept until it is complete
    reader = UcxLogReader(str(path), worker="pre")
    assert reader.poll(force=True) == []
    path.write_text(UCX_LOG)
    with caplog.at_level(logging.WARNING):
        changed = reader.poll(force=True)
    assert changed == ["put intra-node host->cuda", "am intra-node host", "put intra-node cuda->cuda"]
    assert reader.selected == {  # "self" endpoints and other workers' tables are skipped
        "put intra-node host->cuda": ["tcp/lo"],
        "am intra-node host": ["tcp/lo"],
        "put intra-node cuda->cuda": ["tcp/lo", "cuda_ipc/cuda"],
    }
    # only tables whose source is the pool's memory count: host->cuda emulation is not our path
    assert reader.tcp_rma("cuda") == ["put intra-node cuda->cuda"]
    assert reader.tcp_rma("host") == ["put intra-node host->cuda"]
    assert [r.levelname for r in caplog.records] == ["ERROR", "WARNING"]
    assert "connect(fd=28" in caplog.records[0].getMessage()
    assert reader.poll() == []  # rate limited, and nothing new anyway


class FakePipe:
    def __init__(self, present: set[str]) -> None:
        self.present, self.keys = present, []  # type: ignore[var-annotated]

    def exists(self, key: str) -> None:
        self.keys.append(key)

    def execute(self) -> list[int]:
        return [int(k in self.present) for k in self.keys]


class FakeRedis:
    def __init__(self) -> None:
        self.present: set[str] = set()

    def pipeline(self, transaction: bool = False) -> FakePipe:
        return FakePipe(self.present)


def test_peer_liveness_needs_two_misses_grace_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr("sglang.kv_transfer.metadata.time.monotonic", lambda: now[0])
    fake = FakeRedis()
    fake.present = {agent_key("p", "a"), agent_key("p", "b")}
    live = PeerLiveness(fake, "p", period_s=0.5, grace_s=1.0)  # type: ignore[arg-type]
    assert live.gone({"a", "b"}) == set()
    fake.present = {agent_key("p", "a")}
    now[0] += 0.1
    assert live.gone({"a", "b"}) == set()  # rate limited: not even checked
    now[0] += 0.5
    assert live.gone({"a", "b"}) == set()  # first miss
    now[0] += 0.6
    assert live.gone({"a", "b"}) == set()  # missing for 0.6 s < grace
    now[0] += 0.6
    assert live.gone({"a", "b"}) == {"b"}
    fake.present.add(agent_key("p", "b"))  # back (Redis restarted and the heartbeat rewrote it)
    now[0] += 0.6
    assert live.gone({"a", "b"}) == set()


def test_registry_is_lazy_and_importing_does_not_load_nixl() -> None:
    assert available_connectors() == ["nixl"]
    with pytest.raises(ValueError, match="unknown KV connector 'mooncake'"):
        create_sender("mooncake")
    code = (
        "import sys; sys.modules['nixl'] = None; sys.modules['nixl._api'] = None\n"
        "import sglang.kv_transfer as k\n"
        "assert not any(m.startswith('nixl') and sys.modules[m] is not None for m in sys.modules)\n"
        "try:\n    k.create_sender('nixl')\nexcept ImportError as e:\n    print('lazy', e.name)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "lazy nixl._api"
