"""The usage writer's bound values on both twins: the compiled one reads an
exact UsageEvent's slots by their offsets, the pure one by name; the same
values (the very objects) either way, and anything else goes by name. And
the usage recorder's per-request part, `RecorderCore.record`, on both."""
from __future__ import annotations

import gc
import sys
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hubcore.accounting import _rows_py, rows
from hubcore.accounting.usage import FIELDS, Outcome, UsageEvent
from tests.http.twins import NO_EXTENSIONS, check_compiled_loaded, check_no_extensions_selects_pure, twin_of

COMPILED = "hubcore.accounting._rows"


@pytest.fixture(params=["c", "py"])
def twin(request: pytest.FixtureRequest) -> ModuleType:
    return twin_of(request.param, COMPILED, _rows_py)


def test_compiled_twin_loaded() -> None:
    check_compiled_loaded(rows, [rows.insert_values, rows.RecorderCore],  # type: ignore[list-item]
                          COMPILED, "hubcore.accounting._rows_py")


def test_no_extensions_selects_pure_twin() -> None:
    check_no_extensions_selects_pure("hubcore.accounting.rows", "insert_values", "hubcore.accounting._rows_py")


def event(i: int, **changes: Any) -> UsageEvent:
    fields: dict[str, Any] = dict(
        ts=1.7e9 + i, request_id=f"req_{i}", endpoint="/v1/messages", status=200, outcome=Outcome.OK,
        total_ms=12.5, token_id=i, user=f"user{i}", project=None, upstream="anthropic", key_label="a",
        model="claude-sonnet-4-5", input_tokens=10 + i, output_tokens=2**62, cache_read=3, cost_micros=None,
        ttfb_ms=None, attempts=1, output_estimated=True, route="anthropic/a:200",
    )
    fields.update(changes)
    return UsageEvent(**fields)


def test_the_values_are_each_fields_object_row_after_row(twin: ModuleType) -> None:
    events = [event(i) for i in range(3)]
    values = twin.insert_values(events)
    assert len(values) == len(FIELDS) * 3
    expected = [getattr(e, name) for e in events for name in FIELDS]
    assert all(a is b for a, b in zip(values, expected, strict=True))
    assert twin.insert_values([]) == []


def test_the_values_hold_their_own_references(twin: ModuleType) -> None:
    """The list owns a reference to each value: the events may go."""
    user = "".join(["alice", str(len(FIELDS))])  # a str no other object holds
    events = [event(0, user=user)]
    before = sys.getrefcount(user)
    values = twin.insert_values(events)
    assert sys.getrefcount(user) == before + 1
    del events
    assert values[FIELDS.index("user")] == "alice" + str(len(FIELDS))
    del values
    assert sys.getrefcount(user) == before - 1


class Wider(UsageEvent):
    __slots__ = ("extra",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.extra = "not a column"


def test_what_is_not_an_exact_usage_event_is_read_by_name(twin: ModuleType) -> None:
    plain = event(1)
    wider = Wider(**{name: getattr(event(2), name) for name in FIELDS})
    stand_in = SimpleNamespace(**{name: getattr(event(3), name) for name in FIELDS})
    values = twin.insert_values([plain, wider, stand_in])
    assert values == _rows_py.insert_values([plain, wider, stand_in])
    assert "not a column" not in values
    assert values[len(FIELDS):2 * len(FIELDS)] == [getattr(wider, name) for name in FIELDS]


def test_an_unset_field_raises_as_the_pure_twin_does(twin: ModuleType) -> None:
    gone = event(2)
    del gone.model
    with pytest.raises(AttributeError, match="model"):
        twin.insert_values([event(1), gone])


text = st.one_of(st.none(), st.text(max_size=6))
events = st.builds(
    UsageEvent,
    ts=st.floats(0, 2e9), request_id=st.text(min_size=1, max_size=8), endpoint=st.text(max_size=8),
    status=st.integers(100, 599), outcome=st.sampled_from(list(Outcome)), total_ms=st.floats(0, 1e6),
    token_id=st.one_of(st.none(), st.integers(0, 10**6)), user=text, project=text, upstream=text, key_label=text,
    model=text, input_tokens=st.integers(0, 2**63 - 1), output_tokens=st.integers(0, 10**9),
    cost_micros=st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)), ttfb_ms=st.one_of(st.none(), st.floats(0, 1e6)),
    output_estimated=st.booleans(), cost_basis=text, served_model=text, route=text,
)


@pytest.mark.skipif(NO_EXTENSIONS, reason="HUBCORE_NO_EXTENSIONS is set: only the pure twin")
@settings(max_examples=200, deadline=None)
@given(batch=st.lists(events, max_size=40))
def test_both_twins_bind_the_same_rows(batch: list[UsageEvent]) -> None:
    """The same objects in the same places: SQLite binds them alike."""
    compiled = twin_of("c", COMPILED, _rows_py).insert_values(batch)
    pure = _rows_py.insert_values(batch)
    assert len(compiled) == len(pure) and all(a is b for a, b in zip(compiled, pure))


