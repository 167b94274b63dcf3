"""Admission order of waiting requests: ``fcfs`` (arrival) and ``lpm`` (longest prefix match
first, so requests that reuse the cache go while their prefix is still resident)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import TYPE_CHECKING

from sglang.engine.scheduler.request import Request

if TYPE_CHECKING:
    from sglang.engine.scheduler.kv_slots import KVSlots


class SchedulePolicy(ABC):
    @abstractmethod
    def order(self, waiting: Iterable[Request], kv: KVSlots) -> list[Request]:
        """Waiting requests in the order admission should try them (a new list)."""


class FCFSPolicy(SchedulePolicy):
    def order(self, waiting: Iterable[Request], kv: KVSlots) -> list[Request]:
        return list(waiting)


class LongestPrefixMatchPolicy(SchedulePolicy):
    """Sort by cached prefix length, longest first; ties keep arrival order. Matching costs
    O(prompt) per request, so past ``max_queue`` waiting requests it falls back to FCFS (as
    SGLang does)."""

    def __init__(self, max_queue: int = 128) -> None:
        self.max_queue = max_queue

    def order(self, waiting: Iterable[Request], kv: KVSlots) -> list[Request]:
        reqs = list(waiting)
        if kv.cache is None or len(reqs) > self.max_queue:
            return reqs
        matched = {r.rid: kv.match_len(r) for r in reqs}
        return sorted(reqs, key=lambda r: -matched[r.rid])


_POLICIES: dict[str, type[SchedulePolicy]] = {"fcfs": FCFSPolicy, "lpm": LongestPrefixMatchPolicy}


def create_policy(name: str) -> SchedulePolicy:
    if name not in _POLICIES:
        raise ValueError(f"unknown schedule_policy {name!r}; choose one of {sorted(_POLICIES)}")
    return _POLICIES[name]()
