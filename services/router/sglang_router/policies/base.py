"""What a routing policy is: given the routable workers and a request's token ids, pick one.

Policies see :class:`WorkerView` snapshots, never clients or registry records, so they are pure
decision logic and unit-testable without processes. ``load`` is the worker's own count (running +
waiting from its last heartbeat) plus the requests this router has in flight to it, the freshest
number the router has.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple


@dataclass(frozen=True)
class WorkerView:
    """One routable worker as a policy sees it."""

    worker_id: str
    load: int = 0


class Selection(NamedTuple):
    worker: WorkerView
    decision: str  # why: "round_robin", "power_of_two", "cache_hit", "cache_miss", "imbalanced"


class RoutingPolicy(ABC):
    """A routing policy.

    Contract:
    - ``select`` gets a non-empty list of routable workers sorted by ``worker_id`` and the request's
      prompt token ids; it returns one of those workers and a decision label (a metrics label: keep
      the set small). It may record the choice (cache_aware inserts the prompt into its index).
    - ``remove_worker`` forgets per-worker state of a worker that left the registry.
    - Policies are used from one event loop; they need no locks.
    """

    name: ClassVar[str]

    @abstractmethod
    async def select(self, workers: Sequence[WorkerView], tokens: Sequence[int]) -> Selection: ...

    def remove_worker(self, worker_id: str) -> None:
        """Forget ``worker_id`` (default: nothing kept)."""
        return None

    async def close(self) -> None:
        """Release resources (default: none)."""
        return None
