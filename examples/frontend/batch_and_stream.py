"""``run_batch`` over several questions, then the same program streamed (SGLang README).
``python batch_and_stream.py --url URL``"""

from __future__ import annotations

import sglang as sgl

QUESTIONS = [
    {"question": "What is the capital of the United Kingdom?"},
    {"question": "What is the capital of France?"},
    {"question": "What is the capital of Japan?"},
]


@sgl.function
def text_qa(s, question):  # type: ignore[no-untyped-def]
    s += "Q: " + question + "\n"
    s += "A:" + sgl.gen("answer", stop="\n")


def main() -> None:
    states = text_qa.run_batch(QUESTIONS, progress_bar=True)
    for state in states:
        print(state["answer"])

    state = text_qa.run(question="What is the capital of France?", temperature=0.1, stream=True)
    for out in state.text_iter():
        print(out, end="", flush=True)
    print()


if __name__ == "__main__":
    from common import connect

    connect(__doc__ or "")
    main()
