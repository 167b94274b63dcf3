"""Control flow on a choice (SGLang README). ``python tool_use.py --url URL``"""

from __future__ import annotations

import sglang as sgl


@sgl.function
def tool_use(s, question):  # type: ignore[no-untyped-def]
    s += "To answer this question: " + question + ". "
    s += "I need to use a " + sgl.gen("tool", choices=["calculator", "search engine"]) + ". "

    if s["tool"] == "calculator":
        s += "The math expression is" + sgl.gen("expression")
    elif s["tool"] == "search engine":
        s += "The key word to search is" + sgl.gen("word")


def main() -> None:
    state = tool_use.run(question="What is the population of Paris times two?")
    print(state.text())


if __name__ == "__main__":
    from common import connect

    connect(__doc__ or "")
    main()
