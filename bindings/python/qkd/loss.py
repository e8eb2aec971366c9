"""Distillation objectives: a weighted sum of terms."""
from ctypes import byref, c_float

from . import _lib
from ._handle import Handle, create, enum_value, fill, i32p

lib = _lib.lib

LOSS_KINDS = {"ce": 0, "fkl": 1, "rkl": 2, "jsd": 3, "cakld": 4, "tsld": 5, "mse": 6}


class Loss(Handle):
    """Loss(ctx, *kinds): a loss with one default term per kind ("fkl",
    ...); add() appends terms with their own weight, temperature, beta,
    tsld_tau or beta_from_teacher."""

    def __init__(self, ctx, *kinds):
        super().__init__(create(ctx, lib.qkd_loss_create, _lib.LossP, ctx._ptr),
                         lib.qkd_loss_free, (ctx,), ctx)
        for kind in kinds:
            self.add(kind)

    def add(self, kind, **term):
        t = _lib.LossTerm()
        lib.qkd_loss_term_init(byref(t), enum_value(LOSS_KINDS, kind, "loss kind"))
        fill(t, term, {})
        self._check(lib.qkd_loss_add(self._ptr, byref(t)))

    def compute(self, student, teacher, targets=None, wait=True):
        """The loss on the last forwards of student and teacher (None when every
        term is CE) against (B, T) int32 targets; its gradient is stored on
        the student for student.backward(). wait=False queues it and returns
        None without waiting for the device; value() reads it later."""
        student.targets_of(targets)
        value = c_float()
        t = teacher._ptr if teacher is not None else None
        self._check(lib.qkd_loss_compute(self._ptr, student._ptr, t, i32p(targets),
                                         byref(value) if wait else None))
        return value.value if wait else None

    def value(self):
        """The weighted sum at the last compute, waiting for a deferred one."""
        value = c_float()
        self._check(lib.qkd_loss_value(self._ptr, byref(value)))
        return value.value

    def term_value(self, term):
        """Unweighted value of term `term` at the last compute."""
        value = c_float()
        self._check(lib.qkd_loss_term_value(self._ptr, term, byref(value)))
        return value.value
