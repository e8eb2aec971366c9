/* Optimizers: AdamW and SGD steps against closed forms worked out by hand
 * and against the header's formulas recomputed here in double, weight
 * decay, every schedule against its formula, clipping, groups, presets,
 * skipped non-finite steps, the state's layout and round trip, allocation
 * and errors. Gradients come from the model's own backward pass. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

#include "backend/backend.h"
#include "model/model_impl.h"
#include "qkd/loss.h"
#include "qkd/quant.h"

/* ---- fixtures -------------------------------------------------------------- */

enum { TB = 2, TT = 6, TV = 11, MAXT = 128 };

static qkd_model_config tiny_config(int tied, int dim)
{
    qkd_model_config c;
    qkd_model_config_init(&c);
    c.dim = dim;
    c.hidden_dim = 12;
    c.n_layers = 2;
    c.n_heads = 2;
    c.n_kv_heads = 1;
    c.vocab_size = TV;
    c.max_seq_len = TT;
    c.tied_embeddings = tied;
    return c;
}

static qkd_model *tiny_model(qkd_context *ctx, int tied, uint64_t seed)
{
    qkd_model_config c = tiny_config(tied, 8);
    qkd_model *m = test_model(ctx, &c, seed, 0.3f);
    ck_assert_int_le(qkd_model_n_tensors(m), MAXT);
    return m;
}

/* Zero the gradients, then accumulate those of one batch drawn from seed. */
static void make_grads(qkd_model *m, uint64_t seed)
{
    int32_t tokens[TB * TT], targets[TB * TT];
    for (int i = 0; i < TB * TT; i++) {
        tokens[i] = (int32_t)(test_lcg_next(&seed) % TV);
        targets[i] = (int32_t)(test_lcg_next(&seed) % TV);
    }
    float loss;
    ck_assert_int_eq(qkd_model_zero_grad(m), QKD_OK);
    ck_assert_int_eq(qkd_model_forward(m, tokens, TB, TT), QKD_OK);
    ck_assert_int_eq(qkd_model_cross_entropy(m, targets, 1, &loss), QKD_OK);
    ck_assert_int_eq(qkd_model_backward(m, NULL), QKD_OK);
}

/* Host copies of every tensor's weights (or gradients). */
typedef struct snap {
    int n;
    int64_t len[MAXT];
    float *x[MAXT];
} snap;

static snap snap_take(const qkd_model *m, int grad)
{
    snap s = {.n = qkd_model_n_tensors(m)};
    for (int i = 0; i < s.n; i++) {
        qkd_tensor_info info = {.size = sizeof info};
        ck_assert_int_eq(qkd_model_tensor_info(m, i, &info), QKD_OK);
        s.len[i] = info.n_elements;
        s.x[i] = malloc((size_t)info.n_elements * sizeof(float));
        ck_assert_ptr_nonnull(s.x[i]);
        size_t n = (size_t)info.n_elements;
        if (grad)
            ck_assert_int_eq(qkd_model_grad_get(m, i, s.x[i], n), QKD_OK);
        else
            ck_assert_int_eq(qkd_model_tensor_get(m, i, s.x[i], n), QKD_OK);
    }
    return s;
}

static void snap_free(snap *s)
{
    for (int i = 0; i < s->n; i++)
        free(s->x[i]);
    s->n = 0;
}

static int tensor_equal(const snap *a, const snap *b, int i)
{
    return memcmp(a->x[i], b->x[i], (size_t)a->len[i] * sizeof(float)) == 0;
}

static int snap_equal(const snap *a, const snap *b)
{
    for (int i = 0; i < a->n; i++) {
        if (!tensor_equal(a, b, i))
            return 0;
    }
    return a->n == b->n;
}

static void assert_close(float got, double want, double tol, const char *what, int i, int64_t j)
{
    ck_assert_msg(fabs(got - want) <= tol * (1.0 + fabs(want)),
                  "%s: tensor %d element %lld is %.9g, expected %.9g", what, i, (long long)j,
                  (double)got, want);
}

static qkd_optim_params base_params(qkd_optim_kind kind)
{
    qkd_optim_params p;
    qkd_optim_params_init(&p);
    p.kind = kind;
    p.lr = 1e-2f;
    p.max_grad_norm = 0.0f;
    return p;
}

static qkd_optimizer *make_opt(qkd_model *m, const qkd_optim_params *p)
{
    qkd_optimizer *opt = NULL;
    ck_assert_int_eq(qkd_optimizer_create(m, p, &opt), QKD_OK);
    ck_assert_ptr_nonnull(opt);
    return opt;
}

static qkd_step_info do_step(qkd_optimizer *opt)
{
    qkd_step_info info = {.size = sizeof info};
    ck_assert_int_eq(qkd_optimizer_step(opt, &info), QKD_OK);
    ck_assert_int_eq(info.skipped, 0);
    return info;
}

static double sq_norm(const float *x, int64_t n)
{
    double s = 0.0;
    for (int64_t j = 0; j < n; j++)
        s += (double)x[j] * x[j];
    return s;
}

/* ---- defaults -------------------------------------------------------------- */

START_TEST(test_params_defaults)
{
    qkd_optim_params p;
    memset(&p, 0xff, sizeof p);
    qkd_optim_params_init(&p);
    ck_assert_uint_eq(p.size, sizeof p);
    ck_assert_int_eq(p.kind, QKD_OPTIM_ADAMW);
    ck_assert_float_eq(p.lr, 1e-4f);
    ck_assert_float_eq(p.beta1, 0.9f);
    ck_assert_float_eq(p.beta2, 0.999f);
    ck_assert_float_eq(p.eps, 1e-8f);
    ck_assert_float_eq(p.momentum, 0.9f);
    ck_assert_float_eq(p.weight_decay, 0.0f);
    ck_assert_int_eq(p.schedule, QKD_SCHEDULE_CONSTANT);
    ck_assert_int_eq(p.warmup_steps, 0);
    ck_assert_int_eq(p.total_steps, 0);
    ck_assert_float_eq(p.min_lr_ratio, 0.0f);
    ck_assert_float_eq(p.max_grad_norm, 1.0f);
    qkd_optim_params_init(NULL); /* no crash */

    /* NULL params mean the defaults */
    qkd_context *ctx = test_context(1);
    qkd_model *m = tiny_model(ctx, 1, 1);
    qkd_optimizer *opt = make_opt(m, NULL);
    ck_assert_float_eq(qkd_optimizer_lr_at(opt, 1), 1e-4f);
    qkd_optimizer_free(opt);
    qkd_model_free(m);
    qkd_context_free(ctx);
}
END_TEST

/* ---- updates against closed forms ------------------------------------------------
 * With the same gradient g at every step, worked out by hand:
 *   AdamW: m_t = (1-b1^t) g and v_t = (1-b2^t) g^2, so the bias-corrected
 *          ratio is g / (|g| + eps) at every step;
 *   SGD:   u_t = g (1 - mu^t) / (1 - mu).
 * Each step then is w -= lr (that + wd w). */

START_TEST(test_constant_gradient_closed_form)
{
    const qkd_optim_kind kind = _i ? QKD_OPTIM_SGD : QKD_OPTIM_ADAMW;
    qkd_context *ctx = test_context(2);
    qkd_model *m = tiny_model(ctx, _i, 2);
    make_grads(m, 7);
    qkd_optim_params p = base_params(kind);
    p.weight_decay = 0.1f;
    p.momentum = 0.8f;
    qkd_optimizer *opt = make_opt(m, &p);
    snap g = snap_take(m, 1), w0 = snap_take(m, 0);

    for (int t = 1; t <= 3; t++) {
        qkd_step_info info = do_step(opt);
        ck_assert_int_eq(info.step, t);
        ck_assert_float_eq(info.lr, p.lr);
        ck_assert_int_eq(info.clipped, 0);
    }
    snap w3 = snap_take(m, 0);
    const double lr = p.lr, wd = p.weight_decay, mu = p.momentum, eps = p.eps;
    for (int i = 0; i < g.n; i++) {
        for (int64_t j = 0; j < g.len[i]; j++) {
            double w = w0.x[i][j], gj = g.x[i][j];
            for (int t = 1; t <= 3; t++) {
                double dir = kind == QKD_OPTIM_ADAMW ? gj / (fabs(gj) + eps)
                                                     : gj * (1.0 - pow(mu, t)) / (1.0 - mu);
                w -= lr * (dir + wd * w);
            }
            assert_close(w3.x[i][j], w, 5e-7, "closed form", i, j);
        }
    }
    /* the gradients were read, not changed */
    snap g3 = snap_take(m, 1);
    ck_assert(snap_equal(&g, &g3));
    snap_free(&g3);
    snap_free(&w3);
    snap_free(&w0);
    snap_free(&g);
    qkd_optimizer_free(opt);
    qkd_model_free(m);
    qkd_context_free(ctx);
}
END_TEST

