#!/usr/bin/env bash
# libqkd's KD-QAT step against PyTorch on the same CPU, in one command:
# builds bench-train (release) in build-bench/, then runs, one after the
# other, `bench-train --only MODEL/kdqat` (SIMD next to the reference
# backend) and benchmarks/torch_kdqat_cpu.py at the same shape, bits,
# group and loss. Both use every core.
#
#   benchmarks/kdqat_vs_torch.sh [MODEL] [--no-ref]   (MODEL: 15M or stories260K)
#
# Without libuv, jansson and check installed, it takes them from Debian
# packages in .debs/ (apt-get download libuv1 libuv1-dev libjansson4
# libjansson-dev check libsubunit0 libsubunit-dev), unpacked into
# .prefix/bench/.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-15M}
ref_flag=""
[ "${2:-}" = "--no-ref" ] && ref_flag="--simd-only"

. benchmarks/debs_prefix.sh
debs_prefix bench
if [ ! -d build-bench ]; then
    meson setup build-bench -Dbuildtype=release >/dev/null 2>&1 ||
        { tail -20 build-bench/meson-logs/meson-log.txt; exit 1; }
fi
ninja -C build-bench benchmarks/bench-train >/dev/null || { echo "build failed"; exit 1; }

echo "== libqkd (every core: $(nproc))"
build-bench/benchmarks/bench-train --only "$model/kdqat" $ref_flag
echo "== PyTorch $(python3 -c 'import torch; print(torch.__version__)') on the CPU"
python3 benchmarks/torch_kdqat_cpu.py --cfg "$model" --batch 4 --seq 256 --bits 4 --group 32
