/* libqkd model: a LLaMA-family decoder (token embedding, RMSNorm, RoPE,
 * grouped-query causal attention, SwiGLU MLP, tied or untied output head)
 * with exact forward and backward passes on the context's backend.
 *
 * Training use: forward over a batch of B sequences of T tokens keeps the
 * logits on the backend; a loss (qkd_model_cross_entropy here, the
 * objectives of qkd/loss.h later) fills the logits gradient; backward
 * accumulates the gradient of every parameter. Activation memory is
 * allocated once per (B, T) shape and reused.
 *
 * Inference use: qkd_model_decode feeds tokens one position at a time
 * through a key/value cache. */
#ifndef QKD_MODEL_H
#define QKD_MODEL_H

#include "core.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct qkd_model qkd_model;

typedef struct qkd_model_config {
    size_t size;        /* sizeof(qkd_model_config), set by _init */
    int dim;            /* model width */
    int hidden_dim;     /* SwiGLU width */
    int n_layers;
    int n_heads;        /* query heads; dim % n_heads == 0 */
    int n_kv_heads;     /* key/value heads; n_heads % n_kv_heads == 0 */
    int vocab_size;
    int max_seq_len;    /* longest sequence forward/decode accept */
    float rope_theta;   /* RoPE base, 10000 for LLaMA 1/2 */
    float norm_eps;     /* RMSNorm epsilon */
    int tied_embeddings; /* 1: the output head is token_embd.weight */
} qkd_model_config;

/* Defaults: the stories260K shape (dim 64, hidden 172, 5 layers, 8 heads,
 * 4 kv heads, vocab 512, seq 512), theta 10000, eps 1e-5, tied.
 * @since 0.1 */
QKD_API void qkd_model_config_init(qkd_model_config *cfg);

/* A model of the given shape with all weights zero.
 * *out: owned, free with qkd_model_free. Errors: INVALID_ARG (NULL or
 * inconsistent config, with the offending field named), NO_MEMORY.
 * @since 0.1 */
QKD_API qkd_status qkd_model_create(qkd_context *ctx,
                                    const qkd_model_config *cfg,
                                    qkd_model **out);

/* Load a model, recognising the format from the file's content:
 *   - GGUF v3 ("GGUF" magic) with F32/F16/BF16 tensors or the block
 *     types of qkd_gguf_type (dequantized as ggml does) and llama.*
 *     metadata; a tokenizer in its tokenizer.ggml.* metadata is kept;
 *   - a Hugging Face folder (config.json + *.safetensors), or a path to
 *     its model.safetensors with config.json beside it;
 *   - a llama2.c legacy checkpoint (.bin, 7 int32 header + fp32 weights).
 * *out: owned, free with qkd_model_free; NULL on error.
 * Errors: IO (cannot open/read), FORMAT (malformed or truncated: the
 * message says where), UNSUPPORTED (valid file of a variant we do not
 * read, e.g. a quantized tensor type), SHAPE (a Hugging Face tensor's
 * shape differs from config.json's), NON_FINITE (a Hugging Face tensor
 * holds a NaN or Inf: the message names it), NO_MEMORY. A header never
 * makes the loader allocate much more than the file's tensors hold
 * (FORMAT instead). @since 0.1 */
QKD_API qkd_status qkd_model_load(qkd_context *ctx, const char *path,
                                  qkd_model **out);

/* Accepts NULL. @since 0.1 */
QKD_API void qkd_model_free(qkd_model *model);

/* Element type of the tensors a writer stores. */
typedef enum qkd_save_dtype {
    QKD_SAVE_F32 = 0,
    QKD_SAVE_F16 = 1,  /* IEEE binary16, rounded to nearest even */
    QKD_SAVE_BF16 = 2  /* bfloat16, rounded to nearest even */
} qkd_save_dtype;

typedef struct qkd_safetensors_params {
    size_t size;          /* sizeof(qkd_safetensors_params), set by _init */
    qkd_save_dtype dtype;
    int as_deployed;      /* 1: a student's targeted tensors are written as
                             its hard-rounded Q(w) (what its forward reads
                             with the STE estimator), 0: its latent weights */
} qkd_safetensors_params;

