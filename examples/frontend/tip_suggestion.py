"""Parallel forks (SGLang README). ``python tip_suggestion.py --url URL``"""

from __future__ import annotations

import sglang as sgl


@sgl.function
def tip_suggestion(s):  # type: ignore[no-untyped-def]
    s += (
        "Here are two tips for staying healthy: "
        "1. Balanced Diet. 2. Regular Exercise.\n\n"
    )

    forks = s.fork(2)
    for i, f in enumerate(forks):
        f += f"Now, expand tip {i+1} into a paragraph:\n"
        f += sgl.gen("detailed_tip", max_tokens=256, stop="\n\n")

    s += "Tip 1:" + forks[0]["detailed_tip"] + "\n"
    s += "Tip 2:" + forks[1]["detailed_tip"] + "\n"
    s += "In summary" + sgl.gen("summary")


def main() -> None:
    print(tip_suggestion.run().text())


if __name__ == "__main__":
    from common import connect

    connect(__doc__ or "")
    main()
