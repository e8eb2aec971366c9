#!/usr/bin/env bash
# Two versions of libqkd's CUDA KD-QAT step on this machine's GPU, in one
# command, so that the machine's noise falls on both alike: this tree
# ("n") and another source tree ("b", usually HEAD before a change), each
# built in its own build-cuda/ (release, -Dcuda=enabled), then
# cuda-kdqat's step run for each shape in the order given, with one more
# step timed part by part (--phases 1, on stderr).
#
#   benchmarks/cuda_kdqat_ab.sh BASE_TREE "CFG BATCH GROUP ORDER"...
#       e.g. git archive --prefix=base/ HEAD | tar -x -C /tmp, then
#       benchmarks/cuda_kdqat_ab.sh /tmp/base "tinyllama1b 4 128 bnbn"
#       (ORDER: b and n in turn; sequences of 1024 tokens)
#
# Environment: SUITE=1 (first the backend_cuda test suite on this tree),
# STEPS (timed steps a run, default 5). Without libuv, jansson and check,
# it takes them from the Debian packages in .debs/ (benchmarks/debs_prefix.sh).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
if [ $# -lt 2 ] || [ ! -d "$1" ]; then
    sed -n '9,12p' "$0"
    exit 2
fi
base=$(realpath "$1")
shift
. benchmarks/debs_prefix.sh
debs_prefix cuda
cuda_lib=$(dirname "$(dirname "$(command -v nvcc)")")/lib64
export LD_LIBRARY_PATH=$cuda_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

# build-cuda/ of tree $1 with targets $2..: setup once, then ninja
build() {
    local tree=$1
    shift
    { [ -d "$tree/build-cuda" ] ||
          meson setup "$tree/build-cuda" "$tree" -Dbuildtype=release -Dcuda=enabled >/dev/null; } &&
        ninja -C "$tree/build-cuda" "$@" >/dev/null
}
build "$base" benchmarks/cuda-kdqat & base_job=$!
build "$PWD" benchmarks/cuda-kdqat ${SUITE:+tests/qkd-tests} || { echo "this tree: build failed"; exit 1; }
wait $base_job || { echo "$base: build failed"; exit 1; }

status=0
if [ -n "${SUITE:-}" ]; then
    env QKD_SOURCE="$PWD" QKD_SHARED="$(realpath "${QKD_SHARED:-../shared}")" \
        CK_RUN_SUITE=backend_cuda CK_DEFAULT_TIMEOUT=600 build-cuda/tests/qkd-tests || status=1
fi
for spec in "$@"; do
    read -r cfg batch group order <<<"$spec"
    for ((i = 0; i < ${#order}; i++)); do
        case ${order:i:1} in
        b) bin=$base/build-cuda/benchmarks/cuda-kdqat ;;
        n) bin=build-cuda/benchmarks/cuda-kdqat ;;
        *) echo "unknown version ${order:i:1} (b or n)"; exit 2 ;;
        esac
        echo "== ${order:i:1} $cfg"
        "$bin" --cfg "$cfg" --batch "$batch" --seq 1024 --group "$group" --steps "${STEPS:-5}" \
            --phases 1 || status=1
    done
done
exit $status
