/* The SIMD kernels compiled for NEON (AArch64 Advanced SIMD), which every
 * AArch64 CPU has. Every kernel of table.inc compiles through vec.h, so
 * none falls back to the reference code here. */
#include <float.h>
#include <math.h>

#include "backend/ref/ref.h"
#include "backend/simd/simd.h"
#include "qkd/loss.h"
#include "qkd/quant.h"

#define QKD_SIMD_ISA QKD__SIMD_NEON
#include "backend/simd/vec.h"

#include "backend/simd/gemm.inc"
#include "backend/simd/rows.inc"
#include "backend/simd/attention.inc"
#include "backend/simd/optim.inc"
#include "backend/simd/kd.inc"
#include "backend/simd/quant.inc"
#include "backend/simd/table.inc"

void qkd__simd_install_neon(qkd__backend *b)
{
    install(b);
}
