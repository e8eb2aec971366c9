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
 *
 * Every function that can fail returns a qkd_status; the details of the
 * last failure are in qkd_context_last_error(). Creators write the new
 * handle through an out-pointer; every _free accepts NULL.
 *
 * A complete training loop on cross-entropy (the distillation objectives
 * and optimizers of later releases plug into the same places):
 *
 *   qkd_context *ctx; qkd_model *m;
 *   if (qkd_context_create(NULL, &ctx) != QKD_OK) return 1;
 *   if (qkd_model_load(ctx, "stories260K.bin", &m) != QKD_OK) {
 *       fprintf(stderr, "%s\n", qkd_context_last_error(ctx));
 *       return 1;
 *   }
 *   for (int step = 0; step < steps; step++) {
 *       float loss;
 *       qkd_model_zero_grad(m);
 *       qkd_model_forward(m, tokens, B, T);
 *       qkd_model_cross_entropy(m, targets, 1, &loss);
 *       qkd_model_backward(m, NULL);
 *       ... read gradients with qkd_model_grad_get, update weights ...
 *   }
 *   qkd_model_free(m);
 *   qkd_context_free(ctx);
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

#endif
