"""Real tokenizer vocabularies for tests, prepared by ``scripts/fetch_vocab.py`` (``make install``).

``real_vocab_dir("llama-bpe")`` is a plain HF tokenizer folder with Llama-3's vocabulary (128,256
tokens plus specials), ``real_vocab_dir("qwen2")`` Qwen2's. Tests never download: a missing folder
fails with what to run.
"""

from __future__ import annotations

import os


def _cache_dir() -> str:
    return os.path.abspath(os.path.expanduser(os.environ.get("SGLANG_CACHE_DIR") or "~/.cache/sglang"))


def real_vocab_dir(name: str = "llama-bpe") -> str:
    """The tokenizer folder for ``name``; ``FileNotFoundError`` saying "run make install" if absent."""
    path = os.path.join(_cache_dir(), "vocab", name)
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise FileNotFoundError(
            f"real vocabulary {name!r} not found at {path}: run make install "
            "(or: .venv/bin/python scripts/fetch_vocab.py)"
        )
    return path


def copy_tokenizer_into(name: str, model_dir: str) -> None:
    """Copy the ``name`` tokenizer files next to a model's config.json so the engine loads them."""
    import shutil

    src = real_vocab_dir(name)
    for f in os.listdir(src):
        shutil.copy(os.path.join(src, f), os.path.join(model_dir, f))
