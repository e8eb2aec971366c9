/* qkd distill: quantization-aware distillation of a teacher into a low-bit
 * student, with progress, JSONL metrics, checkpoints (Ctrl-C saves one),
 * and a held-out report of the teacher, the round-to-nearest student and
 * the distilled student. Public API only. */
#include <jansson.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "distill_cli.h"

enum { EXIT_INTERRUPTED = 130 }; /* 128 + SIGINT, as shells report it */

static volatile sig_atomic_t interrupted;

static void on_sigint(int sig)
{
    (void)sig;
    interrupted = 1;
}

/* Ctrl-C asks the run to stop after the current step; a second one (the
 * handler resets itself) kills the process the usual way. */
static void catch_sigint(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigint;
    sa.sa_flags = SA_RESETHAND;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
}

/* ---- evaluation ------------------------------------------------------------ */

typedef struct eval_row {
    double ce, kl; /* mean nats/token; kl < 0: not measured */
} eval_row;

typedef struct eval_report {
    eval_row teacher, rtn, student;
    int64_t tokens;
} eval_report;

/* Held-out CE of m, and its KL to the teacher unless m is the teacher. A
 * CONTINUOUS student is evaluated with hard rounding (STE's forward). */
static int evaluate(distill_job *j, const distill_opts *o, qkd_model *m, eval_row *r,
                    int64_t *tokens)
{
    qkd_context *ctx = j->s.ctx;
    const int is_student = m == j->student;
    qkd_status st = QKD_OK;
    if (is_student && o->continuous)
        st = qkd_quantizer_set_estimator(j->quant, QKD_ESTIMATOR_STE);
    if (st == QKD_OK)
        st = qkd_distill_eval_ce(ctx, m, j->eval, o->batch, o->seq, &r->ce, tokens);
    r->kl = -1.0;
    if (st == QKD_OK && is_student)
        st = qkd_distill_eval_kl(ctx, m, j->s.model, j->eval, o->batch, o->seq, &r->kl);
    if (st == QKD_OK && is_student && o->continuous)
        st = qkd_quantizer_set_estimator(j->quant, QKD_ESTIMATOR_CONTINUOUS);
    return st == QKD_OK ? CLI_EXIT_OK : cli_fail(ctx, st, "evaluation");
}

static void print_row(const char *name, const eval_row *r)
{
    printf("%-28s %10.6f %10.4f", name, r->ce, exp(r->ce));
    if (r->kl >= 0.0)
        printf(" %12.6f\n", r->kl);
    else
        printf(" %12s\n", "-");
}

static void print_report(const eval_report *e, int64_t windows)
{
    printf("held-out: %lld windows, %lld tokens\n", (long long)windows, (long long)e->tokens);
    printf("%-28s %10s %10s %12s\n", "model", "CE", "PPL", "KL(t||s)");
    print_row("teacher (float)", &e->teacher);
    print_row("student, round-to-nearest", &e->rtn);
    print_row("student, distilled", &e->student);
}

/* ---- JSON ---------------------------------------------------------------------- */

/* A JSON number, or null for NaN/Inf (JSON has no such numbers). */
static json_t *real(double v)
{
    return isfinite(v) ? json_real(v) : json_null();
}

static json_t *row_json(const eval_row *r)
{
    json_t *o = json_pack("{s:o, s:o}", "ce", real(r->ce), "ppl", real(exp(r->ce)));
    if (o && r->kl >= 0.0)
        json_object_set_new(o, "kl", real(r->kl));
    return o;
}

/* What was run: the options that define the training (--resume must be
 * given the same ones). */
