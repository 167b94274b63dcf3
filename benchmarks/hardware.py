"""What the hardware allows, measured in the run: memory bandwidth (a large tensor copy) and matmul
throughput, on the CPU (``perf_counter``) or on a CUDA GPU (device-to-device copy of 1 GiB and a bf16
8192^3 matmul, timed with CUDA events); the load other processes put on a shared CPU; and the
``Hardware`` header every benchmark prints. ``common`` re-exports these names."""

from __future__ import annotations

import gc
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def measure_bandwidth_gbs(mib: int = 512, repeats: int = 8) -> float:
    """Best of ``repeats`` copies of a ``mib`` MiB float32 tensor; counts read + write bytes."""
    n = mib * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / best / 1e9


def measure_matmul_gflops(dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 5) -> float:
    """Best of ``repeats`` ``n x n`` matmuls in ``dtype``."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e9


def measure_gpu_bandwidth_gbs(mib: int = 1024, repeats: int = 10) -> float:
    """Best of ``repeats`` device-to-device copies of a ``mib`` MiB buffer, timed with CUDA
    events; counts read + write bytes (the HBM traffic of the copy)."""
    src = torch.ones(mib * 2**20 // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(repeats):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    nbytes = 2 * src.numel() * src.element_size()
    del src, dst
    return nbytes / best / 1e9


def measure_gpu_matmul_gflops(dtype: torch.dtype = torch.bfloat16, n: int = 8192, repeats: int = 5,
                              inner: int = 10) -> float:
    """Dense ``n x n x n`` matmul rate on the GPU: best of ``repeats`` timings (CUDA events) of
    ``inner`` back-to-back matmuls, after a warm-up that lets the clocks ramp up."""
    a = torch.randn(n, n, device="cuda").to(dtype)
    b = torch.randn(n, n, device="cuda").to(dtype)
    c = torch.empty(n, n, device="cuda", dtype=dtype)
    for _ in range(inner):
        torch.mm(a, b, out=c)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(repeats):
        start.record()
        for _ in range(inner):
            torch.mm(a, b, out=c)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / inner)
    del a, b, c
    return 2.0 * n**3 / best / 1e9


class LoadMeter:
    """CPU used by *other* processes while a measurement runs, in cores (0.0 = a quiet machine).

    Reads the machine's busy time from ``/proc/stat`` and subtracts this process's own CPU time.
    The benchmark machines are shared; a measurement taken next to a busy neighbour is flagged.
    """

    def __init__(self) -> None:
        self._t0 = self._busy0 = self._own0 = 0.0
        self.start()

    @staticmethod
    def _machine_busy_s() -> float:
        try:
            with open("/proc/stat", encoding="utf-8") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return float("nan")
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own_s() -> float:
        t = os.times()
        return t.user + t.system

    def start(self) -> None:
        self._t0, self._busy0, self._own0 = time.perf_counter(), self._machine_busy_s(), self._own_s()

    def others_cores(self) -> float:
        """Average cores used by other processes since ``start``."""
        wall = time.perf_counter() - self._t0
        if wall <= 0:
            return float("nan")
        others = (self._machine_busy_s() - self._busy0) - (self._own_s() - self._own0)
        return max(others, 0.0) / wall


def idle_load(seconds: float = 1.0) -> float:
    """Cores busy with other processes over ``seconds`` while we sleep."""
    m = LoadMeter()
    time.sleep(seconds)
    return m.others_cores()


def wait_for_quiet(max_wait_s: float, threshold: float = 0.25, window_s: float = 2.0) -> float:
    """Wait (up to ``max_wait_s``) until other processes use under ``threshold`` cores for a whole
    ``window_s``; returns their last measured load. The benchmark machines are shared."""
    if max_wait_s <= 0:
        return float("nan")
    deadline = time.monotonic() + max_wait_s
    load = float("nan")
    while time.monotonic() < deadline:
        load = idle_load(min(window_s, max(deadline - time.monotonic(), 0.1)))
        if load < threshold:
            break
    return load


@dataclass
class Hardware:
    cpu: str
    cores: int
    threads: int
    torch: str
    transformers: str
    python: str
    bandwidth_gbs: float
    matmul_gflops: float
    matmul_dtype: str
    commit: str
    others_cores: float  # CPU used by other processes when the benchmark started
    gpu: str = ""  # set when the bandwidth and matmul numbers were measured on a CUDA GPU
    cuda: str = ""

    @property
    def on_gpu(self) -> bool:
        return bool(self.gpu)

    def line(self) -> str:
        if self.on_gpu:
            return (
                f"{self.gpu}, CUDA {self.cuda}, torch {self.torch}, transformers {self.transformers}, "
                f"Python {self.python}; host {self.cpu}, {self.cores} cores"
            )
        return (
            f"{self.cpu}, {self.cores} cores, torch {self.torch} ({self.threads} thread{'s' if self.threads != 1 else ''}), "
            f"transformers {self.transformers}, Python {self.python}"
        )

    def roof_line(self) -> str:
        if self.on_gpu:
            return (
                f"measured: device-to-device copy {self.bandwidth_gbs:.0f} GB/s (read + write), "
                f"dense {self.matmul_dtype} matmul {self.matmul_gflops / 1e3:.0f} TFLOP/s (8192^3)"
            )
        return (
            f"measured: copy bandwidth {self.bandwidth_gbs:.1f} GB/s, "
            f"{self.matmul_dtype} matmul {self.matmul_gflops:.0f} GFLOP/s "
            f"(other processes were using {self.others_cores:.2f} of {self.cores} cores)"
        )


def git_commit() -> str:
    """The sglang code being measured: ``$SGLANG_BENCH_COMMIT`` when set (the caller vouches that
    the tree is that commit), else the commit of this checkout (and whether ``libs/`` has
    uncommitted changes), or, when ``sglang`` is imported from elsewhere (a snapshot on
    ``PYTHONPATH``), that folder and the ``COMMIT`` file next to its ``libs/``."""
    import importlib.util

    given = os.environ.get("SGLANG_BENCH_COMMIT")
    if given:  # a copied tree whose .git is older than its files (e.g. the GPU host's copy)
        return f"{given} (SGLANG_BENCH_COMMIT)"
    spec = importlib.util.find_spec("sglang")
    origin = Path(spec.origin).resolve() if spec and spec.origin else None
    if origin is not None and REPO_ROOT not in origin.parents:
        root = origin.parent.parent.parent  # <root>/libs/sglang/__init__.py
        stamp = root / "COMMIT"
        label = stamp.read_text().strip() if stamp.is_file() else "unknown commit"
        return f"{label} (snapshot in {root})"
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "libs"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        return head + (" + uncommitted changes in libs/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def hardware_info(dtype: torch.dtype = torch.float32, wait_quiet_s: float = 0.0, device: str = "cpu") -> Hardware:
    """The machine and its two limits, measured now. On ``cuda`` the limits are the GPU's (HBM
    copy bandwidth, dense matmul in ``dtype``; the buffers are freed before returning)."""
    import transformers

    on_gpu = device.startswith("cuda")
    wait_for_quiet(wait_quiet_s)
    others = idle_load(0.2 if on_gpu else 1.0)
    if on_gpu:
        bandwidth, matmul = measure_gpu_bandwidth_gbs(), measure_gpu_matmul_gflops(dtype)
        release_memory()
    else:
        bandwidth, matmul = measure_bandwidth_gbs(), measure_matmul_gflops(dtype)
    return Hardware(
        cpu=cpu_model(),
        cores=usable_cores(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        python=platform.python_version(),
        bandwidth_gbs=bandwidth,
        matmul_gflops=matmul,
        matmul_dtype=str(dtype).replace("torch.", ""),
        commit=git_commit(),
        others_cores=others,
        gpu=torch.cuda.get_device_name() if on_gpu else "",
        cuda=str(torch.version.cuda) if on_gpu else "",
    )


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
