use std::ptr::{self, NonNull};

use crate::{check_len, defaults, sys, Context, Model, Result};

/// Quantizer parameters (`qkd_quant_params`), as `qkd_quant_params_init`
/// fills them and a closure changes them.
pub type QuantParams = sys::qkd_quant_params;
/// One loss term (`qkd_loss_term`).
pub type LossTerm = sys::qkd_loss_term;
/// Optimizer parameters (`qkd_optim_params`).
pub type OptimParams = sys::qkd_optim_params;

/// A low-bit grid that students train on.
pub struct Quantizer<'c> {
    raw: NonNull<sys::qkd_quantizer>,
    _ctx: &'c Context,
}

impl<'c> Quantizer<'c> {
    /// The defaults (ASYM, 4 bits, group 128, STE) changed by `configure`:
    /// `Quantizer::new(&ctx, |p| p.group_size = 32)`.
    pub fn new(ctx: &'c Context, configure: impl FnOnce(&mut QuantParams)) -> Result<Self> {
        let mut p = defaults(sys::qkd_quant_params_init);
        configure(&mut p);
        // SAFETY: p is initialised and copied; the quantizer is owned.
        let raw = ctx.create(|out| unsafe { sys::qkd_quantizer_create(ctx.as_ptr(), &p, out) })?;
        Ok(Quantizer { raw, _ctx: ctx })
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::qkd_quantizer {
        self.raw.as_ptr()
    }
}

impl Drop for Quantizer<'_> {
    fn drop(&mut self) {
        // SAFETY: the students that borrow it are gone.
        unsafe { sys::qkd_quantizer_free(self.as_ptr()) }
    }
}

/// A weighted sum of distillation terms.
pub struct Loss<'c> {
    raw: NonNull<sys::qkd_loss>,
    ctx: &'c Context,
}

impl<'c> Loss<'c> {
    pub fn new(ctx: &'c Context) -> Result<Self> {
        // SAFETY: the loss is owned.
        let raw = ctx.create(|out| unsafe { sys::qkd_loss_create(ctx.as_ptr(), out) })?;
        Ok(Loss { raw, ctx })
    }

    /// Append a term of `kind` (`sys::QKD_LOSS_FKL`, ...) with its defaults
    /// changed by `configure`.
    pub fn add(
        &self,
        kind: sys::qkd_loss_kind,
        configure: impl FnOnce(&mut LossTerm),
    ) -> Result<()> {
        let mut term = std::mem::MaybeUninit::<LossTerm>::uninit();
        // SAFETY: _init fills every field.
        let mut term = unsafe {
            sys::qkd_loss_term_init(term.as_mut_ptr(), kind);
            term.assume_init()
        };
        configure(&mut term);
        // SAFETY: term is copied.
        self.ctx
            .check(unsafe { sys::qkd_loss_add(self.raw.as_ptr(), &term) })
    }

    /// The loss on the last forwards of student and teacher (None when every
    /// term is CE) against `targets` (B * T ids; None where no term needs
    /// them). Its gradient is stored on the student for `backward`.
    pub fn compute(
        &self,
        student: &Model<'_>,
        teacher: Option<&Model<'_>>,
        targets: Option<&[i32]>,
    ) -> Result<f32> {
        let mut value = 0.0;
        self.run(student, teacher, targets, &mut value)?;
        Ok(value)
    }

    /// `compute` without waiting for the device; `value` reads the loss later.
    pub fn compute_deferred(
        &self,
        student: &Model<'_>,
        teacher: Option<&Model<'_>>,
        targets: Option<&[i32]>,
    ) -> Result<()> {
        self.run(student, teacher, targets, ptr::null_mut())
    }

    /// The loss at the last compute, waiting for a deferred one.
    pub fn value(&self) -> Result<f32> {
        let mut value = 0.0;
        // SAFETY: the loss is alive; value is written.
        self.ctx
            .check(unsafe { sys::qkd_loss_value(self.raw.as_ptr(), &mut value) })?;
        Ok(value)
    }

