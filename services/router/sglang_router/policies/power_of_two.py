"""Power of two choices: draw two distinct workers at random, take the less loaded one."""

from __future__ import annotations

import random
from collections.abc import Sequence

from sglang_router.policies.base import RoutingPolicy, Selection, WorkerView


class PowerOfTwoPolicy(RoutingPolicy):
    """Two distinct workers drawn uniformly; the lower ``load`` wins, the first drawn on a tie.
    One worker: that one. ``seed`` makes the draws reproducible."""

    name = "power_of_two"

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    async def select(self, workers: Sequence[WorkerView], tokens: Sequence[int]) -> Selection:
        if not workers:
            raise ValueError("no workers to select from")
        if len(workers) == 1:
            return Selection(workers[0], self.name)
        i, j = self._rng.sample(range(len(workers)), 2)
        a, b = workers[i], workers[j]
        return Selection(b if b.load < a.load else a, self.name)
