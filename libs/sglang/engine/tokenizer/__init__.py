"""Tokenizer wrapper, chat templates, incremental detokenizer and stop strings."""

from __future__ import annotations

from sglang.engine.tokenizer.chat import normalize_messages
from sglang.engine.tokenizer.detokenizer import IncrementalDetokenizer
from sglang.engine.tokenizer.stop import StopChecker
from sglang.engine.tokenizer.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer", "StopChecker", "Tokenizer", "normalize_messages"]
