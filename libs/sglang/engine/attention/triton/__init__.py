"""Triton attention backend (imported only when chosen): ``backend.TritonBackend`` plus its
kernels, ``decode`` (split-K) and ``extend`` (tiled causal prefill)."""