/* Zero gradients leave weight decay alone: w_t = w_0 (1 - lr wd)^t for
 * both kinds (AdamW's ratio is 0/(0+eps) = 0). */
START_TEST(test_weight_decay_alone)
{
    const qkd_optim_kind kind = _i ? QKD_OPTIM_SGD : QKD_OPTIM_ADAMW;
    qkd_context *ctx = test_context(1);
    qkd_model *m = tiny_model(ctx, 0, 3);
    ck_assert_int_eq(qkd_model_zero_grad(m), QKD_OK);
    qkd_optim_params p = base_params(kind);
    p.lr = 0.05f;
    p.weight_decay = 0.5f;
    qkd_optimizer *opt = make_opt(m, &p);
    snap w0 = snap_take(m, 0);
    for (int t = 1; t <= 3; t++)
        ck_assert_float_eq(do_step(opt).grad_norm, 0.0f);
    snap w3 = snap_take(m, 0);
    const double f = pow(1.0 - (double)p.lr * p.weight_decay, 3);
    for (int i = 0; i < w0.n; i++) {
        for (int64_t j = 0; j < w0.len[i]; j++)
            assert_close(w3.x[i][j], w0.x[i][j] * f, 1e-6, "decay", i, j);
    }
    snap_free(&w3);
    snap_free(&w0);
    qkd_optimizer_free(opt);
    qkd_model_free(m);
    qkd_context_free(ctx);
}
END_TEST

/* ---- updates against the formulas, with a new gradient at every step --------- */

/* One update of n weights from the header's formulas, in double; m and v
 * are this test's own moments. */
static void expect_update(const qkd_optim_params *p, int t, double lr, int64_t n,
                          const float *w, const float *g, double *m, double *v, double *out)
{
    for (int64_t j = 0; j < n; j++) {
        double dir;
        if (p->kind == QKD_OPTIM_SGD) {
            m[j] = (double)p->momentum * m[j] + g[j];
            dir = m[j];
        } else {
            m[j] = (double)p->beta1 * m[j] + (1.0 - p->beta1) * g[j];
            v[j] = (double)p->beta2 * v[j] + (1.0 - p->beta2) * (double)g[j] * g[j];
            double mh = m[j] / (1.0 - pow(p->beta1, t));
            double vh = v[j] / (1.0 - pow(p->beta2, t));
            dir = mh / (sqrt(vh) + p->eps);
        }
        out[j] = w[j] - lr * (dir + (double)p->weight_decay * w[j]);
    }
}

START_TEST(test_steps_match_formulas)
{
    const qkd_optim_kind kind = _i ? QKD_OPTIM_SGD : QKD_OPTIM_ADAMW;
    qkd_context *ctx = test_context(2);
    qkd_model *m = tiny_model(ctx, 0, 4);
    qkd_optim_params p = base_params(kind);
    p.lr = kind == QKD_OPTIM_SGD ? 0.1f : 3e-3f;
    p.beta1 = 0.8f; /* far from 1 so that a missing bias correction shows */
    p.beta2 = 0.9f;
    p.momentum = 0.7f;
    p.weight_decay = 0.05f;
    qkd_optimizer *opt = make_opt(m, &p);
    int n = qkd_model_n_tensors(m);
    double *mom[MAXT], *vel[MAXT], *want[MAXT];
    for (int i = 0; i < n; i++) {
        qkd_tensor_info info = {.size = sizeof info};
        ck_assert_int_eq(qkd_model_tensor_info(m, i, &info), QKD_OK);
        mom[i] = calloc((size_t)info.n_elements, sizeof(double));
        vel[i] = calloc((size_t)info.n_elements, sizeof(double));
        want[i] = calloc((size_t)info.n_elements, sizeof(double));
    }
    for (int t = 1; t <= 3; t++) {
        make_grads(m, 100 + (uint64_t)t);
        snap g = snap_take(m, 1), w = snap_take(m, 0);
        for (int i = 0; i < n; i++)
            expect_update(&p, t, p.lr, w.len[i], w.x[i], g.x[i], mom[i], vel[i], want[i]);
        do_step(opt);
        snap got = snap_take(m, 0);
        for (int i = 0; i < n; i++) {
            for (int64_t j = 0; j < w.len[i]; j++)
                assert_close(got.x[i][j], want[i][j], 2e-7, "formula", i, j);
        }
        snap_free(&got);
        snap_free(&w);
        snap_free(&g);
    }
    for (int i = 0; i < n; i++) {
        free(mom[i]);
        free(vel[i]);
        free(want[i]);
    }
    qkd_optimizer_free(opt);
    qkd_model_free(m);
    qkd_context_free(ctx);
}
END_TEST

/* ---- schedules ----------------------------------------------------------------- */

typedef struct sched_case {
    qkd_schedule schedule;
    int64_t warmup, total;
    float min_ratio;
} sched_case;

static const sched_case sched_cases[] = {
    {QKD_SCHEDULE_CONSTANT, 0, 0, 0.0f},
    {QKD_SCHEDULE_CONSTANT, 4, 0, 0.0f},
    {QKD_SCHEDULE_LINEAR, 0, 10, 0.0f},
    {QKD_SCHEDULE_LINEAR, 3, 13, 0.2f},
    {QKD_SCHEDULE_COSINE, 0, 8, 0.0f},
    {QKD_SCHEDULE_COSINE, 5, 25, 0.1f},
    {QKD_SCHEDULE_COSINE, 4, 4, 0.3f}, /* no room to decay: r right after warmup */
};

/* The schedule written from its definition in the header. */
static double expected_factor(const sched_case *c, int64_t t)
{
    if (t < 1)
        t = 1;
    if (t <= c->warmup)
        return (double)t / c->warmup;
    if (c->schedule == QKD_SCHEDULE_CONSTANT)
        return 1.0;
    double prog = c->total > c->warmup ? (double)(t - c->warmup) / (c->total - c->warmup) : 1.0;
    prog = prog > 1.0 ? 1.0 : prog;
    double r = c->min_ratio;
    if (c->schedule == QKD_SCHEDULE_LINEAR)
        return 1.0 - (1.0 - r) * prog;
    return r + (1.0 - r) * 0.5 * (1.0 + cos(3.14159265358979323846 * prog));
}

START_TEST(test_schedule_formula)
{
    const sched_case *c = &sched_cases[_i];
    qkd_context *ctx = test_context(1);
    qkd_model *m = tiny_model(ctx, 1, 5);
    qkd_optim_params p = base_params(QKD_OPTIM_ADAMW);
    p.lr = 0.25f;
    p.schedule = c->schedule;
    p.warmup_steps = c->warmup;
    p.total_steps = c->total;
    p.min_lr_ratio = c->min_ratio;
    qkd_optimizer *opt = make_opt(m, &p);
    for (int64_t t = -1; t <= 40; t++) {
        float lr = qkd_optimizer_lr_at(opt, t);
        double want = p.lr * expected_factor(c, t);
        ck_assert_msg(fabs(lr - want) <= 1e-7 * p.lr, "case %d step %lld: lr %.9g, expected %.9g",
                      _i, (long long)t, (double)lr, want);
    }
    /* landmarks, by hand */
    if (c->warmup > 0) {
        ck_assert_float_eq_tol(qkd_optimizer_lr_at(opt, 1), p.lr / (float)c->warmup, 1e-8f);
        ck_assert_float_eq_tol(qkd_optimizer_lr_at(opt, c->warmup), p.lr, 1e-8f);
    }
    if (c->schedule != QKD_SCHEDULE_CONSTANT) {
        float end = p.lr * c->min_ratio;
        ck_assert_float_eq_tol(qkd_optimizer_lr_at(opt, c->total + (c->total == c->warmup)), end,
                               1e-8f);
        ck_assert_float_eq_tol(qkd_optimizer_lr_at(opt, c->total + 100), end, 1e-8f);
    }
    if (c->total > c->warmup && (c->total - c->warmup) % 2 == 0) {
        /* halfway through the decay: both schedules sit at (1 + r) / 2 */
        int64_t mid = c->warmup + (c->total - c->warmup) / 2;
        ck_assert_float_eq_tol(qkd_optimizer_lr_at(opt, mid), p.lr * (1.0f + c->min_ratio) / 2,
                               1e-7f);
    }
    /* the steps use the schedule, counted from 1 */
    make_grads(m, 9);
    for (int64_t t = 1; t <= 3; t++)
        ck_assert_float_eq(do_step(opt).lr, qkd_optimizer_lr_at(opt, t));
    qkd_optimizer_free(opt);
    qkd_model_free(m);
    qkd_context_free(ctx);
}
END_TEST

