"""Shared by the example programs: ``--url`` of a running router (``sglang up``)."""

from __future__ import annotations

import argparse

import sglang as sgl


def connect(description: str) -> None:
    """Parse ``--url`` and make that router the default backend."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--url", default="http://127.0.0.1:30000", help="router URL (sglang up prints it)")
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args()
    sgl.set_default_backend(sgl.RuntimeEndpoint(args.url, api_key=args.api_key))
