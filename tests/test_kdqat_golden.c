/* The golden KD-QAT step: one step of distilling stories260K into a W4
 * asymmetric g32 student (STE) with CAKLD, compared with the independent
 * float64 PyTorch implementation in tests/golden/torch_kdqat_step.py (its
 * docstring gives the semantics and the fixture's layout). Only the public
 * API is used, as a host application would. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "qkd/loss.h"
#include "qkd/qkd.h"
#include "qkd/quant.h"
#include "testutil.h"

enum { GOLD_B = 2, GOLD_T = 32 };

/* ---- reading the fixture ---- */

typedef struct fixture {
    uint8_t *raw;
    size_t len, at;
    int32_t tokens[GOLD_B * GOLD_T];
    double beta, loss;
    int32_t n_tensors;
} fixture;

static const void *take(fixture *f, size_t n)
{
    ck_assert_msg(f->len - f->at >= n, "golden file truncated at byte %zu", f->at);
    const void *p = f->raw + f->at;
    f->at += n;
    return p;
}

static int32_t take_i32(fixture *f)
{
    int32_t v;
    memcpy(&v, take(f, 4), 4);
    return v;
}

static int64_t take_i64(fixture *f)
{
    int64_t v;
    memcpy(&v, take(f, 8), 8);
    return v;
}

static double take_f64(fixture *f)
{
    double v;
    memcpy(&v, take(f, 8), 8);
    return v;
}

/* Read the header; the cursor is left on the first tensor record. */
static fixture fixture_open(void)
{
    fixture f = {0};
    f.raw = test_read_file(test_source("tests/fixtures/stories260K_kdqat_golden.bin"), &f.len);
    ck_assert_msg(memcmp(take(&f, 8), "QKDKDQ01", 8) == 0, "bad golden magic");
    ck_assert_int_eq(take_i32(&f), GOLD_B);
    ck_assert_int_eq(take_i32(&f), GOLD_T);
    memcpy(f.tokens, take(&f, sizeof f.tokens), sizeof f.tokens);
    take(&f, sizeof f.tokens); /* targets: CAKLD does not use them */
    f.beta = take_f64(&f);
    f.loss = take_f64(&f);
    f.n_tensors = take_i32(&f);
    return f;
}

/* ---- the step ---- */

static void expect_ok(qkd_context *ctx, qkd_status s, const char *what)
{
    ck_assert_msg(s == QKD_OK, "%s: %s (\"%s\")", what, qkd_status_name(s),
                  qkd_context_last_error(ctx));
}

typedef struct step {
    qkd_context *ctx;
    qkd_model *teacher, *student;
    qkd_quantizer *quant;
    qkd_loss *loss;
    float beta, value;
} step;

/* Bind the W4 asymmetric g32 STE quantizer to every linear weight. */
static void make_student(step *st)
{
    qkd_quant_params qp;
    qkd_quant_params_init(&qp);
    qp.scheme = QKD_QUANT_ASYM;
    qp.bits = 4;
    qp.group_size = 32;
    qp.estimator = QKD_ESTIMATOR_STE;
    expect_ok(st->ctx, qkd_quantizer_create(st->ctx, &qp, &st->quant), "quantizer");
    expect_ok(st->ctx, qkd_model_set_quantizer(st->student, st->quant, QKD_QUANT_TARGET_LINEAR),
              "bind quantizer");
}

/* Load teacher and student (quantized when `quantize`) and forward both. */
static step step_setup(const char *model_path, const int32_t *tokens, int quantize)
{
    step st = {.ctx = test_context(2)};
    expect_ok(st.ctx, qkd_model_load(st.ctx, model_path, &st.teacher), "load teacher");
    expect_ok(st.ctx, qkd_model_load(st.ctx, model_path, &st.student), "load student");
    if (quantize)
        make_student(&st);
    expect_ok(st.ctx, qkd_model_forward(st.teacher, tokens, GOLD_B, GOLD_T), "teacher forward");
    expect_ok(st.ctx, qkd_model_forward(st.student, tokens, GOLD_B, GOLD_T), "student forward");
    return st;
}

/* CAKLD with the teacher's confidence as beta, then the student's
 * backward from zeroed gradients. */
static void step_run(step *st)
{
    expect_ok(st->ctx, qkd_loss_teacher_confidence(st->teacher, NULL, &st->beta), "confidence");
    qkd_loss_term term;
    qkd_loss_term_init(&term, QKD_LOSS_CAKLD);
    term.beta = st->beta;
    expect_ok(st->ctx, qkd_loss_create(st->ctx, &st->loss), "loss");
    expect_ok(st->ctx, qkd_loss_add(st->loss, &term), "loss term");
    expect_ok(st->ctx, qkd_loss_compute(st->loss, st->student, st->teacher, NULL, &st->value),
              "CAKLD");
    expect_ok(st->ctx, qkd_model_zero_grad(st->student), "zero_grad");
    expect_ok(st->ctx, qkd_model_backward(st->student, NULL), "student backward");
}

