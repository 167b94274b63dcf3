"""Multi-turn chat: each turn appends a user message to the conversation so far (including the
previous answers) and generates the next answer. Prints the prefix-cache hit rate per turn.

    .venv/bin/python benchmarks/multi_turn.py --tiny --num-conversations 8 --turns 6
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from sglang.engine.engine import Engine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--system-len", type=int, default=256)
    ap.add_argument("--user-len", type=int, default=48)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--disable-radix-cache", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    common.quiet_logs()
    path, name = common.resolve_model(args.model_path, args.tiny)
    vocab = min(common.load_hf_config(path).vocab_size, 30000)
    rng = random.Random(args.seed)
    eng = Engine(
        model_path=path, skip_tokenizer_init=True, dtype=args.dtype, page_size=args.page_size,
        disable_radix_cache=args.disable_radix_cache,
    )
    convs = [[rng.randint(3, vocab - 1) for _ in range(args.system_len)] for _ in range(args.num_conversations)]
    params = {"temperature": 0, "max_new_tokens": args.output_len, "ignore_eos": True}
    rows = []
    t_all = time.perf_counter()
    for turn in range(1, args.turns + 1):
        for c in convs:
            c.extend(rng.randint(3, vocab - 1) for _ in range(args.user_len))
        t0 = time.perf_counter()
        outs = eng.generate(input_ids=[list(c) for c in convs], sampling_params=params)
        dt = time.perf_counter() - t0
        assert isinstance(outs, list)
        prompt = sum(o["meta_info"]["prompt_tokens"] for o in outs)
        cached = sum(o["meta_info"]["cached_tokens"] for o in outs)
        for c, o in zip(convs, outs, strict=True):
            c.extend(o["output_ids"])
        rows.append([turn, prompt // len(convs), cached / prompt, dt, sum(len(o["output_ids"]) for o in outs) / dt])
    total = time.perf_counter() - t_all
    eng.check_integrity()
    eng.shutdown()
    table = common.markdown_table(["turn", "prompt tokens/conv", "cache hit rate", "time s", "output tok/s"], rows)
    body = (
        f"model: {name}; {args.num_conversations} conversations x {args.turns} turns, system {args.system_len}, "
        f"user {args.user_len}, output {args.output_len}, page {args.page_size}, "
        f"radix cache {'off' if args.disable_radix_cache else 'on'}\n\n{table}\n\ntotal {total:.2f} s\n"
    )
    print(body)
    if args.out:
        common.append_section(args.out, f"multi-turn chat: {name}", body)


if __name__ == "__main__":
    main()
