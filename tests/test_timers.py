"""StreamTimers: one armed time per stream, the earliest kept; a check takes only what is due."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from streaming_tts.timers import StreamTimers


def test_a_stream_comes_up_once_at_the_earliest_time_it_was_armed_for():
    timers = StreamTimers()
    timers.arm("a", 5.0)
    timers.arm("a", 3.0)     # earlier: replaces
    timers.arm("a", 4.0)     # later: the 3.0 stands
    assert timers.armed_at("a") == 3.0 and len(timers) == 1
    assert timers.pop_due(2.9) == []
    assert timers.pop_due(3.0) == ["a"]
    assert timers.armed_at("a") is None and timers.pop_due(10.0) == []   # superseded entries skipped


def test_due_streams_come_earliest_first_and_the_rest_stay_armed():
    timers = StreamTimers()
    for sid, when in (("c", 3.0), ("a", 1.0), ("d", 9.0), ("b", 2.0)):
        timers.arm(sid, when)
    assert timers.pop_due(3.5) == ["a", "b", "c"]
    assert timers.next_at() == 9.0 and timers.armed_at("d") == 9.0


def test_a_discarded_stream_never_comes_up():
    timers = StreamTimers()
    timers.arm("gone", 1.0)
    timers.arm("kept", 2.0)
    timers.discard("gone")
    assert timers.next_at() == 2.0
    assert timers.pop_due(5.0) == ["kept"] and timers.next_at() is None


def test_rearming_many_times_does_not_grow_the_heap_without_bound():
    # A stream re-armed earlier and earlier (text arriving) leaves superseded entries behind;
    # the heap is rebuilt when they outnumber the live ones.
    timers = StreamTimers()
    for i in range(10_000):
        timers.arm(f"s{i % 10}", 1e6 - i)
    assert len(timers._heap) <= 4 * len(timers) + 64
    assert sorted(timers.pop_due(1e6)) == [f"s{i}" for i in range(10)]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(
    st.tuples(st.just("arm"), st.sampled_from("abcdef"), st.integers(0, 50)),
    st.tuples(st.just("discard"), st.sampled_from("abcdef"), st.just(0)),
    st.tuples(st.just("pop"), st.just(""), st.integers(0, 50))), max_size=80))
def test_timers_behave_as_a_map_of_earliest_times(ops):
    # Against the plainest model: a dict of each stream's earliest armed time.
    timers, model = StreamTimers(), {}
    for op, sid, t in ops:
        if op == "arm":
            timers.arm(sid, float(t))
            model[sid] = min(model.get(sid, float(t)), float(t))
        elif op == "discard":
            timers.discard(sid)
            model.pop(sid, None)
        else:
            due = sorted((when, s) for s, when in model.items() if when <= t)
            got = timers.pop_due(float(t))
            assert sorted(got) == sorted(s for _, s in due)
            assert [model[s] for s in got] == sorted(model[s] for s in got)   # earliest first
            for s in got:
                del model[s]
        assert {s: timers.armed_at(s) for s in "abcdef" if timers.armed_at(s) is not None} == model
        assert timers.next_at() == (min(model.values()) if model else None)
