"""The library context: allocator, log, threads and backend."""
from ctypes import byref

from . import _lib
from ._handle import Handle, enum_value
from .errors import error_for

lib = _lib.lib

BACKENDS = {"auto": 0, "ref": 1, "simd": 2, "cuda": 3}
LOG_LEVELS = {"error": 0, "warn": 1, "info": 2, "debug": 3}


class Context(Handle):
    """Context(n_threads=0, backend="auto", log=None, log_level="warn").

    log: a callable log(level, message) (level an int of LOG_LEVELS),
    called on the thread that made the library call; the context keeps the
    C callback alive until it is closed. An exception it raises is printed
    and ignored (the library cannot propagate it).
    Closing the context closes every handle created from it."""

    def __init__(self, n_threads=0, backend="auto", log=None, log_level="warn"):
        params = _lib.ContextParams()
        lib.qkd_context_params_init(byref(params))
        params.n_threads = n_threads
        params.backend = enum_value(BACKENDS, backend, "backend")
        params.log_level = enum_value(LOG_LEVELS, log_level, "log level")
        self._log_fn = None
        if log is not None:
            self._log_fn = _lib.LogFn(
                lambda user, level, msg: log(level, msg.decode("utf-8", "replace")))
            params.log = self._log_fn
        out = _lib.ContextP()
        status = lib.qkd_context_create(byref(params), byref(out))
        if status != 0:  # no context holds a message
            raise error_for(status, "cannot create a context")
        super().__init__(out, lib.qkd_context_free, (), None)

    @property
    def n_threads(self):
        return lib.qkd_context_n_threads(self._ptr)

    @property
    def backend(self):
        """"ref", "simd" or "cuda": the backend in use."""
        return lib.qkd_context_backend_name(self._ptr).decode()

    @property
    def last_error(self):
        return lib.qkd_context_last_error(self._ptr).decode("utf-8", "replace")
