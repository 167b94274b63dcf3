"""Multi-turn chat with system/user/assistant roles (SGLang README). ``python multi_turn_chat.py --url URL``"""

from __future__ import annotations

from sglang import assistant, function, gen, system, user


@function
def multi_turn_question(s, question_1, question_2):  # type: ignore[no-untyped-def]
    s += system("You are a helpful assistant.")
    s += user(question_1)
    s += assistant(gen("answer_1", max_tokens=256))
    s += user(question_2)
    s += assistant(gen("answer_2", max_tokens=256))


def main() -> None:
    state = multi_turn_question.run(
        question_1="What is the capital of the United States?",
        question_2="List two local attractions.",
    )
    for m in state.messages():
        print(m["role"], ":", m["content"])
    print(state["answer_1"])


if __name__ == "__main__":
    from common import connect

    connect(__doc__ or "")
    main()
