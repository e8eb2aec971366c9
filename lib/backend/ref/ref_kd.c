/* SKELETON: replaced by the loss helper. */
#include "backend/ref/ref.h"

void qkd__ref_kd_loss(qkd__backend *b, float *row_loss, float *ds, const float *s,
                      const float *t, const int32_t *targets, const float *row_w, float scale,
                      int N, int V, int kind, float temperature, float beta)
{
    (void)b; (void)row_loss; (void)ds; (void)s; (void)t; (void)targets; (void)row_w;
    (void)scale; (void)N; (void)V; (void)kind; (void)temperature; (void)beta;
}

void qkd__ref_tsld_weights(qkd__backend *b, float *w, const float *c, const int32_t *targets,
                           int B, int T, float tau)
{
    (void)b; (void)w; (void)c; (void)targets; (void)B; (void)T; (void)tau;
}

void qkd__ref_row_max_prob(qkd__backend *b, float *out, const float *x, int N, int V)
{
    (void)b; (void)out; (void)x; (void)N; (void)V;
}
