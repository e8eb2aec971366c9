#!/usr/bin/env bash
# cargo test of the Rust crates against a copy of libqkd installed from BUILD
# into a scratch prefix (qkd-sys finds it with pkg-config, as a user's build
# would), comparing with BUILD's C example. Offline, on the crates Debian
# packages (.cargo/config.toml). Usage: bindings/rust/test.sh BUILD
set -euo pipefail
build=$(cd "$1" && pwd)
here=$(cd "$(dirname "$0")" && pwd)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

meson install -C "$build" --destdir "$stage" --no-rebuild >/dev/null
pc=$(dirname "$(find "$stage" -name libqkd.pc | head -n 1)")
export PKG_CONFIG_PATH="$pc" PKG_CONFIG_SYSROOT_DIR="$stage" LD_LIBRARY_PATH="$(dirname "$pc")"
export QKD_DISTILL_EXAMPLE="$build/examples/distill" QKD_SHARED="$here/../../../shared"
cargo=$(command -v cargo || echo "$HOME/.cargo/bin/cargo")
cd "$here"
"$cargo" --version
"$cargo" test --offline 2>&1
