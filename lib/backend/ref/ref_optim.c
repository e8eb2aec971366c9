/* SKELETON: replaced by the optimizer helper. */
#include "backend/ref/ref.h"

void qkd__ref_sgd_update(qkd__backend *b, float *p, const float *g, float *u, size_t n,
                         float lr, float momentum, float wd)
{
    (void)b; (void)p; (void)g; (void)u; (void)n; (void)lr; (void)momentum; (void)wd;
}
