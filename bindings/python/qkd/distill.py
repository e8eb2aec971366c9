"""The distillation loop run by the library, with a per-step callback."""
from collections import namedtuple
from ctypes import POINTER, byref, c_float

import numpy as np

from . import _lib
from ._handle import Handle, create
from .errors import CancelledError

lib = _lib.lib

DistillStats = namedtuple("DistillStats", "step total_steps loss lr grad_norm clipped skipped "
                          "step_seconds tokens_per_s n_skipped bad_streak")


def _trampoline(on_step, raised):
    """The C callback: stats to a DistillStats, an exception into raised[0]
    (C cannot unwind it), stopping the run."""
    def step_done(user, stats):
        s = stats.contents
        try:
            return 1 if on_step(DistillStats(
                s.step, s.total_steps, s.loss, s.lr, s.grad_norm, bool(s.clipped),
                bool(s.skipped), s.step_seconds, s.tokens_per_s, s.n_skipped,
                s.bad_streak)) else 0
        except BaseException as e:
            raised[0] = e
            return 1
    return step_done


class Distill(Handle):
    """Distill(ctx, teacher, student, loss, optimizer, data, batch=8, seq=64,
    total_steps=100, on_step=None, max_bad_steps=None): a run over borrowed
    handles (closing any of them closes the run); max_bad_steps (None: the
    library's default) stops it after that many skipped steps in a row.
    on_step(stats) is called after every step with a DistillStats; a true
    result stops the run (run() then returns False). The run keeps the C callback alive; an exception raised by
    on_step stops the run and is re-raised by run()."""

    def __init__(self, ctx, teacher, student, loss, optimizer, data, batch=8, seq=64,
                 total_steps=100, on_step=None, max_bad_steps=None):
        p = _lib.DistillParams()
        lib.qkd_distill_params_init(byref(p))
        p.batch, p.seq, p.total_steps = batch, seq, total_steps
        if max_bad_steps is not None:
            p.max_bad_steps = max_bad_steps
        # The callback closes over a box rather than self: no reference cycle.
        self._raised = [None]
        self._callback = _lib.DistillFn(_trampoline(on_step, self._raised)) if on_step else None
        p.on_step = self._callback
        borrows = [h for h in (ctx, teacher, student, loss, optimizer, data) if h is not None]
        t = teacher._ptr if teacher is not None else None
        ptr = create(ctx, lib.qkd_distill_create, _lib.DistillP, ctx._ptr, t, student._ptr,
                     loss._ptr, optimizer._ptr, data._ptr, byref(p))
        super().__init__(ptr, lib.qkd_distill_free, borrows, ctx)
        self._models = [m for m in (teacher, student) if m is not None]

    def run(self, n_steps=0):
        """Run n_steps more steps (0: to total_steps). True when they are done,
        False when on_step stopped the run."""
        ptr = self._ptr
        for m in self._models:  # the run overwrites their last forward
            m._shape = None
        self._raised[0] = None
        status = lib.qkd_distill_run(ptr, n_steps)
        raised, self._raised[0] = self._raised[0], None
        if raised is not None:
            raise raised
        if status == CancelledError.status:
            return False
        self._check(status)
        return True

    @property
    def step(self):
        """Steps done so far."""
        return lib.qkd_distill_step(self._ptr)

    @property
    def history(self):
        """The loss of every step so far, as a float32 array (a copy)."""
        losses = POINTER(c_float)()
        n = lib.qkd_distill_history(self._ptr, byref(losses))
        return np.ctypeslib.as_array(losses, (n,)).copy() if n else np.empty(0, np.float32)