    fn run(
        &self,
        student: &Model<'_>,
        teacher: Option<&Model<'_>>,
        targets: Option<&[i32]>,
        value: *mut f32,
    ) -> Result<()> {
        if let Some(targets) = targets {
            check_len(targets.len(), student.positions()?, "targets")?;
        }
        // SAFETY: models alive; targets hold B * T ids or are NULL; value is
        // a float or NULL (deferred).
        self.ctx.check(unsafe {
            sys::qkd_loss_compute(
                self.raw.as_ptr(),
                student.as_ptr(),
                teacher.map_or(ptr::null_mut(), |t| t.as_ptr()),
                targets.map_or(ptr::null(), |t| t.as_ptr()),
                value,
            )
        })
    }
}

impl Drop for Loss<'_> {
    fn drop(&mut self) {
        // SAFETY: owned.
        unsafe { sys::qkd_loss_free(self.raw.as_ptr()) }
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepInfo {
    /// Steps applied so far (skipped ones excluded).
    pub step: i64,
    pub lr: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f32,
    pub clipped: bool,
    /// Non-finite gradients: nothing changed (not an error).
    pub skipped: bool,
}

/// AdamW or SGD over a model's tensors; borrows the model.
pub struct Optimizer<'m> {
    raw: NonNull<sys::qkd_optimizer>,
    model: &'m Model<'m>,
}

impl<'m> Optimizer<'m> {
    /// The defaults (AdamW, lr 1e-4, constant) changed by `configure`.
    pub fn new(model: &'m Model<'m>, configure: impl FnOnce(&mut OptimParams)) -> Result<Self> {
        let mut p = defaults(sys::qkd_optim_params_init);
        configure(&mut p);
        // SAFETY: p is copied; the optimizer is owned and borrows model.
        let raw = model
            .context()
            .create(|out| unsafe { sys::qkd_optimizer_create(model.as_ptr(), &p, out) })?;
        Ok(Optimizer { raw, model })
    }

    /// Apply one update from the model's gradients.
    pub fn step(&self) -> Result<StepInfo> {
        // SAFETY: info is a valid out-parameter.
        self.report(|info| unsafe { sys::qkd_optimizer_step(self.raw.as_ptr(), info) })
    }

    /// Queue one update without waiting for the device (which decides the
    /// norm, the clip and a skip); `last_step` reports it.
    pub fn step_deferred(&self) -> Result<()> {
        // SAFETY: the optimizer is alive.
        self.model
            .context()
            .check(unsafe { sys::qkd_optimizer_step_deferred(self.raw.as_ptr()) })
    }

    /// The report of the last step, waiting for a queued one.
    pub fn last_step(&self) -> Result<StepInfo> {
        // SAFETY: info is a valid out-parameter.
        self.report(|info| unsafe { sys::qkd_optimizer_last_step(self.raw.as_ptr(), info) })
    }

    fn report(
        &self,
        call: impl FnOnce(*mut sys::qkd_step_info) -> sys::qkd_status,
    ) -> Result<StepInfo> {
        // SAFETY: plain data; size is set below.
        let mut info: sys::qkd_step_info = unsafe { std::mem::zeroed() };
        info.size = std::mem::size_of::<sys::qkd_step_info>();
        let status = call(&mut info);
        if info.skipped == 0 {
            self.model.context().check(status)?;
        }
        Ok(StepInfo {
            step: info.step,
            lr: info.lr,
            grad_norm: info.grad_norm,
            clipped: info.clipped != 0,
            skipped: info.skipped != 0,
        })
    }
}

impl Drop for Optimizer<'_> {
    fn drop(&mut self) {
        // SAFETY: owned.
        unsafe { sys::qkd_optimizer_free(self.raw.as_ptr()) }
    }
}