/* Warmup reaches the weights: SGD without momentum moves by lr_t g. */
START_TEST(test_warmup_moves_weights)
{
    qkd_context *ctx = test_context(1);
    qkd_model *m = tiny_model(ctx, 1, 6);
    make_grads(m, 11);
    qkd_optim_params p = base_params(QKD_OPTIM_SGD);
    p.lr = 0.5f;
    p.momentum = 0.0f;
    p.warmup_steps = 4;
    qkd_optimizer *opt = make_opt(m, &p);
    snap g = snap_take(m, 1), w0 = snap_take(m, 0);
    do_step(opt); /* lr / 4 */
    do_step(opt); /* lr / 2 */
    snap w2 = snap_take(m, 0);
    for (int i = 0; i < g.n; i++) {
        for (int64_t j = 0; j < g.len[i]; j++)
            assert_close(w2.x[i][j], w0.x[i][j] - 0.75 * p.lr * g.x[i][j], 1e-6, "warmup", i,
                         j);
    }
    snap_free(&w2);
    snap_free(&w0);
    snap_free(&g);
    qkd_optimizer_free(opt);
    qkd_model_free(m);
    qkd_context_free(ctx);
}
END_TEST

/* ---- clipping ------------------------------------------------------------------ */

/* SGD without momentum or decay at lr 1 so the update is the gradient the
 * optimizer used. _i: 0 clipped (max = norm / 4), 1 not (max = 2 norm). */
START_TEST(test_clipping)
{
    qkd_context *ctx = test_context(2);
    qkd_model *m = tiny_model(ctx, 0, 7);
    make_grads(m, 13);
    snap g = snap_take(m, 1), w0 = snap_take(m, 0);
    double sum = 0.0;
    for (int i = 0; i < g.n; i++)
        sum += sq_norm(g.x[i], g.len[i]);
    const double norm = sqrt(sum);
    ck_assert(norm > 0.1);

    qkd_optim_params p = base_params(QKD_OPTIM_SGD);
    p.lr = 1.0f;
    p.momentum = 0.0f;
    p.max_grad_norm = (float)(_i ? 2.0 * norm : norm / 4.0);
    qkd_optimizer *opt = make_opt(m, &p);
    qkd_step_info info = do_step(opt);
    ck_assert_int_eq(info.clipped, !_i);
    ck_assert_msg(fabs(info.grad_norm - norm) <= 1e-6 * norm, "norm %g, expected %g",
                  (double)info.grad_norm, norm);

    const double factor = _i ? 1.0 : p.max_grad_norm / norm;
    snap w1 = snap_take(m, 0);
    double update_sq = 0.0;
    for (int i = 0; i < g.n; i++) {
        for (int64_t j = 0; j < g.len[i]; j++) {
            assert_close(w1.x[i][j], w0.x[i][j] - g.x[i][j] * factor, 1e-6, "clip", i, j);
            double d = (double)w0.x[i][j] - w1.x[i][j];
            update_sq += d * d;
        }
    }
    /* a clipped update has exactly the norm asked for */
    double want = _i ? norm : p.max_grad_norm;
    ck_assert_msg(fabs(sqrt(update_sq) - want) <= 1e-4 * want, "update norm %g, expected %g",
                  sqrt(update_sq), want);
    /* the model's gradients were not scaled */
    snap g1 = snap_take(m, 1);
    ck_assert(snap_equal(&g, &g1));
    snap_free(&g1);
    snap_free(&w1);
    snap_free(&w0);
    snap_free(&g);
    qkd_optimizer_free(opt);
    qkd_model_free(m);
    qkd_context_free(ctx);
}
END_TEST

/* ---- groups -------------------------------------------------------------------- */

static void set_grad_value(qkd_context *ctx, qkd_model *m, int index, int64_t j, float value)
{
    qkd__backend *be = ctx->backend;
    ck_assert_int_eq(be->upload(be, qkd__model_grad_dev(m, index) + j, &value, sizeof value),
                     QKD_OK);
}

/* Tensor 1 at half the rate, tensor 2 frozen (with a NaN gradient, which
 * must neither reach it nor skip the step nor enter the norm). */
START_TEST(test_groups)
{
    qkd_context *ctx = test_context(1);
    qkd_model *m = tiny_model(ctx, 1, 8);
    make_grads(m, 17);
    qkd_optim_params p = base_params(QKD_OPTIM_SGD);
    p.lr = 0.1f;
    p.momentum = 0.0f;
    qkd_optimizer *opt = make_opt(m, &p);
    ck_assert_int_eq(qkd_optimizer_set_group(opt, 1, 0.5f, 0), QKD_OK);
    ck_assert_int_eq(qkd_optimizer_set_group(opt, 2, 1.0f, 1), QKD_OK);
    snap g = snap_take(m, 1), w0 = snap_take(m, 0);
    set_grad_value(ctx, m, 2, 0, NAN);
    double sum = 0.0;
    for (int i = 0; i < g.n; i++)
        sum += i == 2 ? 0.0 : sq_norm(g.x[i], g.len[i]);

    qkd_step_info info = do_step(opt);
    ck_assert_msg(fabs(info.grad_norm - sqrt(sum)) <= 1e-6 * sqrt(sum),
                  "norm %g, expected %g without the frozen tensor", (double)info.grad_norm,
                  sqrt(sum));
    snap w1 = snap_take(m, 0);
    ck_assert(tensor_equal(&w0, &w1, 2));
    for (int i = 0; i < g.n; i++) {
        if (i == 2)
            continue;
        double lr = i == 1 ? 0.05 : 0.1;
        for (int64_t j = 0; j < g.len[i]; j++)
            assert_close(w1.x[i][j], w0.x[i][j] - lr * g.x[i][j], 1e-6, "group", i, j);
    }

    /* unfreezing makes it train again; lr_scale 0 stops a tensor too */
    set_grad_value(ctx, m, 2, 0, g.x[2][0]);
    ck_assert_int_eq(qkd_optimizer_set_group(opt, 2, 1.0f, 0), QKD_OK);
    ck_assert_int_eq(qkd_optimizer_set_group(opt, 1, 0.0f, 0), QKD_OK);
    do_step(opt);
    snap w2 = snap_take(m, 0);
    ck_assert(!tensor_equal(&w1, &w2, 2));
    ck_assert(tensor_equal(&w1, &w2, 1));
    snap_free(&w2);
    snap_free(&w1);
    snap_free(&w0);
    snap_free(&g);
    qkd_optimizer_free(opt);
    qkd_model_free(m);
    qkd_context_free(ctx);
}
END_TEST

/* ---- presets ------------------------------------------------------------------- */

static int ends_with(const char *s, const char *tail)
{
    size_t a = strlen(s), b = strlen(tail);
    return a >= b && strcmp(s + a - b, tail) == 0;
}

/* Which tensors a preset must freeze, decided from the GGUF names (the
 * learned quantizer tensors end in .scale and .zero). */
static int named_frozen(const char *name, unsigned presets)
{
    int ov = ends_with(name, ".attn_v.weight") || ends_with(name, ".attn_output.weight");
    int embed_norm = strcmp(name, "token_embd.weight") == 0 ||
                     strcmp(name, "output.weight") == 0 || ends_with(name, "_norm.weight");
    return ((presets & QKD_PRESET_OV_FREEZE) && ov) ||
           ((presets & QKD_PRESET_FREEZE_EMBED_NORM) && embed_norm) ||
           ((presets & QKD_PRESET_SCALES_ONLY) && !ends_with(name, ".scale"));
}

