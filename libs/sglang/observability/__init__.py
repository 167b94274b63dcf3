"""Observability: every metric name in one module, logging setup, tracing."""
