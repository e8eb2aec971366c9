#!/usr/bin/env bash
# libqkd's CUDA backend on this machine's GPU, in one command: builds
# build-cuda/ (release, -Dcuda=enabled), runs the backend_cuda test suite,
# then the KD-QAT step of cuda-kdqat next to torch_kdqat.py (eager, then
# --compile) at the same shape, bits and group, one after the other.
#
#   benchmarks/cuda_kdqat_vs_torch.sh [CFG [BATCH [SEQ [GROUP]]]]
#       (default: smollm135m 16 1024 64, the shape of docs/benchmarks.md)
#
# Environment: QKD_SHARED (default ../shared: stories260K for the tests,
# bench/torch_kdqat.py), TORCH_KDQAT (another torch_kdqat.py), STEPS
# (timed steps of each side, default 5), DTYPE (libqkd's matmul precision,
# bf16 (default, as PyTorch runs) or fp32), PHASES=1 (cuda-kdqat --phases 1:
# one more step timed part by part, on stderr), ATTN=1 (first the bf16
# attention slots alone, cuda-kdqat-attn, then PyTorch's SDPA alone at the same
# shapes, benchmarks/torch_sdpa.py), SKIP_TESTS=1, SKIP_BENCH=1,
# SKIP_EAGER=1, SKIP_COMPILE=1. Without libuv, jansson and check (or
# pkg-config) installed, it takes them from the Debian packages in .debs/
# (apt-get download libuv1 libuv1-dev libjansson4 libjansson-dev check
# libsubunit0 libsubunit-dev pkgconf pkgconf-bin libpkgconf3), unpacked
# into .prefix/cuda/.
set -uo pipefail
cd "$(dirname "$0")/.."
cfg=${1:-smollm135m} batch=${2:-16} seq=${3:-1024} group=${4:-64}
shared=$(realpath "${QKD_SHARED:-../shared}")
torch_kdqat=${TORCH_KDQAT:-$shared/bench/torch_kdqat.py}
steps=${STEPS:-5}
dtype=${DTYPE:-bf16}
build=build-cuda

. benchmarks/debs_prefix.sh
debs_prefix cuda
cuda_lib=$(dirname "$(dirname "$(command -v nvcc)")")/lib64
export LD_LIBRARY_PATH=$cuda_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

echo "== $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
echo "== nvcc $(nvcc --version | grep -o 'release [0-9.]*'), meson $(meson --version)"
[ -d $build ] || meson setup $build -Dbuildtype=release -Dcuda=enabled >$build.setup.log 2>&1 ||
    { cat $build.setup.log; exit 1; }
ninja -C $build lib/libqkd_internal.a benchmarks/cuda-kdqat benchmarks/cuda-kdqat-attn \
    >/dev/null || exit 1

status=0
if [ -z "${SKIP_TESTS:-}" ]; then
    echo "== tests: suite backend_cuda"
    runner=$build/tests/qkd-tests
    if ! ninja -C $build tests/qkd-tests >/dev/null 2>&1; then
        # Another suite of the full test binary does not build: the CUDA
        # suite alone, against the same library.
        runner=$build/backend-cuda-tests
        printf '%s\n' '#include "testutil.h"' 'int main(void) {' \
            '    SRunner *sr = srunner_create(suite_backend_cuda());' \
            '    srunner_run_all(sr, CK_NORMAL);' \
            '    int failed = srunner_ntests_failed(sr);' \
            '    srunner_free(sr);' '    return failed != 0;' '}' >$build/backend_cuda_main.c
        cc -O2 -std=c11 -D_GNU_SOURCE -DQKD_HAVE_CUDA=1 -Iinclude -Ilib -Itests \
            -I"$(dirname "$cuda_lib")/include" \
            $build/backend_cuda_main.c tests/test_backend_cuda.c tests/testutil.c \
            $build/lib/libqkd_internal.a $(pkg-config --cflags --libs check libuv jansson) \
            -L"$cuda_lib" -lcudart -lcublas -lcublasLt -lstdc++ -lm -o $runner || exit 1
    fi
    QKD_SOURCE=$PWD QKD_SHARED=$shared CK_RUN_SUITE=backend_cuda CK_DEFAULT_TIMEOUT=600 \
        timeout 400 $runner || status=1
fi
if [ -n "${ATTN:-}" ]; then
    echo "== libqkd bf16 attention slots alone"
    timeout 120 $build/benchmarks/cuda-kdqat-attn || status=1
    echo "== PyTorch scaled_dot_product_attention alone"
    PYTHONUNBUFFERED=1 timeout 120 python3 benchmarks/torch_sdpa.py || status=1
fi
if [ -z "${SKIP_BENCH:-}" ]; then
    echo "== libqkd CUDA backend ($cfg, batch $batch x $seq, 4-bit groups of $group, $dtype)"
    timeout 300 $build/benchmarks/cuda-kdqat --cfg "$cfg" --batch "$batch" --seq "$seq" \
        --group "$group" --steps "$steps" --dtype "$dtype" ${PHASES:+--phases 1} || status=1
fi
torch_args=(--cfg "$cfg" --batch "$batch" --seq "$seq" --group "$group" --steps "$steps")
if [ -z "${SKIP_EAGER:-}" ]; then
    echo "== PyTorch $(python3 -c 'import torch; print(torch.__version__)') eager"
    PYTHONUNBUFFERED=1 timeout 300 python3 "$torch_kdqat" "${torch_args[@]}" || status=1
fi
if [ -z "${SKIP_COMPILE:-}" ]; then
    echo "== PyTorch torch.compile"
    PYTHONUNBUFFERED=1 timeout 480 python3 "$torch_kdqat" "${torch_args[@]}" --compile ||
        status=1
fi
exit $status
