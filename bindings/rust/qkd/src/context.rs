use std::ffi::CStr;
use std::ptr::{self, NonNull};

use crate::{defaults, static_str, sys, Error, Result};

/// The library context: threads, backend and the last error's message.
/// Every other handle borrows it.
pub struct Context {
    raw: NonNull<sys::qkd_context>,
}

impl Context {
    /// A context with the defaults: every core, the fastest CPU backend.
    pub fn new() -> Result<Self> {
        Self::with_threads(0)
    }

    /// A context computing with n_threads worker threads (0: one per core).
    pub fn with_threads(n_threads: i32) -> Result<Self> {
        Self::with_backend(n_threads, sys::QKD_BACKEND_AUTO)
    }

    /// A context on the backend asked for (`sys::QKD_BACKEND_AUTO`, `_REF`,
    /// `_SIMD` or `_CUDA`; AUTO never picks CUDA) with n_threads host
    /// threads. A backend not built in, or CUDA without a device, is an
    /// error with status `QKD_ERR_UNSUPPORTED`; an unknown kind,
    /// `QKD_ERR_INVALID_ARG`.
    pub fn with_backend(n_threads: i32, backend: sys::qkd_backend_kind) -> Result<Self> {
        let mut params = defaults(sys::qkd_context_params_init);
        params.n_threads = n_threads;
        params.backend = backend;
        let mut out = ptr::null_mut();
        // SAFETY: params is initialised; out receives an owned context.
        let status = unsafe { sys::qkd_context_create(&params, &mut out) };
        match NonNull::new(out) {
            Some(raw) if status == sys::QKD_OK => Ok(Context { raw }),
            _ => Err(Error::new(status, "cannot create a context")),
        }
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::qkd_context {
        self.raw.as_ptr()
    }

    /// The message of the last error reported on this context.
    pub fn last_error(&self) -> String {
        // SAFETY: the context is alive; the message is copied at once.
        unsafe { CStr::from_ptr(sys::qkd_context_last_error(self.as_ptr())) }
            .to_string_lossy()
            .into_owned()
    }

    /// Worker threads in use (>= 1).
    pub fn n_threads(&self) -> i32 {
        // SAFETY: the context is alive.
        unsafe { sys::qkd_context_n_threads(self.as_ptr()) }
    }

    /// The compute backend in use: "ref", "simd" or "cuda".
    pub fn backend(&self) -> &'static str {
        // SAFETY: a static string.
        unsafe { static_str(sys::qkd_context_backend_name(self.as_ptr())) }
    }

    /// Ok for QKD_OK, else the status with this context's message.
    pub(crate) fn check(&self, status: sys::qkd_status) -> Result<()> {
        if status == sys::QKD_OK {
            Ok(())
        } else {
            Err(Error::new(status, self.last_error()))
        }
    }

    /// Run a creator that writes an owned handle through its out-pointer.
    pub(crate) fn create<T>(
        &self,
        make: impl FnOnce(*mut *mut T) -> sys::qkd_status,
    ) -> Result<NonNull<T>> {
        let mut out = ptr::null_mut();
        self.check(make(&mut out))?;
        NonNull::new(out)
            .ok_or_else(|| Error::new(sys::QKD_ERR_STATE, "the library returned no handle"))
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: every handle borrowing the context has been dropped.
        unsafe { sys::qkd_context_free(self.as_ptr()) }
    }
}