/* Defaults: F32, latent weights. @since 0.1 */
QKD_API void qkd_safetensors_params_init(qkd_safetensors_params *p);

/* Save model as a Hugging Face LlamaForCausalLM folder, which
 * qkd_model_load and transformers' from_pretrained read back:
 *   dir/model.safetensors  every tensor under its Hugging Face name
 *                          (lm_head.weight only when untied), attention
 *                          q/k rows in Hugging Face's rotate-half order;
 *   dir/config.json        the shape, rope_theta, rms_norm_eps,
 *                          tie_word_embeddings, torch_dtype;
 * and, when the model carries a tokenizer (qkd_model_tokenizer):
 *   dir/tokenizer.bin      the vocabulary in llama2.c's format (what
 *                          qkd_tokenizer_load and llama2.c read);
 *   dir/tokenizer.json, dir/tokenizer_config.json
 *                          the same vocabulary as a byte-fallback BPE
 *                          for transformers' fast tokenizer (merges
 *                          ranked by the merged piece's score).
 * dir is created if missing (its parent must exist). Each file is written
 * to "<file>.tmp" and renamed into place. p may be NULL for defaults.
 * A student's activation and key/value quantization is not stored.
 * Errors: INVALID_ARG (NULL model or dir, bad size field or dtype), IO
 * (dir cannot be created or written: the message names the path),
 * RANGE (a weight too large for F16), NO_MEMORY, BACKEND. @since 0.1 */
QKD_API qkd_status qkd_model_save_safetensors(qkd_model *model, const char *dir,
                                              const qkd_safetensors_params *p);

/* ---- GGUF export ----------------------------------------------------------
 * Tensor storage types of a GGUF file, numbered as ggml numbers them (the
 * layouts are in docs/formats.md). */
typedef enum qkd_gguf_type {
    QKD_GGUF_AS_TRAINED = -1, /* what a student's forward reads (see below) */
    QKD_GGUF_F32 = 0,
    QKD_GGUF_F16 = 1,
    QKD_GGUF_Q4_0 = 2,
    QKD_GGUF_Q4_1 = 3,
    QKD_GGUF_Q5_0 = 6,
    QKD_GGUF_Q5_1 = 7,
    QKD_GGUF_Q8_0 = 8,
    QKD_GGUF_Q4_K = 12,
    QKD_GGUF_Q6_K = 14,
    QKD_GGUF_BF16 = 30,
    QKD_GGUF_TQ2_0 = 35
} qkd_gguf_type;

typedef struct qkd_gguf_params {
    size_t size;              /* sizeof(qkd_gguf_params), set by _init */
    qkd_gguf_type type;       /* attention and MLP projections */
    qkd_gguf_type embd_type;  /* token_embd and the output head */
    const char *name;         /* general.name; NULL: "libqkd" */
    const struct qkd_tokenizer *tokenizer; /* NULL: the model's own */
} qkd_gguf_params;

/* Defaults: every tensor AS_TRAINED (so F32 for a model that is no
 * student), no name, the model's tokenizer. @since 0.1 */
QKD_API void qkd_gguf_params_init(qkd_gguf_params *p);

/* "Q4_0", "F32", ... for a type, "AS_TRAINED"; NULL for a value not in
 * the enum. @since 0.1 */
QKD_API const char *qkd_gguf_type_name(qkd_gguf_type type);
/* The type named name, case-insensitively ("q4_0", "f16", "as_trained").
 * Errors: INVALID_ARG (NULL), NOT_FOUND. @since 0.1 */
QKD_API qkd_status qkd_gguf_type_from_name(const char *name, qkd_gguf_type *out);