/* Bind an ASYM quantizer with learned scales and zero points to every
 * linear of m (the table gains a .scale and a .zero per linear), the
 * scales shrunk by a fifth so that some codes clamp. */
static qkd_quantizer *bind_learned(qkd_context *ctx, qkd_model *m, int bits, int group)
{
    qkd_quant_params qp;
    qkd_quant_params_init(&qp);
    qp.bits = bits;
    qp.group_size = group;
    qp.learn_scales = 1;
    qkd_quantizer *q = NULL;
    ck_assert_int_eq(qkd_quantizer_create(ctx, &qp, &q), QKD_OK);
    ck_assert_int_eq(qkd_model_set_quantizer(m, q, QKD_QUANT_TARGET_LINEAR), QKD_OK);
    ck_assert_int_le(qkd_model_n_tensors(m), MAXT);
    for (int i = 0; i < qkd_model_n_tensors(m); i++) {
        qkd_tensor_info info = {.size = sizeof info};
        ck_assert_int_eq(qkd_model_tensor_info(m, i, &info), QKD_OK);
        if (info.kind != QKD_TENSOR_QUANT_SCALE)
            continue;
        float v[256];
        ck_assert_int_le(info.n_elements, 256);
        ck_assert_int_eq(qkd_model_tensor_get(m, i, v, (size_t)info.n_elements), QKD_OK);
        for (int64_t k = 0; k < info.n_elements; k++)
            v[k] *= 0.8f;
        ck_assert_int_eq(qkd_model_tensor_set(m, i, v, (size_t)info.n_elements), QKD_OK);
    }
    return q;
}

/* _i: bit 0 tied, bits 1-3 the presets (1..7), on a student whose linears
 * learn their scales and zero points. */
START_TEST(test_presets)
{
    const int tied = _i & 1;
    const unsigned presets = (unsigned)(_i >> 1) + 1;
    qkd_context *ctx = test_context(1);
    qkd_model *m = tiny_model(ctx, tied, 9);
    qkd_quantizer *q = bind_learned(ctx, m, 4, 4);
    make_grads(m, 19); /* with some codes clamped, the zero points get gradient too */
    qkd_optim_params p = base_params(QKD_OPTIM_SGD);
    qkd_optimizer *opt = make_opt(m, &p);
    ck_assert_int_eq(qkd_optimizer_apply_preset(opt, presets), QKD_OK);
    snap w0 = snap_take(m, 0);
    do_step(opt);
    snap w1 = snap_take(m, 0);
    int n_frozen = 0;
    for (int i = 0; i < w0.n; i++) {
        qkd_tensor_info info = {.size = sizeof info};
        ck_assert_int_eq(qkd_model_tensor_info(m, i, &info), QKD_OK);
        int want = named_frozen(info.name, presets);
        n_frozen += want;
        ck_assert_msg(tensor_equal(&w0, &w1, i) == want, "preset %u: %s %s", presets,
                      info.name, want ? "changed" : "did not train");
    }
    /* per layer: v and o; plus token_embd, output (untied), 2 norms a layer
     * and output_norm; scales-only: all but a scale per linear */
    int n_layers = 2;
    int want_n = (presets & 4) ? w0.n - 7 * n_layers
                               : ((presets & 1) ? 2 * n_layers : 0) +
                                     ((presets & 2) ? 1 + !tied + 2 * n_layers + 1 : 0);
    ck_assert_int_eq(n_frozen, want_n);
    snap_free(&w1);
    snap_free(&w0);
    qkd_optimizer_free(opt);
    qkd_model_free(m);
    qkd_quantizer_free(q);
    qkd_context_free(ctx);
}
END_TEST

/* Scales-only distillation of a 2-bit g32 stories260K student from its
 * float teacher on one batch (AdamW, forward KL): a few steps lower the
 * loss by more than 15% (3.92 to 3.13 as written) and change nothing but
 * the scale tensors (the weights and the zero points stay bit for bit). */
START_TEST(test_scales_only_training)
{
    enum { B = 2, T = 64, STEPS = 12 };
    int32_t tokens[B * T];
    const char *path =
        test_shared("models/stories260K/reference/gen_greedy_n256.input_token_ids.txt");
    if (!path)
        return;
    FILE *f = fopen(path, "r");
    ck_assert_ptr_nonnull(f);
    for (int i = 0; i < B * T; i++)
        ck_assert_int_eq(fscanf(f, "%d", &tokens[i]), 1);
    fclose(f);
    if (!(path = test_shared("models/stories260K/stories260K.bin")))
        return;
    qkd_context *ctx = test_context(2);
    qkd_model *teacher = NULL, *student = NULL;
    ck_assert_int_eq(qkd_model_load(ctx, path, &teacher), QKD_OK);
    ck_assert_int_eq(qkd_model_load(ctx, path, &student), QKD_OK);
    qkd_quant_params qp;
    qkd_quant_params_init(&qp);
    qp.bits = 2;
    qp.group_size = 32;
    qp.learn_scales = 1;
    qkd_quantizer *q = NULL;
    ck_assert_int_eq(qkd_quantizer_create(ctx, &qp, &q), QKD_OK);
    ck_assert_int_eq(qkd_model_set_quantizer(student, q, QKD_QUANT_TARGET_LINEAR), QKD_OK);
    qkd_loss *loss = test_one_term_loss(ctx, QKD_LOSS_FKL, 0);
    qkd_optim_params p = base_params(QKD_OPTIM_ADAMW);
    p.lr = 5e-4f;
    qkd_optimizer *opt = make_opt(student, &p);
    ck_assert_int_eq(qkd_optimizer_apply_preset(opt, QKD_PRESET_SCALES_ONLY), QKD_OK);
    ck_assert_int_eq(qkd_model_forward(teacher, tokens, B, T), QKD_OK);
    snap w0 = snap_take(student, 0);
    float first = 0.0f, last = 0.0f;
    for (int step = 0; step <= STEPS; step++) {
        ck_assert_int_eq(qkd_model_zero_grad(student), QKD_OK);
        ck_assert_int_eq(qkd_model_forward(student, tokens, B, T), QKD_OK);
        ck_assert_int_eq(qkd_loss_compute(loss, student, teacher, NULL, &last), QKD_OK);
        ck_assert_int_eq(qkd_model_backward(student, NULL), QKD_OK);
        if (step < STEPS)
            do_step(opt);
        first = step == 0 ? last : first;
    }
    ck_assert_msg(last < 0.85f * first, "KL %g after %d steps, %g at the start", (double)last,
                  STEPS, (double)first);
    snap w1 = snap_take(student, 0);
    int n_scales = 0;
    for (int i = 0; i < w0.n; i++) {
        qkd_tensor_info info = {.size = sizeof info};
        ck_assert_int_eq(qkd_model_tensor_info(student, i, &info), QKD_OK);
        const int is_scale = info.kind == QKD_TENSOR_QUANT_SCALE;
        n_scales += is_scale;
        ck_assert_msg(tensor_equal(&w0, &w1, i) == !is_scale, "%s %s", info.name,
                      is_scale ? "did not train" : "changed");
    }
    ck_assert_int_eq(n_scales, 7 * 5);
    snap_free(&w1);
    snap_free(&w0);
    qkd_optimizer_free(opt);
    qkd_loss_free(loss);
    qkd_model_free(teacher);
    qkd_model_free(student);
    qkd_quantizer_free(q);
    qkd_context_free(ctx);
}
END_TEST

/* An optimizer holds the table of its creation: binding or unbinding a
 * quantizer with learned scales afterwards makes its step fail with STATE
 * and change nothing; scales-only needs learned scales; one created after
 * binding keeps moments for the scales too. */
START_TEST(test_table_changes)
{
    qkd_context *ctx = test_context(1);
    qkd_model *m = tiny_model(ctx, 0, 33);
    qkd_optim_params p = base_params(QKD_OPTIM_ADAMW);
    qkd_optimizer *before = make_opt(m, &p);
    ck_assert_int_eq(qkd_optimizer_apply_preset(before, QKD_PRESET_SCALES_ONLY), QKD_ERR_STATE);
    const size_t bytes_before = qkd_optimizer_state_bytes(before);
    qkd_quantizer *q = bind_learned(ctx, m, 3, 8);
    make_grads(m, 34);
    snap w0 = snap_take(m, 0);
    ck_assert_int_eq(qkd_optimizer_step(before, NULL), QKD_ERR_STATE);
    ck_assert_ptr_nonnull(strstr(qkd_context_last_error(ctx), "learn_scales"));
    qkd_optimizer *after = make_opt(m, &p);
    ck_assert_uint_gt(qkd_optimizer_state_bytes(after), bytes_before);
    do_step(after);
    snap w1 = snap_take(m, 0);
    ck_assert(!snap_equal(&w0, &w1));
    ck_assert_int_eq(qkd_model_set_quantizer(m, NULL, 0), QKD_OK);
    ck_assert_int_eq(qkd_optimizer_step(after, NULL), QKD_ERR_STATE);
    snap_free(&w1);
    snap_free(&w0);
    qkd_optimizer_free(before);
    qkd_optimizer_free(after);
    qkd_model_free(m);
    qkd_quantizer_free(q);
    qkd_context_free(ctx);
}
END_TEST

