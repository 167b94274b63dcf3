"""``make up`` (until the mesh lands): a short demo of the default model through sglang.Engine."""

from __future__ import annotations

import argparse
import logging
import time

from sglang.engine.engine import Engine


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Chat with the default model through sglang.Engine.")
    ap.add_argument("--model-path", default=None, help="local HF folder; default: SmolLM2-135M-Instruct")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument(
        "questions", nargs="*",
        default=["What is the capital of France?", "Name three primary colors.", "Write a haiku about the sea."],
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    engine = Engine(model_path=args.model_path)
    print(f"engine ready in {time.perf_counter() - t0:.1f} s: {engine.model_path}")
    tok = engine.tokenizer
    assert tok is not None
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}]) for q in args.questions]
    params = {"temperature": 0, "max_new_tokens": args.max_new_tokens}
    t0 = time.perf_counter()
    outs = engine.generate(prompt=prompts, sampling_params=params)
    dt = time.perf_counter() - t0
    assert isinstance(outs, list)
    n = 0
    for q, out in zip(args.questions, outs, strict=True):
        n += out["meta_info"]["completion_tokens"]
        print(f"\nQ: {q}\nA: {out['text'].strip()}")
    print(f"\n{len(outs)} answers, {n} tokens in {dt:.2f} s ({n / dt:.1f} tok/s, batched)")
    print("streaming: ", end="", flush=True)
    last = ""
    stream = engine.generate(prompt=prompts[0], sampling_params=params, stream=True)
    assert not isinstance(stream, (dict, list))
    for chunk in stream:
        print(chunk["text"][len(last) :], end="", flush=True)
        last = chunk["text"]
    print()
    engine.shutdown()


if __name__ == "__main__":
    main()
