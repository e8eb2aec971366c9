/* Internal model interface for the layers above the model (loaders, the
 * loss layer, the optimizer): what the public header does not expose. */
#ifndef QKD_LIB_MODEL_H
#define QKD_LIB_MODEL_H

#include "qkd/model.h"
#include "qkd/quant.h"
#include "qkd/tokenizer.h"
#include "core/core.h"

/* The context the model was created on (for errors and allocation). */
qkd_context *qkd__model_context(const qkd_model *model);

/* Check a config before creating a model; INVALID_ARG naming the bad
 * field, recorded on ctx. */
qkd_status qkd__model_config_check(qkd_context *ctx, const qkd_model_config *cfg);

/* Index of the tensor of `kind` in `layer` (-1 for non-layer kinds), or -1
 * if the model has no such tensor (e.g. OUTPUT when tied). */
int qkd__model_tensor_index(const qkd_model *model, qkd_tensor_kind kind, int layer);

/* The last forward's logits ([B*T][vocab] on the device) into *out,
 * computed now (memory allocated at the first such call of a shape) if
 * the model runs its head when they are read (qkd_model_set_logits_rows).
 * STATE before any forward, NO_MEMORY. */
qkd_status qkd__model_logits_all(qkd_model *model, const float **out);
/* A loss's way to the logits: 0 when the forward stored them all (read
 * them with qkd__model_logits_all), else at most how many rows a call of
 * qkd__model_logits_rows computes. */
int qkd__model_logits_chunk(const qkd_model *model);
/* Rows [row0, row0 + n) of the last forward's logits into out ([n][vocab]
 * on the device): the head's products on those rows. */
void qkd__model_logits_rows(qkd_model *model, float *out, int row0, int n);
/* The logits gradient ([B*T][vocab] on the device) in fp32 into *out: a
 * bf16-bits model allocates it at the first such call of a shape (STATE
 * without a forward, or for a model that is not trainable; NO_MEMORY).
 * Or in bf16 bits: qkd__model_dlogits_bits_dev, a bf16-bits model's own
 * (its head's products round the gradient to those bits anyway; NULL for
 * other models and before any forward). A loss that writes the gradient calls
 * qkd__model_mark_dlogits (bits: 1 if it wrote the bits, 0 floats, -1 a
 * gradient that must not be used) so that qkd_model_backward(model, NULL)
 * accepts it, or refuses it. */
qkd_status qkd__model_dlogits_f32(qkd_model *model, float **out);
uint16_t *qkd__model_dlogits_bits_dev(qkd_model *model);
/* B and T of the last forward (both 0 before any forward). */
void qkd__model_last_shape(const qkd_model *model, int *B, int *T);
void qkd__model_mark_dlogits(qkd_model *model, int bits);

/* Device pointers to tensor `index`'s weights and gradient (its
 * n_elements floats each); index must be valid, and the gradient exists
 * only while the model is trainable. The optimizer and the quantizer work
 * on these in place. Code that writes the weights takes their pointer
 * here (a frozen model's bf16 copy then goes stale). Only a frozen model
 * with no quantizer may hold its matrices on the host (model_impl.h,
 * matrices_host), so the weights of a model that is trained or bound to a
 * quantizer are always there. */
float *qkd__model_param_dev(qkd_model *model, int index);
float *qkd__model_grad_dev(qkd_model *model, int index);
/* A deferred AdamW step (adamw_update_multi_dev) on tensor `index`: 1 when
 * the update may also write the student's Q(w) that the next forward reads
 * (a bf16 student's hard-rounded SYM or ASYM tensor, in groups that tile
 * its rows, last refreshed in that form), by *spec's setting if
 * spec->group is set, else by its own, which then goes to *spec. Then it
 * sets span's wq, scales and zeros, and counts on the caller to queue the
 * update: the next forward skips that tensor unless its weights are
 * written again (qkd__model_param_dev) or the quantized form changes. */
struct qkd__update_span;
struct qkd__quant_spec;
int qkd__model_update_quantizes(qkd_model *model, int index, struct qkd__update_span *span,
                                struct qkd__quant_spec *spec);
/* Whether the model is trained (qkd_model_set_trainable): it has gradients. */
int qkd__model_trainable(const qkd_model *model);

/* Bumped whenever the tensor table gains or loses a quantizer's learned
 * tensors: an optimizer holds on to the table of its creation. */
unsigned qkd__model_table_gen(const qkd_model *model);

/* The model's own tensors (the table's first), without a bound
 * quantizer's learned scales and zero points: what a file stores. */
int qkd__model_n_weights(const qkd_model *model);

/* Tensor `index`'s weights as the student deploys them, into host dst
 * (its n_elements floats): Q(w) with hard rounding and the student's
 * scales (learned ones included) for a tensor a bound quantizer targets,
 * else the tensor's values. index must be valid. Errors: BACKEND. */
qkd_status qkd__model_deployed_get(qkd_model *model, int index, float *dst);

/* The quantizer whose Q(w) a student's forward reads in place of tensor
 * `index` (valid), or NULL: the model is no student or the tensor is not
 * one of its targets. For export "as deployed". */
qkd_quantizer *qkd__model_tensor_quantizer(const qkd_model *model, int index);

/* Give the model the tokenizer found in its file (taken: the model frees
 * it). */
void qkd__model_attach_tokenizer(qkd_model *model, qkd_tokenizer *tok);

#endif