/* The type tensor `index` is written in under p (NULL: defaults), never
 * AS_TRAINED: norm weights are F32; a projection takes p->type and the
 * embeddings and head p->embd_type, where
 *   - AS_TRAINED is, for a tensor that a bound quantizer targets, the
 *     quantizer's format when its scheme is one (include/qkd/quant.h), so
 *     the file holds exactly the trained codes and scales; F32 holding
 *     Q(w) (hard rounding) for the other schemes; F32 for a tensor no
 *     quantizer targets;
 *   - a block type whose block does not divide the row length falls back
 *     as the format quantizers do: a 256-value type (Q4_K, Q6_K, TQ2_0) to
 *     Q8_0 when 32 divides the row, any block type to F16 otherwise.
 * A result other than the type asked for is such a fallback.
 * Errors: INVALID_ARG (NULL model or out, bad size field or type), RANGE
 * (index). @since 0.1 */
QKD_API qkd_status qkd_gguf_tensor_type(const qkd_model *model, int index,
                                        const qkd_gguf_params *p, qkd_gguf_type *out);

/* Write model as a GGUF v3 file that llama.cpp loads and runs: every
 * tensor in the type qkd_gguf_tensor_type gives (an explicit type
 * quantizes the latent weights with ggml's reference quantizer; a tied
 * model stores no output.weight), general.* (architecture llama, name,
 * file_type from the type most projection weights have, alignment 32,
 * quantization_version 2), llama.* (context length = max_seq_len, widths,
 * block and head counts, rope dimension count and freq base, RMS norm
 * epsilon, vocab size) and, when there is a tokenizer, tokenizer.ggml.*
 * (model llama, tokens with U+2581 for spaces, scores, token types,
 * bos/eos/unknown ids). The file is written to "<path>.tmp", fsynced and
 * renamed over path. qkd_model_load reads it back: a student's logits
 * from the file equal, bit for bit, its forward with hard rounding when
 * every projection is AS_TRAINED. A student's activation and key/value
 * quantization is not stored. Errors: INVALID_ARG (NULL model or path,
 * bad params, a tokenizer whose vocabulary size differs from the
 * model's), NON_FINITE (a weight to quantize is NaN/Inf), RANGE (a value
 * too large for the type's half-float scales or values: the message names
 * the tensor), IO, NO_MEMORY, BACKEND. @since 0.1 */
QKD_API qkd_status qkd_model_save_gguf(qkd_model *model, const char *path,
                                       const qkd_gguf_params *p);

/* Copy the model's config into *cfg (cfg->size must be set, e.g. by
 * qkd_model_config_init). Errors: INVALID_ARG. @since 0.1 */
QKD_API qkd_status qkd_model_get_config(const qkd_model *model,
                                        qkd_model_config *cfg);

/* Change the longest sequence forward and decode accept (max_seq_len).
 * Activations and the key/value cache are re-sized on their next use. A
 * window longer than the trained context works (RoPE extrapolates), with
 * possibly lower quality: GGUF files often record a shorter context than
 * the model was trained with. Errors: INVALID_ARG (n < 1 or > 1<<20).
 * @since 0.1 */
QKD_API qkd_status qkd_model_set_max_seq_len(qkd_model *model, int n);

/* How a model's matmuls treat their inputs. */
typedef enum qkd_matmul_precision {
    QKD_MATMUL_FP32 = 0, /* fp32 products (the default) */
    QKD_MATMUL_BF16 = 1  /* inputs rounded to bf16, fp32 accumulation */
} qkd_matmul_precision;

