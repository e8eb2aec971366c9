//! Safe Rust interface to libqkd: quantization-aware training with
//! knowledge distillation of LLaMA-family models.
//!
//! Every handle owns its C object through a `NonNull` pointer and frees it
//! on `Drop`; borrows encode the library's lifetime rules, so a model
//! cannot outlive its context, a student its quantizer, or an optimizer
//! its model. Every fallible call returns [`Result`], whose [`Error`]
//! carries the `qkd_status` and the context's message. Buffers are plain
//! slices (`f32` weights and logits, `i32` token ids), checked against the
//! shapes before the C call. Handles are neither `Send` nor `Sync`: a
//! context and what it made are used by one thread at a time.
//!
//! ```no_run
//! use qkd::{Context, Model, Quantizer};
//! let ctx = Context::new()?;
//! let q = Quantizer::new(&ctx, |p| p.group_size = 32)?;
//! let mut student = Model::load(&ctx, "stories260K.bin")?;
//! student.set_quantizer(&q, qkd::sys::QKD_QUANT_TARGET_LINEAR)?;
//! # Ok::<(), qkd::Error>(())
//! ```
//!
//! Using a handle after what it borrows is gone does not compile:
//!
//! ```compile_fail
//! use qkd::{Context, Model};
//! let model = {
//!     let ctx = Context::new().unwrap();
//!     Model::load(&ctx, "stories260K.bin").unwrap()
//! }; // error: `ctx` does not live long enough
//! ```
//!
//! nor does a student whose quantizer is gone:
//!
//! ```compile_fail
//! use qkd::{Context, Model, Quantizer};
//! let ctx = Context::new().unwrap();
//! let mut student = Model::load(&ctx, "stories260K.bin").unwrap();
//! {
//!     let q = Quantizer::new(&ctx, |_| {}).unwrap();
//!     student.set_quantizer(&q, qkd::sys::QKD_QUANT_TARGET_LINEAR).unwrap();
//! } // error: `q` does not live long enough
//! student.zero_grad().unwrap();
//! ```
//!
//! bindings/rust/qkd/examples/distill.rs is the complete training loop.

mod context;
mod data;
mod model;
mod train;

pub use context::Context;
pub use data::{Dataset, Tokenizer};
pub use model::{Model, ModelConfig};
pub use qkd_sys as sys;
pub use train::{Loss, LossTerm, OptimParams, Optimizer, QuantParams, Quantizer, StepInfo};

use std::ffi::{CStr, CString};
use std::fmt;
use std::os::raw::c_char;
use std::path::Path;

/// A failed libqkd call: its `qkd_status` and the context's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    status: sys::qkd_status,
    message: String,
}

impl Error {
    pub(crate) fn new(status: sys::qkd_status, message: impl Into<String>) -> Self {
        Error {
            status,
            message: message.into(),
        }
    }

    /// The `qkd_status` value (`sys::QKD_ERR_IO`, ...).
    pub fn status(&self) -> sys::qkd_status {
        self.status
    }

    /// What the library (or the binding's own check) recorded.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The status's name, "QKD_ERR_IO".
    pub fn name(&self) -> &'static str {
        // SAFETY: qkd_status_name returns a static string for any value.
        unsafe { static_str(sys::qkd_status_name(self.status)) }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.name(), self.message)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// The version of the libqkd actually loaded, "0.1.0".
pub fn version() -> &'static str {
    // SAFETY: a static string.
    unsafe { static_str(sys::qkd_version_string()) }
}

/// # Safety
/// `s` is a NUL-terminated string that lives as long as the library.
unsafe fn static_str(s: *const c_char) -> &'static str {
    CStr::from_ptr(s).to_str().unwrap_or("?")
}

/// Defaults of a parameter struct from its `_init` function.
fn defaults<T>(init: unsafe extern "C" fn(*mut T)) -> T {
    let mut p = std::mem::MaybeUninit::<T>::uninit();
    // SAFETY: _init fills every field of the struct.
    unsafe {
        init(p.as_mut_ptr());
        p.assume_init()
    }
}

/// A path or name as a C string; an interior NUL is INVALID_ARG.
fn c_path(path: impl AsRef<Path>) -> Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_ref().as_os_str().as_bytes();
    CString::new(bytes).map_err(|_| {
        Error::new(
            sys::QKD_ERR_INVALID_ARG,
            format!("{:?}: a NUL byte in a path", path.as_ref()),
        )
    })
}

/// A count as a C int; larger is INVALID_ARG.
fn c_int(n: usize, what: &str) -> Result<i32> {
    i32::try_from(n).map_err(|_| {
        Error::new(
            sys::QKD_ERR_INVALID_ARG,
            format!("{what} = {n} is too large"),
        )
    })
}

/// A buffer of the wrong length: SHAPE, as the library reports it.
fn check_len(have: usize, want: usize, what: &str) -> Result<()> {
    if have == want {
        Ok(())
    } else {
        Err(Error::new(
            sys::QKD_ERR_SHAPE,
            format!("{what} has {have} elements, expected {want}"),
        ))
    }
}
