"""Statuses as exceptions: one QkdError subclass per qkd_status, carrying
the status, its name and the context's message (qkd_context_last_error)."""
from . import _lib


class QkdError(Exception):
    """A libqkd call failed. status: the qkd_status value; name: its name
    ("QKD_ERR_IO"); message: what the library recorded."""
    status = None

    def __init__(self, status, message):
        self.status = status
        self.name = _lib.lib.qkd_status_name(status).decode()
        self.message = message
        super().__init__("%s: %s" % (self.name, message) if message else self.name)


class InvalidArgError(QkdError):
    status = -1


class NoMemoryError(QkdError):
    status = -2


class IoError(QkdError):
    status = -3


class FormatError(QkdError):
    status = -4


class UnsupportedError(QkdError):
    status = -5


class ShapeError(QkdError):
    status = -6


class BackendError(QkdError):
    status = -7


class StateError(QkdError):
    status = -8


class NotFoundError(QkdError):
    status = -9


class NonFiniteError(QkdError):
    status = -10


class CancelledError(QkdError):
    status = -11


class VersionError(QkdError):
    status = -12


class RangeError(QkdError):
    status = -13


class ClosedError(StateError, ValueError):
    """A method was called on a closed handle (or one whose owner, such as
    its context, was closed)."""

    def __init__(self, what):
        super().__init__(StateError.status, "%s is closed" % what)


_BY_STATUS = {cls.status: cls for cls in QkdError.__subclasses__()}


def error_for(status, message):
    """The exception for a failed status (QkdError for an unknown one)."""
    return _BY_STATUS.get(status, QkdError)(status, message)
