/* The SIMD kernels compiled for AVX-512 (F, BW, VL, DQ) with FMA and
 * AVX512_BF16: the AVX-512 kernels, with the bf16 products on VDPBF16PS. */
#include <float.h>
#include <math.h>
#include <string.h>

#include "backend/ref/ref.h"
#include "backend/simd/simd.h"
#include "qkd/loss.h"
#include "qkd/quant.h"

#define QKD_SIMD_ISA QKD__SIMD_AVX512BF16
#include "backend/simd/vec.h"

#include "backend/simd/gemm.inc"
#include "backend/simd/rows.inc"
#include "backend/simd/attention.inc"
#include "backend/simd/optim.inc"
#include "backend/simd/kd.inc"
#include "backend/simd/quant.inc"
#include "backend/simd/table.inc"

void qkd__simd_install_avx512bf16(qkd__backend *b)
{
    install(b);
}

#ifdef __clang__
#pragma clang attribute pop
#endif