/* Set the precision of every matmul of `model` (forward, backward,
 * decode). BF16 rounds each input element of a product (activations,
 * weights, output gradients) to bfloat16, round to nearest even, and
 * accumulates in fp32 or better, as tensor cores and AVX-512 BF16 do;
 * weights, gradients and optimizer state stay fp32. The products SwiGLU
 * reads (the feed-forward's gate and up outputs, and the gradient of its
 * output), attention's output, and the projections added to the residual
 * stream (attention's output projection and the feed-forward's down
 * projection) are rounded to bf16 as well, as PyTorch's bf16 products
 * give them. Attention's products
 * (q, k, v, the probabilities and their gradients) are rounded the same
 * way on backends with bf16 attention (the reference and CUDA; on a GPU
 * the probabilities may be rounded before they are normalised: within
 * 2^-8 of each); the SIMD backend keeps attention in fp32, its faster
 * path. The matmuls round alike on every backend, so results agree
 * within float accumulation order, and attention's rounding. Meant for a
 * frozen teacher, or for mixed-precision training on a GPU. Where the
 * backend can take bf16 operands as they are (CUDA, the reference), a
 * BF16 model keeps the tensors its products only read rounded (some
 * activations and gradients, a student's quantized weights) in bf16, with
 * the same results; changing the precision releases the activations and
 * the decode cache (a sequence being decoded starts again at position 0:
 * the cache of a bf16 attention holds its keys before RoPE) and resizes a
 * student's quantized-weight buffers. Errors: INVALID_ARG (NULL
 * model, unknown precision), UNSUPPORTED (the backend has no bf16
 * matmuls), NO_MEMORY (the resized buffers; the model is then unchanged).
 * @since 0.1 */
QKD_API qkd_status qkd_model_set_matmul_precision(qkd_model *model,
                                                  qkd_matmul_precision precision);

/* Whether the model is trained (1, the default) or only run forward, as a
 * frozen teacher is (0). A model that is not trained keeps no per-layer
 * activations: its layers share one set of buffers, so a forward needs
 * about 1 / n_layers of the activation memory (and stays in cache where
 * the whole set would not), with the same logits, bit for bit. It keeps
 * no gradients either, of activations or of parameters (4 bytes a
 * parameter freed); qkd_model_backward, qkd_model_cross_entropy with
 * compute_grad, qkd_loss_compute with it as the student, an output-error
 * clip search on it, qkd_model_grad_get and an optimizer step on it then
 * fail with STATE, and qkd_model_zero_grad does nothing. With bf16
 * matmuls, on a backend that can, it keeps its weights rounded to bf16 as
 * well (2 bytes a parameter), rounded again by the first forward after
 * they change, and its products read them (the same logits, bit for bit,
 * without rounding every weight in every forward). Where its products
 * read nothing else (no quantizer bound), that forward also moves its
 * linears' fp32 weights to host memory (4 bytes a parameter of the device
 * memory freed; only the embedding and the norms stay, which the forward
 * reads in fp32; for TinyLlama-1.1B, 4.4 GB), waiting for the device
 * once for the move; short of memory for it, or where they would take
 * more than half of the host memory available (Linux's MemAvailable),
 * they stay until the weights change.
 * qkd_model_tensor_get and the savers read them there; whatever writes
 * the weights (qkd_model_tensor_set, the loaders, qkd_model_init_random),
 * binding a quantizer, changing the matmul precision or training the
 * model again first moves them back, and fails with NO_MEMORY (nothing
 * changed) without device memory for them.
 * Changing it releases the activations (set up again by the next
 * forward); training it again releases the bf16 weights and gives zeroed
 * gradients. Errors: INVALID_ARG (NULL model), NO_MEMORY (the gradients
 * or the weights, when training it again; it then stays frozen).
 * @since 0.1 */
QKD_API qkd_status qkd_model_set_trainable(qkd_model *model, int trainable);

/* How a training forward leaves its logits: 0 (the default) computes
 * and stores all [B*T][vocab] of them; rows > 0 stops the forward at the
 * head's input, and the head's products run when the logits are read.
 * qkd_loss_compute then computes them at most `rows` positions at a time,
 * each block's objective and gradient right after it, so that neither
 * model's logits are ever stored whole (for SmolLM's vocabulary of 49,152
 * at 16 x 1024 tokens, 3.2 GB a model in fp32). The price: where a term
 * needs a figure of the whole batch first (CAKLD's beta_from_teacher,
 * TSLD's token weights), the teacher's logits are computed twice. Readers
 * of all the logits at once (qkd_model_logits, qkd_model_cross_entropy,
 * qkd_loss_teacher_confidence) compute them all, into memory allocated at
 * the first such read of a shape. Changing it releases the activations.
 * The values do not change: bit for bit on the reference backend; on the
 * SIMD and CUDA backends within float rounding, their products summing
 * in an order that may depend on the rows a call has. Errors: INVALID_ARG
 * (NULL model, rows < 0). @since 0.1 */
