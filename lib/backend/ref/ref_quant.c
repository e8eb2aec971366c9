/* SKELETON: replaced by the quantizer helper. */
#include "backend/ref/ref.h"

void qkd__ref_fakequant_forward(qkd__backend *b, float *wq, float *scales, float *zeros,
                                const float *w, int64_t rows, int64_t cols,
                                const qkd__quant_spec *spec)
{
    (void)b; (void)wq; (void)scales; (void)zeros; (void)w; (void)rows; (void)cols; (void)spec;
}

void qkd__ref_fakequant_backward(qkd__backend *b, float *dw, const float *dwq, const float *w,
                                 const float *scales, const float *zeros, int64_t rows,
                                 int64_t cols, const qkd__quant_spec *spec)
{
    (void)b; (void)dw; (void)dwq; (void)w; (void)scales; (void)zeros; (void)rows; (void)cols;
    (void)spec;
}

void qkd__ref_quant_rows(qkd__backend *b, float *out, const float *x, int64_t rows,
                         int64_t cols, int bits)
{
    (void)b; (void)out; (void)x; (void)rows; (void)cols; (void)bits;
}
