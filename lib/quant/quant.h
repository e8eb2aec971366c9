/* Internal quantizer interface for the model (binding, calibration): how a
 * quantizer drives the backend's fake-quantization kernels. */
#ifndef QKD_LIB_QUANT_H
#define QKD_LIB_QUANT_H

#include "backend/backend.h"
#include "qkd/quant.h"

qkd_context *qkd__quantizer_context(const qkd_quantizer *q);
const qkd_quant_params *qkd__quantizer_params(const qkd_quantizer *q);

/* The ggml type of a format scheme (QKD__GGML_*), -1 for the others. */
int qkd__quant_scheme_type(int scheme);
/* The ggml type a row of cols values is stored in when `type` is asked
 * for: type itself, or the fallback when its block does not divide cols
 * (a 256-value type to Q8_0 when 32 divides cols, any block type to F16
 * otherwise). */
int qkd__quant_fit_type(int type, int64_t cols);
/* qkd__quant_fit_type of a format scheme's type; -1 when scheme is not a
 * format scheme. */
int qkd__quant_row_type(int scheme, int64_t cols);

/* 1 when the training forward rounds smoothly (the CONTINUOUS estimator). */
int qkd__quantizer_smooth(const qkd_quantizer *q);

/* The spec the kernels get for a rows x cols weight, and the shape they
 * see (per-tensor quantization: one row of rows * cols values). */
qkd__quant_spec qkd__quantizer_spec(const qkd_quantizer *q, int64_t *rows, int64_t *cols,
                                    int smooth);

/* wq = Q(w) of a device weight w[rows][cols] with the quantizer's groups;
 * scales and zeros receive qkd_quantizer_n_groups(q, rows, cols) floats.
 * smooth: round_T and SoftClamp instead of hard rounding. */
void qkd__quantizer_forward(const qkd_quantizer *q, float *wq, float *scales, float *zeros,
                            const float *w, int64_t rows, int64_t cols, int smooth);
/* The same with Q(w) rounded to bf16 (raw bits) through the backend's
 * fakequant_forward_bf16 (which the caller checks is there), for SYM,
 * ASYM and TERNARY. */
void qkd__quantizer_forward_bf16(const qkd_quantizer *q, uint16_t *wq, float *scales,
                                 float *zeros, const float *w, int64_t rows, int64_t cols,
                                 int smooth);
/* dw += dQ(w)/dw * dwq through the quantizer's estimator, from the
 * scales and zeros of the forward. */
void qkd__quantizer_backward(const qkd_quantizer *q, float *dw, const float *dwq,
                             const float *w, const float *scales, const float *zeros,
                             int64_t rows, int64_t cols);

/* 1 when the backward maps dL/dQ(w) to dL/dw unchanged for every weight
 * (the plain STE without a clip, computed scales): the model then adds
 * the weight gradients straight to dL/dw, with no dL/dQ(w) buffer. */
int qkd__quantizer_grad_is_identity(const qkd_quantizer *q);

/* 1 when the groups' scales (and ASYM zero points) are trainable
 * (learn_scales); 2 when the zero points are too (ASYM). 0 otherwise. */
int qkd__quantizer_learned(const qkd_quantizer *q);
/* The shape [*srows][*scols] of a rows x cols weight's learned scale (and
 * zero point) tensor: its qkd_quantizer_n_groups in row-major order. */
void qkd__quantizer_scale_shape(const qkd_quantizer *q, int64_t rows, int64_t cols,
                                int64_t *srows, int64_t *scols);
/* The learned forms of forward and backward (include/qkd/quant.h,
 * learn_scales): scales and zeros are read (zeros NULL: none); the
 * backward adds dL/dw, dL/ds and (dzeros not NULL) dL/dz. */
void qkd__quantizer_lsq_forward(const qkd_quantizer *q, float *wq, const float *w,
                                const float *scales, const float *zeros, int64_t rows,
                                int64_t cols, int smooth);
void qkd__quantizer_lsq_backward(const qkd_quantizer *q, float *dw, float *dscales,
                                 float *dzeros, const float *dwq, const float *w,
                                 const float *scales, const float *zeros, int64_t rows,
                                 int64_t cols);

/* The SEARCH clip of a host weight w[rows][cols], clamped in place: per
 * group, the grid's shrink factors that minimise the squared error of the
 * quantized weight (x NULL) or of the group's partial dot products with
 * the inputs x[n_x][cols]. `what` names the tensor in messages. Errors:
 * NO_MEMORY, BACKEND. */
qkd_status qkd__quantizer_search_clip(qkd_quantizer *q, float *w, int64_t rows, int64_t cols,
                                      const float *x, int64_t n_x, const char *what);

#endif
