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
    test_golden g; /* the cursor is on the first tensor record */
    int32_t tokens[GOLD_B * GOLD_T];
    double beta, loss;
    int32_t n_tensors;
} fixture;

/* Read the header; the cursor is left on the first tensor record. */
static fixture fixture_open(void)
{
    const char *path = test_source("tests/fixtures/stories260K_kdqat_golden.bin");
    fixture f = {.g = test_golden_open(path, "QKDKDQ01")};
    test_golden *g = &f.g;
    ck_assert_int_eq(test_golden_i32(g), GOLD_B);
    ck_assert_int_eq(test_golden_i32(g), GOLD_T);
    memcpy(f.tokens, test_golden_take(g, sizeof f.tokens), sizeof f.tokens);
    test_golden_take(g, sizeof f.tokens); /* targets: CAKLD does not use them */
    f.beta = test_golden_f64(g);
    f.loss = test_golden_f64(g);
    f.n_tensors = test_golden_i32(g);
    return f;
}

/* ---- the step ---- */

static void expect_ok(qkd_context *ctx, qkd_status s, const char *what)
{
    test_expect_status(ctx, s, QKD_OK, what);
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
        test_golden_check_grad(&f.g, st.student);
    ck_assert_uint_eq(f.g.at, f.g.len);
    step_free(&st);
    free(f.g.raw);
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
    free(f.g.raw);
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
