//! Find libqkd with pkg-config (PKG_CONFIG_PATH for a prefix of your own)
//! and generate the bindings of its installed headers: every `qkd_*`
//! function and type and every `QKD_*` constant, nothing of libc.

use std::env;
use std::path::PathBuf;

/// The versions these bindings are for: major 0 (the soname's number),
/// from 0.1 on.
const MIN_VERSION: &str = "0.1";
const NEXT_MAJOR: &str = "1";

fn main() {
    let lib = pkg_config::Config::new()
        .range_version(MIN_VERSION..NEXT_MAJOR)
        .probe("libqkd")
        .unwrap_or_else(|e| panic!("libqkd >= {MIN_VERSION}, < {NEXT_MAJOR} not found: {e}"));

    let mut builder = bindgen::Builder::default()
        .header("wrapper.h")
        .allowlist_function("qkd_.*")
        .allowlist_type("qkd_.*")
        .allowlist_var("QKD_.*")
        .prepend_enum_name(false)
        .size_t_is_usize(true)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks));
    for dir in &lib.include_paths {
        builder = builder.clang_arg(format!("-I{}", dir.display()));
    }
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("bindings.rs");
    builder
        .generate()
        .expect("bindgen could not parse <qkd/qkd.h>")
        .write_to_file(&out)
        .expect("cannot write the bindings");
}
