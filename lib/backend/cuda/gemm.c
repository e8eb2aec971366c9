/* The bf16 products: cuBLASLt, with each shape's algorithm chosen by
 * timing at its first use.
 *
 * cuBLAS's default choice for a shape is its heuristic's first candidate;
 * at the KD-QAT step's shapes another candidate of the same heuristic
 * list is often faster (up to 1.19x on one product timed alone; the whole
 * step gains 1 to 1.5%: docs/benchmarks.md, "cuBLASLt plans"). So the
 * first product of a shape asks the heuristic for its candidates, times
 * them on the product's own operands, and keeps the fastest in a plan
 * that every later product of that shape reuses.
 *
 * Bits do not depend on that timing: only candidates that sum each element
 * in the first candidate's order are timed: the same algorithm, split of k
 * and reduction of the split parts, whatever their tiles. On an H100 every
 * candidate of the first one's split gave its bits and every other split
 * other bits; the suite's gemm_candidates_agree checks it on the GPU at
 * hand. So a resumed run still reaches the weights of an uninterrupted one
 * bit for bit.
 *
 * A product below TUNE_MIN_MACS takes the first candidate untimed: timing
 * costs a stream synchronize, and such a product is launch-bound anyway.
 * The plan table is a ring of QKD__CUDA_GEMM_PLANS entries: a host that
 * keeps making new shapes replaces the oldest plans, so it grows no memory. */
#include <math.h>
#include <string.h>

#include "backend/cuda/cuda.h"

/* cuBLASLt's workspace: split-K candidates of the shapes take up to 18 MiB */
#define GEMM_WS_BYTES ((size_t)32 << 20)
#define CANDIDATES 8                     /* asked of the heuristic */
#define TUNE_MIN_MACS ((double)(1 << 24))
#define TUNE_REPS 10

qkd_status qkd__cuda_gemm_setup(qkd__backend *b)
{
    qkd__cuda *c = qkd__cuda_of(b);
    qkd_status st = qkd__cuda_check_blas(b, cublasLtCreate(&c->lt), "cublasLtCreate");
    if (st == QKD_OK && cudaMalloc(&c->lt_ws, GEMM_WS_BYTES) != cudaSuccess) {
        cudaGetLastError();
        c->lt_ws = NULL;
        st = qkd__error(b->ctx, QKD_ERR_NO_MEMORY,
                        "cuda backend: out of device memory for the cuBLASLt workspace");
    }
    return st;
}

static void plan_clear(qkd__cuda_gemm_plan *p)
{
    if (p->op)
        cublasLtMatmulDescDestroy(p->op);
    if (p->la)
        cublasLtMatrixLayoutDestroy(p->la);
    if (p->lb)
        cublasLtMatrixLayoutDestroy(p->lb);
    if (p->lc)
        cublasLtMatrixLayoutDestroy(p->lc);
    memset(p, 0, sizeof *p);
}

void qkd__cuda_gemm_teardown(qkd__cuda *c)
{
    for (int i = 0; i < QKD__CUDA_GEMM_PLANS; i++)
        plan_clear(&c->plans[i]);
    cudaFree(c->lt_ws);
    if (c->lt)
        cublasLtDestroy(c->lt);
}

/* The largest power of two up to 16 that divides the address: what the
 * heuristic may assume of it. 16 bytes is all a tensor-core kernel needs
 * (PyTorch caps it there too); more would split one shape into several
 * plans by where the arena happened to place its buffers. */
static unsigned alignment(const void *p)
{
    const uintptr_t a = (uintptr_t)p | 16;
    return (unsigned)(a & -a);
}

static bool same_key(const qkd__cuda_gemm_plan *p, const qkd__cuda_gemm *g,
                     const unsigned align[3])
{
    return p->op && p->g.ta == g->ta && p->g.tb == g->tb && p->g.m == g->m && p->g.n == g->n &&
           p->g.k == g->k && p->g.lda == g->lda && p->g.ldb == g->ldb && p->g.ldc == g->ldc &&
           (p->g.beta != 0.0f) == (g->beta != 0.0f) && p->g.c16 == g->c16 &&
           !memcmp(p->align, align, sizeof p->align);
}

/* The product's descriptors: column-major A (m x k, or k x m transposed),
 * B (k x n, or n x k), C (m x n, fp32 or bf16), fp32 accumulation. */
static cublasStatus_t describe(qkd__cuda_gemm_plan *p)
{
    const qkd__cuda_gemm *g = &p->g;
    const bool an = g->ta == CUBLAS_OP_N, bn = g->tb == CUBLAS_OP_N;
    cublasStatus_t st = cublasLtMatmulDescCreate(&p->op, CUBLAS_COMPUTE_32F, CUDA_R_32F);
    if (st == CUBLAS_STATUS_SUCCESS)
        st = cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSA, &g->ta,
                                            sizeof g->ta);
    if (st == CUBLAS_STATUS_SUCCESS)
        st = cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSB, &g->tb,
                                            sizeof g->tb);
    if (st == CUBLAS_STATUS_SUCCESS)
        st = cublasLtMatrixLayoutCreate(&p->la, CUDA_R_16BF, an ? g->m : g->k, an ? g->k : g->m,
                                        g->lda);
    if (st == CUBLAS_STATUS_SUCCESS)
        st = cublasLtMatrixLayoutCreate(&p->lb, CUDA_R_16BF, bn ? g->k : g->n, bn ? g->n : g->k,
                                        g->ldb);
    if (st == CUBLAS_STATUS_SUCCESS)
        st = cublasLtMatrixLayoutCreate(&p->lc, g->c16 ? CUDA_R_16BF : CUDA_R_32F, g->m, g->n,
                                        g->ldc);
    return st;
}