static json_t *config_json(const distill_opts *o)
{
    return json_pack("{s:s, s:s, s:i, s:i, s:s, s:s, s:i, s:i, s:b, s:b, s:s, s:i, s:i, s:i, "
                     "s:i, s:o, s:s, s:i, s:I, s:s, s:b, s:b}",
                     "method", o->method, "scheme", o->scheme, "bits", o->bits, "group",
                     o->group, "clip", o->clip ? o->clip : "preset", "loss", o->loss,
                     "act_bits", o->act_bits, "kv_bits", o->kv_bits, "learn_scales",
                     o->learn_scales || o->scales_only, "scales_only", o->scales_only, "data",
                     o->data ? o->data : "data-free", "data_free", o->data_free, "steps",
                     o->steps, "batch", o->batch,
                     "seq", o->seq, "lr", real(o->lr), "schedule", o->schedule, "warmup",
                     o->warmup, "seed", (json_int_t)o->seed, "teacher", o->teacher,
                     "teacher_bf16", o->teacher_bf16, "student_bf16", o->student_bf16);
}

static int write_summary(const distill_job *j, const distill_opts *o, const eval_report *e,
                         double wall_s, double train_s)
{
    const float *losses;
    int64_t steps = qkd_distill_history(j->run, &losses);
    json_t *root = config_json(o);
    json_t *run = json_pack("{s:I, s:I, s:o, s:o, s:o}", "steps", (json_int_t)steps,
                            "train_tokens", (json_int_t)(steps * o->batch * o->seq), "wall_s",
                            real(wall_s), "train_s", real(train_s), "final_loss",
                            real(steps > 0 ? losses[steps - 1] : NAN));
    json_t *eval = json_pack(
        "{s:{s:I, s:I, s:s}, s:o, s:o, s:o}", "eval", "windows",
        (json_int_t)qkd_dataset_n_windows(j->eval, o->seq, QKD_SPLIT_EVAL), "tokens",
        (json_int_t)e->tokens, "source",
        o->eval_text ? o->eval_text : "the last windows of the training data", "teacher",
        row_json(&e->teacher), "rtn", row_json(&e->rtn), "student", row_json(&e->student));
    int ok = root && run && eval && json_object_update(root, run) == 0 &&
             json_object_update(root, eval) == 0 &&
             json_dump_file(root, j->summary_path, JSON_INDENT(2) | JSON_REAL_PRECISION(9)) == 0;
    json_decref(root);
    json_decref(run);
    json_decref(eval);
    if (!ok)
        fprintf(stderr, "qkd: cannot write %s\n", j->summary_path);
    return ok ? CLI_EXIT_OK : CLI_EXIT_FAIL;
}

/* ---- per-step reporting ------------------------------------------------------------ */

typedef struct progress {
    distill_job *j;
    const distill_opts *o;
    FILE *metrics;
    int tty;
    double t0;          /* when this process's steps started */
    int64_t step0;      /* the step they started from */
    int64_t log_every;  /* plain-line period when stderr is not a terminal */
    int save_failed;
} progress;

static void write_metrics(progress *p, const qkd_distill_stats *st)
{
    json_t *line = json_pack("{s:I, s:o, s:o, s:o, s:i, s:i, s:o, s:o}", "step",
                             (json_int_t)st->step, "loss", real(st->loss), "lr", real(st->lr),
                             "grad_norm", real(st->grad_norm), "clipped", st->clipped,
                             "skipped", st->skipped, "tokens_per_s", real(st->tokens_per_s),
                             "elapsed_s", real(cli_now() - p->t0));
    const distill_opts *o = p->o;
    for (int i = 0; line && o->n_terms > 1 && i < o->n_terms; i++) {
        float v = NAN;
        char key[32];
        qkd_loss_term_value(p->j->loss, i, &v);
        snprintf(key, sizeof key, "loss_%s", distill_loss_name(o->kinds[i]));
        json_object_set_new(line, key, real(v));
    }
    char *text = line ? json_dumps(line, JSON_COMPACT | JSON_REAL_PRECISION(8)) : NULL;
    if (text) {
        fprintf(p->metrics, "%s\n", text);
        fflush(p->metrics);
    }
    free(text);
    json_decref(line);
}

