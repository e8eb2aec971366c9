#!/usr/bin/env bash
# Install libqkd into a scratch prefix and build every example against the
# installed copy with pkg-config alone, as a user would: C, C++, Python (the
# binding finds the library through QKD_LIB_PATH) and Rust (qkd-sys probes
# pkg-config). Where ../shared is there, run each for 5 distillation steps on
# stories260K and check that all print the C example's lines.
# Usage: installed_examples.sh BUILD
set -euo pipefail
build=$(cd "$1" && pwd)
src=$(cd "$(dirname "$0")/.." && pwd)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

meson install -C "$build" --destdir "$stage" --no-rebuild >/dev/null
pc=$(dirname "$(find "$stage" -name libqkd.pc | head -n 1)")
libdir=$(dirname "$pc")
export PKG_CONFIG_PATH="$pc" PKG_CONFIG_SYSROOT_DIR="$stage"
cc -std=c11 -Wall -Werror "$src/examples/distill.c" $(pkg-config --cflags --libs libqkd) \
   -lm -o "$stage/distill"
echo "examples/distill.c builds against the installed libqkd (pkg-config)"
c++ -std=c++17 -Wall -Wextra -Werror "$src/examples/distill.cpp" \
    $(pkg-config --cflags --libs libqkd) -o "$stage/distill-cpp"
echo "examples/distill.cpp builds against the installed libqkd (pkg-config)"

# A python3 with numpy: PATH's, else Debian's (python3-numpy).
python=""
for p in python3 /usr/bin/python3; do
    if "$p" -c 'import numpy' 2>/dev/null; then python=$p; break; fi
done
# cargo: PATH's, else rustup's default place.
cargo=$(command -v cargo || echo "$HOME/.cargo/bin/cargo")
rust_example=""
if [ -x "$cargo" ]; then
    (cd "$src/bindings/rust" && "$cargo" build --offline --quiet --example distill)
    rust_example="$src/bindings/rust/target/debug/examples/distill"
    echo "the Rust example builds against the installed libqkd (pkg-config)"
fi

shared="$src/../shared"
if [ -f "$shared/models/stories260K/stories260K.bin" ]; then
    args=("$shared/models/stories260K/stories260K.bin" "$shared/models/stories260K/tok512.bin"
          "$shared/text/tinystories/TinyStories-valid.slice_My-AI_Tasks.txt" 5)
    export LD_LIBRARY_PATH="$libdir"
    "$stage/distill" "${args[@]}" >"$stage/c.txt"
    echo "the installed C example ran 5 distillation steps on stories260K"
    "$stage/distill-cpp" "${args[@]}" >"$stage/cpp.txt"
    cmp "$stage/c.txt" "$stage/cpp.txt"
    echo "the installed C++ example printed the C example's lines"
    if [ -n "$python" ]; then
        QKD_LIB_PATH="$libdir" PYTHONPATH="$src/bindings/python" PYTHONDONTWRITEBYTECODE=1 \
            "$python" "$src/examples/distill.py" "${args[@]}" >"$stage/py.txt"
        cmp "$stage/c.txt" "$stage/py.txt"
        echo "the Python example, on the installed library, printed the C example's lines"
    fi
    if [ -n "$rust_example" ]; then
        "$rust_example" "${args[@]}" >"$stage/rs.txt"
        cmp "$stage/c.txt" "$stage/rs.txt"
        echo "the Rust example, on the installed library, printed the C example's lines"
    fi
fi
