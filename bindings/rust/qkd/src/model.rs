use std::cell::Cell;
use std::ffi::CString;
use std::path::Path;
use std::ptr::{self, NonNull};

use crate::{c_int, c_path, check_len, defaults, sys, Context, Dataset, Error, Quantizer, Result};

/// The shape of a model (`qkd_model_config`).
pub type ModelConfig = sys::qkd_model_config;

/// A LLaMA-family model on a context. Methods take `&self`: the C model
/// changes behind them, and the type is neither `Send` nor `Sync`, so an
/// optimizer can borrow the model while the loop drives it.
pub struct Model<'c> {
    raw: NonNull<sys::qkd_model>,
    ctx: &'c Context,
    /// (B, T) of the last forward, for the sizes of logits and targets.
    shape: Cell<Option<(usize, usize)>>,
    trainable: Cell<bool>,
}

impl<'c> Model<'c> {
    /// Load a GGUF file, a Hugging Face folder or a llama2.c checkpoint.
    pub fn load(ctx: &'c Context, path: impl AsRef<Path>) -> Result<Self> {
        let path = c_path(path)?;
        // SAFETY: ctx is alive, path a C string; the model is owned.
        let raw =
            ctx.create(|out| unsafe { sys::qkd_model_load(ctx.as_ptr(), path.as_ptr(), out) })?;
        Ok(Model {
            raw,
            ctx,
            shape: Cell::new(None),
            trainable: Cell::new(true),
        })
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::qkd_model {
        self.raw.as_ptr()
    }

    pub(crate) fn context(&self) -> &'c Context {
        self.ctx
    }

    pub fn config(&self) -> Result<ModelConfig> {
        let mut cfg = defaults(sys::qkd_model_config_init);
        // SAFETY: cfg.size is set by _init.
        self.ctx
            .check(unsafe { sys::qkd_model_get_config(self.as_ptr(), &mut cfg) })?;
        Ok(cfg)
    }

    pub fn n_params(&self) -> i64 {
        // SAFETY: the model is alive.
        unsafe { sys::qkd_model_n_params(self.as_ptr()) }
    }

    /// The index of the tensor named `name` ("blk.0.attn_q.weight").
    pub fn tensor_index(&self, name: &str) -> Result<i32> {
        let name = CString::new(name)
            .map_err(|_| Error::new(sys::QKD_ERR_INVALID_ARG, "a NUL byte in a tensor name"))?;
        let mut index = 0;
        // SAFETY: name is a C string, index an out-parameter.
        self.ctx.check(unsafe {
            sys::qkd_model_tensor_find(self.as_ptr(), name.as_ptr(), &mut index)
        })?;
        Ok(index)
    }

    /// Number of elements of tensor `index`.
    pub fn tensor_len(&self, index: i32) -> Result<usize> {
        // SAFETY: qkd_tensor_info is plain data; size is set below.
        let mut info: sys::qkd_tensor_info = unsafe { std::mem::zeroed() };
        info.size = std::mem::size_of::<sys::qkd_tensor_info>();
        // SAFETY: info is a valid out-parameter.
        self.ctx
            .check(unsafe { sys::qkd_model_tensor_info(self.as_ptr(), index, &mut info) })?;
        Ok(info.n_elements as usize)
    }

    /// Copy tensor `index`'s weights into `out` (its exact length).
    pub fn tensor_into(&self, index: i32, out: &mut [f32]) -> Result<()> {
        check_len(out.len(), self.tensor_len(index)?, "out")?;
        // SAFETY: out holds n floats.
        self.ctx.check(unsafe {
            sys::qkd_model_tensor_get(self.as_ptr(), index, out.as_mut_ptr(), out.len())
        })
    }

    /// Tensor `index`'s weights (row-major).
    pub fn tensor(&self, index: i32) -> Result<Vec<f32>> {
        let mut out = vec![0.0; self.tensor_len(index)?];
        self.tensor_into(index, &mut out)?;
        Ok(out)
    }

    /// Set tensor `index`'s weights from `values` (its exact length).
    pub fn set_tensor(&self, index: i32, values: &[f32]) -> Result<()> {
        check_len(values.len(), self.tensor_len(index)?, "values")?;
        // SAFETY: values holds n floats, copied by the library.
        self.ctx.check(unsafe {
            sys::qkd_model_tensor_set(self.as_ptr(), index, values.as_ptr(), values.len())
        })
    }

    /// Tensor `index`'s accumulated gradient.
    pub fn grad(&self, index: i32) -> Result<Vec<f32>> {
        let mut out = vec![0.0; self.tensor_len(index)?];
        // SAFETY: out holds n floats.
        self.ctx.check(unsafe {
            sys::qkd_model_grad_get(self.as_ptr(), index, out.as_mut_ptr(), out.len())
        })?;
        Ok(out)
    }

    /// Forward `b` sequences of `t` token ids (`tokens.len() == b * t`).
    pub fn forward(&self, tokens: &[i32], b: usize, t: usize) -> Result<()> {
        check_len(tokens.len(), b * t, "tokens")?;
        let (cb, ct) = (c_int(b, "B")?, c_int(t, "T")?);
        self.shape.set(None);
        // SAFETY: tokens holds b * t ids.
        self.ctx
            .check(unsafe { sys::qkd_model_forward(self.as_ptr(), tokens.as_ptr(), cb, ct) })?;
        self.shape.set(Some((b, t)));
        Ok(())
    }

    /// (B, T) of the last forward.
    pub fn last_shape(&self) -> Result<(usize, usize)> {
        self.shape
            .get()
            .ok_or_else(|| Error::new(sys::QKD_ERR_STATE, "the model has no forward yet"))
    }

