# cython: language_level=3
"""The SQLite usage writer's connection, compiled: the twin of
`_sqlite_batch_py.py` (see there for the contract;
tests/accounting/test_sqlite_batch.py holds both to it).

Why it exists: the pure twin binds each of a batch's values through
Python's sqlite3 module, holding the GIL (some thirty values a row), and
lets go of the GIL around each statement's step only to take it back
after; on the writer's thread, beside a busy event loop, each retake is a
handoff between the two threads. Here `prepare`, on the event loop's
thread, reads each value once into a C array (its kind, its number, or a
pointer to its UTF-8 text, which the batch keeps alive by holding the
values); `write`, on the writer's thread, then runs the whole transaction
(BEGIN IMMEDIATE, the id before the batch, the multi-row INSERTs of
usage.INSERT_SIZES, rollup.ADD_STATEMENTS, COMMIT) through SQLite's C API
with the GIL released throughout: one release and one retake a batch.

The connection is SQLite's own (sqlite3_open_v2 of the same file with the
pragmas of store.configure), not a Python sqlite3 one, and is used by one
thread at a time (the recorder's single-thread executor). Its statements
are prepared once, when first run, and kept; the rollup's, which name a
temporary table the first of them makes, could not be prepared earlier.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.long cimport PyLong_AsLongLong
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.string cimport memset

import os
import sqlite3

from hubcore import store
from hubcore.accounting import rollup
from hubcore.accounting.rows import insert_values
from hubcore.accounting.usage import FIELDS, INSERT_SIZES, insert_sql

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object, Py_ssize_t*) except NULL

cdef extern from "sqlite3.h" nogil:
    # named so in C; "sqlite3" here is Python's module, for its exceptions
    ctypedef struct Database "sqlite3"
    ctypedef struct sqlite3_stmt
    ctypedef long long sqlite3_int64
    ctypedef void (*sqlite3_destructor_type)(void*)
    sqlite3_destructor_type SQLITE_STATIC
    enum:
        SQLITE_OK
        SQLITE_ROW
        SQLITE_DONE
        SQLITE_NOMEM
        SQLITE_INTEGER
        SQLITE_FLOAT
        SQLITE_TEXT
        SQLITE_BLOB
        SQLITE_NULL
        SQLITE_OPEN_READWRITE
        SQLITE_OPEN_CREATE
        SQLITE_OPEN_NOMUTEX
    int sqlite3_open_v2(const char*, Database**, int, const char*)
    int sqlite3_close_v2(Database*)
    int sqlite3_busy_timeout(Database*, int)
    int sqlite3_exec(Database*, const char*, void*, void*, char**)
    int sqlite3_prepare_v2(Database*, const char*, int, sqlite3_stmt**, const char**)
    int sqlite3_finalize(sqlite3_stmt*)
    int sqlite3_reset(sqlite3_stmt*)
    int sqlite3_clear_bindings(sqlite3_stmt*)
    int sqlite3_step(sqlite3_stmt*)
    int sqlite3_bind_parameter_index(sqlite3_stmt*, const char*)
    int sqlite3_bind_null(sqlite3_stmt*, int)
    int sqlite3_bind_int64(sqlite3_stmt*, int, sqlite3_int64)
    int sqlite3_bind_double(sqlite3_stmt*, int, double)
    int sqlite3_bind_text(sqlite3_stmt*, int, const char*, int, sqlite3_destructor_type)
    int sqlite3_bind_blob(sqlite3_stmt*, int, const void*, int, sqlite3_destructor_type)
    sqlite3_int64 sqlite3_column_int64(sqlite3_stmt*, int)
    int sqlite3_changes(Database*)
    int sqlite3_extended_errcode(Database*)
    const char* sqlite3_errmsg(Database*)
    const char* sqlite3_errstr(int)

cdef enum:
    SIZES_MAX = 8
    ADD_MAX = 32
    ERROR_MAX = 512

cdef int _width = len(FIELDS)


cdef struct Value:
    # kind is SQLite's type code: which of the other fields holds the value
    int kind
    sqlite3_int64 integer
    double real
    const char* data  # TEXT's UTF-8 or a BLOB's bytes, owned by the batch's values
    int size


cdef class Batch:
    """A batch's values, read for SQLite: what `BatchConnection.write` takes."""

    cdef readonly Py_ssize_t rows
    cdef list _values  # holds every object `_read` points into
    cdef Value* _read

    def __dealloc__(self):
        PyMem_Free(self._read)