static int algo_attr(const cublasLtMatmulAlgo_t *algo, cublasLtMatmulAlgoConfigAttributes_t at)
{
    int v = 0;
    size_t got;
    cublasLtMatmulAlgoConfigGetAttribute(algo, at, &v, sizeof v, &got);
    return v;
}

/* Whether a and b sum each element in the same order: the same algorithm,
 * split of k and reduction of the split parts (the tile may differ). */
static bool same_sum_order(const cublasLtMatmulAlgo_t *a, const cublasLtMatmulAlgo_t *b)
{
    static const cublasLtMatmulAlgoConfigAttributes_t order[3] = {
        CUBLASLT_ALGO_CONFIG_ID, CUBLASLT_ALGO_CONFIG_SPLITK_NUM,
        CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME};
    for (int i = 0; i < 3; i++)
        if (algo_attr(a, order[i]) != algo_attr(b, order[i]))
            return false;
    return true;
}

/* p's descriptors (for p->g and p->align), then the heuristic's
 * candidates that sum as its first one does, into algos (at most
 * CANDIDATES); their count, 0 when it has none or *st failed. */
static int candidates(qkd__cuda *c, qkd__cuda_gemm_plan *p, cublasLtMatmulAlgo_t *algos,
                      cublasStatus_t *st)
{
    *st = describe(p);
    if (*st != CUBLAS_STATUS_SUCCESS)
        return 0;
    cublasLtMatmulPreference_t pref = NULL;
    const size_t ws = GEMM_WS_BYTES;
    static const cublasLtMatmulPreferenceAttributes_t align_attr[4] = {
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
    *st = cublasLtMatmulPreferenceCreate(&pref);
    if (*st == CUBLAS_STATUS_SUCCESS)
        *st = cublasLtMatmulPreferenceSetAttribute(
            pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
    /* a bf16 C sums split parts in fp32: reduced in C's type (in place, or
     * through a bf16 workspace), each part would be rounded to bf16 */
    const uint32_t reduce = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
    if (*st == CUBLAS_STATUS_SUCCESS && p->g.c16)
        *st = cublasLtMatmulPreferenceSetAttribute(
            pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &reduce, sizeof reduce);
    for (int i = 0; i < 4 && *st == CUBLAS_STATUS_SUCCESS; i++) /* D is C */
        *st = cublasLtMatmulPreferenceSetAttribute(pref, align_attr[i], &p->align[i < 3 ? i : 2],
                                                   sizeof p->align[0]);
    cublasLtMatmulHeuristicResult_t res[CANDIDATES];
    int n_res = 0;
    if (*st == CUBLAS_STATUS_SUCCESS)
        *st = cublasLtMatmulAlgoGetHeuristic(c->lt, p->op, p->la, p->lb, p->lc, p->lc, pref,
                                             CANDIDATES, res, &n_res);
    if (pref)
        cublasLtMatmulPreferenceDestroy(pref);
    int n = 0;
    for (int i = 0; *st == CUBLAS_STATUS_SUCCESS && i < n_res; i++)
        if (res[i].state == CUBLAS_STATUS_SUCCESS && same_sum_order(&res[i].algo, &res[0].algo))
            algos[n++] = res[i].algo;
    return n;
}

static cublasStatus_t run_algo(qkd__cuda *c, const qkd__cuda_gemm_plan *p,
                               const cublasLtMatmulAlgo_t *algo, const uint16_t *A,
                               const uint16_t *B, float beta, void *C)
{
    const float one = 1.0f;
    return cublasLtMatmul(c->lt, p->op, &one, A, p->la, B, p->lb, &beta, C, p->lc, C, p->lc,
                          algo, c->lt_ws, GEMM_WS_BYTES, c->stream);
}

/* Milliseconds of TUNE_REPS runs of algo after one untimed, writing out;
 * INFINITY when it fails. */
static float time_algo(qkd__cuda *c, const qkd__cuda_gemm_plan *p,
                       const cublasLtMatmulAlgo_t *algo, const uint16_t *A, const uint16_t *B,
                       void *out, cudaEvent_t ev[2])
{
    bool ok = run_algo(c, p, algo, A, B, p->g.beta, out) == CUBLAS_STATUS_SUCCESS;
    ok = ok && cudaEventRecord(ev[0], c->stream) == cudaSuccess;
    for (int r = 0; ok && r < TUNE_REPS; r++)
        ok = run_algo(c, p, algo, A, B, p->g.beta, out) == CUBLAS_STATUS_SUCCESS;
    ok = ok && cudaEventRecord(ev[1], c->stream) == cudaSuccess &&
         cudaEventSynchronize(ev[1]) == cudaSuccess;
    float ms = INFINITY;
    if (!ok || cudaEventElapsedTime(&ms, ev[0], ev[1]) != cudaSuccess)
        ms = INFINITY;
    cudaGetLastError(); /* a candidate that failed leaves no error behind */
    return ms;
}

/* The fastest of algos[0..n) on the product's operands. Timing writes C
 * over and over: harmless when beta is 0 (the product then overwrites
 * it), so the runs write C itself; a product that adds to C is timed
 * writing a scratch output instead (its contents do not matter), or not
 * at all when there is no memory for one. The scratch is allocated here,
 * once a shape: the backend's workspace may hold the operands' bf16
 * copies. */
static int fastest(qkd__cuda *c, const qkd__cuda_gemm_plan *p,
                   const cublasLtMatmulAlgo_t *algos, int n, const uint16_t *A,
                   const uint16_t *B, void *C)
{
    void *out = C, *scratch = NULL;
    if (p->g.beta != 0.0f) {
        if (cudaMalloc(&scratch, qkd__cuda_gemm_c_bytes(&p->g)) != cudaSuccess) {
            cudaGetLastError();
            return 0;
        }
        out = scratch;
    }
    cudaEvent_t ev[2] = {NULL, NULL};
    int best = 0;
    if (cudaEventCreate(&ev[0]) == cudaSuccess && cudaEventCreate(&ev[1]) == cudaSuccess) {
        float best_ms = INFINITY;
        for (int i = 0; i < n; i++) {
            const float ms = time_algo(c, p, &algos[i], A, B, out, ev);
            if (ms < best_ms) {
                best_ms = ms;
                best = i;
            }
        }
    }
    for (int i = 0; i < 2; i++)
        if (ev[i])
            cudaEventDestroy(ev[i]);
    cudaFree(scratch);
    cudaGetLastError();
    return best;
}

/* Plan g's product in the ring's next slot, timing its candidates when
 * it is large enough; NULL (recorded) when cuBLASLt has none. */
static qkd__cuda_gemm_plan *make_plan(qkd__backend *b, const qkd__cuda_gemm *g,
                                      const unsigned align[3], const uint16_t *A,
                                      const uint16_t *B, void *C, const char *what)
{
    qkd__cuda *c = qkd__cuda_of(b);
    qkd__cuda_gemm_plan *p = &c->plans[c->next_plan];
    plan_clear(p);
    p->g = *g;
    memcpy(p->align, align, sizeof p->align);
    cublasLtMatmulAlgo_t algos[CANDIDATES];
    cublasStatus_t st;
    const int n = candidates(c, p, algos, &st);
    if (st == CUBLAS_STATUS_SUCCESS && n == 0)
        st = CUBLAS_STATUS_NOT_SUPPORTED;
    if (st != CUBLAS_STATUS_SUCCESS) {
        plan_clear(p);
        qkd__cuda_check_blas(b, st, what);
        return NULL;
    }
    const bool tune = n > 1 && (double)g->m * g->n * g->k >= TUNE_MIN_MACS;
    p->algo = algos[tune ? fastest(c, p, algos, n, A, B, C) : 0];
    c->next_plan = (c->next_plan + 1) % QKD__CUDA_GEMM_PLANS;
    return p;
}

size_t qkd__cuda_gemm_c_bytes(const qkd__cuda_gemm *g)
{
    return ((size_t)g->ldc * (g->n - 1) + g->m) * (g->c16 ? sizeof(uint16_t) : sizeof(float));
}

void qkd__cuda_gemm_bf16(qkd__backend *b, const qkd__cuda_gemm *g, const uint16_t *A,
                         const uint16_t *B, void *C, const char *what)
{
    qkd__cuda *c = qkd__cuda_of(b);
    if (c->status != QKD_OK)
        return;
    const unsigned align[3] = {alignment(A), alignment(B), alignment(C)};
    qkd__cuda_gemm_plan *p = NULL;
    for (int i = 0; i < QKD__CUDA_GEMM_PLANS && !p; i++)
        if (same_key(&c->plans[i], g, align))
            p = &c->plans[i];
    if (!p)
        p = make_plan(b, g, align, A, B, C, what);
    if (p)
        qkd__cuda_check_blas(b, run_algo(c, p, &p->algo, A, B, g->beta, C), what);
}

int qkd__cuda_gemm_bf16_candidate(qkd__backend *b, const qkd__cuda_gemm *g, int i,
                                  const uint16_t *A, const uint16_t *B, void *C)
{
    qkd__cuda *c = qkd__cuda_of(b);
    qkd__cuda_gemm_plan p = {.g = *g,
                             .align = {alignment(A), alignment(B), alignment(C)}};
    cublasLtMatmulAlgo_t algos[CANDIDATES];
    cublasStatus_t st;
    const int n = candidates(c, &p, algos, &st);
    if (i < n)
        qkd__cuda_check_blas(b, run_algo(c, &p, &algos[i], A, B, g->beta, C),
                             "gemm candidate");
    plan_clear(&p);
    return n;
}