QKD_API qkd_status qkd_model_set_logits_rows(qkd_model *model, int rows);

/* Total number of trainable scalars (a bound quantizer's learned scales
 * and zero points included). @since 0.1 */
QKD_API int64_t qkd_model_n_params(const qkd_model *model);

/* Fill every weight from a seeded normal distribution N(0, std^2), norm
 * weights with 1. Deterministic for a given seed on every backend and for
 * any thread count (the numbers are drawn on the context's threads). A
 * bound quantizer's learned scales are set again from the new weights.
 * Errors: INVALID_ARG (std < 0 or not finite), NO_MEMORY (the host
 * staging buffer, at most 4 MB). @since 0.1 */
QKD_API qkd_status qkd_model_init_random(qkd_model *model, uint64_t seed,
                                         float std);

/* ---- parameter tensors --------------------------------------------------
 * Tensors are numbered 0..n-1 in a fixed order: token_embd, then for each
 * layer attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate,
 * ffn_down, ffn_up, then output_norm, then output (only when untied).
 * While a quantizer with learn_scales is bound (qkd_model_set_quantizer),
 * the table continues with that quantizer's parameters, per targeted
 * weight in table order: its scales ("blk.3.attn_q.scale",
 * QKD_TENSOR_QUANT_SCALE) and, for ASYM, its zero points
 * ("blk.3.attn_q.zero", QKD_TENSOR_QUANT_ZERO); qkd/quant.h gives their
 * shape. Binding or unbinding such a quantizer changes the count.
 * Names follow GGUF ("blk.3.attn_q.weight"). Linear weights are row-major
 * [out_features][in_features]. attn_q/attn_k rows use the interleaved RoPE
 * pair order of llama2.c and GGUF (the Hugging Face loader converts). */
typedef enum qkd_tensor_kind {
    QKD_TENSOR_TOKEN_EMBD = 0,
    QKD_TENSOR_ATTN_NORM = 1,
    QKD_TENSOR_ATTN_Q = 2,
    QKD_TENSOR_ATTN_K = 3,
    QKD_TENSOR_ATTN_V = 4,
    QKD_TENSOR_ATTN_OUTPUT = 5,
    QKD_TENSOR_FFN_NORM = 6,
    QKD_TENSOR_FFN_GATE = 7,
    QKD_TENSOR_FFN_DOWN = 8,
    QKD_TENSOR_FFN_UP = 9,
    QKD_TENSOR_OUTPUT_NORM = 10,
    QKD_TENSOR_OUTPUT = 11,
    /* A bound quantizer's learned parameters (learn_scales, qkd/quant.h):
     * the per-group scales and zero points of one targeted weight.
     * @since 0.1 */
    QKD_TENSOR_QUANT_SCALE = 12,
    QKD_TENSOR_QUANT_ZERO = 13
} qkd_tensor_kind;

typedef struct qkd_tensor_info {
    size_t size;         /* sizeof(qkd_tensor_info), set by the caller */
    const char *name;    /* borrowed until the model is freed */
    qkd_tensor_kind kind;
    int layer;           /* -1 for tensors outside the layers */
    int n_dims;          /* 1 or 2 */
    int64_t shape[2];    /* shape[0] rows (out features), shape[1] cols */
    int64_t n_elements;
} qkd_tensor_info;

/* @since 0.1 */
QKD_API int qkd_model_n_tensors(const qkd_model *model);

/* Describe tensor `index`. Errors: INVALID_ARG (NULL, size field),
 * RANGE (index out of range). @since 0.1 */
QKD_API qkd_status qkd_model_tensor_info(const qkd_model *model, int index,
                                         qkd_tensor_info *info);

/* Index of the tensor named `name` into *index.
 * Errors: INVALID_ARG, NOT_FOUND. @since 0.1 */