cdef class BatchConnection:
    """See the twin."""

    cdef Database* _db
    cdef int _sizes[SIZES_MAX]
    cdef int _size_count
    cdef sqlite3_stmt* _inserts[SIZES_MAX]
    cdef sqlite3_stmt* _adds[ADD_MAX]
    cdef int _add_count
    cdef sqlite3_stmt* _begin
    cdef sqlite3_stmt* _last_id
    cdef sqlite3_stmt* _commit
    # The SQL of each statement, as UTF-8 that lives as long as the connection.
    cdef list _insert_sql
    cdef list _add_sql
    # The last failure, copied out of SQLite before the rollback resets it.
    cdef int _error_code
    cdef char _error[ERROR_MAX]

    def __cinit__(self):
        self._db = NULL

    def __init__(self, path, int busy_timeout_ms):
        cdef bytes name = os.fsencode(path)
        cdef const char* c_name = name
        cdef int code
        if len(INSERT_SIZES) > SIZES_MAX or len(rollup.ADD_STATEMENTS) > ADD_MAX:
            raise ValueError("more statements than this module keeps")
        self._size_count = len(INSERT_SIZES)
        for i, size in enumerate(INSERT_SIZES):
            self._sizes[i] = size
        self._insert_sql = [insert_sql(size).encode() for size in INSERT_SIZES]
        self._add_sql = [statement.encode() for statement in rollup.ADD_STATEMENTS]
        self._add_count = len(self._add_sql)
        with nogil:
            code = sqlite3_open_v2(c_name, &self._db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, NULL)
            if code == SQLITE_OK:
                code = _configure(self._db, busy_timeout_ms)
        if code != SQLITE_OK:
            if self._db != NULL:
                self._keep_db_error()
            else:
                self._keep_error(code)
            self.close()
            self._raise()

    def prepare(self, events):
        """See the twin."""
        cdef Batch batch = Batch.__new__(Batch)
        cdef list values = insert_values(events)
        cdef Py_ssize_t n = len(values), i
        cdef Value* read
        batch._values = values
        batch.rows = n // _width
        batch._read = read = <Value*>PyMem_Malloc(max(n, 1) * sizeof(Value))
        if read == NULL:
            raise MemoryError()
        memset(read, 0, n * sizeof(Value))
        for i in range(n):
            _read_value(values[i], &read[i], i)
        return batch

    def write(self, Batch batch not None):
        """See the twin."""
        cdef sqlite3_int64 inserted = 0
        cdef int code
        if self._db == NULL:
            raise sqlite3.ProgrammingError("Cannot operate on a closed database.")
        with nogil:
            code = self._write(batch._read, batch.rows, &inserted)
        if code != SQLITE_OK:
            self._raise()
        return inserted

    def close(self):
        """See the twin."""
        cdef int i
        cdef Database* db = self._db
        if db == NULL:
            return
        self._db = NULL
        for i in range(self._size_count):
            sqlite3_finalize(self._inserts[i])
            self._inserts[i] = NULL
        for i in range(self._add_count):
            sqlite3_finalize(self._adds[i])
            self._adds[i] = NULL
        sqlite3_finalize(self._begin)
        sqlite3_finalize(self._last_id)
        sqlite3_finalize(self._commit)
        self._begin = self._last_id = self._commit = NULL
        # _v2: a statement left unfinalized would keep the file open rather
        # than fail the close; there is none, so this closes it now.
        with nogil:
            sqlite3_close_v2(db)

    def __dealloc__(self):
        self.close()

    # -- the transaction, without the GIL ------------------------------------------

    cdef int _write(self, const Value* values, Py_ssize_t rows, sqlite3_int64* inserted) noexcept nogil:
        """The batch's transaction: SQLITE_OK, or the failure's code with its
        message kept (and the transaction rolled back)."""
        cdef sqlite3_int64 last_id = 0
        cdef Py_ssize_t at = 0, statements
        cdef int i, k, code, size, after_id_index
        cdef sqlite3_stmt* stmt
        code = self._run(&self._begin, "BEGIN IMMEDIATE")
        if code != SQLITE_OK:
            return code  # no transaction to roll back
        # Other processes may write to the same file, but not before COMMIT:
        # BEGIN IMMEDIATE holds the write lock, so the rows with an id above
        # this one will be exactly this batch's (see rollup.add).
        code = self._ready(&self._last_id, _LAST_ID)
        if code == SQLITE_OK:
            code = sqlite3_step(self._last_id)
            if code == SQLITE_ROW:
                last_id = sqlite3_column_int64(self._last_id, 0)
                code = SQLITE_OK
            else:
                self._keep_db_error()
            sqlite3_reset(self._last_id)
        # usage.insert_chunks: as many statements of each size, the largest
        # first, as the rows left fill.
        i = 0
        while code == SQLITE_OK and i < self._size_count:
            size = self._sizes[i]
            statements = (rows - at) // size
            if statements:
                code = self._ready(&self._inserts[i], <const char*>NULL, i)
            while code == SQLITE_OK and statements:
                stmt = self._inserts[i]
                for k in range(size * _width):
                    code = _bind(stmt, k + 1, &values[at * _width + k])
                    if code != SQLITE_OK:
                        break
                if code == SQLITE_OK:
                    code = sqlite3_step(stmt)
                    if code == SQLITE_DONE:
                        inserted[0] += sqlite3_changes(self._db)
                        code = SQLITE_OK
                if code != SQLITE_OK:
                    self._keep_db_error()
                # The text bound is the batch's: never left behind for the next.
                sqlite3_clear_bindings(stmt)
                sqlite3_reset(stmt)
                at += size
                statements -= 1
            i += 1
        if code == SQLITE_OK and inserted[0]:
            for i in range(self._add_count):
                code = self._ready(&self._adds[i], <const char*>NULL, -1 - i)
                if code != SQLITE_OK:
                    break
                stmt = self._adds[i]
                after_id_index = sqlite3_bind_parameter_index(stmt, ":after_id")
                if after_id_index:
                    sqlite3_bind_int64(stmt, after_id_index, last_id)
                code = sqlite3_step(stmt)
                while code == SQLITE_ROW:
                    code = sqlite3_step(stmt)
                if code == SQLITE_DONE:
                    code = SQLITE_OK
                else:
                    self._keep_db_error()
                sqlite3_reset(stmt)
                if code != SQLITE_OK:
                    break
        if code == SQLITE_OK:
            code = self._run(&self._commit, "COMMIT")
            if code == SQLITE_OK:
                return SQLITE_OK
        # The failure's message is kept; the rollback's own (if BEGIN's
        # transaction is gone already) would not say what went wrong.
        sqlite3_exec(self._db, "ROLLBACK", NULL, NULL, NULL)
        return code

    cdef int _ready(self, sqlite3_stmt** stmt, const char* sql, int which=0) noexcept nogil:
        """Prepare *stmt from `sql`, or, when sql is NULL, from the SQL kept
        for insert size `which` (>= 0) or rollup statement -1 - which, unless
        it is prepared already."""
        cdef int code
        if stmt[0] != NULL:
            return SQLITE_OK
        if sql == NULL:
            with gil:
                sql = self._sql(which)
        code = sqlite3_prepare_v2(self._db, sql, -1, stmt, NULL)
        if code != SQLITE_OK:
            self._keep_db_error()
        return code

    cdef const char* _sql(self, int which) noexcept:
        # Called once per statement for the connection's life: the only
        # place the transaction takes the GIL.
        cdef bytes text = self._insert_sql[which] if which >= 0 else self._add_sql[-1 - which]
        return PyBytes_AS_STRING(text)

    cdef int _run(self, sqlite3_stmt** stmt, const char* sql) noexcept nogil:
        cdef int code = self._ready(stmt, sql)
        if code != SQLITE_OK:
            return code
        code = sqlite3_step(stmt[0])
        if code == SQLITE_DONE:
            code = SQLITE_OK
        else:
            self._keep_db_error()
        sqlite3_reset(stmt[0])
        return code

    # -- errors ------------------------------------------------------------------------

    cdef void _keep_db_error(self) noexcept nogil:
        # The connection's extended code: after a prepare_v2 statement's
        # step, the step's own error, with its detail (SQLITE_BUSY_SNAPSHOT).
        self._keep_error(sqlite3_extended_errcode(self._db))

    cdef void _keep_error(self, int code) noexcept nogil:
        # Without a connection (no memory to open one), SQLite's text for the code.
        cdef const char* message = sqlite3_errmsg(self._db) if self._db != NULL else sqlite3_errstr(code)
        cdef int i = 0
        self._error_code = code
        while i < ERROR_MAX - 1 and message[i] != 0:
            self._error[i] = message[i]
            i += 1
        self._error[i] = 0

    cdef _raise(self):
        code = self._error_code
        exc = _exception_for(code & 0xff)((<bytes>self._error).decode("utf-8", "replace"))
        exc.sqlite_errorcode = code
        raise exc