/* ---- non-finite gradients ------------------------------------------------------- */

static void *state_copy(const qkd_optimizer *opt, size_t *n)
{
    *n = qkd_optimizer_state_bytes(opt);
    void *s = malloc(*n);
    ck_assert_ptr_nonnull(s);
    ck_assert_int_eq(qkd_optimizer_state_get(opt, s, *n), QKD_OK);
    return s;
}

START_TEST(test_non_finite_skips)
{
    const qkd_optim_kind kind = _i ? QKD_OPTIM_SGD : QKD_OPTIM_ADAMW;
    qkd_context *ctx = test_context(2);
    qkd_model *m = tiny_model(ctx, 0, 10);
    qkd_optim_params p = base_params(kind);
    p.max_grad_norm = 1.0f;
    qkd_optimizer *opt = make_opt(m, &p);
    make_grads(m, 23);
    do_step(opt); /* moments are no longer zero */

    /* a NaN weight in the final norm turns the backward's gradients NaN */
    int idx;
    ck_assert_int_eq(qkd_model_tensor_find(m, "output_norm.weight", &idx), QKD_OK);
    float w[8];
    ck_assert_int_eq(qkd_model_tensor_get(m, idx, w, 8), QKD_OK);
    w[3] = NAN;
    ck_assert_int_eq(qkd_model_tensor_set(m, idx, w, 8), QKD_OK);
    make_grads(m, 29);
    snap w0 = snap_take(m, 0);
    size_t n0, n1;
    void *s0 = state_copy(opt, &n0);

    qkd_step_info info = {.size = sizeof info};
    ck_assert_int_eq(qkd_optimizer_step(opt, &info), QKD_ERR_NON_FINITE);
    ck_assert_int_eq(info.skipped, 1);
    ck_assert_int_eq(info.clipped, 0);
    ck_assert_int_eq(info.step, 1);
    ck_assert(!isfinite(info.grad_norm));
    ck_assert_float_eq(info.lr, qkd_optimizer_lr_at(opt, 2));
    ck_assert_ptr_nonnull(strstr(qkd_context_last_error(ctx), "skipped"));
    snap w1 = snap_take(m, 0);
    ck_assert(snap_equal(&w0, &w1));
    void *s1 = state_copy(opt, &n1);
    ck_assert_uint_eq(n0, n1);
    ck_assert(memcmp(s0, s1, n0) == 0);

    /* an Inf gradient is skipped too; info may be NULL */
    w[3] = 1.0f;
    ck_assert_int_eq(qkd_model_tensor_set(m, idx, w, 8), QKD_OK);
    make_grads(m, 29);
    set_grad_value(ctx, m, 0, 5, INFINITY);
    ck_assert_int_eq(qkd_optimizer_step(opt, NULL), QKD_ERR_NON_FINITE);
    /* and the next finite step is step 2 */
    make_grads(m, 31);
    ck_assert_int_eq(do_step(opt).step, 2);
    free(s1);
    free(s0);
    snap_free(&w1);
    snap_free(&w0);
    qkd_optimizer_free(opt);
    qkd_model_free(m);
    qkd_context_free(ctx);
}
END_TEST

/* ---- state ----------------------------------------------------------------------- */

static uint32_t rd_u32(const unsigned char *q)
{
    uint32_t v;
    memcpy(&v, q, sizeof v);
    return v;
}

static int64_t rd_i64(const unsigned char *q)
{
    int64_t v;
    memcpy(&v, q, sizeof v);
    return v;
}

/* The documented layout, read back after one step from zero moments, where
 * SGD's u = g, and AdamW's m = (1-b1) g, v = (1-b2) g^2. */
START_TEST(test_state_layout)
{
    const qkd_optim_kind kind = _i ? QKD_OPTIM_SGD : QKD_OPTIM_ADAMW;
    qkd_context *ctx = test_context(1);
    qkd_model *m = tiny_model(ctx, 1, 11);
    make_grads(m, 37);
    qkd_optim_params p = base_params(kind);
    qkd_optimizer *opt = make_opt(m, &p);
    do_step(opt);
    snap g = snap_take(m, 1);
    const int nm = kind == QKD_OPTIM_ADAMW ? 2 : 1;
    size_t n;
    unsigned char *s = state_copy(opt, &n);
    size_t want = 24 + 8 * (size_t)g.n + 4 * (size_t)nm * (size_t)qkd_model_n_params(m);
    ck_assert_uint_eq(n, want);
    ck_assert(memcmp(s, "QKDO", 4) == 0);
    ck_assert_uint_eq(rd_u32(s + 4), 1);
    ck_assert_uint_eq(rd_u32(s + 8), (uint32_t)kind);
    ck_assert_uint_eq(rd_u32(s + 12), (uint32_t)g.n);
    ck_assert_int_eq(rd_i64(s + 16), 1);
    const unsigned char *q = s + 24 + 8 * (size_t)g.n;
    for (int i = 0; i < g.n; i++) {
        ck_assert_int_eq(rd_i64(s + 24 + 8 * (size_t)i), g.len[i]);
        for (int k = 0; k < nm; k++) {
            for (int64_t j = 0; j < g.len[i]; j++, q += 4) {
                float got;
                memcpy(&got, q, 4);
                double gj = g.x[i][j];
                double w = kind == QKD_OPTIM_SGD ? gj
                           : k == 0              ? (1.0 - p.beta1) * gj
                                                 : (1.0 - p.beta2) * gj * gj;
                ck_assert_msg(fabs(got - w) <= 1e-6 * fabs(w),
                              "moment %d of tensor %d element %lld: %g, expected %g", k, i,
                              (long long)j, (double)got, w);
            }
        }
    }
    ck_assert_ptr_eq(q, s + n);
    free(s);
    snap_free(&g);
    qkd_optimizer_free(opt);
    qkd_model_free(m);
    qkd_context_free(ctx);
}
END_TEST

/* Steps on batches from..to-1; returns the optimizer's step count. */
static int64_t train(qkd_model *m, qkd_optimizer *opt, int from, int to)
{
    int64_t step = 0;
    for (int k = from; k < to; k++) {
        make_grads(m, 1000 + (uint64_t)k);
        step = do_step(opt).step;
    }
    return step;
}

static qkd_optim_params resume_params(qkd_optim_kind kind)
{
    qkd_optim_params p = base_params(kind);
    p.schedule = QKD_SCHEDULE_COSINE;
    p.warmup_steps = 2;
    p.total_steps = 6;
    p.weight_decay = 0.01f;
    p.max_grad_norm = 0.5f; /* clips some steps */
    return p;
}

/* 3 steps, save, 2 more -> W1; restore weights and state into a fresh
 * model and optimizer, 2 steps -> W2 == W1 bit for bit. */
