"""sglang.transport.convert: plain Python <-> proto, exactly, including unset vs zero."""

from __future__ import annotations

import pytest
from sglang.transport import convert
from sglang.transport.types import GenerateEvent, GenerateInput
from sglang.v1 import worker_pb2

pytestmark = pytest.mark.unit


def wire(msg):  # noqa: ANN001, ANN201 - any message: serialize and parse back, as gRPC does
    return type(msg).FromString(msg.SerializeToString())


def sp_round_trip(d: dict) -> dict:
    return convert.sampling_params_from_proto(wire(convert.sampling_params_to_proto(d)))


def test_empty_sampling_params_stay_empty_so_engine_defaults_apply() -> None:
    assert sp_round_trip({}) == {}
    assert convert.sampling_params_to_proto(None).ByteSize() == 0
    msg = wire(convert.sampling_params_to_proto({}))
    for name in ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "n", "seed",
                 "skip_special_tokens", "regex", "json_schema", "ebnf"):
        assert not msg.HasField(name), name


@pytest.mark.parametrize(
    "d",
    [
        {"temperature": 0.0},
        {"max_new_tokens": 0},
        {"top_k": -1},
        {"top_p": 1.0},
        {"repetition_penalty": 1.0},
        {"skip_special_tokens": False},
        {"skip_special_tokens": True},
        {"n": 1},
        {"seed": 0},
        {"regex": ""},
        {"json_schema": ""},
        {"ebnf": ""},
    ],
)
def test_optional_fields_set_to_zero_survive(d: dict) -> None:
    assert sp_round_trip(d) == d
    (name,) = d
    assert wire(convert.sampling_params_to_proto(d)).HasField(name)


def test_every_field_round_trips_with_exact_values() -> None:
    d = {
        "max_new_tokens": 17, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "min_p": 0.05,
        "frequency_penalty": -0.5, "presence_penalty": 1.25, "repetition_penalty": 1.1,
        "min_new_tokens": 3, "stop": ["\n\n", "END"], "stop_token_ids": [2, 7], "ignore_eos": True,
        "skip_special_tokens": False, "n": 1, "seed": 2**40 + 3, "regex": "[a-z]+",
        "logit_bias": {5: -100.0, 9: 2.5}, "no_stop_trim": True,
    }
    assert sp_round_trip(d) == d
    assert sp_round_trip({"json_schema": '{"type": "object"}'}) == {"json_schema": '{"type": "object"}'}
    assert sp_round_trip({"ebnf": 'root ::= "a"'}) == {"ebnf": 'root ::= "a"'}


def test_plain_fields_at_their_default_are_left_out() -> None:
    d = {"min_p": 0.0, "frequency_penalty": 0.0, "presence_penalty": 0.0, "min_new_tokens": 0,
         "stop": [], "stop_token_ids": [], "ignore_eos": False, "no_stop_trim": False, "logit_bias": {}}
    assert sp_round_trip(d) == {}


def test_normalizing_shapes() -> None:
    assert sp_round_trip({"stop": "###"}) == {"stop": ["###"]}
    assert sp_round_trip({"logit_bias": {"12": 1.5}}) == {"logit_bias": {12: 1.5}}
    assert sp_round_trip({"seed": None, "regex": None, "temperature": None}) == {}
    assert sp_round_trip({"temperature": 1}) == {"temperature": 1.0}


def test_f32_gives_the_shortest_decimal() -> None:
    assert convert.f32(0.1) == 0.1
    assert convert.f32(1 / 3) == 0.33333334
    assert convert.f32(-100.0) == -100.0


@pytest.mark.parametrize(
    ("d", "param"),
    [
        ({"max_tokens": 5}, "max_tokens"),
        ({"spaces_between_special_tokens": True}, "spaces_between_special_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"max_new_tokens": 1.5}, "max_new_tokens"),
        ({"max_new_tokens": True}, "max_new_tokens"),
        ({"max_new_tokens": 2**31}, "max_new_tokens"),
        ({"seed": 2**63}, "seed"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"stop": [1]}, "stop"),
        ({"stop": 3}, "stop"),
        ({"stop_token_ids": "2"}, "stop_token_ids"),
        ({"logit_bias": {"x": 1.0}}, "logit_bias"),
        ({"logit_bias": [1]}, "logit_bias"),
        ({"json_schema": {"type": "object"}}, "json_schema"),
    ],
)
def test_bad_values_raise_invalid_param(d: dict, param: str) -> None:
    with pytest.raises(convert.InvalidParam) as info:
        convert.sampling_params_to_proto(d)
    assert info.value.param == param
    assert param in str(info.value)
    assert isinstance(info.value, ValueError)


