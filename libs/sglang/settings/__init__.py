"""Settings: one pydantic-settings class per domain, env prefix ``SGLANG_``.

Nothing here reads the environment at import time; a class reads it when instantiated.
"""

from __future__ import annotations

from sglang.settings.cache import CacheSettings
from sglang.settings.model import ModelSettings
from sglang.settings.scheduler import SchedulerSettings

__all__ = ["CacheSettings", "ModelSettings", "SchedulerSettings"]