START_TEST(test_state_round_trip)
{
    const qkd_optim_kind kind = _i ? QKD_OPTIM_SGD : QKD_OPTIM_ADAMW;
    qkd_context *ctx = test_context(2);
    qkd_optim_params p = resume_params(kind);
    qkd_model *a = tiny_model(ctx, 0, 12);
    qkd_optimizer *oa = make_opt(a, &p);
    ck_assert_int_eq(qkd_optimizer_apply_preset(oa, QKD_PRESET_OV_FREEZE), QKD_OK);
    ck_assert_int_eq(train(a, oa, 0, 3), 3);
    size_t n;
    void *saved = state_copy(oa, &n);
    snap w_saved = snap_take(a, 0);
    ck_assert_int_eq(train(a, oa, 3, 5), 5);
    snap w1 = snap_take(a, 0);

    qkd_model *b = tiny_model(ctx, 0, 99);
    for (int i = 0; i < w_saved.n; i++)
        ck_assert_int_eq(qkd_model_tensor_set(b, i, w_saved.x[i], (size_t)w_saved.len[i]),
                         QKD_OK);
    qkd_optimizer *ob = make_opt(b, &p);
    ck_assert_int_eq(qkd_optimizer_apply_preset(ob, QKD_PRESET_OV_FREEZE), QKD_OK);
    ck_assert_int_eq(qkd_optimizer_state_set(ob, saved, n), QKD_OK);
    ck_assert_int_eq(train(b, ob, 3, 5), 5);
    snap w2 = snap_take(b, 0);
    ck_assert_msg(snap_equal(&w1, &w2), "resumed run differs from the uninterrupted one");

    /* the state matters: on the same batches without it the run differs */
    qkd_model *c = tiny_model(ctx, 0, 99);
    for (int i = 0; i < w_saved.n; i++)
        ck_assert_int_eq(qkd_model_tensor_set(c, i, w_saved.x[i], (size_t)w_saved.len[i]),
                         QKD_OK);
    qkd_optimizer *oc = make_opt(c, &p);
    ck_assert_int_eq(qkd_optimizer_apply_preset(oc, QKD_PRESET_OV_FREEZE), QKD_OK);
    ck_assert_int_eq(train(c, oc, 3, 5), 2);
    snap w3 = snap_take(c, 0);
    ck_assert(!snap_equal(&w1, &w3));

    snap_free(&w3);
    snap_free(&w2);
    snap_free(&w1);
    snap_free(&w_saved);
    free(saved);
    qkd_optimizer_free(oc);
    qkd_optimizer_free(ob);
    qkd_optimizer_free(oa);
    qkd_model_free(c);
    qkd_model_free(b);
    qkd_model_free(a);
    qkd_context_free(ctx);
}
END_TEST

/* ---- deferred steps ------------------------------------------------------------ */

/* Two models from seed with an optimizer each; twins_free frees them. */
static void twins_open(qkd_context *ctx, const qkd_optim_params *p, uint64_t seed,
                       qkd_model *m[2], qkd_optimizer *opt[2])
{
    for (int k = 0; k < 2; k++) {
        m[k] = tiny_model(ctx, 0, seed);
        opt[k] = make_opt(m[k], p);
    }
}

static void twins_free(qkd_model *m[2], qkd_optimizer *opt[2])
{
    for (int k = 0; k < 2; k++) {
        qkd_optimizer_free(opt[k]);
        qkd_model_free(m[k]);
    }
}

/* One step of `how`: 0 qkd_optimizer_step, 1 deferred. */
static void step_by(qkd_optimizer *opt, int how)
{
    ck_assert_int_eq(how ? qkd_optimizer_step_deferred(opt) : qkd_optimizer_step(opt, NULL),
                     QKD_OK);
}

/* Deferred AdamW steps (decided on the device) give the synchronous steps'
 * weights, state and reports bit for bit, with a schedule, weight decay
 * and clipping that catches some steps, deferred and synchronous steps
 * mixed; SGD's deferred step is the synchronous one. */
START_TEST(test_deferred_matches_step)
{
    const qkd_optim_kind kind = _i ? QKD_OPTIM_SGD : QKD_OPTIM_ADAMW;
    static const int how[] = {1, 1, 1, 0, 1, 1};
    qkd_context *ctx = test_context(2);
    qkd_optim_params p = resume_params(kind);
    qkd_model *m[2];
    qkd_optimizer *opt[2];
    twins_open(ctx, &p, 12, m, opt);
    qkd_step_info info[2] = {{.size = sizeof info[0]}, {.size = sizeof info[1]}};
    ck_assert_int_eq(qkd_optimizer_last_step(opt[1], &info[1]), QKD_ERR_STATE);
    int clipped = 0;
    for (int s = 0; s < 6; s++)
        for (int k = 0; k < 2; k++) {
            make_grads(m[k], 2000 + (uint64_t)s);
            step_by(opt[k], k && how[s]);
            ck_assert_int_eq(qkd_optimizer_last_step(opt[k], &info[k]), QKD_OK);
            clipped += k && info[k].clipped;
        }
    ck_assert_int_gt(clipped, 0);
    ck_assert_int_eq(info[1].step, 6);
    ck_assert_mem_eq(&info[0], &info[1], sizeof info[0]);
    snap w0 = snap_take(m[0], 0), w1 = snap_take(m[1], 0);
    ck_assert(snap_equal(&w0, &w1));
    /* the state of queued steps, read without a report first */
    make_grads(m[0], 3000), make_grads(m[1], 3000);
    step_by(opt[0], 0), step_by(opt[1], 1);
    size_t n0, n1;
    void *s0 = state_copy(opt[0], &n0), *s1 = state_copy(opt[1], &n1);
    ck_assert_uint_eq(n0, n1);
    ck_assert_mem_eq(s0, s1, n0);
    free(s0), free(s1);
    snap_free(&w0), snap_free(&w1);
    twins_free(m, opt);
    qkd_context_free(ctx);
}
END_TEST

/* Add x to every weight of tensor `index` of m (a writer between steps). */
static void shift_tensor(qkd_model *m, int index, float x)
{
    qkd_tensor_info info = {.size = sizeof info};
    ck_assert_int_eq(qkd_model_tensor_info(m, index, &info), QKD_OK);
    float *w = test_vec_new((size_t)info.n_elements);
    ck_assert_int_eq(qkd_model_tensor_get(m, index, w, (size_t)info.n_elements), QKD_OK);
    for (int64_t k = 0; k < info.n_elements; k++)
        w[k] += x;
    ck_assert_int_eq(qkd_model_tensor_set(m, index, w, (size_t)info.n_elements), QKD_OK);
    free(w);
}

/* How many of m's quantized tensors a deferred step quantized as it
 * updated them (their next forward reads that Q(w)). */
static int updated_count(const qkd_model *m)
{
    int n = 0;
    for (int i = 0; i < m->n_weights; i++)
        n += m->student.t[i].updated;
    return n;
}

/* A bf16 student's deferred AdamW step also writes the Q(w) its next
 * forward reads, in place of that forward's fake quantization
 * (qkd__model_update_quantizes). Twins, one stepping synchronously (so
 * that its forwards quantize every tensor again), give the same logits
 * and weights bit for bit over steps that include a weight written after
 * a step, one written before a skipped step (a NaN gradient: the update
 * must still write Q(w) of the weights it leaves), and groups of 8, which
 * do not tile the down projections' 12 columns (left to the forward). */
START_TEST(test_deferred_student_quantizes)
{
    qkd_context *ctx = test_context(2);
    const qkd_optim_params p = resume_params(QKD_OPTIM_ADAMW);
    for (int group = 4; group <= 8; group += 4) {
        qkd_model *m[2];
        qkd_optimizer *opt[2];
        qkd_quantizer *q[2];
        for (int k = 0; k < 2; k++) {
            m[k] = tiny_model(ctx, 0, 14);
            ck_assert_int_eq(qkd_model_set_matmul_precision(m[k], QKD_MATMUL_BF16), QKD_OK);
            qkd_quant_params qp;
            qkd_quant_params_init(&qp);
            qp.bits = 3;
            qp.group_size = group;
            ck_assert_int_eq(qkd_quantizer_create(ctx, &qp, &q[k]), QKD_OK);
            ck_assert_int_eq(qkd_model_set_quantizer(m[k], q[k], QKD_QUANT_TARGET_LINEAR),
                             QKD_OK);
            opt[k] = make_opt(m[k], &p);
        }
        const int attn_q = qkd__model_tensor_index(m[0], QKD_TENSOR_ATTN_Q, 0);
        const int n_quantized = 7 * 2, n_down = 2;
        static float logits[2][TB * TT * TV];
        for (int s = 0; s < 6; s++) {
            for (int k = 0; k < 2; k++) {
                make_grads(m[k], 5000 + (uint64_t)s);
                ck_assert_int_eq(qkd_model_logits(m[k], logits[k], TB * TT * TV), QKD_OK);
                if (s == 2) { /* written after the forward, then a skipped step */
                    shift_tensor(m[k], attn_q, 0.01f);
                    set_grad_value(ctx, m[k], 1, 3, NAN);
                }
                qkd_step_info info = {.size = sizeof info};
                if (k) /* the report settles the step: the schedule counts a skipped one */
                    ck_assert_int_eq(qkd_optimizer_step_deferred(opt[k]), QKD_OK);
                ck_assert_int_eq(k ? qkd_optimizer_last_step(opt[k], &info)
                                   : qkd_optimizer_step(opt[k], &info),
                                 s != 2 ? QKD_OK : QKD_ERR_NON_FINITE);
                if (s == 4) /* written between the step and the next forward */
                    shift_tensor(m[k], attn_q, -0.02f);
            }
            ck_assert_msg(memcmp(logits[0], logits[1], sizeof logits[0]) == 0,
                          "group %d, step %d: the logits differ", group, s);
            ck_assert_int_eq(updated_count(m[0]), 0);
            ck_assert_int_eq(updated_count(m[1]), n_quantized - (group == 8 ? n_down : 0) -
                                                      (s == 4)); /* attn_q written since */
        }
        make_grads(m[0], 6000), make_grads(m[1], 6000);
        ck_assert_int_eq(qkd_model_logits(m[0], logits[0], TB * TT * TV), QKD_OK);
        ck_assert_int_eq(qkd_model_logits(m[1], logits[1], TB * TT * TV), QKD_OK);
        ck_assert_mem_eq(logits[0], logits[1], sizeof logits[0]);
        snap w0 = snap_take(m[0], 0), w1 = snap_take(m[1], 0);
        ck_assert(snap_equal(&w0, &w1));
        snap_free(&w0), snap_free(&w1);
        for (int k = 0; k < 2; k++) {
            qkd_optimizer_free(opt[k]);
            qkd_model_free(m[k]);
            qkd_quantizer_free(q[k]);
        }
    }
    qkd_context_free(ctx);
}
END_TEST

