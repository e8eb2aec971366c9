"""Optimizers: AdamW and SGD with schedules, clipping and parameter groups."""
from collections import namedtuple
from ctypes import byref, sizeof

from . import _lib
from ._handle import Handle, create, fill

lib = _lib.lib

OPTIM_KINDS = {"adamw": 0, "sgd": 1}
SCHEDULES = {"constant": 0, "linear": 1, "cosine": 2}

StepInfo = namedtuple("StepInfo", "step lr grad_norm clipped skipped")


class Optimizer(Handle):
    """Optimizer(model, **params): qkd_optim_params_init's defaults (AdamW,
    lr 1e-4, constant) with the given fields changed: kind, lr, beta1,
    beta2, eps, momentum, weight_decay, schedule, warmup_steps,
    total_steps, min_lr_ratio, max_grad_norm. It borrows the model."""

    def __init__(self, model, **params):
        p = _lib.OptimParams()
        lib.qkd_optim_params_init(byref(p))
        fill(p, params, {"kind": OPTIM_KINDS, "schedule": SCHEDULES})
        ptr = create(model._ctx, lib.qkd_optimizer_create, _lib.OptimizerP, model._ptr,
                     byref(p))
        super().__init__(ptr, lib.qkd_optimizer_free, (model,), model._ctx)

    def step(self, wait=True):
        """Apply one update; a step skipped for non-finite gradients is
        returned with skipped=True rather than raised. wait=False queues it
        (norm, clipping and skipping decided on the device) and returns None;
        last_step() reports it later."""
        if not wait:
            self._check(lib.qkd_optimizer_step_deferred(self._ptr))
            return None
        return self._report(lib.qkd_optimizer_step)

    def last_step(self):
        """The report of the last step, waiting for a queued one."""
        return self._report(lib.qkd_optimizer_last_step)

    def _report(self, fn):
        info = _lib.StepInfo(size=sizeof(_lib.StepInfo))
        status = fn(self._ptr, byref(info))
        if not info.skipped:
            self._check(status)
        return StepInfo(info.step, info.lr, info.grad_norm, bool(info.clipped),
                        bool(info.skipped))

    def set_group(self, index, lr_scale=1.0, frozen=False):
        self._check(lib.qkd_optimizer_set_group(self._ptr, index, lr_scale, int(frozen)))

    def lr_at(self, step):
        """The scheduled learning rate of step (1-based)."""
        return lib.qkd_optimizer_lr_at(self._ptr, step)
