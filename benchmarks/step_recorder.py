"""The forward calls an engine runs during a benchmark: decode batch shapes (for the decode
floor), launch times (where the wall time went), and optionally a torch.profiler + cProfile window
of forward calls (``offline.py --profile-launches A B``)."""

from __future__ import annotations

import contextlib
import cProfile
import itertools
import time
from collections.abc import Iterator
from typing import Any

import torch
from common import Hardware, ModelCost


class StepRecorder:
    """Records every forward our engine runs: ``(batch size, total context)`` of each decode step
    and the number of extend steps. Shadows ``runner.forward`` with an instance attribute while
    active (runs on the scheduler thread; one list append per step)."""

    def __init__(self, profile_launches: tuple[int, int] | None = None) -> None:
        self.profile_launches = profile_launches  # (first, last) forward call to run torch.profiler over
        self.profile_report = ""
        self._prof: Any = None
        self._cprof: Any = None
        self._prof_t0 = 0.0
        self.decode: list[tuple[int, int]] = []
        self.extend_steps = 0
        self.launches: list[tuple[float, bool]] = []  # (perf_counter at the forward call, is decode)
        self.start = self.end = 0.0  # the run's wall-clock bounds (set by ``run_workload``)

    @contextlib.contextmanager
    def attach(self, engine: Any) -> Iterator[StepRecorder]:
        from sglang.engine.runner.forward_batch import ForwardMode

        runner = engine.runner
        forward = runner.forward

        def recorded(inp: Any) -> Any:
            decode = inp.mode is ForwardMode.DECODE
            self.launches.append((time.perf_counter(), decode))
            if self.profile_launches is not None:
                self._profile_tick(len(self.launches) - 1)
            if decode:
                self.decode.append((len(inp.extend_lens), sum(inp.prefix_lens) + len(inp.extend_lens)))
            else:
                self.extend_steps += 1
            return forward(inp)

        runner.forward = recorded
        try:
            yield self
        finally:
            del runner.forward

    def _profile_tick(self, n: int) -> None:
        """Start torch.profiler at forward call ``first`` and stop it at ``last`` (scheduler thread):
        GPU kernels and idle gaps of that window of the run, mixed prefill and decode steps."""
        first, last = self.profile_launches or (0, 0)
        if n == first:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=acts)
            self._prof.__enter__()
            self._cprof = cProfile.Profile()  # this (the scheduler's) thread only
            self._cprof.enable()
            self._prof_t0 = time.perf_counter()
        elif n == last and self._prof is not None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall = time.perf_counter() - self._prof_t0
            self._cprof.disable()
            self._prof.__exit__(None, None, None)
            from one_batch import cprofile_table, gpu_gap_table, gpu_kernel_table

            kinds = [d for _, d in self.launches[first:last]]
            self.profile_report = (
                f"profile of forward calls {first}..{last} ({kinds.count(True)} decode, {kinds.count(False)} prefill; "
                f"per call below):\n\n{gpu_kernel_table(self._prof, last - first, wall, 16)}\n\n"
                f"{gpu_gap_table(self._prof, last - first, 12, 10.0)}\n\n"
                f"host (scheduler thread, cProfile):\n\n{cprofile_table(self._cprof, last - first, 25)}"
            )
            self._prof = None

    def wall_split(self) -> tuple[float, float, float, float]:
        """Seconds before the first forward call, from each prefill (extend) call to the next call,
        the same after decode calls, and after the last call. A call is made when the host has the
        batch ready; with overlap scheduling the interval after it is about its GPU time."""
        if not self.launches:
            return self.end - self.start, 0.0, 0.0, 0.0
        ext, dec = self.intervals()
        return self.launches[0][0] - self.start, sum(ext), sum(dec), self.end - self.launches[-1][0]

    def intervals(self) -> tuple[list[float], list[float]]:
        """Seconds from each prefill (extend) call to the next call, and the same for decode calls."""
        ext: list[float] = []
        dec: list[float] = []
        for (t, decode), (t_next, _) in itertools.pairwise(self.launches):
            (dec if decode else ext).append(t_next - t)
        return ext, dec

    def decode_floor_s(self, cost: ModelCost, hw: Hardware) -> tuple[float, float, float]:
        """(decode floor seconds, bytes read, FLOPs) over the recorded decode steps."""
        bw, rate = hw.bandwidth_gbs * 1e9, hw.matmul_gflops * 1e9
        total_s = total_b = total_f = 0.0
        for bs, ctx in self.decode:
            b, f = cost.decode_step_bytes(bs, ctx), cost.decode_step_flops(bs, ctx)
            total_s += max(b / bw, f / rate)
            total_b += b
            total_f += f
        return total_s, total_b, total_f
