"""Entry point: ``python -m sglang_worker --role unified --port P --redis-url redis://... --model-path M``."""

from __future__ import annotations

import asyncio
import sys

from sglang_worker.main import main

if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
