/* llama.cpp's (ggml's) tensor storage types: the packed block layouts and
 * the reference quantizers and dequantizers, reproducing ggml's
 * non-SIMD, imatrix-free reference functions byte for byte (blocks) and
 * value for value (dequantized floats). Plain C with no library
 * dependencies, so a device backend can include it.
 *
 * A block holds `block` consecutive values of a row; a row of n values is
 * n / block blocks one after another. All multi-byte fields are
 * little-endian (the library assumes a little-endian host). Half floats
 * are IEEE binary16 bit patterns. */
#ifndef QKD_LIB_GGML_BLOCKS_H
#define QKD_LIB_GGML_BLOCKS_H

#include <stddef.h>
#include <stdint.h>

/* ggml type ids, as GGUF tensor infos store them. */
enum {
    QKD__GGML_F32 = 0,
    QKD__GGML_F16 = 1,
    QKD__GGML_Q4_0 = 2,
    QKD__GGML_Q4_1 = 3,
    QKD__GGML_Q5_0 = 6,
    QKD__GGML_Q5_1 = 7,
    QKD__GGML_Q8_0 = 8,
    QKD__GGML_Q4_K = 12,
    QKD__GGML_Q6_K = 14,
    QKD__GGML_BF16 = 30,
    QKD__GGML_TQ2_0 = 35
};

#define QKD__QK 32    /* values per block of the 32-value formats */
#define QKD__QK_K 256 /* values per super-block of the k-quants and TQ2_0 */

/* Q8_0: value = qs * d. */
typedef struct qkd__block_q8_0 {
    uint16_t d;
    int8_t qs[QKD__QK];
} qkd__block_q8_0;

/* Q4_0: value = (q - 8) * d, q in 0..15; value j of the block is the low
 * nibble of qs[j] (j < 16) or the high nibble of qs[j - 16]. */
typedef struct qkd__block_q4_0 {
    uint16_t d;
    uint8_t qs[QKD__QK / 2];
} qkd__block_q4_0;

/* Q4_1: value = q * d + m, q in 0..15, nibbles as Q4_0. */
typedef struct qkd__block_q4_1 {
    uint16_t d, m;
    uint8_t qs[QKD__QK / 2];
} qkd__block_q4_1;

/* Q5_0: value = (q - 16) * d, q in 0..31: the low 4 bits as Q4_0's
 * nibbles, bit 4 of value j in bit j of the little-endian u32 qh. */
typedef struct qkd__block_q5_0 {
    uint16_t d;
    uint8_t qh[4];
    uint8_t qs[QKD__QK / 2];
} qkd__block_q5_0;

/* Q5_1: value = q * d + m, q in 0..31, bits as Q5_0. */
typedef struct qkd__block_q5_1 {
    uint16_t d, m;
    uint8_t qh[4];
    uint8_t qs[QKD__QK / 2];
} qkd__block_q5_1;

/* Q4_K: 8 sub-blocks of 32; value = d * sc[j] * q - dmin * mn[j], q in
 * 0..15. The 6-bit sc and mn of sub-block j < 4 are the low 6 bits of
 * scales[j] and scales[j + 4]; for j >= 4 the low nibbles of scales[j + 4]
 * (sc) and its high nibble (mn) give bits 0..3, and the top 2 bits of
 * scales[j - 4] (sc) and scales[j] (mn) bits 4..5. qs holds 4 chunks of 32
 * bytes: chunk c carries sub-block 2c in its low and 2c + 1 in its high
 * nibbles. */
typedef struct qkd__block_q4_k {
    uint16_t d, dmin;
    uint8_t scales[12];
    uint8_t qs[QKD__QK_K / 2];
} qkd__block_q4_k;

/* Q6_K: 16 sub-blocks of 16; value = d * scales[j] * (q - 32), q in 0..63.
 * Each half (128 values) of the block has 64 bytes of ql and 32 of qh:
 * value l + 32 k (l < 32, k < 4) of the half has its low 4 bits in the
 * low (k < 2) or high (k >= 2) nibble of ql[l + 32 (k & 1)] and bits 4..5
 * in bits 2k..2k+1 of qh[l]. */
typedef struct qkd__block_q6_k {
    uint8_t ql[QKD__QK_K / 2];
    uint8_t qh[QKD__QK_K / 4];
    int8_t scales[QKD__QK_K / 16];
    uint16_t d;
} qkd__block_q6_k;

/* TQ2_0: ternary; value = (q - 1) * d, q in 0..2. Value m + 32 n + 128 h
 * (m < 32, n < 4, h < 2) is bits 2n..2n+1 of qs[32 h + m]. */
typedef struct qkd__block_tq2_0 {
    uint8_t qs[QKD__QK_K / 4];
    uint16_t d;
} qkd__block_tq2_0;

_Static_assert(sizeof(qkd__block_q8_0) == 34, "Q8_0 block is 34 bytes");
_Static_assert(sizeof(qkd__block_q4_0) == 18, "Q4_0 block is 18 bytes");
_Static_assert(sizeof(qkd__block_q4_1) == 20, "Q4_1 block is 20 bytes");
_Static_assert(sizeof(qkd__block_q5_0) == 22, "Q5_0 block is 22 bytes");
_Static_assert(sizeof(qkd__block_q5_1) == 24, "Q5_1 block is 24 bytes");
_Static_assert(sizeof(qkd__block_q4_k) == 144, "Q4_K block is 144 bytes");
_Static_assert(sizeof(qkd__block_q6_k) == 210, "Q6_K block is 210 bytes");
_Static_assert(sizeof(qkd__block_tq2_0) == 66, "TQ2_0 block is 66 bytes");

/* The largest block of any type, in bytes and values. */
#define QKD__GGML_MAX_BLOCK_BYTES 210
#define QKD__GGML_MAX_BLOCK_VALUES QKD__QK_K

/* One storage type. F32, F16 and BF16 are blocks of one value with no
 * groups. A group is a run of `group` values sharing one scale and one
 * offset: value = code * scale + offset exactly in float (Q4_0: offset
 * -8 d; Q4_1: m; Q4_K: scale d sc, offset -dmin mn; Q6_K: scale d sc,
 * offset -32 d sc; TQ2_0: offset -d). */
typedef struct qkd__ggml_format {
    int type;
    const char *name;   /* "Q4_0" */
    int block;          /* values per block */
    size_t bytes;       /* bytes per block */
    int group;          /* values per group; 0: no groups (F32, F16, BF16) */
    void (*quantize)(const float *x, void *blk);
    void (*dequantize)(const void *blk, float *y);
    /* scales and offsets of the block's block / group groups */
    void (*groups)(const void *blk, float *scales, float *offsets);
    /* the block's stored codes (16-bit floats: their bit patterns; F32:
     * NULL) */
    void (*codes)(const void *blk, int32_t *codes);
} qkd__ggml_format;

/* The format of a ggml type id, or NULL for a type libqkd does not
 * handle. */
const qkd__ggml_format *qkd__ggml_format_of(uint32_t type);

/* Row helpers: n must be a multiple of the format's block. */
size_t qkd__ggml_row_bytes(const qkd__ggml_format *f, int64_t n);
void qkd__ggml_quantize_row(const qkd__ggml_format *f, const float *x, void *dst, int64_t n);
void qkd__ggml_dequantize_row(const qkd__ggml_format *f, const void *src, float *y,
                              int64_t n);

#endif
