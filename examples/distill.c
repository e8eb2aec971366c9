/* Distill a float teacher into a 4-bit student with forward KL: the whole
 * host loop (data, teacher forward, student forward, loss, backward,
 * optimizer step) written out with the public API.
 *
 * Build against an installed libqkd:
 *   cc distill.c $(pkg-config --cflags --libs libqkd) -o distill
 * Run:
 *   ./distill stories260K.bin tok512.bin tinystories.txt [STEPS]
 */
#include <stdio.h>
#include <stdlib.h>

#include <qkd/qkd.h>

enum { B = 8, T = 64, HELD_OUT = 8 };

/* Print the failure (with the context's message) and return 1. */
static int failed(qkd_context *ctx, qkd_status st, const char *what)
{
    if (st == QKD_OK)
        return 0;
    fprintf(stderr, "%s: %s: %s\n", what, qkd_status_name(st), qkd_context_last_error(ctx));
    return 1;
}

typedef struct job {
    qkd_context *ctx;
    qkd_model *teacher, *student;
    qkd_tokenizer *tok;
    qkd_quantizer *quant;
    qkd_loss *loss;
    qkd_optimizer *opt;
    qkd_dataset *data;
} job;

/* Teacher, student (a second copy of the teacher with 4-bit weights),
 * loss, optimizer and data. */
static int setup(job *j, char **argv, int steps)
{
    qkd_quant_params qp;
    qkd_quant_params_init(&qp);
    qp.scheme = QKD_QUANT_ASYM;
    qp.bits = 4;
    qp.group_size = 32;
    qkd_loss_term term;
    qkd_loss_term_init(&term, QKD_LOSS_FKL);
    qkd_optim_params op;
    qkd_optim_params_init(&op);
    op.lr = 5e-4f;
    op.schedule = QKD_SCHEDULE_COSINE;
    op.warmup_steps = steps / 10;
    op.total_steps = steps;
    qkd_context *ctx = j->ctx;
    return failed(ctx, qkd_model_load(ctx, argv[1], &j->teacher), argv[1]) ||
           failed(ctx, qkd_model_set_trainable(j->teacher, 0), "frozen teacher") ||
           failed(ctx, qkd_model_load(ctx, argv[1], &j->student), argv[1]) ||
           failed(ctx, qkd_tokenizer_load(ctx, argv[2], &j->tok), argv[2]) ||
           failed(ctx, qkd_quantizer_create(ctx, &qp, &j->quant), "quantizer") ||
           failed(ctx, qkd_model_set_quantizer(j->student, j->quant, QKD_QUANT_TARGET_LINEAR),
                  "student") ||
           failed(ctx, qkd_loss_create(ctx, &j->loss), "loss") ||
           failed(ctx, qkd_loss_add(j->loss, &term), "loss") ||
           failed(ctx, qkd_optimizer_create(j->student, &op, &j->opt), "optimizer") ||
           failed(ctx, qkd_dataset_from_text(ctx, j->tok, argv[3], &j->data), argv[3]) ||
           failed(ctx, qkd_dataset_set_split(j->data, 1, HELD_OUT), "split");
}

/* One step: B windows of T + 1 tokens, both forwards, loss, backward and
 * the optimizer's update. */
static int step(job *j, int s, int steps)
{
    static int32_t tokens[B * T], targets[B * T];
    float value = 0.0f;
    qkd_step_info info = {.size = sizeof info};
    qkd_context *ctx = j->ctx;
    if (failed(ctx, qkd_dataset_batch(j->data, s, B, T, tokens, targets), "batch") ||
        failed(ctx, qkd_model_forward(j->teacher, tokens, B, T), "teacher forward") ||
        failed(ctx, qkd_model_forward(j->student, tokens, B, T), "student forward") ||
        failed(ctx, qkd_loss_compute(j->loss, j->student, j->teacher, targets, &value), "loss") ||
        failed(ctx, qkd_model_zero_grad(j->student), "zero grad") ||
        failed(ctx, qkd_model_backward(j->student, NULL), "backward"))
        return 1;
    qkd_status st = qkd_optimizer_step(j->opt, &info);
    if (st != QKD_OK && !info.skipped) /* a skipped step (non-finite) is not fatal */
        return failed(ctx, st, "optimizer step");
    if (s % 10 == 0 || s == steps - 1)
        printf("step %4d  loss %.4f  lr %.2e  grad norm %.3f\n", s + 1, value, info.lr,
               info.grad_norm);
    return 0;
}

/* Mean cross-entropy on the held-out windows, in nats/token. */
static int held_out(job *j, qkd_model *m, double *ce)
{
    return failed(j->ctx, qkd_distill_eval_ce(j->ctx, m, j->data, B, T, ce, NULL), "eval");
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: %s TEACHER TOKENIZER TEXT [STEPS]\n", argv[0]);
        return 2;
    }
    int steps = argc > 4 ? atoi(argv[4]) : 100;
    job j = {0};
    if (steps < 1 || qkd_context_create(NULL, &j.ctx) != QKD_OK)
        return 1;
    double ce_teacher, ce_rtn, ce_student;
    int rc = setup(&j, argv, steps) || held_out(&j, j.teacher, &ce_teacher) ||
             held_out(&j, j.student, &ce_rtn);
    for (int s = 0; s < steps && !rc; s++)
        rc = step(&j, s, steps);
    if (!rc && !(rc = held_out(&j, j.student, &ce_student)))
        printf("held-out cross-entropy: teacher %.4f, 4-bit round-to-nearest %.4f, "
               "distilled %.4f\n", ce_teacher, ce_rtn, ce_student);
    qkd_dataset_free(j.data);
    qkd_optimizer_free(j.opt);
    qkd_loss_free(j.loss);
    qkd_model_free(j.student);
    qkd_quantizer_free(j.quant);
    qkd_tokenizer_free(j.tok);
    qkd_model_free(j.teacher);
    qkd_context_free(j.ctx);
    return rc;
}
