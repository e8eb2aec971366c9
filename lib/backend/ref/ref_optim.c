/* The reference SGD update (AdamW's lives in ref.c with the table). Like
 * every reference kernel it computes in double and rounds once per stored
 * value, so another backend's float arithmetic can be checked against it. */
#include "backend/ref/ref.h"

void qkd__ref_sgd_update(qkd__backend *b, float *p, const float *g, float *u, size_t n,
                         float lr, float momentum, float wd)
{
    (void)b;
    for (size_t i = 0; i < n; i++) {
        double ui = (double)momentum * u[i] + g[i];
        u[i] = (float)ui;
        p[i] = (float)(p[i] - (double)lr * (ui + (double)wd * p[i]));
    }
}
