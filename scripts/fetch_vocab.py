"""Fetch real tokenizer vocabularies for tests (run by ``make install``; idempotent).

No machine here can reach the HF hub, but the ``llama-cpp-python`` sdist on PyPI carries vocab-only
GGUF files (``vendor/llama.cpp/models/ggml-vocab-*.gguf``). This script downloads that sdist once
with pip (``pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36``), extracts only the
vocab GGUFs it needs, loads each with ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` and saves
a plain HF tokenizer folder (``tokenizer.json`` + ``tokenizer_config.json``, fast to load) under::

    <cache>/vocab/<name>/        # <cache> = $SGLANG_CACHE_DIR or ~/.cache/sglang

Names: ``llama-bpe`` (Llama-3, 128,256 tokens + specials) and ``qwen2`` (Qwen2, 151,643 + specials).
A folder that already holds ``tokenizer.json`` is left alone, so a second run does nothing.

    python scripts/fetch_vocab.py [--sdist PATH] [--force]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{VERSION}.tar.gz"
VOCABS = {"llama-bpe": "ggml-vocab-llama-bpe.gguf", "qwen2": "ggml-vocab-qwen2.gguf"}
_MEMBER_DIR = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/models/"


def cache_dir() -> str:
    """``$SGLANG_CACHE_DIR`` or ``~/.cache/sglang`` (as ``sglang.engine.models.default_model``)."""
    return os.path.abspath(os.path.expanduser(os.environ.get("SGLANG_CACHE_DIR") or "~/.cache/sglang"))


def vocab_dir(name: str) -> str:
    return os.path.join(cache_dir(), "vocab", name)


def is_complete(name: str) -> bool:
    return os.path.isfile(os.path.join(vocab_dir(name), "tokenizer.json"))


def download_sdist(dest: str) -> str:
    """The sdist in ``dest``, downloaded with pip unless it is there already."""
    path = os.path.join(dest, SDIST_NAME)
    if os.path.isfile(path):
        return path
    os.makedirs(dest, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
        f"{PACKAGE}=={VERSION}", "-d", dest,
    ]
    print("fetch_vocab:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pip download did not leave {SDIST_NAME} in {dest}")
    return path


def extract_gguf(sdist: str, file_name: str, out_dir: str) -> str:
    """Extract one vocab GGUF from the sdist into ``out_dir``; returns its path."""
    with tarfile.open(sdist, "r:gz") as tar:
        member = tar.getmember(_MEMBER_DIR + file_name)
        src = tar.extractfile(member)
        if src is None:
            raise FileNotFoundError(f"{file_name} is not a regular file in {sdist}")
        path = os.path.join(out_dir, file_name)
        with src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return path


def convert(gguf_path: str, target: str) -> None:
    """Save the GGUF's tokenizer as a plain HF folder at ``target`` (atomically)."""
    from transformers import AutoTokenizer

    folder, name = os.path.split(gguf_path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    try:
        tok.save_pretrained(tmp)
        os.chmod(tmp, 0o755)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"fetch_vocab: {target} ({len(tok)} tokens)", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sdist", help=f"use this {SDIST_NAME} instead of downloading it")
    ap.add_argument("--force", action="store_true", help="rebuild folders that already exist")
    args = ap.parse_args(argv)
    todo = [n for n in VOCABS if args.force or not is_complete(n)]
    if not todo:
        print(f"fetch_vocab: {', '.join(vocab_dir(n) for n in VOCABS)} already present", flush=True)
        return 0
    sdist = args.sdist or download_sdist(os.path.join(cache_dir(), "downloads"))
    with tempfile.TemporaryDirectory() as tmp:
        for name in todo:
            convert(extract_gguf(sdist, VOCABS[name], tmp), vocab_dir(name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