static void show_progress(const progress *p, const qkd_distill_stats *st)
{
    enum { WIDTH = 24 };
    double dt = cli_now() - p->t0;
    int64_t done = st->step - p->step0, left = st->total_steps - st->step;
    double eta = done > 0 ? dt / (double)done * (double)left : 0.0;
    if (p->tty) {
        int fill = (int)(st->step * WIDTH / st->total_steps);
        fprintf(stderr, "\r[%.*s%*s] %lld/%lld loss %.4f lr %.2e %.0f tok/s ETA %.0f s ", fill,
                "========================", WIDTH - fill, "", (long long)st->step,
                (long long)st->total_steps, st->loss, st->lr, st->tokens_per_s, eta);
        if (left == 0)
            fputc('\n', stderr);
    } else if (st->step % p->log_every == 0 || left == 0) {
        fprintf(stderr, "step %lld/%lld loss %.4f lr %.2e %.0f tok/s ETA %.0f s\n",
                (long long)st->step, (long long)st->total_steps, st->loss, st->lr,
                st->tokens_per_s, eta);
    }
}

static int save_checkpoint(distill_job *j)
{
    qkd_status st = qkd_distill_save(j->run, j->ckpt_path);
    return st == QKD_OK ? CLI_EXIT_OK : cli_fail(j->s.ctx, st, "checkpoint");
}

static int on_step(void *user, const qkd_distill_stats *st)
{
    progress *p = user;
    write_metrics(p, st);
    show_progress(p, st);
    if (p->o->continuous) /* the next step's; a positive finite value cannot fail */
        (void)qkd_quantizer_set_sharpness(p->j->quant,
                                          distill_sharpness(st->step + 1, st->total_steps));
    /* A skipped step (non-finite loss or gradients) is not saved: the
     * checkpoint stays at the last good state. */
    const int every = p->o->checkpoint_every;
    if (every > 0 && !st->skipped && st->step % every == 0 && st->step < st->total_steps &&
        save_checkpoint(p->j) != CLI_EXIT_OK) {
        p->save_failed = 1;
        return 1;
    }
    return interrupted;
}

/* ---- resuming -------------------------------------------------------------------- */

/* Keep the metrics of steps up to `step` (those after it are redone). */
static int trim_metrics(const char *path, int64_t step)
{
    FILE *in = fopen(path, "r");
    if (!in)
        return CLI_EXIT_OK;
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *out = fopen(tmp, "w");
    char line[8192];
    while (out && fgets(line, sizeof line, in)) {
        json_t *obj = json_loads(line, 0, NULL);
        json_t *s = obj ? json_object_get(obj, "step") : NULL;
        if (json_is_integer(s) && json_integer_value(s) <= step)
            fputs(line, out);
        json_decref(obj);
    }
    fclose(in);
    if (!out || fclose(out) != 0 || rename(tmp, path) != 0) {
        fprintf(stderr, "qkd: cannot rewrite %s\n", path);
        return CLI_EXIT_FAIL;
    }
    return CLI_EXIT_OK;
}

/* A fresh run records its options in DIR/run.json (numbers with all 17
 * digits, so that they read back exactly); a resumed one must match them,
 * or it would not continue the same training. A switch added to the tool
 * after the run was started is absent there: off, it matches. */
static int check_config(const distill_job *j, const distill_opts *o)
{
    json_t *now = config_json(o), *was = json_load_file(j->config_path, 0, NULL);
    int rc = now ? CLI_EXIT_OK : CLI_EXIT_FAIL;
    if (rc == CLI_EXIT_OK && !o->resume &&
        json_dump_file(now, j->config_path, JSON_INDENT(2) | JSON_REAL_PRECISION(17)) != 0) {
        fprintf(stderr, "qkd: cannot write %s\n", j->config_path);
        rc = CLI_EXIT_FAIL;
    }
    const char *key;
    json_t *v;
    if (rc == CLI_EXIT_OK && o->resume && was) {
        json_object_foreach(now, key, v) {
            json_t *old = json_object_get(was, key);
            if (!(old ? json_equal(v, old) : json_is_false(v))) {
                fprintf(stderr, "qkd: --resume: '%s' differs from the run in %s; give the "
                                "options that run was started with\n", key, j->config_path);
                rc = CLI_EXIT_USAGE;
                break;
            }
        }
    }
    json_decref(now);
    json_decref(was);
    return rc;
}