_last_id_sql = rollup.LAST_ID.encode()
cdef const char* _LAST_ID = PyBytes_AS_STRING(_last_id_sql)


cdef int _configure(Database* db, int busy_timeout_ms) noexcept nogil:
    """store.configure's pragmas, with the recorder's busy timeout."""
    cdef int code = sqlite3_busy_timeout(db, busy_timeout_ms)
    if code == SQLITE_OK:
        code = sqlite3_exec(db, _PRAGMAS, NULL, NULL, NULL)
    return code


# busy_timeout is the recorder's, set first (the others may wait on a lock).
_pragmas_sql = b"".join(
    f"PRAGMA {name} = {value};".encode() for name, value in store.PRAGMAS if name != "busy_timeout"
)
cdef const char* _PRAGMAS = PyBytes_AS_STRING(_pragmas_sql)


cdef int _read_value(object value, Value* into, Py_ssize_t at) except -1:
    """Read one value as Python's sqlite3 module would bind it (after the
    adapters usage.py registers: None as NULL, bool as an integer, an
    Outcome as its text)."""
    cdef Py_ssize_t size
    if value is None:
        into.kind = SQLITE_NULL
    elif isinstance(value, int):
        into.kind = SQLITE_INTEGER
        into.integer = PyLong_AsLongLong(value)  # OverflowError past 64 bits, as sqlite3
    elif isinstance(value, float):
        into.kind = SQLITE_FLOAT
        into.real = PyFloat_AS_DOUBLE(value)
    elif isinstance(value, str):
        into.kind = SQLITE_TEXT
        into.data = PyUnicode_AsUTF8AndSize(value, &size)  # cached in the str, alive with it
        into.size = _length(size)
    elif isinstance(value, bytes):
        into.kind = SQLITE_BLOB
        into.data = PyBytes_AS_STRING(value)
        into.size = _length(PyBytes_GET_SIZE(value))
    else:
        raise sqlite3.ProgrammingError(
            f"Error binding parameter {at % _width + 1}: type '{type(value).__name__}' is not supported"
        )
    return 0


