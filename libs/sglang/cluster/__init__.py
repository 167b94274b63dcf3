"""Cluster coordination through Redis: worker registry with TTL heartbeats, KV events, shared
prefix index."""