static void step_free(step *st)
{
    qkd_loss_free(st->loss);
    qkd_model_free(st->student);
    qkd_model_free(st->teacher);
    qkd_quantizer_free(st->quant);
    qkd_context_free(st->ctx);
}

/* The student gradient of tensor `index`, malloc'd (caller frees). */
static float *student_grad(const step *st, int index, int64_t n)
{
    float *grad = malloc((size_t)n * sizeof(float));
    ck_assert_ptr_nonnull(grad);
    expect_ok(st->ctx, qkd_model_grad_get(st->student, index, grad, (size_t)n), "grad_get");
    return grad;
}

/* Compare one tensor's gradient with the record at f's cursor. */
static void check_grad_record(fixture *f, const step *st)
{
    int32_t name_len = take_i32(f);
    ck_assert(name_len > 0 && name_len < 64);
    char name[64];
    memcpy(name, take(f, (size_t)name_len), (size_t)name_len);
    name[name_len] = '\0';
    int64_t n = take_i64(f);
    double l2_want = take_f64(f);
    int32_t n_samples = take_i32(f);

    int index;
    ck_assert_msg(qkd_model_tensor_find(st->student, name, &index) == QKD_OK, "no tensor %s",
                  name);
    qkd_tensor_info info = {.size = sizeof info};
    ck_assert_int_eq(qkd_model_tensor_info(st->student, index, &info), QKD_OK);
    ck_assert_int_eq(info.n_elements, n);
    float *grad = student_grad(st, index, n);
    double l2 = 0;
    for (int64_t i = 0; i < n; i++)
        l2 += (double)grad[i] * grad[i];
    l2 = sqrt(l2);
    ck_assert_msg(l2_want > 0, "%s: PyTorch's gradient is zero", name);
    ck_assert_msg(fabs(l2 - l2_want) <= 1e-4 * l2_want, "%s: |grad| %.9g vs PyTorch %.9g", name,
                  l2, l2_want);
    for (int32_t s = 0; s < n_samples; s++) {
        int32_t i = take_i32(f);
        double want = take_f64(f);
        ck_assert(i >= 0 && i < n);
        double err = fabs(grad[i] - want);
        ck_assert_msg(err <= 1e-6 || err <= 1e-4 * fabs(want),
                      "%s[%d]: grad %.9g vs PyTorch %.9g", name, i, (double)grad[i], want);
    }
    free(grad);
}

START_TEST(kdqat_golden_w4_asym_g32_cakld)
{
    const char *model_path = test_shared("models/stories260K/stories260K.bin");
    if (!model_path)
        return;
    fixture f = fixture_open();
    step st = step_setup(model_path, f.tokens, 1);
    step_run(&st);
    ck_assert_msg(fabs(st.beta - f.beta) <= 1e-6, "teacher confidence %.9f vs PyTorch %.9f",
                  (double)st.beta, f.beta);
    ck_assert_msg(fabs(st.value - f.loss) <= 1e-5, "CAKLD loss %.9f vs PyTorch %.9f",
                  (double)st.value, f.loss);
    ck_assert_int_eq(f.n_tensors, qkd_model_n_tensors(st.student));
    for (int k = 0; k < f.n_tensors; k++)
        check_grad_record(&f, &st);
    ck_assert_uint_eq(f.at, f.len);
    step_free(&st);
    free(f.raw);
}
END_TEST

/* The script's own self-check, on libqkd's side: a student without a
 * quantizer equals the teacher, so CAKLD and every gradient vanish. */
START_TEST(kdqat_golden_float_student_is_teacher)
{
    const char *model_path = test_shared("models/stories260K/stories260K.bin");
    if (!model_path)
        return;
    fixture f = fixture_open();
    step st = step_setup(model_path, f.tokens, 0);
    step_run(&st);
    ck_assert_msg(fabs(st.value) <= 1e-6, "float student: CAKLD %.3g, want 0", (double)st.value);
    for (int k = 0; k < qkd_model_n_tensors(st.student); k++) {
        qkd_tensor_info info = {.size = sizeof info};
        ck_assert_int_eq(qkd_model_tensor_info(st.student, k, &info), QKD_OK);
        float *grad = student_grad(&st, k, info.n_elements);
        for (int64_t i = 0; i < info.n_elements; i++)
            ck_assert_msg(fabsf(grad[i]) <= 1e-7f, "float student: %s[%lld] = %g, want 0",
                          info.name, (long long)i, (double)grad[i]);
        free(grad);
    }
    step_free(&st);
    free(f.raw);
}
END_TEST

Suite *suite_kdqat_golden(void)
{
    Suite *s = suite_create("kdqat_golden");
    TCase *tc = tcase_create("step");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, kdqat_golden_w4_asym_g32_cakld);
    tcase_add_test(tc, kdqat_golden_float_student_is_teacher);
    suite_add_tcase(s, tc);
    return s;
}