/* A deferred step on a NaN gradient is skipped on the device: it returns
 * OK, changes nothing, and the report says NON_FINITE; the next finite
 * step is step 2 at step 2's rate, as after a synchronous skip. */
START_TEST(test_deferred_non_finite)
{
    qkd_context *ctx = test_context(2);
    qkd_optim_params p = resume_params(QKD_OPTIM_ADAMW);
    qkd_model *m[2];
    qkd_optimizer *opt[2];
    twins_open(ctx, &p, 13, m, opt);
    for (int k = 0; k < 2; k++) {
        make_grads(m[k], 41);
        step_by(opt[k], k);
        make_grads(m[k], 43);
        set_grad_value(ctx, m[k], 1, 3, NAN);
    }
    snap w0 = snap_take(m[1], 0);
    ck_assert_int_eq(qkd_optimizer_step(opt[0], NULL), QKD_ERR_NON_FINITE);
    ck_assert_int_eq(qkd_optimizer_step_deferred(opt[1]), QKD_OK);
    snap w1 = snap_take(m[1], 0);
    ck_assert(snap_equal(&w0, &w1));
    qkd_step_info info = {.size = sizeof info};
    ck_assert_int_eq(qkd_optimizer_last_step(opt[1], &info), QKD_ERR_NON_FINITE);
    ck_assert(info.skipped && info.step == 1 && !isfinite(info.grad_norm));
    ck_assert_ptr_nonnull(strstr(qkd_context_last_error(ctx), "skipped"));
    for (int k = 0; k < 2; k++) {
        make_grads(m[k], 47);
        step_by(opt[k], k);
    }
    ck_assert_int_eq(qkd_optimizer_last_step(opt[1], &info), QKD_OK);
    ck_assert_int_eq(info.step, 2);
    ck_assert_float_eq(info.lr, qkd_optimizer_lr_at(opt[1], 2));
    snap_free(&w0), snap_free(&w1);
    w0 = snap_take(m[0], 0), w1 = snap_take(m[1], 0);
    ck_assert(snap_equal(&w0, &w1));
    snap_free(&w0), snap_free(&w1);
    ck_assert_int_eq(qkd_optimizer_step_deferred(NULL), QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(qkd_optimizer_last_step(NULL, &info), QKD_ERR_INVALID_ARG);
    info.size = 4;
    ck_assert_int_eq(qkd_optimizer_last_step(opt[1], &info), QKD_ERR_INVALID_ARG);
    twins_free(m, opt);
    qkd_context_free(ctx);
}
END_TEST

START_TEST(test_state_errors)
{
    qkd_context *ctx = test_context(1);
    qkd_model *m = tiny_model(ctx, 0, 13);
    qkd_optim_params pa = base_params(QKD_OPTIM_ADAMW);
    qkd_optim_params ps = base_params(QKD_OPTIM_SGD);
    qkd_optimizer *adam = make_opt(m, &pa), *sgd = make_opt(m, &ps);
    make_grads(m, 41);
    do_step(adam);
    size_t n, ns;
    unsigned char *s = state_copy(adam, &n);
    unsigned char *sg = state_copy(sgd, &ns);

    ck_assert_int_eq(qkd_optimizer_state_get(adam, s, n - 1), QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(qkd_optimizer_state_get(adam, NULL, n), QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(qkd_optimizer_state_set(adam, NULL, n), QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(qkd_optimizer_state_set(adam, s, 10), QKD_ERR_FORMAT);
    ck_assert_int_eq(qkd_optimizer_state_set(adam, s, n - 4), QKD_ERR_FORMAT);
    ck_assert_int_eq(qkd_optimizer_state_set(adam, sg, ns), QKD_ERR_SHAPE);
    ck_assert_ptr_nonnull(strstr(qkd_context_last_error(ctx), "SGD"));
    s[0] = 'X';
    ck_assert_int_eq(qkd_optimizer_state_set(adam, s, n), QKD_ERR_FORMAT);
    s[0] = 'Q';
    unsigned char version = s[4];
    s[4] ^= 6;
    ck_assert_int_eq(qkd_optimizer_state_set(adam, s, n), QKD_ERR_FORMAT);
    s[4] = version;
    int64_t neg = -1;
    memcpy(s + 16, &neg, 8);
    ck_assert_int_eq(qkd_optimizer_state_set(adam, s, n), QKD_ERR_FORMAT);
    int64_t one = 1;
    memcpy(s + 16, &one, 8);

    /* another model shape: same tensor count, other sizes */
    qkd_model_config c = tiny_config(0, 12);
    qkd_model *wide = NULL;
    ck_assert_int_eq(qkd_model_create(ctx, &c, &wide), QKD_OK);
    qkd_optimizer *ow = make_opt(wide, &pa);
    ck_assert_int_eq(qkd_optimizer_state_set(ow, s, n), QKD_ERR_SHAPE);
    /* another tensor count */
    qkd_model *tied = tiny_model(ctx, 1, 14);
    qkd_optimizer *ot = make_opt(tied, &pa);
    ck_assert_int_eq(qkd_optimizer_state_set(ot, s, n), QKD_ERR_SHAPE);

    /* failed restores changed nothing; a good one works */
    size_t n2;
    unsigned char *s2 = state_copy(adam, &n2);
    ck_assert(memcmp(s, s2, n) == 0);
    ck_assert_int_eq(qkd_optimizer_state_set(sgd, sg, ns), QKD_OK);
    ck_assert_int_eq(qkd_optimizer_state_set(adam, s, n), QKD_OK);

    free(s2);
    free(sg);
    free(s);
    qkd_optimizer_free(ot);
    qkd_optimizer_free(ow);
    qkd_optimizer_free(sgd);
    qkd_optimizer_free(adam);
    qkd_model_free(tied);
    qkd_model_free(wide);
    qkd_model_free(m);
    qkd_context_free(ctx);
}
END_TEST

/* ---- errors ------------------------------------------------------------------------ */

typedef struct bad_case {
    const char *field; /* expected in the message */
    void (*edit)(qkd_optim_params *p);
} bad_case;

static void e_size(qkd_optim_params *p) { p->size = 8; }
static void e_kind(qkd_optim_params *p) { p->kind = (qkd_optim_kind)7; }
static void e_lr0(qkd_optim_params *p) { p->lr = 0.0f; }
static void e_lr_nan(qkd_optim_params *p) { p->lr = NAN; }
static void e_lr_inf(qkd_optim_params *p) { p->lr = INFINITY; }
static void e_beta1(qkd_optim_params *p) { p->beta1 = 1.0f; }
static void e_beta2(qkd_optim_params *p) { p->beta2 = -0.1f; }
static void e_eps(qkd_optim_params *p) { p->eps = 0.0f; }
static void e_momentum(qkd_optim_params *p) { p->kind = QKD_OPTIM_SGD; p->momentum = 1.0f; }
static void e_decay(qkd_optim_params *p) { p->weight_decay = -0.1f; }
static void e_clip(qkd_optim_params *p) { p->max_grad_norm = -1.0f; }
static void e_clip_nan(qkd_optim_params *p) { p->max_grad_norm = NAN; }
static void e_schedule(qkd_optim_params *p) { p->schedule = (qkd_schedule)9; }
static void e_warmup(qkd_optim_params *p) { p->warmup_steps = -1; }
static void e_total(qkd_optim_params *p)
{
    p->schedule = QKD_SCHEDULE_COSINE;
    p->warmup_steps = 10;
    p->total_steps = 5;
}
static void e_total0(qkd_optim_params *p) { p->schedule = QKD_SCHEDULE_LINEAR; }
static void e_ratio(qkd_optim_params *p) { p->min_lr_ratio = 1.5f; }

static const bad_case bad_cases[] = {
    {"size", e_size},         {"kind", e_kind},         {"lr", e_lr0},
    {"lr", e_lr_nan},         {"lr", e_lr_inf},         {"beta1", e_beta1},
    {"beta2", e_beta2},       {"eps", e_eps},           {"momentum", e_momentum},
    {"weight_decay", e_decay}, {"max_grad_norm", e_clip}, {"max_grad_norm", e_clip_nan},
    {"schedule", e_schedule}, {"warmup_steps", e_warmup}, {"total_steps", e_total},
    {"total_steps", e_total0}, {"min_lr_ratio", e_ratio},
};

START_TEST(test_bad_params)
{
    qkd_context *ctx = test_context(1);
    qkd_model *m = tiny_model(ctx, 1, 15);
    qkd_optim_params p;
    qkd_optim_params_init(&p);
    bad_cases[_i].edit(&p);
    qkd_optimizer *opt = (qkd_optimizer *)&p; /* must be reset to NULL */
    ck_assert_int_eq(qkd_optimizer_create(m, &p, &opt), QKD_ERR_INVALID_ARG);
    ck_assert_ptr_null(opt);
    ck_assert_msg(strstr(qkd_context_last_error(ctx), bad_cases[_i].field) != NULL,
                  "message '%s' does not name %s", qkd_context_last_error(ctx),
                  bad_cases[_i].field);
    qkd_model_free(m);
    qkd_context_free(ctx);
}
END_TEST

START_TEST(test_bad_calls)
{
    qkd_context *ctx = test_context(1);
    qkd_model *m = tiny_model(ctx, 1, 16);
    qkd_optim_params p = base_params(QKD_OPTIM_ADAMW);
    qkd_optimizer *opt = NULL;
    ck_assert_int_eq(qkd_optimizer_create(NULL, &p, &opt), QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(qkd_optimizer_create(m, &p, NULL), QKD_ERR_INVALID_ARG);
    opt = make_opt(m, &p);
    int n = qkd_model_n_tensors(m);
    ck_assert_int_eq(qkd_optimizer_set_group(opt, -1, 1.0f, 0), QKD_ERR_RANGE);
    ck_assert_int_eq(qkd_optimizer_set_group(opt, n, 1.0f, 0), QKD_ERR_RANGE);
    ck_assert_int_eq(qkd_optimizer_set_group(opt, 0, -1.0f, 0), QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(qkd_optimizer_set_group(opt, 0, NAN, 0), QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(qkd_optimizer_set_group(NULL, 0, 1.0f, 0), QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(qkd_optimizer_apply_preset(opt, 1u << 5), QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(qkd_optimizer_apply_preset(NULL, 1), QKD_ERR_INVALID_ARG);

    make_grads(m, 43);
    snap w0 = snap_take(m, 0);
    qkd_step_info info = {.size = 4};
    ck_assert_int_eq(qkd_optimizer_step(opt, &info), QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(qkd_optimizer_step(NULL, NULL), QKD_ERR_INVALID_ARG);
    snap w1 = snap_take(m, 0);
    ck_assert(snap_equal(&w0, &w1)); /* refused calls changed nothing */
    ck_assert_int_eq(qkd_optimizer_step(opt, NULL), QKD_OK);

    ck_assert_uint_eq(qkd_optimizer_state_bytes(NULL), 0);
    ck_assert_int_eq(qkd_optimizer_state_get(NULL, &info, 1), QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(qkd_optimizer_state_set(NULL, &info, 1), QKD_ERR_INVALID_ARG);
    ck_assert_float_eq(qkd_optimizer_lr_at(NULL, 1), 0.0f);
    qkd_optimizer_free(NULL);
    snap_free(&w1);
    snap_free(&w0);
    qkd_optimizer_free(opt);
    qkd_model_free(m);
    qkd_context_free(ctx);
}
END_TEST

/* ---- allocation ---------------------------------------------------------------------- */

/* Steps allocate nothing; every failed allocation in create is reported
 * and leaks nothing. */
START_TEST(test_allocation)
{
    test_alloc cnt;
    qkd_context *ctx = test_counting_context(&cnt, 1);
    qkd_model *m = tiny_model(ctx, 0, 17);
    make_grads(m, 47);
    qkd_optim_params p = base_params(_i ? QKD_OPTIM_SGD : QKD_OPTIM_ADAMW);
    p.max_grad_norm = 0.01f; /* clipping uses the scratch */

    int failures = 0;
    for (;;) {
        long live = cnt.live;
        test_alloc_fail_in(&cnt, failures, 0);
        qkd_optimizer *opt = NULL;
        qkd_status st = qkd_optimizer_create(m, &p, &opt);
        cnt.fail_at = -1;
        if (st == QKD_OK) {
            long before = cnt.n;
            ck_assert_int_eq(do_step(opt).clipped, 1);
            do_step(opt);
            ck_assert_int_eq(cnt.n, before);
            qkd_optimizer_free(opt);
            ck_assert_int_eq(cnt.live, live);
            break;
        }
        ck_assert_int_eq(st, QKD_ERR_NO_MEMORY);
        ck_assert_ptr_null(opt);
        ck_assert_int_eq(cnt.live, live);
        failures++;
    }
    ck_assert_int_ge(failures, 3); /* host table, norms, device state */
    qkd_model_free(m);
    qkd_context_free(ctx);
}
END_TEST

Suite *suite_optim(void)
{
    Suite *s = suite_create("optim");
    TCase *tc = tcase_create("updates");
    tcase_add_test(tc, test_params_defaults);
    tcase_add_loop_test(tc, test_constant_gradient_closed_form, 0, 2);
    tcase_add_loop_test(tc, test_weight_decay_alone, 0, 2);
    tcase_add_loop_test(tc, test_steps_match_formulas, 0, 2);
    tcase_add_test(tc, test_warmup_moves_weights);
    tcase_add_loop_test(tc, test_clipping, 0, 2);
    tcase_add_test(tc, test_groups);
    tcase_add_loop_test(tc, test_presets, 0, 14);
    tcase_add_test(tc, test_table_changes);
    tcase_add_loop_test(tc, test_non_finite_skips, 0, 2);
    suite_add_tcase(s, tc);

    tc = tcase_create("scales-only");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_scales_only_training);
    suite_add_tcase(s, tc);

    tc = tcase_create("schedules");
    tcase_add_loop_test(tc, test_schedule_formula, 0,
                        (int)(sizeof sched_cases / sizeof sched_cases[0]));
    suite_add_tcase(s, tc);

    tc = tcase_create("state");
    tcase_add_loop_test(tc, test_state_layout, 0, 2);
    tcase_add_loop_test(tc, test_state_round_trip, 0, 2);
    tcase_add_loop_test(tc, test_deferred_matches_step, 0, 2);
    tcase_add_test(tc, test_deferred_non_finite);
    tcase_add_test(tc, test_deferred_student_quantizes);
    tcase_add_test(tc, test_state_errors);
    suite_add_tcase(s, tc);

    tc = tcase_create("errors");
    tcase_add_loop_test(tc, test_bad_params, 0, (int)(sizeof bad_cases / sizeof bad_cases[0]));
    tcase_add_test(tc, test_bad_calls);
    tcase_add_loop_test(tc, test_allocation, 0, 2);
    suite_add_tcase(s, tc);
    return s;
}
