#!/usr/bin/env bash
# Compare the ABI of the built libqkd with the last release tag's, through
# the types the public headers declare (abidiff from Debian's abigail-tools,
# on the DWARF of both libraries). docs/abi-policy.md says what may change.
#
#   tests/abi/abidiff.sh BUILD [TAG]
#
# TAG defaults to the newest tag named vMAJOR.MINOR.PATCH reachable from
# HEAD. With no such tag (no release yet) it says so and exits 0. While the
# current major version is 0 every finding is a warning (exit 0); from 1.0
# on, an incompatible change without a major bump fails (exit 1), and so
# does a comparison that could not be made.
set -uo pipefail
build=$(cd "$1" && pwd)
src=$(cd "$(dirname "$0")/../.." && pwd)

major_of() { sed -n 's/^#define QKD_VERSION_MAJOR \([0-9]*\).*/\1/p' "$1/include/qkd/version.h"; }
major=$(major_of "$src")

# fail MESSAGE: an error, or only a warning while the major version is 0.
fail() {
    if [ "$major" = 0 ]; then
        echo "abidiff: WARNING (major version 0, not enforced): $1"
        exit 0
    fi
    echo "abidiff: FAILED: $1"
    exit 1
}

command -v abidiff >/dev/null || fail "abidiff not found (apt-get install abigail-tools)"
tag=${2:-$(git -C "$src" describe --tags --abbrev=0 --match 'v[0-9]*.[0-9]*.[0-9]*' 2>/dev/null)}
if [ -z "$tag" ]; then
    echo "abidiff: no release tag (vMAJOR.MINOR.PATCH) yet: nothing to compare against"
    exit 0
fi

new_lib=$(readlink -f "$build/lib/libqkd.so")
[ -f "$new_lib" ] || fail "no built library at $build/lib/libqkd.so"

# The release's library, built from its own tree with the same options.
old=$(mktemp -d)
trap 'rm -rf "$old"' EXIT
mkdir "$old/src"
git -C "$src" archive "$tag" | tar -x -C "$old/src" || fail "cannot check out $tag"
{ meson setup "$old/build" "$old/src" --buildtype=debugoptimized &&
  meson compile -C "$old/build" lib/qkd:shared_library; } >"$old/build.log" 2>&1 ||
    { tail -n 20 "$old/build.log"; fail "cannot build $tag"; }
old_lib=$(readlink -f "$old/build/lib/libqkd.so")
old_major=$(major_of "$old/src")

echo "abidiff: libqkd $tag ($(basename "$old_lib")) -> this tree ($(basename "$new_lib"))," \
     "public headers only"
# Changes reviewed as allowed (docs/abi-policy.md) are suppressed here.
suppressions=()
[ -f "$src/tests/abi/abidiff.suppr" ] &&
    suppressions=(--suppressions "$src/tests/abi/abidiff.suppr")
report=$(abidiff "${suppressions[@]}" --headers-dir1 "$old/src/include/qkd" \
                 --headers-dir2 "$src/include/qkd" "$old_lib" "$new_lib" 2>&1)
rc=$?
echo "$report"
# abidiff's status bits: 1 error, 2 usage error, 4 ABI change, 8 incompatible
# change. Added functions alone are allowed; a removed or changed function
# or variable (a struct it reaches changed layout) is not, unless suppressed.
if (( rc & 3 )); then
    fail "abidiff could not compare the libraries (status $rc)"
elif (( rc & 12 )) && grep 'changes summary' <<<"$report" |
        grep -qE '(: |, )[1-9][0-9]* (Removed|Changed)'; then
    if [ "$major" != "$old_major" ]; then
        echo "abidiff: ABI changes since $tag, with the major version bumped ($old_major -> $major)"
        exit 0
    fi
    fail "ABI changes since $tag beyond added functions (above): see docs/abi-policy.md"
elif (( rc & 4 )); then
    echo "abidiff: only added functions since $tag"
else
    echo "abidiff: no ABI change since $tag"
fi
