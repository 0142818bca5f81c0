"""Wire protocol: client frames decode with the spec's defaults, bad frames become bad_request,
nothing but ProtocolError ever escapes the decoder, and server messages carry exactly the spec's
fields."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.protocol import (
    AudioFormat,
    CancelMsg,
    DecodeLimits,
    EndMsg,
    ErrorCode,
    FlushMsg,
    ProtocolError,
    StartMsg,
    TextMsg,
    Usage,
    check_frame_size,
    check_sample_rate,
    decode_client_frame,
    decode_server_frame,
    encode_audio,
    encode_cancelled,
    encode_done,
    encode_error,
    encode_phrase,
    encode_ready,
    encode_words,
    error_body,
    text_frame_error,
)

LIMITS = DecodeLimits(max_frame_bytes=4096)


def frame(**fields: Any) -> bytes:
    data: bytes = msgpack.packb(fields, use_bin_type=True)
    return data


def decode(**fields: Any) -> Any:
    return decode_client_frame(frame(**fields), limits=LIMITS)


def refused(data: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode_client_frame(data, limits=LIMITS)
    return info.value


# --------------------------------------------------------------------------- valid frames


def test_start_without_fields_gets_the_spec_defaults() -> None:
    msg = decode(type="start")
    assert msg == StartMsg(
        ctx="default", voice=None, speaker=None, format=AudioFormat.OPUS, sample_rate=48000,
        speed=1.0, noise_scale=None, noise_w=None, bitrate=32000, max_buffer_delay_ms=300.0,
        words=True,
    )
    assert msg.length_scale == 1.0


def test_start_with_every_field() -> None:
    msg = decode(type="start", ctx="a", voice="en_US-joe-medium", speaker="p225",
                 format="pcm_s16le", sample_rate=22050, speed=2, noise_scale=0.5, noise_w=0.6,
                 bitrate=64000, max_buffer_delay_ms=0, words=False, markdown=False,
                 normalize=False, read_code=False, max_speed=2)
    assert msg == StartMsg(ctx="a", voice="en_US-joe-medium", speaker="p225",
                           format=AudioFormat.PCM_S16LE, sample_rate=22050, speed=2.0,
                           noise_scale=0.5, noise_w=0.6, bitrate=64000, max_buffer_delay_ms=0.0,
                           words=False, markdown=False, normalize=False, read_code=False,
                           max_speed=2.0)
    assert msg.length_scale == 0.5


def test_nil_means_omitted_and_js_style_numbers_are_accepted() -> None:
    # JS msgpack encoders send `undefined` as nil and 48000.0 / 1.0 as plain integers.
    assert decode(type="start", speaker=2.0).speaker == 2   # a client that has only floats
    msg = decode(type="start", voice=None, speaker=3, speed=1, sample_rate=24000.0, words=None)
    assert (msg.voice, msg.speaker, msg.speed, msg.sample_rate, msg.words) == (
        None, 3, 1.0, 24000, True)
    assert isinstance(msg.sample_rate, int)


@pytest.mark.parametrize(("fields", "expected"), [
    ({"type": "text", "text": "Hello, wor"}, TextMsg(ctx="default", text="Hello, wor")),
    ({"type": "text", "ctx": "b", "text": ""}, TextMsg(ctx="b", text="")),
    ({"type": "flush", "ctx": "b"}, FlushMsg(ctx="b")),
    ({"type": "end"}, EndMsg(ctx="default")),
    ({"type": "cancel", "ctx": "x" * 64}, CancelMsg(ctx="x" * 64)),
])
def test_other_client_messages(fields: dict[str, Any], expected: Any) -> None:
    assert decode(**fields) == expected


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    assert decode(type="end", ctx="a", future_field=[1, 2], priority="high") == EndMsg(ctx="a")
    assert decode(type="end", meta={"trace": ["a", "b"], "tags": {"x": 1}}) == EndMsg(ctx="default")
    # Fields named by other msgpack types than str are unknown fields too (they were refused
    # as "not valid msgpack").
    for key in (1, None, 2.5, b"bin", True):
        frame = msgpack.packb({"type": "cancel", "ctx": "k", key: "x"})
        assert decode_client_frame(frame, limits=DecodeLimits()) == CancelMsg(ctx="k")


def test_a_frame_of_many_containers_is_refused_before_it_is_built() -> None:
    # A 1 MiB `cancel` carrying a million empty arrays in an ignored field is a valid frame
    # under the size limit, but decoding it held the event loop and the GIL for 0.5-1.3 s: one
    # client at ~1 MB/s silenced every stream. Maps and arrays are limited in size and number.
    def refused_by_default(data: bytes) -> ProtocolError:
        assert len(data) <= DecodeLimits().max_frame_bytes      # the server's default limit
        with pytest.raises(ProtocolError) as info:
            decode_client_frame(data, limits=DecodeLimits())
        assert info.value.code is ErrorCode.BAD_REQUEST
        return info.value

    wide = frame(type="cancel", x=[[] for _ in range(1_000_000)])
    assert "exceeds max_array_len(64)" in refused_by_default(wide).message
    leaf = [[] for _ in range(64)]
    tree = frame(type="cancel", x=[[leaf] * 64] * 64)      # every container small, 266k of them
    assert "more than 16 maps and arrays" in refused_by_default(tree).message
    assert "exceeds max_map_len(64)" in refused(frame(**{f"k{i}": i for i in range(65)})).message


# --------------------------------------------------------------------------- bad frames


@pytest.mark.parametrize(("data", "needle"), [
    (b"", "not valid msgpack"),
    (b"\xc1", "not valid msgpack"),  # a reserved msgpack byte
    (msgpack.packb({"type": "end"}) + b"\x00", "not valid msgpack"),  # trailing bytes
    (b"\xa2\xff\xfe", "not valid msgpack"),  # str with invalid UTF-8
    (msgpack.packb([1, 2]), "one msgpack map, got array"),
    (msgpack.packb("start"), "one msgpack map, got str"),
    (b"\x81\x92\x01\x02\xa5start", "not valid msgpack"),  # a key Python cannot hash (array)
], ids=["empty", "reserved", "trailing", "utf8", "array", "str", "array-key"])
def test_undecodable_frames(data: bytes, needle: str) -> None:
    err = refused(data)
    assert err.code is ErrorCode.BAD_REQUEST
    assert needle in err.message
    assert err.ctx is None


@pytest.mark.parametrize(("fields", "needle"), [
    ({}, "missing field 'type'"),
    ({"type": 1}, "field 'type' must be str, got int"),
    ({"type": "speak"}, "unknown message type 'speak'"),
    ({"type": "text"}, "missing field 'text'"),
    ({"type": "text", "text": b"hi"}, "field 'text' must be str, got bin"),
    ({"type": "text", "text": 5}, "field 'text' must be str, got int"),
    ({"type": "start", "voice": 7}, "field 'voice' must be str"),
    ({"type": "start", "voice": ""}, "field 'voice' must be 1..256 characters"),
    ({"type": "start", "speaker": True}, "field 'speaker' must be int or str, got bool"),
    ({"type": "start", "speaker": 1.5}, "field 'speaker' must be int or str"),
    ({"type": "start", "speaker": -1}, "field 'speaker' must be >= 0"),
    ({"type": "start", "format": "mp3"}, "unknown format 'mp3'"),
    ({"type": "start", "format": 1}, "field 'format' must be str"),
    ({"type": "start", "sample_rate": 44100}, "sample_rate 44100 is not supported for opus"),
    ({"type": "start", "sample_rate": 48000.5}, "field 'sample_rate' must be an integer"),
    ({"type": "start", "sample_rate": "48000"}, "field 'sample_rate' must be an integer"),
    ({"type": "start", "format": "pcm_s16le", "sample_rate": 1}, "'sample_rate' must be between"),
    ({"type": "start", "speed": 0.49}, "field 'speed' must be between 0.5 and 2"),
    ({"type": "start", "speed": 2.01}, "field 'speed' must be between 0.5 and 2"),
    ({"type": "start", "speed": float("nan")}, "field 'speed' must be between"),
    ({"type": "start", "speed": "fast"}, "field 'speed' must be a number, got str"),
    ({"type": "start", "speed": True}, "field 'speed' must be a number, got bool"),
    ({"type": "start", "speed": 2**64 - 1}, "field 'speed' must be between 0.5 and 2, got inf"),
    ({"type": "start", "speed": -(2**63)}, "field 'speed' must be between 0.5 and 2, got -inf"),
    ({"type": "start", "max_speed": 2.5}, "field 'max_speed' must be between 0.5 and 2"),
    ({"type": "start", "max_speed": "fast"}, "field 'max_speed' must be a number, got str"),
    ({"type": "start", "speed": 1.2, "max_speed": 1.1},
     "field 'max_speed' (1.1) must not be below 'speed' (1.2)"),
    ({"type": "start", "max_speed": 0.9}, "field 'max_speed' (0.9) must not be below 'speed' (1)"),
    ({"type": "start", "noise_scale": -0.1}, "field 'noise_scale' must be between"),
    ({"type": "start", "noise_w": float("inf")}, "field 'noise_w' must be between"),
    ({"type": "start", "bitrate": 5999}, "field 'bitrate' must be between 6000 and 510000"),
    ({"type": "start", "bitrate": 510001}, "field 'bitrate' must be between"),
    ({"type": "start", "max_buffer_delay_ms": -1}, "'max_buffer_delay_ms' must be between 0"),
    ({"type": "start", "max_buffer_delay_ms": 10001}, "'max_buffer_delay_ms' must be between"),
    ({"type": "start", "words": 1}, "field 'words' must be bool, got int"),
    ({"type": "start", "normalize": "yes"}, "field 'normalize' must be bool, got str"),
    ({"type": "start", "read_code": 0}, "field 'read_code' must be bool, got int"),
])
def test_invalid_fields_are_bad_request_with_a_clear_message(
    fields: dict[str, Any], needle: str
) -> None:
    err = refused(frame(ctx="c1", **fields))
    assert err.code is ErrorCode.BAD_REQUEST
    assert needle in err.message
    assert err.ctx == "c1"  # the client learns which stream the error belongs to


@pytest.mark.parametrize(("ctx", "needle"), [
    ("", "field 'ctx' must be 1..64 characters, got 0"),
    ("x" * 65, "field 'ctx' must be 1..64 characters, got 65"),
    (3, "field 'ctx' must be str, got int"),
    ([], "field 'ctx' must be str, got array"),
])
def test_invalid_ctx(ctx: Any, needle: str) -> None:
    err = refused(frame(type="end", ctx=ctx))
    assert (err.code, err.ctx) == (ErrorCode.BAD_REQUEST, None)
    assert needle in err.message


def test_text_of_any_length_within_the_frame_limit_decodes() -> None:
    # The per-stream limit (`text_too_long`) belongs to a live context: the session checks it.
    assert decode(type="text", text="x" * 1000).text == "x" * 1000


def test_oversize_frames_are_refused_before_decoding() -> None:
    err = refused(frame(type="text", text="y" * 5000))
    assert err.code is ErrorCode.BAD_REQUEST and "exceeds the limit of 4096 bytes" in err.message
    check_frame_size(4096, limit=4096)
    with pytest.raises(ProtocolError):
        check_frame_size(4097, limit=4096)


def test_text_frame_error_is_bad_request() -> None:
    err = text_frame_error()
    assert err.code is ErrorCode.BAD_REQUEST and "binary" in err.message


def test_pcm_native_rate_is_checked_once_the_voice_is_known() -> None:
    pcm = decode(type="start", format="pcm_s16le", sample_rate=22050)
    check_sample_rate(pcm, native_rate=22050)
    with pytest.raises(ProtocolError, match="22050 is not supported for pcm_s16le"):
        check_sample_rate(pcm, native_rate=16000)
    check_sample_rate(decode(type="start", format="pcm_s16le", sample_rate=16000),
                      native_rate=22050)
    check_sample_rate(decode(type="start"), native_rate=22050)


def test_error_codes_are_exactly_the_spec_list() -> None:
    assert {c.value for c in ErrorCode} == {
        "bad_request", "unauthorized", "unknown_voice", "text_too_long", "too_many_contexts",
        "overloaded", "internal"}


# --------------------------------------------------------------------------- robustness

_scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
            | st.floats(allow_nan=True) | st.text(max_size=20) | st.binary(max_size=20))
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                               max_size=4),
    max_leaves=12,
)
_field_names = st.sampled_from([
    "type", "ctx", "text", "voice", "speaker", "format", "sample_rate", "speed", "noise_scale",
    "noise_w", "bitrate", "max_buffer_delay_ms", "words", "markdown", "normalize",
    "read_code"])
_types = st.sampled_from(["start", "text", "flush", "end", "cancel", "bogus"])
# Maps that look like real messages, with arbitrary values in the spec's fields.
_messages = st.builds(
    lambda kind, extra: {"type": kind, **extra},
    _types, st.dictionaries(_field_names, _values, max_size=6),
)


def _decodes_or_protocol_error(data: bytes) -> None:
    try:
        msg = decode_client_frame(data, limits=LIMITS)
    except ProtocolError as err:
        assert isinstance(err.code, ErrorCode) and err.message
    else:
        assert isinstance(msg, (StartMsg, TextMsg, FlushMsg, EndMsg, CancelMsg))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_arbitrary_bytes_only_ever_raise_protocol_error(data: bytes) -> None:
    _decodes_or_protocol_error(data)


@settings(max_examples=200, deadline=None)
@given(_values | _messages)
def test_arbitrary_msgpack_objects_only_ever_raise_protocol_error(obj: Any) -> None:
    _decodes_or_protocol_error(msgpack.packb(obj, use_bin_type=True))


@settings(max_examples=150, deadline=None)
@given(_messages, st.integers(min_value=0), st.binary(min_size=1, max_size=3))
def test_corrupted_messages_only_ever_raise_protocol_error(
    obj: dict[str, Any], pos: int, junk: bytes
) -> None:
    data = msgpack.packb(obj, use_bin_type=True)
    pos %= len(data)
    _decodes_or_protocol_error(data[:pos] + junk + data[pos + len(junk):])


# --------------------------------------------------------------------------- server messages


def test_ready_fields() -> None:
    msg = decode_server_frame(encode_ready(ctx="a", stream_id="s1", voice="v", format="opus",
                                           sample_rate=48000, frame_ms=20))
    assert msg == {"type": "ready", "ctx": "a", "stream_id": "s1", "voice": "v",
                   "format": "opus", "sample_rate": 48000, "channels": 1, "frame_ms": 20}


def test_audio_opus_is_a_list_of_bin_packets_and_pcm_is_bin() -> None:
    opus = decode_server_frame(encode_audio(ctx="a", seq=0, pts_ms=0, data=[b"\x01", b"\x02"]))
    assert opus == {"type": "audio", "ctx": "a", "seq": 0, "pts_ms": 0,
                    "data": [b"\x01", b"\x02"]}
    pcm = decode_server_frame(encode_audio(ctx="a", seq=3, pts_ms=60.0, data=b"\x00\x01"))
    assert pcm == {"type": "audio", "ctx": "a", "seq": 3, "pts_ms": 60, "data": b"\x00\x01"}
    assert isinstance(pcm["pts_ms"], int)  # whole milliseconds go out as integers
    frac = decode_server_frame(encode_audio(ctx="a", seq=1, pts_ms=11.60997, data=b""))
    assert frac["pts_ms"] == 11.61


def test_phrase_and_words_fields() -> None:
    phrase = decode_server_frame(encode_phrase(ctx="a", phrase_id=2, text="Hi.", start_ms=0,
                                               end_ms=480, space_before="\n "))
    assert phrase == {"type": "phrase", "ctx": "a", "id": 2, "text": "Hi.", "start_ms": 0,
                      "end_ms": 480, "space_before": "\n "}
    words = decode_server_frame(encode_words(ctx="a", phrase_id=2,
                                             items=[("Hi", 40, 300.5), ("there", 300.5, 480)]))
    assert words == {"type": "words", "ctx": "a", "phrase_id": 2,
                     "items": [["Hi", 40, 300.5], ["there", 300.5, 480]]}


def test_done_usage_fields_with_and_without_nulls() -> None:
    usage = Usage(chars=12, phrases=1, audio_ms=900.0, compute_ms=35.25, energy_j=None,
                  cost=None, ttfa_ms=180.0)
    msg = decode_server_frame(encode_done(ctx="a", usage=usage))
    assert msg == {"type": "done", "ctx": "a", "usage": {
        "chars": 12, "phrases": 1, "audio_ms": 900, "compute_ms": 35.25, "energy_j": None,
        "cost": None, "ttfa_ms": 180, "encode_ms": None}}
    metered = Usage(chars=1, phrases=1, audio_ms=1, compute_ms=1, energy_j=2.5, cost=1e-6,
                    ttfa_ms=None, encode_ms=4.25)
    got = decode_server_frame(encode_done(ctx="a", usage=metered))["usage"]
    assert (got["energy_j"], got["cost"], got["ttfa_ms"], got["encode_ms"]) == (2.5, 1e-6, None, 4.25)


def test_done_accepts_a_usage_map_with_exactly_the_spec_fields() -> None:
    wire = {"chars": 3, "phrases": 1, "audio_ms": 250, "compute_ms": 12.5, "energy_j": 0.4,
            "cost": 2e-7, "ttfa_ms": 95.0, "encode_ms": 3.5}
    assert decode_server_frame(encode_done(ctx="a", usage=wire))["usage"] == wire
    with pytest.raises(ValueError, match="usage must have exactly"):
        encode_done(ctx="a", usage={**wire, "extra": 1})


def test_cancelled_and_error_fields() -> None:
    assert decode_server_frame(encode_cancelled(ctx="a")) == {
        "type": "cancelled", "ctx": "a", "usage": None}
    wire = {"chars": 3, "phrases": 1, "audio_ms": 250, "compute_ms": 12.5, "energy_j": None,
            "cost": None, "ttfa_ms": 95.0, "encode_ms": 3.5}
    assert decode_server_frame(encode_cancelled(ctx="a", usage=wire))["usage"] == wire
    with pytest.raises(ValueError, match="usage must have exactly"):
        encode_cancelled(ctx="a", usage={"chars": 3})
    bare = decode_server_frame(encode_error(code=ErrorCode.INTERNAL, message="boom"))
    assert bare == {"type": "error", "code": "internal", "message": "boom"}
    full = decode_server_frame(encode_error(code="overloaded", message="busy", ctx="a",
                                            retry_after_s=2))
    assert full == {"type": "error", "code": "overloaded", "message": "busy", "ctx": "a",
                    "retry_after_s": 2}
    with pytest.raises(ValueError):
        encode_error(code="nope", message="x")


def test_protocol_error_renders_as_an_error_frame() -> None:
    err = ProtocolError(ErrorCode.TOO_MANY_CONTEXTS, "8 contexts already live", "c9")
    assert decode_server_frame(err.to_frame()) == {
        "type": "error", "code": "too_many_contexts", "message": "8 contexts already live",
        "ctx": "c9"}


def test_http_error_body_matches_the_spec() -> None:
    assert error_body("overloaded", "busy", retry_after_s=3) == {
        "error": {"code": "overloaded", "message": "busy", "retry_after_s": 3}}
    assert error_body(ErrorCode.UNAUTHORIZED, "bad key") == {
        "error": {"code": "unauthorized", "message": "bad key"}}
