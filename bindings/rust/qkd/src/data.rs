use std::path::Path;
use std::ptr::NonNull;

use crate::{c_int, c_path, check_len, sys, Context, Result};

/// A llama2.c or GGUF vocabulary.
pub struct Tokenizer<'c> {
    raw: NonNull<sys::qkd_tokenizer>,
    _ctx: &'c Context,
}

impl<'c> Tokenizer<'c> {
    pub fn load(ctx: &'c Context, path: impl AsRef<Path>) -> Result<Self> {
        let path = c_path(path)?;
        // SAFETY: path is a C string; the tokenizer is owned.
        let raw =
            ctx.create(|out| unsafe { sys::qkd_tokenizer_load(ctx.as_ptr(), path.as_ptr(), out) })?;
        Ok(Tokenizer { raw, _ctx: ctx })
    }

    pub fn vocab_size(&self) -> usize {
        // SAFETY: alive.
        unsafe { sys::qkd_tokenizer_vocab_size(self.raw.as_ptr()) as usize }
    }
}

impl Drop for Tokenizer<'_> {
    fn drop(&mut self) {
        // SAFETY: owned.
        unsafe { sys::qkd_tokenizer_free(self.raw.as_ptr()) }
    }
}

/// A token dataset and the deterministic batches of a run.
pub struct Dataset<'c> {
    raw: NonNull<sys::qkd_dataset>,
    ctx: &'c Context,
}

impl<'c> Dataset<'c> {
    /// A UTF-8 text file encoded with `tok`, BOS first.
    pub fn from_text(
        ctx: &'c Context,
        tok: &Tokenizer<'_>,
        path: impl AsRef<Path>,
    ) -> Result<Self> {
        let path = c_path(path)?;
        // SAFETY: tok is only used during the call; the dataset is owned.
        let raw = ctx.create(|out| unsafe {
            sys::qkd_dataset_from_text(ctx.as_ptr(), tok.raw.as_ptr(), path.as_ptr(), out)
        })?;
        Ok(Dataset { raw, ctx })
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::qkd_dataset {
        self.raw.as_ptr()
    }

    /// Seed of the training order; the last n_eval windows are held out.
    pub fn set_split(&self, seed: u64, n_eval: i64) -> Result<()> {
        // SAFETY: alive.
        self.ctx
            .check(unsafe { sys::qkd_dataset_set_split(self.as_ptr(), seed, n_eval) })
    }

    /// Training batch `step`: `b` windows of `t` tokens into `tokens` and
    /// their next-token `targets` (each `b * t` long).
    pub fn batch(
        &self,
        step: i64,
        b: usize,
        t: usize,
        tokens: &mut [i32],
        targets: &mut [i32],
    ) -> Result<()> {
        check_len(tokens.len(), b * t, "tokens")?;
        check_len(targets.len(), b * t, "targets")?;
        let (cb, ct) = (c_int(b, "B")?, c_int(t, "T")?);
        // SAFETY: both buffers hold b * t ids.
        self.ctx.check(unsafe {
            sys::qkd_dataset_batch(
                self.as_ptr(),
                step,
                cb,
                ct,
                tokens.as_mut_ptr(),
                targets.as_mut_ptr(),
            )
        })
    }
}

impl Drop for Dataset<'_> {
    fn drop(&mut self) {
        // SAFETY: owned.
        unsafe { sys::qkd_dataset_free(self.as_ptr()) }
    }
}
