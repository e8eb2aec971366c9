/* The SIMD CPU backend: the reference backend's table with SIMD kernels in
 * the slots that matter for speed. The kernels (the *.inc files) are
 * written once against the vector layer of vec.h and compiled once per
 * instruction set (simd_avx2.c, simd_avx512.c, simd_avx512bf16.c;
 * simd_neon.c on aarch64);
 * simd.c checks the CPU at creation and installs the best set it
 * supports. Slots without a SIMD kernel keep the reference kernel, and so
 * does a kernel whose workspace cannot be allocated.
 *
 * Every SIMD kernel is deterministic like the reference ones: each output
 * element is written by one task and summed in an order fixed by the shape
 * alone, so a result never depends on the thread count. */
#ifndef QKD_LIB_BACKEND_SIMD_H
#define QKD_LIB_BACKEND_SIMD_H

#include <string.h>

#include "backend/backend.h"
#include "backend/ref/ref.h"

/* Instruction sets, for QKD_SIMD_ISA in the files that include vec.h. */
#define QKD__SIMD_AVX2 1
#define QKD__SIMD_AVX512 2
#define QKD__SIMD_NEON 3
#define QKD__SIMD_AVX512BF16 4

/* Create the SIMD backend on ctx. */
qkd_status qkd__backend_simd_create(qkd_context *ctx, qkd__backend **out);

/* Scratch memory of a SIMD backend, kept between kernels and grown on
 * demand: at least `floats` floats, 64-byte aligned, valid until the next
 * call. NULL when it cannot grow; the kernel then runs the reference
 * kernel instead. */
float *qkd__simd_workspace(qkd__backend *b, size_t floats);

/* RoPE's rotation for positions [0, n_pos) and more, kept by the backend
 * (a few tables, one per hd, width and theta) until more positions are
 * asked: row pos
 * is 2 * width floats, cs then sn, each repeating the hd values of the
 * position width / hd times (width a multiple of hd, so whole vectors
 * cover several heads): cs = cos of each pair's angle pos theta^(-p/hd)
 * on both of its values, sn = -sin on the first and +sin on the second
 * (an odd last value has no partner: 1 and 0). Then x' = x cs +
 * swap_pairs(x) sn; the backward rotation is x cs - swap_pairs(x) sn.
 * NULL when out of memory. */
const float *qkd__simd_rope_table(qkd__backend *b, int hd, int width, float theta, int n_pos);

/* Run fn(arg, i) for i in [0, n_tasks) on the context's pool, or inline on
 * the calling thread when the whole job is below some fifty thousand
 * flops (waking threads would cost more). */
void qkd__simd_run(qkd__backend *b, int64_t n_tasks, double flops, qkd__task_fn fn, void *arg);

/* Run fn over the items [0, n) in contiguous ranges on the context's pool;
 * cost is the rough number of flops of one item. Like qkd__ref_parallel,
 * but a job below some fifty thousand flops stays on the calling thread,
 * since SIMD kernels finish small jobs faster than threads wake up. */
void qkd__simd_parallel(qkd__backend *b, int64_t n, double cost, qkd__ref_range_fn fn,
                        const void *arg);

/* Processes items [begin, end) of a job described by arg, with `slot`, a
 * piece of workspace no other task touches. */
typedef void (*qkd__simd_slot_fn)(const void *arg, int64_t begin, int64_t end, float *slot);

/* Run fn over the items [0, n) in contiguous ranges on the context's pool,
 * each range with a slot of slot_floats floats of workspace (64-byte
 * aligned). flops is the rough cost of one item. Returns 0, running
 * nothing, if the workspace cannot be allocated. */
int qkd__simd_parallel_slots(qkd__backend *b, int64_t n, double flops, size_t slot_floats,
                             qkd__simd_slot_fn fn, const void *arg);

/* Floats of memory that holds the slots of any job of
 * qkd__simd_parallel_slots_in with slot_floats per slot (a few tasks per
 * thread, cache-line aligned wherever the memory starts). */
size_t qkd__simd_slots_floats(qkd__backend *b, size_t slot_floats);

/* qkd__simd_parallel_slots with the slots in mem, of
 * qkd__simd_slots_floats(b, slot_floats) floats: allocates nothing, so it
 * always runs. */
void qkd__simd_parallel_slots_in(qkd__backend *b, int64_t n, double flops, size_t slot_floats,
                                 float *mem, qkd__simd_slot_fn fn, const void *arg);

/* Put each instruction set's kernels into the table. */
void qkd__simd_install_avx2(qkd__backend *b);
void qkd__simd_install_avx512(qkd__backend *b);
void qkd__simd_install_avx512bf16(qkd__backend *b);
void qkd__simd_install_neon(qkd__backend *b);

#endif
