/* Internal safetensors reader. At open the 8-byte header length and the
 * JSON header are read and every tensor entry is checked (dtype, shape,
 * data_offsets inside the data section and consistent with the shape);
 * tensor data is read on demand, so a file is never held in memory whole.
 *
 * Format: u64 little-endian N, then N bytes of JSON mapping each tensor
 * name to {"dtype": "F32", "shape": [rows, cols], "data_offsets": [begin,
 * end]} (offsets relative to the data section that follows the header),
 * plus an optional "__metadata__" object of strings, which is ignored. */
#ifndef QKD_LIB_SAFETENSORS_H
#define QKD_LIB_SAFETENSORS_H

#include <stdint.h>

#include "core/core.h"

#define QKD__ST_MAX_DIMS 8

typedef struct qkd__safetensors qkd__safetensors;

typedef struct qkd__st_tensor {
    const char *name;   /* borrowed until close */
    const char *dtype;  /* "F32", "BF16", ...: borrowed until close */
    int n_dims;
    uint64_t shape[QKD__ST_MAX_DIMS];
    uint64_t n_elements;
    uint64_t begin;     /* byte offsets in the data section */
    uint64_t end;
} qkd__st_tensor;

/* Open and check path. IO (cannot open/read), FORMAT (truncated file,
 * header length past the end, bad JSON, unknown dtype, bad shape, offsets
 * out of range or inconsistent with the shape), NO_MEMORY; the message
 * names the file and the tensor. *out: owned, qkd__st_close. */
qkd_status qkd__st_open(qkd_context *ctx, const char *path, qkd__safetensors **out);
void qkd__st_close(qkd__safetensors *st); /* accepts NULL */

/* The tensor named `name`, or NULL (nothing recorded) if absent. */
const qkd__st_tensor *qkd__st_find(const qkd__safetensors *st, const char *name);
/* The elements of all its tensors (open checked they lie in the file). */
uint64_t qkd__st_elements(const qkd__safetensors *st);

/* Read tensor t converted to float. n must equal its element count
 * (SHAPE otherwise); UNSUPPORTED for dtypes other than F32, F16, BF16;
 * IO if the file cannot be read. */
qkd_status qkd__st_read_f32(qkd__safetensors *st, const qkd__st_tensor *t,
                            float *dst, uint64_t n);

#endif
