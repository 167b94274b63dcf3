"""Regex-constrained decoding (SGLang README). ``python regex_ip.py --url URL``"""

from __future__ import annotations

import sglang as sgl

IP_REGEX = r"((25[0-5]|2[0-4]\d|[01]?\d\d?).){3}(25[0-5]|2[0-4]\d|[01]?\d\d?)"


@sgl.function
def regular_expression_gen(s):  # type: ignore[no-untyped-def]
    s += "Q: What is the IP address of the Google DNS servers?\n"
    s += "A: " + sgl.gen(
        "answer",
        temperature=0,
        regex=IP_REGEX,
    )


def main() -> None:
    print(regular_expression_gen.run()["answer"])


if __name__ == "__main__":
    from common import connect

    connect(__doc__ or "")
    main()
