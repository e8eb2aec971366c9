"""Ownership of C handles.

Every handle owns a _Resource: the C pointer, its free function, and the
resources that borrow it (a model borrows its context and its bound
quantizer, an optimizer its model, a run everything it drives). Closing a
resource closes its borrowers first, so the library never sees a handle
whose owner is gone, whatever order close(), `with` blocks or the garbage
collector (which may finalize a whole cycle in any order) choose. A Python
handle also keeps the Python objects it borrows alive, so that dropping the
last reference to a context does not close it under a model still in use.
"""
from ctypes import POINTER, byref, c_float, c_int32

import numpy as np

from . import _lib
from .errors import ClosedError, StateError, error_for

lib = _lib.lib


class _Resource:
    __slots__ = ("ptr", "free", "parents", "children")

    def __init__(self, ptr, free, parents):
        self.ptr, self.free, self.parents, self.children = ptr, free, [], {}
        for parent in parents:
            self.borrow(parent)

    def borrow(self, parent):
        parent.children[id(self)] = self
        self.parents.append(parent)

    def release(self, parent):
        parent.children.pop(id(self), None)
        self.parents.remove(parent)

    def close(self):
        if self.ptr is None:
            return
        for child in reversed(list(self.children.values())):
            child.close()
        ptr, self.ptr = self.ptr, None
        self.free(ptr)
        for parent in list(self.parents):
            self.release(parent)


class Handle:
    """Base of every handle: close(), `with`, and closing on collection."""

    def __init__(self, ptr, free, borrows, ctx):
        # borrows: the Python handles this one borrows (kept alive).
        self._res = _Resource(ptr, free, [h._res for h in borrows])
        self._borrows = list(borrows)
        self._ctx = ctx if ctx is not None else self

    @property
    def _ptr(self):
        ptr = self._res.ptr
        if ptr is None:
            raise ClosedError(type(self).__name__)
        return ptr

    @property
    def closed(self):
        return self._res.ptr is None

    def close(self):
        """Free the C handle and every handle that borrows it. Idempotent."""
        self._res.close()

    def __del__(self):
        res = getattr(self, "_res", None)
        if res is not None:
            res.close()

    def __enter__(self):
        self._ptr  # a closed handle cannot be entered
        return self

    def __exit__(self, *exc):
        self.close()

    def _check(self, status):
        """Raise the status's exception with the context's message."""
        if status != 0:
            msg = lib.qkd_context_last_error(self._ctx._ptr)
            raise error_for(status, msg.decode("utf-8", "replace"))

    def _borrow(self, other):
        self._res.borrow(other._res)
        self._borrows.append(other)

    def _release(self, other):
        self._res.release(other._res)
        self._borrows.remove(other)


def create(ctx, creator, ptr_type, *args):
    """Call creator(*args, &out), raising on failure; return out."""
    out = ptr_type()
    ctx._check(creator(*args, byref(out)))
    return out


def require_state(ok, what):
    if not ok:
        raise StateError(StateError.status, what)


# ---- enums by name -------------------------------------------------------------

def enum_value(table, value, what):
    """An enum given as its lower-case name (a key of table) or its number."""
    if isinstance(value, str):
        try:
            return table[value.lower()]
        except KeyError:
            raise ValueError("unknown %s %r (one of %s)"
                             % (what, value, ", ".join(sorted(table)))) from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("%s must be a name or an int, not %r" % (what, value))
    return value


def fill(struct, values, enums):
    """Set struct's fields from a dict; enums maps a field to its name table."""
    names = {f[0] for f in struct._fields_} - {"size"}
    for key, value in values.items():
        if key not in names:
            raise TypeError("unknown parameter %r (expected one of %s)"
                            % (key, ", ".join(sorted(names))))
        if key in enums:
            value = enum_value(enums[key], value, key)
        setattr(struct, key, value)
    return struct


# ---- numpy arrays, passed to C without copies -------------------------------------

def _describe(arr):
    if isinstance(arr, np.ndarray):
        return "a %s array of shape %s" % (arr.dtype, arr.shape)
    return type(arr).__name__


def array_in(arr, dtype, shape, what):
    """Check that arr can be handed to C as is: a C-contiguous ndarray of
    exactly dtype (and of shape, where given; None in shape is any size)."""
    dtype = np.dtype(dtype)
    if not isinstance(arr, np.ndarray) or arr.dtype != dtype:
        raise ValueError("%s must be a numpy %s array, got %s" % (what, dtype, _describe(arr)))
    if shape is not None and (len(arr.shape) != len(shape) or any(
            want is not None and have != want for have, want in zip(arr.shape, shape))):
        want = "(%s)" % ", ".join("*" if s is None else str(s) for s in shape)
        raise ValueError("%s must have shape %s, got %s" % (what, want, arr.shape))
    if not arr.flags.c_contiguous:
        raise ValueError("%s must be C-contiguous" % what)
    return arr


def array_out(out, dtype, shape, what):
    """A new array, or out checked to be writable and of dtype and shape."""
    if out is None:
        return np.empty(shape, dtype)
    array_in(out, dtype, shape, what)
    if not out.flags.writeable:
        raise ValueError("%s must be writable" % what)
    return out


def f32p(arr):
    return None if arr is None else arr.ctypes.data_as(POINTER(c_float))


def i32p(arr):
    return None if arr is None else arr.ctypes.data_as(POINTER(c_int32))
