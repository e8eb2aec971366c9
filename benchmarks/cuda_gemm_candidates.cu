/* The bf16 products of the KD-QAT step (both models of docs/benchmarks.md,
 * every linear shape: forward, input gradient, weight gradient) timed with
 * cublasGemmEx's default choice and with each of the first 8 candidates
 * of cuBLASLt's heuristic, on random bf16 operands, fp32 C. Then, and
 * alone with --fused, the products of q, k and v and of gate and up apart
 * against one product of each group's weights stacked (ms a layer; q, k
 * and v's forward also with a bf16 output, the form they would take
 * written in bf16, which the step's total leaves out). For each
 * candidate: its algorithm, tile, stages, split of k, reduction scheme,
 * workspace, milliseconds (mean of 20 runs after 3), and whether its
 * output equals candidate 0's bit for bit (first 2^20 elements). Per
 * shape: the default, the best candidate and the gain; per model: the
 * step's product time (each shape times its count a step) with the
 * default and with the best of each shape. This is the measurement behind
 * lib/backend/cuda/gemm.c's choice (docs/benchmarks.md, "cuBLASLt plans").
 * Built by meson next to cuda-kdqat (nvcc links it to cuBLAS and
 * cuBLASLt); run: build/benchmarks/cuda-gemm-candidates. */
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <vector>

/* Any CUDA or cuBLAS failure ends the benchmark, naming the line. */
#define CK(x)                                                                           \
    do {                                                                                \
        auto e_ = (x);                                                                  \
        if ((int)e_) {                                                                  \
            printf("error %d at %s:%d\n", (int)e_, __FILE__, __LINE__);                 \
            exit(1);                                                                    \
        }                                                                               \
    } while (0)

/* bf16 bits of hashed values in [-0.05, 0.05). */
__global__ void fill(uint16_t *x, size_t n, unsigned seed)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        unsigned h = (unsigned)(i * 2654435761u) ^ (seed * 40503u);
        h ^= h >> 13;
        h *= 0x5bd1e995;
        h ^= h >> 15;
        const float f = ((h & 0xffff) / 65536.0f - 0.5f) * 0.1f;
        x[i] = (uint16_t)(__float_as_uint(f) >> 16);
    }
}

struct shape {
    const char *what;
    cublasOperation_t ta, tb;
    int m, n, k;
    float beta;
    int count; /* products of this shape a step */
    bool c16;  /* C in bf16 (else fp32) */
};

/* Mean milliseconds of reps runs of fn after 3 untimed. */
template <typename F> static float time_it(cudaStream_t s, int reps, F fn)
{
    cudaEvent_t a, b;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    for (int i = 0; i < 3; i++)
        fn();
    cudaEventRecord(a, s);
    for (int i = 0; i < reps; i++)
        fn();
    cudaEventRecord(b, s);
    cudaEventSynchronize(b);
    float ms;
    cudaEventElapsedTime(&ms, a, b);
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    return ms / reps;
}

static int algo_attr(const cublasLtMatmulAlgo_t *algo, cublasLtMatmulAlgoConfigAttributes_t at)
{
    int v = 0;
    size_t got;
    cublasLtMatmulAlgoConfigGetAttribute(algo, at, &v, sizeof v, &got);
    return v;
}

/* What one shape's timing needs: operands, C, the reference C, the workspace. */
struct bench {
    cublasHandle_t h;
    cublasLtHandle_t lt;
    cudaStream_t s;
    void *A, *B, *C, *Cref, *ws;
    size_t ws_bytes;
};

struct timing {
    float t_default; /* cublasGemmEx's default */
    float first;     /* cuBLASLt's first candidate */
    float same;      /* the fastest candidate of the first one's split (gemm.c's plan) */
    float best;      /* the fastest of any candidate */
};

/* x timed as cublasGemmEx's default and as each of the first 8 candidates
 * of cuBLASLt's heuristic (a bf16 C asks for split parts reduced in fp32,
 * as gemm.c does); each candidate printed when verbose. */
