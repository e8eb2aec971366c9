/* Backend registry: picks and checks a backend table for a context. */
#include "backend/backend.h"
#ifdef QKD_HAVE_SIMD
#include "backend/simd/simd.h"
#endif
#ifdef QKD_HAVE_CUDA
#include "backend/cuda/cuda.h"
#endif

qkd_status qkd__backend_create(qkd_context *ctx, qkd_backend_kind kind, qkd__backend **out)
{
    *out = NULL;
    qkd__backend *b = NULL;
    qkd_status st;
    switch (kind) {
#ifdef QKD_HAVE_SIMD
    /* SIMD keeps the reference kernels in the slots its CPU cannot speed
     * up, so it is the best choice whenever it is built in. */
    case QKD_BACKEND_AUTO:
    case QKD_BACKEND_SIMD:
        st = qkd__backend_simd_create(ctx, &b);
        break;
#else
    case QKD_BACKEND_SIMD:
        return qkd__error(ctx, QKD_ERR_UNSUPPORTED,
                          "the SIMD backend is not built into this libqkd (configure with "
                          "-Dsimd=enabled on x86-64 or aarch64)");
    case QKD_BACKEND_AUTO:
#endif
    case QKD_BACKEND_REF:
        st = qkd__backend_ref_create(ctx, &b);
        break;
    /* CUDA only when asked for: AUTO stays on the CPU, so a host that
     * links a CUDA build never finds its work on a (maybe shared) GPU it
     * did not choose. */
    case QKD_BACKEND_CUDA:
#ifdef QKD_HAVE_CUDA
        st = qkd__backend_cuda_create(ctx, &b);
        break;
#else
        return qkd__error(ctx, QKD_ERR_UNSUPPORTED,
                          "the CUDA backend is not built into this libqkd "
                          "(configure with -Dcuda=enabled where nvcc is found)");
#endif
    default:
        return qkd__error(ctx, QKD_ERR_UNSUPPORTED,
                          "backend %d is not built into this libqkd", (int)kind);
    }
    if (st != QKD_OK)
        return st;
    if (b->abi != QKD__BACKEND_ABI) {
        unsigned abi = b->abi;
        qkd__backend_free(b);
        return qkd__error(ctx, QKD_ERR_VERSION, "backend table ABI %u, expected %u", abi,
                          (unsigned)QKD__BACKEND_ABI);
    }
    *out = b;
    return QKD_OK;
}

void qkd__backend_free(qkd__backend *b)
{
    if (b)
        b->destroy(b);
}
