/* The bf16 products of the KD-QAT step (both models of docs/benchmarks.md,
 * every linear shape: forward, input gradient, weight gradient) timed with
 * cublasGemmEx's default choice and with each of the first 8 candidates
 * of cuBLASLt's heuristic, on random bf16 operands, fp32 C. For each
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

int main(void)
{
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
        puts("cuda-gemm-candidates: no CUDA device, nothing measured");
        return 77; /* meson's skip */
    }
    const size_t max_b = (size_t)16384 * 49152, max_a = 2 * (size_t)50000 * 5632;
    void *A, *B, *C, *ws;
    float *Cref;
    const size_t ws_bytes = 64 << 20;
    CK(cudaMalloc(&A, max_a * 2));
    CK(cudaMalloc(&B, max_b * 2));
    CK(cudaMalloc(&C, max_b * 4));
    CK(cudaMalloc(&Cref, max_b * 4));
    CK(cudaMalloc(&ws, ws_bytes));
    fill<<<4096, 256>>>((uint16_t *)A, max_a, 1);
    fill<<<4096, 256>>>((uint16_t *)B, max_b, 2);
    CK(cudaMemset(C, 0, max_b * 4));
    cublasHandle_t h;
    cublasLtHandle_t lt;
    cudaStream_t s;
    CK(cublasCreate(&h));
    CK(cublasLtCreate(&lt));
    CK(cudaStreamCreate(&s));
    CK(cublasSetStream(h, s));
    struct model {
        const char *name;
        int N, C, H, kvd, V, L;
    } models[] = {{"smollm", 16384, 576, 1536, 192, 49152, 30},
                  {"tinyllama", 4096, 2048, 5632, 256, 32000, 22}};
    for (auto &md : models) {
        /* out, in and count of each linear: q and o, k and v, gate and up,
         * down (forward counted for student and teacher), the head */
        const int lin[][3] = {{md.C, md.C, 2 * md.L},
                              {md.kvd, md.C, 2 * md.L},
                              {md.H, md.C, 2 * md.L},
                              {md.C, md.H, md.L},
                              {md.V, md.C, 1}};
        std::vector<shape> shapes;
        for (auto &l : lin) {
            const int OC = l[0], Cin = l[1], cnt = l[2];
            shapes.push_back({"fwd", CUBLAS_OP_T, CUBLAS_OP_N, OC, md.N, Cin, 0.f, 2 * cnt});
            shapes.push_back({"bwd_in", CUBLAS_OP_N, CUBLAS_OP_N, Cin, md.N, OC, 1.f, cnt});
            shapes.push_back({"bwd_w", CUBLAS_OP_N, CUBLAS_OP_T, Cin, OC, md.N, 0.f, cnt});
        }
        double total_default = 0, total_best = 0;
        for (auto &x : shapes) {
            const int lda = x.ta == CUBLAS_OP_N ? x.m : x.k, ldb = x.tb == CUBLAS_OP_N ? x.k : x.n;
            const int ldc = x.m, reps = 20;
            const float one = 1.f, zero = 0.f, beta = x.beta;
            const float t_default = time_it(s, reps, [&] {
                cublasGemmEx(h, x.ta, x.tb, x.m, x.n, x.k, &one, A, CUDA_R_16BF, lda, B,
                             CUDA_R_16BF, ldb, &beta, C, CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F,
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
            CK(cublasLtMatrixLayoutCreate(&lc, CUDA_R_32F, x.m, x.n, ldc));
            cublasLtMatmulPreference_t pref;
            CK(cublasLtMatmulPreferenceCreate(&pref));
            CK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                    &ws_bytes, sizeof ws_bytes));
            cublasLtMatmulHeuristicResult_t res[8];
            int n_res = 0;
            CK(cublasLtMatmulAlgoGetHeuristic(lt, op, la, lb, lc, lc, pref, 8, res, &n_res));
            float best = 1e30f, first = 0;
            int best_i = -1;
            const size_t n_cmp = std::min((size_t)x.m * x.n, (size_t)1 << 20);
            std::vector<float> h_ref(n_cmp), h_got(n_cmp);
            for (int i = 0; i < n_res; i++) {
                float *out = i == 0 ? Cref : (float *)C;
                cublasLtMatmul(lt, op, &one, A, la, B, lb, &zero, out, lc, out, lc, &res[i].algo,
                               ws, ws_bytes, s);
                CK(cudaStreamSynchronize(s));
                int same = 1;
                if (i > 0) {
                    CK(cudaMemcpy(h_ref.data(), Cref, n_cmp * 4, cudaMemcpyDeviceToHost));
                    CK(cudaMemcpy(h_got.data(), C, n_cmp * 4, cudaMemcpyDeviceToHost));
                    same = memcmp(h_ref.data(), h_got.data(), n_cmp * 4) == 0;
                }
                const float t = time_it(s, reps, [&] {
                    cublasLtMatmul(lt, op, &one, A, la, B, lb, &beta, C, lc, C, lc, &res[i].algo,
                                   ws, ws_bytes, s);
                });
                printf("    cand %d: algo %d tile %d stages %d splitk %d red %d ws %zu  %.4f ms  "
                       "same-bits-as-0 %d\n",
                       i, algo_attr(&res[i].algo, CUBLASLT_ALGO_CONFIG_ID),
                       algo_attr(&res[i].algo, CUBLASLT_ALGO_CONFIG_TILE_ID),
                       algo_attr(&res[i].algo, CUBLASLT_ALGO_CONFIG_STAGES_ID),
                       algo_attr(&res[i].algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM),
                       algo_attr(&res[i].algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME),
                       res[i].workspaceSize, t, same);
                if (i == 0)
                    first = t;
                if (t < best) {
                    best = t;
                    best_i = i;
                }
            }
            const double flop = 2.0 * x.m * x.n * x.k;
            printf("%-9s %-6s m=%5d n=%5d k=%5d x%-3d def %.4f ms (%.0f TF) lt0 %.4f best[%d/%d] "
                   "%.4f ms (%.0f TF) gain %.2fx\n",
                   md.name, x.what, x.m, x.n, x.k, x.count, t_default, flop / t_default / 1e9,
                   first, best_i, n_res, best, flop / best / 1e9, t_default / best);
            total_default += t_default * x.count;
            total_best += std::min(best, t_default) * x.count;
            cublasLtMatmulPreferenceDestroy(pref);
            cublasLtMatrixLayoutDestroy(la);
            cublasLtMatrixLayoutDestroy(lb);
            cublasLtMatrixLayoutDestroy(lc);
            cublasLtMatmulDescDestroy(op);
        }
        printf("%s step GEMMs: default %.2f ms, best-of %.2f ms\n", md.name, total_default,
               total_best);
    }
    return 0;
}