static int resume(distill_job *j, const distill_opts *o)
{
    if (access(j->ckpt_path, R_OK) != 0) {
        fprintf(stderr, "qkd: --resume: no checkpoint at %s\n", j->ckpt_path);
        return CLI_EXIT_FAIL;
    }
    qkd_status st = qkd_distill_resume(j->run, j->ckpt_path);
    if (st != QKD_OK)
        return cli_fail(j->s.ctx, st, "--resume");
    int64_t step = qkd_distill_step(j->run);
    fprintf(stderr, "qkd: resumed at step %lld of %d\n", (long long)step, o->steps);
    if (o->continuous)
        (void)qkd_quantizer_set_sharpness(j->quant, distill_sharpness(step + 1, o->steps));
    return trim_metrics(j->metrics_path, step);
}

/* ---- the command --------------------------------------------------------------------- */

/* Steps, with progress; CLI_EXIT_OK, EXIT_INTERRUPTED (checkpoint saved)
 * or CLI_EXIT_FAIL. */
static int train(distill_job *j, const distill_opts *o, progress *p)
{
    p->metrics = fopen(j->metrics_path, o->resume ? "a" : "w");
    if (!p->metrics) {
        fprintf(stderr, "qkd: cannot write %s\n", j->metrics_path);
        return CLI_EXIT_FAIL;
    }
    p->t0 = cli_now();
    p->step0 = qkd_distill_step(j->run);
    catch_sigint();
    qkd_status st = qkd_distill_run(j->run, 0);
    fclose(p->metrics);
    p->metrics = NULL;
    if (p->tty && st != QKD_OK)
        fputc('\n', stderr);
    if (p->save_failed)
        return CLI_EXIT_FAIL;
    if (st == QKD_ERR_CANCELLED && interrupted) {
        int rc = save_checkpoint(j);
        fprintf(stderr, "qkd: interrupted at step %lld; checkpoint %s; continue with --resume\n",
                (long long)qkd_distill_step(j->run), j->ckpt_path);
        return rc == CLI_EXIT_OK ? EXIT_INTERRUPTED : rc;
    }
    if (st != QKD_OK)
        return cli_fail(j->s.ctx, st, "distill");
    return save_checkpoint(j);
}

/* DIR/student.gguf: the student as trained (a GGUF format grid is written
 * in that format, other grids as their rounded weights in F32) with the
 * teacher's tokenizer, ready for `qkd generate`, `qkd eval` or llama.cpp. */
static int save_student(distill_job *j, const distill_opts *o)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/student.gguf", o->out);
    qkd_gguf_params p;
    qkd_gguf_params_init(&p);
    p.tokenizer = j->s.tok;
    qkd_status st = qkd_model_save_gguf(j->student, path, &p);
    if (st != QKD_OK)
        return cli_fail(j->s.ctx, st, path);
    fprintf(stderr, "student written to %s\n", path);
    return CLI_EXIT_OK;
}

static int run_job(distill_job *j, const distill_opts *o, const cli_common *c)
{
    const double t_start = cli_now();
    eval_report e;
    memset(&e, 0, sizeof e);
    progress p = {.j = j, .o = o, .tty = isatty(STDERR_FILENO),
                  .log_every = o->steps >= 20 ? o->steps / 20 : 1};
    /* The round-to-nearest student is the bound student before any
     * calibration or training. */
    int rc = distill_open(j, o, c);
    if (rc == CLI_EXIT_OK)
        rc = check_config(j, o);
    if (rc == CLI_EXIT_OK)
        rc = evaluate(j, o, j->s.model, &e.teacher, &e.tokens);
    if (rc == CLI_EXIT_OK)
        rc = evaluate(j, o, j->student, &e.rtn, NULL);
    if (rc == CLI_EXIT_OK)
        rc = distill_prepare_run(j, o, on_step, &p);
    if (rc == CLI_EXIT_OK && o->resume)
        rc = resume(j, o);
    if (rc != CLI_EXIT_OK)
        return rc;
    const double t_train = cli_now();
    rc = train(j, o, &p);
    if (rc != CLI_EXIT_OK)
        return rc;
    const double train_s = cli_now() - t_train;
    rc = evaluate(j, o, j->student, &e.student, NULL);
    if (rc != CLI_EXIT_OK)
        return rc;
    print_report(&e, qkd_dataset_n_windows(j->eval, o->seq, QKD_SPLIT_EVAL));
    rc = save_student(j, o);
    return rc == CLI_EXIT_OK ? write_summary(j, o, &e, cli_now() - t_start, train_s) : rc;
}