static timing measure(const bench &b, const shape &x, bool verbose)
{
    const int lda = x.ta == CUBLAS_OP_N ? x.m : x.k, ldb = x.tb == CUBLAS_OP_N ? x.k : x.n;
    const int ldc = x.m, reps = 20;
    const float one = 1.f, zero = 0.f, beta = x.beta;
    const cudaDataType_t ct = x.c16 ? CUDA_R_16BF : CUDA_R_32F;
    const size_t esize = x.c16 ? 2 : 4;
    timing r;
    r.t_default = time_it(b.s, reps, [&] {
        cublasGemmEx(b.h, x.ta, x.tb, x.m, x.n, x.k, &one, b.A, CUDA_R_16BF, lda, b.B,
                     CUDA_R_16BF, ldb, &beta, b.C, ct, ldc, CUBLAS_COMPUTE_32F,
                     CUBLAS_GEMM_DEFAULT);
    });
    cublasLtMatmulDesc_t op;
    CK(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    CK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &x.ta, sizeof x.ta));
    CK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &x.tb, sizeof x.tb));
    cublasLtMatrixLayout_t la, lb, lc;
    CK(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, x.ta == CUBLAS_OP_N ? x.m : x.k,
                                  x.ta == CUBLAS_OP_N ? x.k : x.m, lda));
    CK(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, x.tb == CUBLAS_OP_N ? x.k : x.n,
                                  x.tb == CUBLAS_OP_N ? x.n : x.k, ldb));
    CK(cublasLtMatrixLayoutCreate(&lc, ct, x.m, x.n, ldc));
    cublasLtMatmulPreference_t pref;
    CK(cublasLtMatmulPreferenceCreate(&pref));
    CK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                            &b.ws_bytes, sizeof b.ws_bytes));
    const uint32_t reduce = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
    if (x.c16)
        CK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                                                &reduce, sizeof reduce));
    cublasLtMatmulHeuristicResult_t res[8];
    int n_res = 0;
    CK(cublasLtMatmulAlgoGetHeuristic(b.lt, op, la, lb, lc, lc, pref, 8, res, &n_res));
    r.first = r.same = r.best = 1e30f;
    const size_t n_cmp = std::min((size_t)x.m * x.n, (size_t)1 << 20);
    std::vector<unsigned char> h_ref(n_cmp * esize), h_got(n_cmp * esize);
    for (int i = 0; i < n_res; i++) {
        void *out = i == 0 ? b.Cref : b.C;
        cublasLtMatmul(b.lt, op, &one, b.A, la, b.B, lb, &zero, out, lc, out, lc, &res[i].algo,
                       b.ws, b.ws_bytes, b.s);
        CK(cudaStreamSynchronize(b.s));
        int same = 1;
        if (i > 0) {
            CK(cudaMemcpy(h_ref.data(), b.Cref, n_cmp * esize, cudaMemcpyDeviceToHost));
            CK(cudaMemcpy(h_got.data(), b.C, n_cmp * esize, cudaMemcpyDeviceToHost));
            same = memcmp(h_ref.data(), h_got.data(), n_cmp * esize) == 0;
        }
        const float t = time_it(b.s, reps, [&] {
            cublasLtMatmul(b.lt, op, &one, b.A, la, b.B, lb, &beta, b.C, lc, b.C, lc,
                           &res[i].algo, b.ws, b.ws_bytes, b.s);
        });
        const int split = algo_attr(&res[i].algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM);
        if (verbose)
            printf("    cand %d: algo %d tile %d stages %d splitk %d red %d ws %zu  %.4f ms  "
                   "same-bits-as-0 %d\n",
                   i, algo_attr(&res[i].algo, CUBLASLT_ALGO_CONFIG_ID),
                   algo_attr(&res[i].algo, CUBLASLT_ALGO_CONFIG_TILE_ID),
                   algo_attr(&res[i].algo, CUBLASLT_ALGO_CONFIG_STAGES_ID), split,
                   algo_attr(&res[i].algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME),
                   res[i].workspaceSize, t, same);
        if (i == 0)
            r.first = t;
        if (split == algo_attr(&res[0].algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM))
            r.same = std::min(r.same, t);
        r.best = std::min(r.best, t);
    }
    cublasLtMatmulPreferenceDestroy(pref);
    cublasLtMatrixLayoutDestroy(la);
    cublasLtMatrixLayoutDestroy(lb);
    cublasLtMatrixLayoutDestroy(lc);
    cublasLtMatmulDescDestroy(op);
    return r;
}

/* A linear's three products (cublas's column-major view of out = x W^T
 * over N tokens): forward (C bf16 or fp32), input gradient (adding to C:
 * beta), weight gradient. */
static shape fwd(int OC, int Cin, int N, int count, bool c16)
{
    return {"fwd", CUBLAS_OP_T, CUBLAS_OP_N, OC, N, Cin, 0.f, count, c16};
}
static shape bwd_in(int OC, int Cin, int N, int count, float beta)
{
    return {"bwd_in", CUBLAS_OP_N, CUBLAS_OP_N, Cin, N, OC, beta, count, false};
}
static shape bwd_w(int OC, int Cin, int N, int count)
{
    return {"bwd_w", CUBLAS_OP_N, CUBLAS_OP_T, Cin, OC, N, 0.f, count, false};
}

struct model {
    const char *name;
    int N, C, H, kvd, V, L;
};

