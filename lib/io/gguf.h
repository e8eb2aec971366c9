/* Internal GGUF v3 reader: header, metadata key/values and tensor infos
 * are parsed and bounds-checked at open; tensor data is read on demand.
 * Shared by the model loader and the tokenizer loader. */
#ifndef QKD_LIB_GGUF_H
#define QKD_LIB_GGUF_H

#include <stdint.h>

#include "core/core.h"
#include "quant/ggml_blocks.h"

typedef struct qkd__gguf qkd__gguf;

/* GGUF metadata value types (numbers as in the GGUF spec). */
typedef enum qkd__gguf_type {
    QKD__GGUF_U8 = 0, QKD__GGUF_I8 = 1, QKD__GGUF_U16 = 2, QKD__GGUF_I16 = 3,
    QKD__GGUF_U32 = 4, QKD__GGUF_I32 = 5, QKD__GGUF_F32 = 6, QKD__GGUF_BOOL = 7,
    QKD__GGUF_STRING = 8, QKD__GGUF_ARRAY = 9, QKD__GGUF_U64 = 10,
    QKD__GGUF_I64 = 11, QKD__GGUF_F64 = 12
} qkd__gguf_type;

/* Open and parse path. FORMAT (bad magic, truncation, absurd counts or
 * sizes, offsets past the end, misalignment), UNSUPPORTED (version other
 * than 2 or 3), IO, NO_MEMORY; the message names the file and the place. */
qkd_status qkd__gguf_open(qkd_context *ctx, const char *path, qkd__gguf **out);
void qkd__gguf_close(qkd__gguf *g); /* accepts NULL */

/* Scalars: NOT_FOUND if the key is absent, FORMAT if its type does not
 * convert (any integer type in range converts to u32/i32; f32 and f64 to
 * float). Errors are NOT recorded on ctx for NOT_FOUND (optional keys). */
qkd_status qkd__gguf_get_u32(const qkd__gguf *g, const char *key, uint32_t *out);
qkd_status qkd__gguf_get_f32(const qkd__gguf *g, const char *key, float *out);
/* String value: borrowed until close; not NUL-terminated in general. */
qkd_status qkd__gguf_get_str(const qkd__gguf *g, const char *key,
                             const char **s, uint64_t *len);

/* Arrays: element type and count. */
qkd_status qkd__gguf_get_arr(const qkd__gguf *g, const char *key,
                             qkd__gguf_type *elem_type, uint64_t *n);
/* Element i of a string array (borrowed until close). */
qkd_status qkd__gguf_arr_str(const qkd__gguf *g, const char *key, uint64_t i,
                             const char **s, uint64_t *len);
/* Copy an f32 array (n elements) / an integer array converted to int32. */
qkd_status qkd__gguf_arr_f32(const qkd__gguf *g, const char *key, float *dst, uint64_t n);
qkd_status qkd__gguf_arr_i32(const qkd__gguf *g, const char *key, int32_t *dst, uint64_t n);

/* Tensors. ne[0] is the fastest-varying (row length), as in ggml. */
typedef struct qkd__gguf_tensor {
    const char *name; /* NUL-terminated, borrowed until close */
    uint32_t n_dims;
    uint64_t ne[4];
    uint32_t type;    /* ggml type id */
    uint64_t offset;  /* from the start of the data section */
    uint64_t n_elements;
} qkd__gguf_tensor;

int64_t qkd__gguf_n_tensors(const qkd__gguf *g);
/* Elements of every tensor whose data open checked to lie in the file (the
 * types qkd__gguf_read_f32 reads). */
uint64_t qkd__gguf_data_elements(const qkd__gguf *g);
/* Tensor by name: NOT_FOUND (not recorded on ctx) if absent. */
qkd_status qkd__gguf_find_tensor(const qkd__gguf *g, const char *name,
                                 const qkd__gguf_tensor **out);
/* Read a tensor converted to float: F32, F16, BF16 and the block types of
 * quant/ggml_blocks.h (dequantized exactly as ggml does; open checked
 * that ne[0] is a multiple of the block and that the blocks fit in the
 * file). n must equal its element count (SHAPE otherwise); UNSUPPORTED
 * for other types. */
qkd_status qkd__gguf_read_f32(qkd__gguf *g, const qkd__gguf_tensor *t,
                              float *dst, uint64_t n);

#endif