static int distill_main(int argc, char **argv)
{
    distill_opts o;
    cli_common c;
    int rc = distill_parse(argc, argv, &o, &c);
    if (rc != CLI_CONTINUE)
        return rc;
    distill_job j;
    rc = run_job(&j, &o, &c);
    distill_close(&j);
    return rc;
}

const cli_command cli_cmd_distill = {
    .name = "distill",
    .summary = "quantization-aware distillation of a teacher into a low-bit student",
    .usage = "--teacher MODEL (--data FILE | --data-free N) --out DIR [options]",
    .help =
        "  --teacher MODEL      the float teacher; the student starts as a copy of it\n"
        "  --teacher-bf16       run the frozen teacher's matmuls with bf16 inputs (fp32\n"
        "                       accumulation; AVX-512 BF16 where the CPU has it)\n"
        "  --student-bf16       the same for the student's matmuls; its weights,\n"
        "                       gradients and optimizer state stay fp32 (with\n"
        "                       --backend cuda: the tensor cores)\n"
        "  --logits-rows R      the loss computes both models' logits R positions at a\n"
        "                       time, never all at once (less memory; 0: whole, default)\n"
        "  --tokenizer T        tokenizer file (default: the one inside MODEL)\n"
        "  --method M           preset: bitdistiller (clip + cakld), tsld (ternary,\n"
        "                       tsld+ce), llm-qat (sym per channel, fkl, data-free),\n"
        "                       ov-freeze (fkl, v/o frozen), cont-approx (clip, fkl,\n"
        "                       continuous rounding and clamping annealed, lr 1e-3),\n"
        "                       none (asym g32, fkl; default).\n"
        "                       Options given explicitly override the preset\n"
        "  --bits B             2, 3, 4 or 8 (default 4; ignored by ternary)\n"
        "  --group G            group size; 0 per output row, -1 per tensor\n"
        "  --scheme S           sym, asym, clip (asym + searched clip) or ternary\n"
        "  --clip C             none, weight, output (searched) or a fixed ratio\n"
        "  --act-bits N         fake-quantize activations per token (0: off)\n"
        "  --kv-bits N          fake-quantize the keys and values per token (0: off)\n"
        "  --learn-scales       train each group's scale (and asym zero point) too (LSQ)\n"
        "  --scales-only        train the learned scales only, every weight frozen\n"
        "  --loss L             ce, fkl, rkl, jsd, cakld, tsld, mse; a sum as tsld+ce\n"
        "  --data FILE          training text, or a token file (QKDT)\n"
        "  --data-free N        N sequences written by the teacher (cached in DIR)\n"
        "  --eval-text FILE     held-out text (default: the last windows of the data)\n"
        "  --eval-windows N     held-out windows, at most (default 64)\n"
        "  --steps S            optimizer steps (default 100)\n"
        "  --batch B            sequences per step (default 8)\n"
        "  --seq T              tokens per sequence (default 64)\n"
        "  --lr LR              AdamW learning rate (default 5e-4; cont-approx 1e-3)\n"
        "  --schedule S         constant, linear or cosine (default cosine)\n"
        "  --warmup N           warmup steps (default steps/10)\n"
        "  --out DIR            checkpoint.qkdc, metrics.jsonl, summary.json, run.json\n"
        "  --resume             continue from DIR/checkpoint.qkdc\n"
        "  --checkpoint-every K also save every K steps (always at the end and on\n"
        "                       Ctrl-C, which exits with status 130)\n"
        "  --seed S             data order and data-free generation (default 1)\n",
    .run = distill_main,
};