cdef int _length(Py_ssize_t size) except -1:
    if size > 0x7fffffff:
        raise sqlite3.DataError("string or blob too big")
    return <int>size


cdef int _bind(sqlite3_stmt* stmt, int index, const Value* value) noexcept nogil:
    cdef int kind = value.kind
    if kind == SQLITE_TEXT:
        return sqlite3_bind_text(stmt, index, value.data, value.size, SQLITE_STATIC)
    if kind == SQLITE_INTEGER:
        return sqlite3_bind_int64(stmt, index, value.integer)
    if kind == SQLITE_FLOAT:
        return sqlite3_bind_double(stmt, index, value.real)
    if kind == SQLITE_NULL:
        return sqlite3_bind_null(stmt, index)
    return sqlite3_bind_blob(stmt, index, value.data, value.size, SQLITE_STATIC)


def _names(*names):
    return frozenset(getattr(sqlite3, f"SQLITE_{name}") for name in names)


# Which sqlite3 exception Python's sqlite3 raises for a primary result code
# (the table of CPython's Modules/_sqlite/util.c); any other, DatabaseError.
_RAISED_AS = (
    (_names("INTERNAL", "NOTFOUND"), sqlite3.InternalError),
    (_names("NOMEM"), MemoryError),
    (_names("CORRUPT"), sqlite3.DatabaseError),
    (_names("TOOBIG"), sqlite3.DataError),
    (_names("CONSTRAINT", "MISMATCH"), sqlite3.IntegrityError),
    (_names("MISUSE", "RANGE"), sqlite3.InterfaceError),
    (_names("ERROR", "PERM", "ABORT", "BUSY", "LOCKED", "READONLY", "INTERRUPT", "IOERR", "FULL",
            "CANTOPEN", "PROTOCOL", "EMPTY", "SCHEMA"), sqlite3.OperationalError),
)


def _exception_for(int primary):
    for codes, exception in _RAISED_AS:
        if primary in codes:
            return exception
    return sqlite3.DatabaseError