def test_new_event_fills_every_field_with_its_value(twin: ModuleType) -> None:
    values = tuple(getattr(event(4), name) for name in FIELDS)
    made = twin.new_event(values)
    assert type(made) is UsageEvent and made == event(4)
    assert all(getattr(made, name) is value for name, value in zip(FIELDS, values, strict=True))
    assert gc.is_tracked(made)  # its fields may hold containers, as a constructed one's may
    made.model = "changed"  # an ordinary instance: its slots are writable, unset ones raise
    del made.user
    with pytest.raises(AttributeError):
        made.user


def test_new_event_holds_its_own_references(twin: ModuleType) -> None:
    user = "".join(["bob", str(len(FIELDS))])  # a str no other object holds
    values = tuple(user if name == "user" else getattr(event(5), name) for name in FIELDS)
    before = sys.getrefcount(user)
    made = twin.new_event(values)
    assert sys.getrefcount(user) == before + 1
    del values
    assert made.user == "bob" + str(len(FIELDS))
    del made
    assert sys.getrefcount(user) == before - 1


def test_new_event_of_another_count_is_the_constructors(twin: ModuleType) -> None:
    """Fewer values leave the last fields their defaults, too many or too
    few for the fields without one raise: the positional call's results."""
    values = tuple(getattr(event(6), name) for name in FIELDS)
    assert twin.new_event(values[:-2]) == UsageEvent(*values[:-2])
    for wrong in (values + (None,), values[:3]):
        with pytest.raises(TypeError) as made:
            twin.new_event(wrong)
        with pytest.raises(TypeError) as constructed:
            UsageEvent(*wrong)
        assert str(made.value) == str(constructed.value)


@pytest.mark.skipif(NO_EXTENSIONS, reason="HUBCORE_NO_EXTENSIONS is set: only the pure twin")
@settings(max_examples=200, deadline=None)
@given(made=events)
def test_both_twins_make_the_same_event(made: UsageEvent) -> None:
    values = tuple(getattr(made, name) for name in FIELDS)
    compiled = twin_of("c", COMPILED, _rows_py).new_event(values)
    assert compiled == _rows_py.new_event(values) == made
    assert repr(compiled) == repr(made)


def recorder_of(twin: ModuleType, queue_max: int = 3, batch_max: int = 3) -> Any:
    """A RecorderCore with UsageRecorder's two rare paths recorded."""

    class Recorder(twin.RecorderCore):  # type: ignore[name-defined, misc]
        def __init__(self) -> None:
            super().__init__(queue_max, batch_max)
            self.unpriced: list[str] = []
            self.overflowed: list[UsageEvent] = []

        def _count_unpriced(self, model: str) -> None:
            self.unpriced.append(model)

        def _overflow(self, event: UsageEvent) -> None:
            self.overflowed.append(event)

    return Recorder()


@pytest.mark.parametrize("kind", ["exact", "stand-in"])
def test_record_tells_the_listeners_queues_and_wakes_the_writer(twin: ModuleType, kind: str) -> None:
    recorder = recorder_of(twin)
    heard: list[Any] = []
    recorder._listeners.append(heard.append)

    def failing(_: Any) -> None:
        raise RuntimeError("a listener's bug")

    recorder._listeners.append(failing)  # logged; the event goes on
    recorder._listeners.append(lambda e: heard.append(("second", e)))
    events = [
        event(0, cost_micros=120),                         # priced
        event(1, cost_micros=None),                        # no price: counted
        event(2, cost_micros=80, cost_basis="estimate"),   # priced by an estimate: counted
        event(3, model=None),                              # no model: nothing to count
    ]
    made = events if kind == "exact" else [SimpleNamespace(**{n: getattr(e, n) for n in FIELDS}) for e in events]
    woken = []
    for e in made[:3]:
        recorder._wake.clear()
        recorder.record(e)
        woken.append(recorder._wake.is_set())
    # Woken as the queue leaves empty and when it holds a batch (3), not between.
    assert woken == [True, False, True]
    assert list(recorder._queue) == made[:3] and recorder.overflowed == []
    recorder.record(made[3])  # the queue holds 3, its most: the spool's
    assert list(recorder._queue) == made[:3] and recorder.overflowed == [made[3]]
    assert heard == [x for e in made for x in (e, ("second", e))]
    assert recorder.unpriced == ["claude-sonnet-4-5", "claude-sonnet-4-5"]
    recorder._queue.clear()
    recorder._closed = True  # a straggler after close: the spool's too
    recorder.record(made[0])
    assert not recorder._queue and recorder.overflowed == [made[3], made[0]]
