/* libqkd: quantization-aware training with knowledge distillation of
 * LLaMA-family models, as an embeddable C library.
 *
 * A short tour:
 *   qkd_context    allocator, log, threads and compute backend (core.h)
 *   qkd_model      load / create a LLaMA model, forward, backward (model.h)
 *   qkd_tokenizer  text <-> token ids (tokenizer.h)
 *   qkd_sampler    greedy / temperature / top-p sampling, generation
 *                  (generate.h)
 *   qkd_quantizer  low-bit weight grids bound to a student; STE or
 *                  continuous gradient estimators (quant.h)
 *   qkd_loss       CE, forward/reverse KL, JSD, CAKLD, TSLD, MSE between the
 *                  teacher's and the student's logits (loss.h)
 *   qkd_optimizer  AdamW / SGD, schedules, clipping, frozen groups (optim.h)
 *   qkd_dataset    token datasets from text, token files or the teacher's
 *                  own generations; seeded, resumable batches (data.h)
 *   qkd_distill    a convenience layer over the public API: the teacher ->
 *                  student -> loss -> optimizer loop for N steps with a
 *                  callback, checkpoints and resume, held-out perplexity and
 *                  KL to the teacher (distill.h)
 *   qkd_eval       zero-shot multiple-choice scoring (PIQA, HellaSwag, ARC,
 *                  BoolQ, WinoGrande, LAMBADA) by log-likelihood (eval.h)
 *
 * Every function that can fail returns a qkd_status; the details of the
 * last failure are in qkd_context_last_error(). Creators write the new
 * handle through an out-pointer; every _free accepts NULL.
 *
 * A complete KD-QAT loop (examples/distill.c is the runnable version):
 *
 *   qkd_context *ctx; qkd_model *teacher, *student; qkd_quantizer *q;
 *   qkd_loss *loss; qkd_optimizer *opt;
 *   qkd_context_create(NULL, &ctx);
 *   qkd_model_load(ctx, "stories260K.bin", &teacher);   (check every status;
 *   qkd_model_load(ctx, "stories260K.bin", &student);    the message is in
 *                                                        qkd_context_last_error)
 *   qkd_quant_params qp; qkd_quant_params_init(&qp);    (ASYM, 4 bits, g128)
 *   qp.group_size = 32;
 *   qkd_quantizer_create(ctx, &qp, &q);
 *   qkd_model_set_quantizer(student, q, QKD_QUANT_TARGET_LINEAR);
 *   qkd_loss_term term; qkd_loss_term_init(&term, QKD_LOSS_FKL);
 *   qkd_loss_create(ctx, &loss); qkd_loss_add(loss, &term);
 *   qkd_optim_params op; qkd_optim_params_init(&op);
 *   qkd_optimizer_create(student, &op, &opt);
 *   for (int step = 0; step < steps; step++) {
 *       float value;
 *       next_batch(tokens, targets);                       (B x T ids)
 *       qkd_model_forward(teacher, tokens, B, T);
 *       qkd_model_forward(student, tokens, B, T);          (fake-quantized)
 *       qkd_loss_compute(loss, student, teacher, targets, &value);
 *       qkd_model_zero_grad(student);
 *       qkd_model_backward(student, NULL);                 (STE to latent w)
 *       qkd_optimizer_step(opt, NULL);
 *   }
 *   then free every handle, the context last.
 */
#ifndef QKD_QKD_H
#define QKD_QKD_H

#include "version.h"
#include "core.h"
#include "model.h"
#include "tokenizer.h"
#include "generate.h"
#include "quant.h"
#include "loss.h"
#include "optim.h"
#include "data.h"
#include "distill.h"
#include "eval.h"

#endif