def test_generate_input_round_trip() -> None:
    inp = GenerateInput(
        request_id="r1", input_ids=[1, 2, 300], sampling_params={"temperature": 0.0, "max_new_tokens": 4},
        return_logprob=True, logprob_start_len=0, top_logprobs_num=3, stream=False,
    )
    back = convert.generate_input_from_proto(wire(convert.generate_input_to_proto(inp)))
    assert back == inp
    minimal = GenerateInput(request_id="r2", input_ids=[5])
    back = convert.generate_input_from_proto(wire(convert.generate_input_to_proto(minimal)))
    assert back == minimal
    assert back.logprob_start_len is None  # unset stays None, not 0
    assert back.bootstrap_room is None
    for room in (0, 2**63 - 1, 12345):  # PD rooms: 0 is a room, not "unset"
        pd = GenerateInput(request_id="r4", input_ids=[5], bootstrap_room=room)
        assert convert.generate_input_from_proto(wire(convert.generate_input_to_proto(pd))) == pd
    with pytest.raises(convert.InvalidParam) as info:
        convert.generate_input_to_proto(GenerateInput(request_id="r5", input_ids=[5], bootstrap_room=-1))
    assert info.value.param == "bootstrap_room"
    with pytest.raises(convert.InvalidParam) as info:
        convert.generate_input_to_proto(GenerateInput(request_id="r3", input_ids=[1, "2"]))  # type: ignore[list-item]
    assert info.value.param == "input_ids"


def test_logprob_entries() -> None:
    entries = [(None, 5, None), (-0.5, 6, [(-0.5, 6), (-1.25, 9)]), (-2.0, 7, None)]
    back = [convert.logprob_from_proto(wire(convert.logprob_to_proto(e))) for e in entries]
    assert back == entries
    msg = convert.logprob_to_proto((None, 5, None))
    assert not msg.HasField("logprob")
    assert convert.logprob_to_proto((0.0, 5, None)).HasField("logprob")  # 0.0 is a logprob, not unset
    # Engine tuples (logprob, token_id, text) with top lists of the same shape.
    engine_lp = [(-0.5, 6, None), (-2.0, 7, None)]
    engine_top = [[(-0.5, 6, None), (-1.25, 9, None)], None]
    assert convert.logprob_entries(engine_lp, engine_top) == [(-0.5, 6, [(-0.5, 6), (-1.25, 9)]), (-2.0, 7, None)]
    assert convert.logprob_entries(engine_lp) == [(-0.5, 6, None), (-2.0, 7, None)]


@pytest.mark.parametrize(
    "reason",
    [{"type": "length"}, {"type": "stop", "matched": 2}, {"type": "stop", "matched": 0},
     {"type": "stop", "matched": "END"}, {"type": "abort", "message": "aborted by the client"}],
)
def test_finish_reason_round_trip(reason: dict) -> None:
    assert convert.finish_reason_from_proto(wire(convert.finish_reason_to_proto(reason))) == reason


def test_events_round_trip() -> None:
    chunk = GenerateEvent(
        kind="chunk", request_id="r", token_ids=[4, 5], output_logprobs=[(-0.5, 4, None), (-0.25, 5, None)],
        prompt_tokens=7, completion_tokens=2, cached_tokens=4,
    )
    complete = GenerateEvent(
        kind="complete", request_id="r", token_ids=[6], output_logprobs=[(-1.5, 6, [(-1.5, 6), (-2.0, 1)])],
        input_logprobs=[(None, 1, None), (-3.0, 2, None)], finish_reason={"type": "length"},
        prompt_tokens=7, completion_tokens=3, cached_tokens=4,
    )
    error = GenerateEvent(kind="error", request_id="r", error_code=400, error_message="bad", error_param="top_p")
    for ev in (chunk, complete, error):
        assert convert.event_from_proto(wire(convert.event_to_proto(ev))) == ev
    msg = convert.event_to_proto(error)
    assert msg.WhichOneof("response") == "error"
    assert msg.error.type == "invalid_request_error"
    assert convert.event_to_proto(GenerateEvent(kind="error", error_code=503)).error.type == "overloaded"
    with pytest.raises(ValueError, match="no chunk"):
        convert.event_from_proto(worker_pb2.GenerateResponse(request_id="r"))


def test_load_and_model_info_dicts() -> None:
    stats = {"num_running_reqs": 2, "num_waiting_reqs": 1, "token_usage": 0.25, "cache_hit_rate": 0.1,
             "num_used_pages": 8, "num_total_pages": 32, "num_cached_pages": 3, "num_steps": 99,
             "num_prefill_inflight_queue_reqs": 0, "num_decode_prealloc_queue_reqs": 4,
             "num_decode_transfer_queue_reqs": 5, "disaggregation_mode": "decode"}
    load = convert.load_from_proto(wire(convert.load_to_proto(stats)))
    assert load == {k: v for k, v in stats.items() if k not in ("num_steps", "disaggregation_mode")}
    info = {"model_path": "/m", "served_model_name": "m", "architecture": "LlamaForCausalLM",
            "context_length": 1024, "vocab_size": 320, "page_size": 4, "dtype": "float32", "role": "unified",
            "eos_token_ids": [1, 2], "max_total_tokens": 4096}
    assert convert.model_info_from_proto(wire(convert.model_info_to_proto(info))) == info
