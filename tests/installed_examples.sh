#!/usr/bin/env bash
# Install libqkd into a scratch prefix and build the C example against the
# installed copy with pkg-config alone, as a user would; then run it briefly
# on stories260K when ../shared is there. Usage: installed_examples.sh BUILD
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

shared="$src/../shared"
if [ -f "$shared/models/stories260K/stories260K.bin" ]; then
    LD_LIBRARY_PATH="$libdir" "$stage/distill" "$shared/models/stories260K/stories260K.bin" \
        "$shared/models/stories260K/tok512.bin" \
        "$shared/text/tinystories/TinyStories-valid.slice_My-AI_Tasks.txt" 5 >/dev/null
    echo "the installed example ran 5 distillation steps on stories260K"
fi
