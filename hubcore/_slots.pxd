# Reading a slotted class's fields from C by their slots' offsets: a field
# read by name is a lookup through the type to the slot's descriptor, some
# hundred instructions and a few cache lines each time, which the request
# path's compiled modules pay on every request for the dataclasses they read
# (accounting/_rows.pyx: UsageEvent; governance/_admit.pyx: Principal and
# the stored limits; gateway/_exchange.pyx: Principal and UpstreamConfig).
# A dataclass(slots=True) keeps each field in a slot at a fixed offset in
# the instance, which the slot's descriptor records: read once at import.

from cpython.object cimport PyObject

cdef extern from "structmember.h":
    ctypedef struct PyMemberDef:
        int type
        Py_ssize_t offset
    int T_OBJECT_EX  # an object slot: what __slots__ makes

cdef extern from "Python.h":
    ctypedef struct PyMemberDescrObject:
        PyMemberDef* d_member


cdef inline Py_ssize_t slot_offset(type cls, str name) except -1:
    """Where `cls` keeps its field `name`: ImportError unless in an object slot of its own."""
    descriptor = cls.__dict__.get(name)
    if (type(descriptor).__name__ != "member_descriptor"
            or (<PyMemberDescrObject*><PyObject*>descriptor).d_member.type != T_OBJECT_EX):
        raise ImportError(f"{cls.__name__}.{name} is not an object slot")
    return (<PyMemberDescrObject*><PyObject*>descriptor).d_member.offset


cdef inline object read_slot(object obj, type cls, Py_ssize_t offset, str name):
    """`getattr(obj, name)`: from the slot at `offset` when `obj` is exactly a
    `cls` (a subclass may lay out more slots; a stand-in has none), by name
    for anything else or a slot that is unset, which raises as the name does."""
    cdef PyObject* value
    if type(obj) is cls:
        value = (<PyObject**>(<char*><PyObject*>obj + offset))[0]
        if value != NULL:
            return <object>value
    return getattr(obj, name)