    /// Positions of the last forward (B * T).
    pub(crate) fn positions(&self) -> Result<usize> {
        self.last_shape().map(|(b, t)| b * t)
    }

    /// Copy the last forward's logits ([B * T][vocab]) into `out`.
    pub fn logits_into(&self, out: &mut [f32]) -> Result<()> {
        let vocab = self.config()?.vocab_size as usize;
        check_len(out.len(), self.positions()? * vocab, "out")?;
        // SAFETY: out holds n floats.
        self.ctx
            .check(unsafe { sys::qkd_model_logits(self.as_ptr(), out.as_mut_ptr(), out.len()) })
    }

    /// The last forward's logits, [B * T][vocab] row-major.
    pub fn logits(&self) -> Result<Vec<f32>> {
        let mut out = vec![0.0; self.positions()? * self.config()?.vocab_size as usize];
        self.logits_into(&mut out)?;
        Ok(out)
    }

    /// Mean cross-entropy of the last forward against `targets` (B * T ids,
    /// negative: ignored), storing its gradient for [`Model::backward`].
    pub fn cross_entropy(&self, targets: &[i32]) -> Result<f32> {
        check_len(targets.len(), self.positions()?, "targets")?;
        let mut loss = 0.0;
        // SAFETY: targets holds B * T ids.
        self.ctx.check(unsafe {
            sys::qkd_model_cross_entropy(self.as_ptr(), targets.as_ptr(), 1, &mut loss)
        })?;
        Ok(loss)
    }

    /// Backward from the gradient a loss stored on the model, adding every
    /// parameter's gradient.
    pub fn backward(&self) -> Result<()> {
        // SAFETY: NULL selects the stored gradient.
        self.ctx
            .check(unsafe { sys::qkd_model_backward(self.as_ptr(), ptr::null()) })
    }

    pub fn zero_grad(&self) -> Result<()> {
        // SAFETY: the model is alive.
        self.ctx
            .check(unsafe { sys::qkd_model_zero_grad(self.as_ptr()) })
    }

    /// `false` for a model only run forward, as a frozen teacher: its
    /// layers then share one set of activations and it keeps no gradient
    /// buffers ([`Model::backward`], [`Model::cross_entropy`],
    /// [`Model::grad`] and an optimizer step fail with `QKD_ERR_STATE`);
    /// with bf16 matmuls it keeps its weights rounded to bf16 once. A
    /// change discards the last forward.
    pub fn set_trainable(&self, trainable: bool) -> Result<()> {
        // SAFETY: the model is alive.
        self.ctx.check(unsafe {
            sys::qkd_model_set_trainable(self.as_ptr(), trainable as std::os::raw::c_int)
        })?;
        if trainable != self.trainable.replace(trainable) {
            self.shape.set(None);
        }
        Ok(())
    }

    /// 0 (the default): the forward stores all logits. `rows` > 0: they
    /// are computed when read, a loss computing them `rows` positions at
    /// a time so that neither model's logits are ever stored whole. A
    /// change discards the last forward.
    pub fn set_logits_rows(&self, rows: i32) -> Result<()> {
        // SAFETY: the model is alive; the library checks the value.
        self.ctx
            .check(unsafe { sys::qkd_model_set_logits_rows(self.as_ptr(), rows) })?;
        self.shape.set(None);
        Ok(())
    }

    /// bf16 matmul inputs with fp32 accumulation
    /// (`sys::QKD_MATMUL_BF16`) or fp32 (`sys::QKD_MATMUL_FP32`, the default).
    pub fn set_matmul_precision(&self, precision: sys::qkd_matmul_precision) -> Result<()> {
        // SAFETY: the model is alive; the library checks the value.
        self.ctx
            .check(unsafe { sys::qkd_model_set_matmul_precision(self.as_ptr(), precision) })
    }

    /// Make the model a student of `q` for the tensors in `targets` (a mask
    /// of `sys::QKD_QUANT_TARGET(kind)` bits, e.g.
    /// `sys::QKD_QUANT_TARGET_LINEAR`). The quantizer stays borrowed for
    /// the model's whole life.
    pub fn set_quantizer(&mut self, q: &'c Quantizer<'_>, targets: u32) -> Result<()> {
        self.shape.set(None); // binding discards the last forward
                              // SAFETY: q outlives the model (the borrow above).
        self.ctx
            .check(unsafe { sys::qkd_model_set_quantizer(self.as_ptr(), q.as_ptr(), targets) })
    }

    /// Mean cross-entropy (nats/token) on `data`'s held-out windows, in
    /// batches of `b` windows of `t` tokens. Overwrites the last forward.
    pub fn eval_ce(&self, data: &Dataset<'_>, b: usize, t: usize) -> Result<f64> {
        let (cb, ct) = (c_int(b, "B")?, c_int(t, "T")?);
        let mut ce = 0.0;
        self.shape.set(None);
        // SAFETY: handles alive; n_tokens may be NULL.
        self.ctx.check(unsafe {
            sys::qkd_distill_eval_ce(
                self.ctx.as_ptr(),
                self.as_ptr(),
                data.as_ptr(),
                cb,
                ct,
                &mut ce,
                ptr::null_mut(),
            )
        })?;
        Ok(ce)
    }
}

impl Drop for Model<'_> {
    fn drop(&mut self) {
        // SAFETY: optimizers borrowing the model are gone (borrow rules).
        unsafe { sys::qkd_model_free(self.as_ptr()) }
    }
}
