"""The router service (``python -m sglang_router``): the mesh's HTTP + gRPC front door.

It tokenizes (chat templates included), picks a worker per request through a policy
(``round_robin``, ``power_of_two``, ``cache_aware``), streams token ids from the worker's gRPC
``Generate`` and detokenizes them incrementally. Workers are discovered from the Redis registry.
"""

from __future__ import annotations
