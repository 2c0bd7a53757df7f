# cython: language_level=3
"""A log line's JSON text, in C: ``server.logs.JsonFormatter.line`` writes one such line per
call, and in Python its per-field work was a large part of what a PreSettle costs the server
besides gRPC (docs/performance.md, "2026-12-07, second pass").

``line`` writes what ``json.dumps`` of the line's dict writes with ``ensure_ascii=False``. Keys
and values that are their own JSON text (an ASCII string of
printable characters without quote or backslash, an int, a finite float) are copied into one
buffer; a line with any other key or value is written item by item, that item by
``json.dumps``, which raises where it would. tests/test_log_lines.py holds both to json.dumps.
"""
import json

from libc.string cimport memcpy

cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object)
    void* PyUnicode_DATA(object)
    Py_ssize_t PyUnicode_GET_LENGTH(object)
    object PyUnicode_FromStringAndSize(const char*, Py_ssize_t)
    char* PyOS_double_to_string(double, char, int, int, int*) except NULL
    void PyMem_Free(void*)
    int Py_DTSF_ADD_DOT_0

cdef object _dumps = json.dumps
cdef double _INF = float("inf")
cdef enum:
    CAP = 2048   # bytes of a line written in place; a longer one is written item by item


cdef inline bint _plain_ascii(str s):
    """An ASCII string whose JSON text is itself in quotes."""
    if not PyUnicode_IS_ASCII(s):
        return False
    cdef const unsigned char* p = <const unsigned char*>PyUnicode_DATA(s)
    cdef Py_ssize_t i, n = PyUnicode_GET_LENGTH(s)
    cdef unsigned char c
    for i in range(n):
        c = p[i]
        if c < 0x20 or c == 0x7f or c == 34 or c == 92:   # control, DEL, '"', '\\'
            return False
    return True


cdef inline Py_ssize_t _put(char* buf, Py_ssize_t at, const char* src, Py_ssize_t n):
    """Copy n bytes at ``at``; -1 when the buffer would overflow."""
    if at < 0 or at + n > CAP:
        return -1
    memcpy(buf + at, src, n)
    return at + n


cdef Py_ssize_t _put_value(char* buf, Py_ssize_t at, object v):
    """The JSON text of ``v`` at ``at``; -1 where it is not one copied as is (or no room)."""
    cdef type t = type(v)
    cdef str s
    cdef double d
    cdef char* txt
    cdef Py_ssize_t n
    if t is str:
        s = <str>v
        if not _plain_ascii(s):
            return -1
        at = _put(buf, at, '"', 1)
        at = _put(buf, at, <const char*>PyUnicode_DATA(s), PyUnicode_GET_LENGTH(s))
        return _put(buf, at, '"', 1)
    if t is int:
        s = int.__repr__(v)
        return _put(buf, at, <const char*>PyUnicode_DATA(s), PyUnicode_GET_LENGTH(s))
    if t is float:
        d = v
        if not (-_INF < d < _INF):
            return -1
        txt = PyOS_double_to_string(d, b'r', 0, Py_DTSF_ADD_DOT_0, NULL)   # float.__repr__
        n = 0
        while txt[n]:
            n += 1
        at = _put(buf, at, txt, n)
        PyMem_Free(txt)
        return at
    return -1


cdef str _text(object v):
    cdef type t = type(v)
    cdef str s
    if t is str:
        s = <str>v
        if '"' not in s and "\\" not in s and s.isprintable():
            return '"' + s + '"'
    elif t is int:
        return int.__repr__(v)
    elif t is float and -_INF < <double>v < _INF:
        return float.__repr__(v)
    return _dumps(v, ensure_ascii=False)


cdef Py_ssize_t _put_fields(char* buf, Py_ssize_t at, dict fields):
    for k, v in fields.items():
        at = _put(buf, at, ", ", 2)
        at = _put_value(buf, at, k)
        at = _put(buf, at, ": ", 2)
        at = _put_value(buf, at, v)
        if at < 0:
            return -1
    return at


cdef str _fields_slow(dict fields):
    cdef list parts = []
    for k, v in fields.items():
        parts.append(", ")
        parts.append(_text(k))
        parts.append(": ")
        parts.append(_text(v))
    return "".join(parts)


def line(str second, int millis, str level, str logger, dict fields) -> str:
    """``{"ts": "<second>.<millis>Z", "level": level, "logger": logger, "key": value, ...}``
    as json.dumps writes it with ``ensure_ascii=False``: ``second`` the timestamp to the
    second (ASCII), ``millis`` 0-999."""
    cdef char buf[CAP]
    cdef char ms[5]
    cdef Py_ssize_t at
    ms[0] = 46   # '.'
    ms[1] = 48 + millis // 100
    ms[2] = 48 + millis // 10 % 10
    ms[3] = 48 + millis % 10
    ms[4] = 90   # 'Z'
    if PyUnicode_IS_ASCII(second):
        at = _put(buf, 0, '{"ts": "', 8)
        at = _put(buf, at, <const char*>PyUnicode_DATA(second), PyUnicode_GET_LENGTH(second))
        at = _put(buf, at, ms, 5)
        at = _put(buf, at, '", "level": ', 12)
        at = _put_value(buf, at, level)
        at = _put(buf, at, ', "logger": ', 12)
        at = _put_value(buf, at, logger)
        at = _put_fields(buf, at, fields)
        at = _put(buf, at, "}", 1)
        if at >= 0:
            return PyUnicode_FromStringAndSize(buf, at)
    return (f'{{"ts": "{second}.{millis:03d}Z", "level": {_text(level)}, '
            f'"logger": {_text(logger)}{_fields_slow(fields)}}}')
