/* qkd distill: the options, the method presets and the job's handles
 * (distill_setup.c), shared with the run itself (distill.c). */
#ifndef QKD_TOOL_DISTILL_CLI_H
#define QKD_TOOL_DISTILL_CLI_H

#include "cli.h"

typedef struct distill_opts {
    const char *teacher; /* the session's MODEL */
    const char *tokenizer, *data, *eval_text, *out;
    const char *method, *scheme, *loss, *clip, *schedule;
    int bits, group, act_bits, kv_bits;
    int data_free;       /* sequences to generate; 0: --data */
    int steps, batch, seq, warmup, checkpoint_every, eval_windows;
    int resume;
    int learn_scales;    /* --learn-scales: the quantizer's scales are trained */
    int scales_only;     /* --scales-only: and nothing else (implies the above) */
    int teacher_bf16;    /* --teacher-bf16: the teacher's matmuls with bf16 inputs */
    int student_bf16;    /* --student-bf16: the student's, its state staying fp32 */
    int logits_rows;     /* --logits-rows: both models' logits by block, 0: whole */
    float lr;
    uint64_t seed;
    /* Which options were given (a given option beats the method's preset). */
    struct {
        int scheme, loss, group, data_free, warmup, lr;
    } seen;
    /* From the method preset. */
    unsigned optim_presets;
    int continuous;      /* CONTINUOUS estimator with annealed sharpness */
    /* Parsed from the options. */
    qkd_quant_params quant;
    int n_terms;         /* the loss's terms, in order */
    qkd_loss_kind kinds[8];
} distill_opts;

/* Everything a run holds; distill_close frees what is set. */
typedef struct distill_job {
    cli_session s;           /* context, teacher, tokenizer */
    qkd_model *student;
    qkd_quantizer *quant;
    qkd_loss *loss;
    qkd_optimizer *opt;
    qkd_dataset *train;
    qkd_dataset *own_eval;   /* from --eval-text, or NULL */
    const qkd_dataset *eval; /* own_eval or train */
    qkd_distill *run;
    char ckpt_path[4096], metrics_path[4096], summary_path[4096], config_path[4096];
} distill_job;

/* Parse argv into o and c, presets applied. Returns CLI_CONTINUE, or the
 * exit status (help printed, or a usage error reported). */
int distill_parse(int argc, char **argv, distill_opts *o, cli_common *c);

/* Open the teacher, the student, the data and the quantizer; bind and
 * (unless resuming) calibrate it. CLI_EXIT_OK or CLI_EXIT_FAIL (reported;
 * the caller still calls distill_close). */
int distill_open(distill_job *j, const distill_opts *o, const cli_common *c);

/* The loss (CAKLD's beta from the teacher's confidence) and the optimizer,
 * and the run over them. CLI_EXIT_OK or CLI_EXIT_FAIL. */
int distill_prepare_run(distill_job *j, const distill_opts *o, qkd_distill_fn on_step,
                        void *user);

void distill_close(distill_job *j);

/* "fkl" for QKD_LOSS_FKL, as --loss spells it. */
const char *distill_loss_name(qkd_loss_kind kind);

/* The CONTINUOUS estimator's rounding sharpness at step t (1-based) of
 * total: annealed geometrically from 4 to 64. */
float distill_sharpness(int64_t t, int64_t total);

#endif
