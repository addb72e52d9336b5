# cython: language_level=3
"""The access log's per-request line, compiled: the twin of `_access_py.py`
(see there for the contract; tests/ops/test_access_core.py holds both to
it).

The same steps in the same order; what changes is that `record` is a C
method and the stamp and the buffer are C calls on typed fields rather
than two more Python calls per request. `_timestamp` and `_append` stay
callable from Python (AccessLog.refused uses them) through thin wrappers."""

import time

from hubcore.ops._access_py import _JSON_FIELDS, TEXT_LINE, _json_line

cdef str _TEXT_LINE = TEXT_LINE  # typed, so `%` is PyUnicode_Format
cdef tuple _FIELDS = _JSON_FIELDS
cdef object _strftime = time.strftime
cdef object _localtime = time.localtime


cdef class AccessCore:
    """See _access_py.AccessCore."""

    cdef public object loop
    cdef public bint json
    cdef public double flush_interval
    cdef public list lines
    cdef public object timer
    cdef long long _second
    cdef str _stamp

    def __init__(self, loop, bint json, double flush_interval):
        self.loop = loop
        self.json = json
        self.flush_interval = flush_interval
        self.lines = []
        self.timer = None
        self._second = -1
        self._stamp = ""

    cpdef record(self, event, client=None):
        """See the twin."""
        if self.json:
            line = _json_line(event.ts, {k: getattr(event, k) for k in _FIELDS}, client)
        else:
            ttfb_ms = event.ttfb_ms
            cost_micros = event.cost_micros
            line = _TEXT_LINE % (
                self._stamp_of(event.ts), event.request_id, event.user or "-", event.project or "-",
                event.model or "-", event.key_label or "-", event.status, event.outcome, event.input_tokens,
                event.output_tokens, event.cache_write_5m, event.cache_write_1h, event.cache_read,
                "-" if cost_micros is None else cost_micros,
                "-" if ttfb_ms is None else "%.3f" % ttfb_ms, event.total_ms, event.attempts,
                event.endpoint, client or "-",
            )
        self._add(line)

    def _append(self, line):
        self._add(line)

    def _timestamp(self, double ts):
        return self._stamp_of(ts)

    cdef _add(self, line):
        self.lines.append(line)
        if self.timer is None:
            self.timer = self.loop.call_later(self.flush_interval, self.flush)

    cdef str _stamp_of(self, double ts):
        # int(ts): C truncates toward zero as int() does (ts is a unix time).
        cdef long long second = <long long>ts
        if second != self._second:
            self._second = second
            self._stamp = _strftime("%Y-%m-%d %H:%M:%S", _localtime(second))
        return self._stamp
