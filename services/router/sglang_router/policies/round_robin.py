"""Round robin: each request to the next worker in id order."""

from __future__ import annotations

from collections.abc import Sequence

from sglang_router.policies.base import RoutingPolicy, Selection, WorkerView


class RoundRobinPolicy(RoutingPolicy):
    """The i-th request goes to ``workers[i % len(workers)]`` of the list it is given."""

    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    async def select(self, workers: Sequence[WorkerView], tokens: Sequence[int]) -> Selection:
        if not workers:
            raise ValueError("no workers to select from")
        worker = workers[self._next % len(workers)]
        self._next += 1
        return Selection(worker, self.name)