QKD_API qkd_status qkd_model_tensor_find(const qkd_model *model,
                                         const char *name, int *index);

/* Copy tensor `index`'s weights (get) or gradient (grad_get) to dst, or
 * set its weights from src (copied). n must equal the tensor's element
 * count. Errors: INVALID_ARG, RANGE, SHAPE (wrong n), STATE (grad_get on
 * a model that is not trainable), BACKEND.
 * @since 0.1 */
QKD_API qkd_status qkd_model_tensor_get(const qkd_model *model, int index,
                                        float *dst, size_t n);
QKD_API qkd_status qkd_model_tensor_set(qkd_model *model, int index,
                                        const float *src, size_t n);
QKD_API qkd_status qkd_model_grad_get(const qkd_model *model, int index,
                                      float *dst, size_t n);

/* ---- training passes ---------------------------------------------------- */

/* Forward B sequences of T token ids (tokens[B*T], row-major), positions
 * 0..T-1. The logits [B*T][vocab] stay on the backend (read them with
 * qkd_model_logits; with qkd_model_set_logits_rows, they are computed
 * when read). The first call for a new (B, T) allocates the
 * activations; later calls with the same shape allocate nothing.
 * Errors: INVALID_ARG (B, T < 1; T > max_seq_len), RANGE (a token id
 * outside the vocabulary: the message names its position), NO_MEMORY.
 * @since 0.1 */
QKD_API qkd_status qkd_model_forward(qkd_model *model, const int32_t *tokens,
                                     int B, int T);

/* Copy the last forward's logits ([B*T][vocab] floats) to dst.
 * Errors: INVALID_ARG, STATE (no forward yet), SHAPE (n differs).
 * @since 0.1 */
QKD_API qkd_status qkd_model_logits(const qkd_model *model, float *dst,
                                    size_t n);

/* Mean cross-entropy of the last forward's logits against targets[B*T]
 * (a negative target is ignored: padding). If compute_grad is non-zero the
 * gradient of that mean with respect to the logits is stored as the
 * model's logits gradient for qkd_model_backward(model, NULL).
 * *loss: the mean over counted positions (0 if none).
 * Errors: INVALID_ARG, STATE (no forward), RANGE (target >= vocab).
 * @since 0.1 */
QKD_API qkd_status qkd_model_cross_entropy(qkd_model *model,
                                           const int32_t *targets,
                                           int compute_grad, float *loss);

/* Backward from a logits gradient through the last forward, ADDING every
 * parameter's gradient to the model's gradient buffers (so several
 * micro-batches accumulate). dlogits: [B*T][vocab] host floats (copied),
 * or NULL to use the gradient a loss stored on the model.
 * Errors: INVALID_ARG, STATE (no forward, or NULL dlogits with no stored
 * gradient). @since 0.1 */
QKD_API qkd_status qkd_model_backward(qkd_model *model, const float *dlogits);

/* Set every parameter gradient to zero (nothing, for a model that is not
 * trainable: it keeps none). The zeroing is deferred: the next backward
 * writes the gradients its bf16 products make instead of adding them to
 * zeros, so a step need not write and read back a zeroed buffer the size
 * of the weights. @since 0.1 */
QKD_API qkd_status qkd_model_zero_grad(qkd_model *model);

/* ---- inference ----------------------------------------------------------- */

/* Feed one token at position pos (0-based) of a single sequence through the
 * key/value cache; positions must come in order 0, 1, 2... (pos 0 starts a
 * new sequence, dropping the cache). logits: vocab_size floats out, or NULL.
 * The cache is allocated on the first call (max_seq_len positions).
 * qkd_model_set_matmul_precision and qkd_model_set_max_seq_len end the
 * sequence: the next call must be at pos 0.
 * Errors: INVALID_ARG, RANGE (token outside the vocabulary, pos >=
 * max_seq_len), STATE (pos skips a position), NO_MEMORY. @since 0.1 */
QKD_API qkd_status qkd_model_decode(qkd_model *model, int32_t token, int pos,
                                    float *logits);

#ifdef __cplusplus
}
#endif
#endif
