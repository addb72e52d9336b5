# cython: language_level=3
"""The usage writer's bound values, compiled: the twin of `_rows_py.py`
(see there for the contract; tests/accounting/test_rows.py holds both to it).

A batch's rows are flattened on the event loop's thread, thirty fields a
row; read by name (the pure twin's `attrgetter`), each field is a lookup
through UsageEvent's type to its slot's descriptor. UsageEvent is a slotted
dataclass, so each field lives at a fixed offset in the instance, which
that descriptor records: this twin reads the offsets once, at import, and
each row's values straight from their slots. Anything but an exact
UsageEvent (a subclass may lay out more slots; a test's stand-in has none),
or a field that is unset, sends the batch to the pure twin, which reads by
name and raises as it does."""

from cpython.list cimport PyList_New, PyList_SET_ITEM
from cpython.object cimport PyObject, PyTypeObject
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE

from hubcore._slots cimport read_slot, slot_offset

import asyncio
from collections import deque

from hubcore.accounting._rows_py import insert_values as _by_name, log as _log
from hubcore.accounting.usage import FIELDS, UsageEvent

cdef enum:
    FIELDS_MAX = 64

cdef type _UsageEvent = UsageEvent
cdef Py_ssize_t _fields = len(FIELDS)
cdef Py_ssize_t _offsets[FIELDS_MAX]


cdef void _read_offsets() except *:
    cdef Py_ssize_t i
    if _fields > FIELDS_MAX:
        raise ImportError(f"UsageEvent has {_fields} fields, more than the {FIELDS_MAX} this module reads")
    for i, name in enumerate(FIELDS):
        _offsets[i] = slot_offset(UsageEvent, name)


_read_offsets()

# Each F_ constant (_rows.pxd) with the field it names for event_field:
# the module is not used unless they name FIELDS, each at its place.
_CONSTANTS = (
    (F_TS, "ts"), (F_REQUEST_ID, "request_id"), (F_ENDPOINT, "endpoint"), (F_STATUS, "status"),
    (F_OUTCOME, "outcome"), (F_TOTAL_MS, "total_ms"), (F_TOKEN_ID, "token_id"), (F_USER, "user"),
    (F_PROJECT, "project"), (F_UPSTREAM, "upstream"), (F_KEY_LABEL, "key_label"), (F_MODEL, "model"),
    (F_INPUT_TOKENS, "input_tokens"), (F_OUTPUT_TOKENS, "output_tokens"),
    (F_CACHE_WRITE_5M, "cache_write_5m"), (F_CACHE_WRITE_1H, "cache_write_1h"), (F_CACHE_READ, "cache_read"),
    (F_REASONING_TOKENS, "reasoning_tokens"), (F_SERVER_TOOL_REQUESTS, "server_tool_requests"),
    (F_STOP_REASON, "stop_reason"), (F_ERROR_TYPE, "error_type"), (F_COST_MICROS, "cost_micros"),
    (F_TTFB_MS, "ttfb_ms"), (F_ATTEMPTS, "attempts"), (F_SESSION_ID, "session_id"),
    (F_USER_AGENT, "user_agent"), (F_OUTPUT_ESTIMATED, "output_estimated"), (F_COST_BASIS, "cost_basis"),
    (F_SERVED_MODEL, "served_model"), (F_ROUTE, "route"),
)
if len(_CONSTANTS) != _fields or any(FIELDS[constant] != name for constant, name in _CONSTANTS):
    raise ImportError("_rows.pxd's F_ constants do not name UsageEvent's fields at their places")

cdef tuple _FIELD_NAMES = FIELDS


cdef object event_field(object event, int field):
    """`getattr(event, FIELDS[field])`, from its slot for an exact UsageEvent
    (the listeners that read an event on every request read some thirty
    fields): see hubcore/_slots.pxd."""
    return read_slot(event, _UsageEvent, _offsets[field], <str>_FIELD_NAMES[field])


cdef tuple _NO_ARGS = ()


cpdef object new_event(tuple values):
    """See the twin: the UsageEvent of `values`, in FIELDS order. Its
    dataclass __init__ runs in the interpreter (a frame and thirty stores,
    some 0.7 µs a request in the running hub); this fills the slots the
    offsets name."""
    cdef Py_ssize_t j
    cdef object value
    cdef char* base
    if PyTuple_GET_SIZE(values) != _fields:
        return _UsageEvent(*values)  # the constructor's defaults, or its TypeError
    # object.__new__(UsageEvent): the type's own allocation, every slot unset.
    event = (<PyTypeObject*>_UsageEvent).tp_new(_UsageEvent, <PyObject*>_NO_ARGS, NULL)
    base = <char*><PyObject*>event
    for j in range(_fields):
        value = <object>PyTuple_GET_ITEM(values, j)
        Py_INCREF(value)
        (<PyObject**>(base + _offsets[j]))[0] = <PyObject*>value
    return event


cpdef list insert_values(events):
    """See the twin."""
    cdef list batch, values
    cdef Py_ssize_t n, i, j, at = 0
    cdef PyObject* value
    cdef char* base
    if type(events) is not list:
        return _by_name(events)
    batch = events
    for event in batch:
        if type(event) is not _UsageEvent:
            return _by_name(batch)
    n = len(batch)
    values = PyList_New(n * _fields)
    for i in range(n):
        event = batch[i]
        base = <char*><PyObject*>event
        for j in range(_fields):
            value = (<PyObject**>(base + _offsets[j]))[0]
            if value == NULL:
                # Unset (deleted): the twin raises AttributeError for it.
                # The list's items not yet set are NULL, which it may hold.
                return _by_name(batch)
            Py_INCREF(<object>value)
            PyList_SET_ITEM(values, at, <object>value)
            at += 1
    return values


cdef class RecorderCore:
    """See _rows_py.RecorderCore: `record` without a Python frame, the
    event's fields read by their slots."""

    def __init__(self, Py_ssize_t queue_max, Py_ssize_t batch_max):
        self._queue_max = queue_max
        self._batch_max = batch_max
        self._listeners = []
        self._queue = deque()
        self._wake = asyncio.Event()
        self._closed = False

    cpdef record(self, event):
        """See the twin."""
        cdef Py_ssize_t n
        model = event_field(event, F_MODEL)
        if model is not None and (event_field(event, F_COST_BASIS) is not None
                                  or event_field(event, F_COST_MICROS) is None):
            self._count_unpriced(model)
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                _log.exception("usage listener %r failed", listener)
        queue = self._queue
        if self._closed or len(queue) >= self._queue_max:
            self._overflow(event)
            return
        queue.append(event)
        n = len(queue)
        if n == 1 or n >= self._batch_max:
            self._wake.set()