/* Every product shape of md's step, each candidate printed. */
static void candidates(const bench &b, const model &md)
{
    /* out, in and count of each linear: q and o, k and v, gate and up,
     * down (forward counted for student and teacher), the head */
    const int lin[][3] = {{md.C, md.C, 2 * md.L},
                          {md.kvd, md.C, 2 * md.L},
                          {md.H, md.C, 2 * md.L},
                          {md.C, md.H, md.L},
                          {md.V, md.C, 1}};
    double total_default = 0, total_best = 0;
    for (auto &l : lin) {
        const int OC = l[0], Cin = l[1], cnt = l[2];
        const shape shapes[3] = {fwd(OC, Cin, md.N, 2 * cnt, false),
                                 bwd_in(OC, Cin, md.N, cnt, 1.f), bwd_w(OC, Cin, md.N, cnt)};
        for (auto &x : shapes) {
            const timing t = measure(b, x, true);
            const double flop = 2.0 * x.m * x.n * x.k;
            printf("%-9s %-6s m=%5d n=%5d k=%5d x%-3d def %.4f ms (%.0f TF) lt0 %.4f best "
                   "%.4f ms (%.0f TF) gain %.2fx\n",
                   md.name, x.what, x.m, x.n, x.k, x.count, t.t_default,
                   flop / t.t_default / 1e9, t.first, t.best, flop / t.best / 1e9,
                   t.t_default / t.best);
            total_default += t.t_default * x.count;
            total_best += std::min(t.best, t.t_default) * x.count;
        }
    }
    printf("%s step GEMMs: default %.2f ms, best-of %.2f ms\n", md.name, total_default,
           total_best);
}

/* The products of q, k and v, and of gate and up, as the step makes them
 * (one per linear; the input gradients add to one buffer) against one
 * product of the linears stacked (outputs side by side in a row, the
 * stacked weights one matrix: what a fused layout would make), each timed
 * as gemm.c's plan would run it (the fastest candidate of the first one's
 * split), milliseconds a layer of one model. */
static void fused(const bench &b, const model &md)
{
    const int C = md.C, kvd = md.kvd, H = md.H, N = md.N;
    struct pair {
        const char *what;
        std::vector<shape> apart;
        shape together;
        int per_step; /* runs a layer in a step: 2 (teacher and student), 1, or 0: an
                         alternative form, not counted in the step's total */
    } pairs[] = {
        {"qkv fwd", {fwd(C, C, N, 1, false), fwd(kvd, C, N, 2, false)},
         fwd(C + 2 * kvd, C, N, 1, false), 2},
        {"qkv fwd16", {fwd(C, C, N, 1, true), fwd(kvd, C, N, 2, true)},
         fwd(C + 2 * kvd, C, N, 1, true), 0},
        {"qkv bwd_in", {bwd_in(C, C, N, 1, 0.f), bwd_in(kvd, C, N, 2, 1.f)},
         bwd_in(C + 2 * kvd, C, N, 1, 0.f), 1},
        {"qkv bwd_w", {bwd_w(C, C, N, 1), bwd_w(kvd, C, N, 2)}, bwd_w(C + 2 * kvd, C, N, 1), 1},
        {"gate-up fwd", {fwd(H, C, N, 2, true)}, fwd(2 * H, C, N, 1, true), 2},
        {"gate-up bwd_in", {bwd_in(H, C, N, 1, 0.f), bwd_in(H, C, N, 1, 1.f)},
         bwd_in(2 * H, C, N, 1, 0.f), 1},
        {"gate-up bwd_w", {bwd_w(H, C, N, 2)}, bwd_w(2 * H, C, N, 1), 1},
    };
    double saved = 0; /* ms a step */
    for (auto &p : pairs) {
        double apart = 0;
        for (auto &x : p.apart)
            apart += measure(b, x, false).same * x.count;
        const double together = measure(b, p.together, false).same;
        printf("%-9s stacked %-14s apart %.4f ms, stacked %.4f ms, %.2fx\n", md.name, p.what,
               apart, together, apart / together);
        saved += (apart - together) * md.L * p.per_step;
    }
    printf("%s stacked: a step's products save %.2f ms\n", md.name, saved);
}

int main(int argc, char **argv)
{
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
        puts("cuda-gemm-candidates: no CUDA device, nothing measured");
        return 77; /* meson's skip */
    }
    const bool only_fused = argc > 1 && !strcmp(argv[1], "--fused");
    const size_t max_b = (size_t)16384 * 49152, max_a = 2 * (size_t)50000 * 5632;
    bench b;
    b.ws_bytes = 64 << 20;
    CK(cudaMalloc(&b.A, max_a * 2));
    CK(cudaMalloc(&b.B, max_b * 2));
    CK(cudaMalloc(&b.C, max_b * 4));
    CK(cudaMalloc(&b.Cref, max_b * 4));
    CK(cudaMalloc(&b.ws, b.ws_bytes));
    fill<<<4096, 256>>>((uint16_t *)b.A, max_a, 1);
    fill<<<4096, 256>>>((uint16_t *)b.B, max_b, 2);
    CK(cudaMemset(b.C, 0, max_b * 4));
    CK(cublasCreate(&b.h));
    CK(cublasLtCreate(&b.lt));
    CK(cudaStreamCreate(&b.s));
    CK(cublasSetStream(b.h, b.s));
    const model models[] = {{"smollm", 16384, 576, 1536, 192, 49152, 30},
                            {"tinyllama", 4096, 2048, 5632, 256, 32000, 22}};
    for (auto &md : models) {
        if (!only_fused)
            candidates(b, md);
        fused(b, md);
    }
    return 0;
}
