/* The model's body and the helpers its files share (lib/model only). */
#ifndef QKD_LIB_MODEL_IMPL_H
#define QKD_LIB_MODEL_IMPL_H

#include "backend/backend.h"
#include "model/model.h"
#include "quant/quant.h"

#define QKD__TENSOR_NAME_LEN 48
/* Tensors per layer: attn_norm, attn_q, attn_k, attn_v, attn_output,
 * ffn_norm, ffn_gate, ffn_down, ffn_up (kinds 1..9, in this order). */
#define QKD__LAYER_TENSORS 9

typedef struct qkd__tensor_entry {
    char name[QKD__TENSOR_NAME_LEN];
    qkd_tensor_kind kind;
    int layer;
    int n_dims;
    int64_t rows, cols;   /* a 1-D tensor has cols == 1 */
    size_t offset;        /* in floats, into the weight and gradient buffers */
} qkd__tensor_entry;

/* Where one layer reads and writes its activations. In training every
 * pointer is the layer's own slice of the arena; in decoding the buffers
 * are shared by all layers and k/v point at the cache row being written,
 * kcache/vcache at the layer's whole cache. */
typedef struct qkd__layer_acts {
    float *x_in;          /* residual stream into the layer [N][C] */
    float *h, *rstd1;     /* attn_norm output [N][C], its 1/rms [N] */
    /* [N][C]; this step's keys and values [N][kvd]: rotated by RoPE,
     * unless the attention rotates them itself (qkd__model_attention_bf16) */
    float *q;
    float *k, *v;
    const float *kcache, *vcache; /* what attention reads [B][kv_len][kvd] */
    float *scratch;       /* attention's saved softmax */
    float *att;           /* attention output [N][C] */
    float *x_mid;         /* residual after attention [N][C] */
    float *h2, *rstd2;    /* ffn_norm output [N][C], its 1/rms [N] */
    float *gate, *up, *sw; /* [N][H] each: h2 Wg^T, h2 Wu^T, silu(gate)*up */
    float *x_out;         /* residual out of the layer [N][C] */
    float *proj;          /* a projection before its residual add [N][C]; NULL
                             where proj_bits is planned */
    uint16_t *proj_bits;  /* proj as bf16 bits where h_bits is planned, else NULL */
    /* What the targeted linears read when a student quantizes its
     * activations: per-token quantized copies of h, att, h2 and sw (else
     * these alias them). */
    float *hq, *attq, *h2q, *swq;
    /* h, h2, gate, up and sw as bf16 bits instead (those then NULL) where
     * the model's products take them (qkd__model_bf16_bits) and
     * activations are not quantized: only products and SwiGLU read them.
     * att_bits: att as bits instead (att then NULL), where h_bits is
     * planned: written by the attention for the output projection, read
     * by the attention backward. Else NULL. sw_bits is one buffer that
     * all layers of a training forward share: a layer's forward writes it
     * for its down product, the backward writes it again
     * (swiglu_backward_bf16_bits) for that product's weight gradient. */
    uint16_t *h_bits, *h2_bits, *gate_bits, *up_bits, *sw_bits, *att_bits;
} qkd__layer_acts;

/* Geometry of one pass: B sequences of T rows at positions pos0.., with
 * kv_len keys visible to the attention. */
typedef struct qkd__step {
    int B, T, pos0, kv_len;
} qkd__step;

/* The RMSNorm that follows a layer's closing residual add: the next
 * layer's attention norm, or the head's output norm (layer -1). */
typedef struct qkd__norm_out {
    float *out;        /* fp32, or NULL with out16 */
    uint16_t *out16;   /* bf16 bits, or NULL */
    float *rstd;
    qkd_tensor_kind kind;
    int layer;
} qkd__norm_out;

/* Training activations for one (B, T): a single device allocation. */
typedef struct qkd__train_acts {
    int B, T;             /* 0 when nothing is allocated */
    void *mem;
    qkd__layer_acts *layers; /* host array [n_layers], allocated with the model */
    int32_t *tokens, *targets; /* [N] */
    float *losses, *loss_sum;  /* [N], [1] */
    float *xf, *rstdf;    /* output_norm output [N][C], its 1/rms [N] */
    uint16_t *xf_bits;    /* xf as bf16 bits instead (xf NULL), as the layers' h_bits */
    float *xfq;           /* the head's input as it reads it (see hq) */
    float *logits, *dlogits; /* [N][V]; a bf16-bits model's dlogits is NULL until
                                something writes the gradient in fp32
                                (qkd__model_dlogits_f32: memory of its own) */
    uint16_t *dlogits_bits; /* [N][V]: a bf16-bits model's gradient as its head's
                               products read it; else NULL */
    /* activation gradients, reused by every layer */
    float *dres, *dnorm, *datt, *dq, *dk, *dv, *dsw, *dgate, *dup;
    /* dsw, and dgate with dup, as bf16 bits instead (those then NULL)
     * where the layers keep gate and up so (qkd__layer_acts); else NULL.
     * dgu holds dgate and dup as the backend's attention_backward_bf16
     * holds dq, dk and dv: in rows or blocks (backend.h) */
    uint16_t *dsw_bits, *dgu_bits;
    /* dres's bits beside it, written with it by the RMSNorm backward for
     * the products that read it, where the model's products take bits and
     * the backend has rmsnorm_backward_bf16_bits; else NULL */
    uint16_t *dres_bits;
    /* dq, dk and dv as bf16 bits instead (dq, dk, dv then NULL) where
     * the model's products take bits: written so by the bf16 attention
     * (in rows or blocks: backend.h), read only by the q, k and v
     * products; else NULL */
    uint16_t *dqkv_bits;
} qkd__train_acts;

/* Decoding state: the key/value cache and one row of activations. */
typedef struct qkd__decode {
    int seq_len;          /* rows the cache holds; 0 when not allocated */
    int next_pos;         /* the position the next call must feed */
    void *mem;
    int32_t *token;       /* [1] */
    float *kcache, *vcache; /* [n_layers][seq_len][kvd] */
    qkd__layer_acts row;  /* shared by the layers; k/v re-pointed per layer */
    float *xf, *rstdf, *xfq, *logits;
} qkd__decode;

/* How a targeted tensor's products read Q(w) (student.c). */
typedef enum qkd__wq_form {
    QKD__WQ_FLOAT, /* from wq, in fp32 */
    QKD__WQ_FUSED, /* the training forward's products quantize w while packing
                      it (the backend's fused slots): scales/zeros are
                      fakequant_groups', wq is stale */
    QKD__WQ_BF16   /* wq holds Q(w) in bf16 (fakequant_forward_bf16) for the
                      bf16-bits products, in its first half where it has
                      room for fp32 values (those are then stale) */
} qkd__wq_form;

/* A targeted tensor's quantization state (device buffers). */
typedef struct qkd__qtensor {
    float *wq;            /* Q(w), what the forward reads; NULL: not targeted */
    float *dwq;           /* dL/dQ(w), zeroed by each backward that collects it;
                             NULL until the first (student.dwq_mem) */
    float *scales, *zeros; /* the groups as the quantizer computes them: the
                             forward's, or (learned) the initial values */
    int scale_index, zero_index; /* learned scales: the table's tensors of
                             the scales and zero points; -1: none */
    qkd__wq_form form;    /* how the products read Q(w) */
    int bf16_only;        /* wq has room for bf16 values only: the model's
                             products always read this Q(w) in bf16 */
    int updated;          /* a deferred optimizer step wrote wq from the
                             weights it updated (qkd__model_update_quantizes);
                             cleared by qkd__model_param_dev and by a refresh */
} qkd__qtensor;

/* What makes a model a student (lib/model/student.c). */
typedef struct qkd__student {
    qkd_quantizer *q;     /* borrowed; NULL when the model is not a student */
    unsigned targets;     /* what it quantizes (qkd_model_set_quantizer) */
    int off;              /* 1 while calibration runs the float model */
    int act_bits, kv_bits; /* the quantizer's, fixed when bound */
    int wq_state;         /* what the wq buffers hold: -1 nothing yet, else
                             the WQ_* bits of the last refresh (student.c) */
    qkd__qtensor *t;      /* host array [n_weights] */
    void *mem;            /* device memory of every qtensor but dwq */
    void *dwq_mem;        /* every dwq: allocated by the first backward whose
                             estimator is not the identity */
    int grad_direct;      /* this backward adds weight gradients to dL/dw
                             directly (qkd__quantizer_grad_is_identity) */
} qkd__student;

struct qkd_model {
    qkd_context *ctx;
    qkd_model_config cfg;
    int n_tensors;        /* the table: the weights, then a bound quantizer's
                             learned scales and zero points */
    int n_weights;        /* the model's own tensors, the table's first */
    qkd__tensor_entry *tensors;
    int64_t n_params;     /* trainable scalars */
    size_t n_floats;      /* buffer length, alignment padding included */
    size_t weight_floats; /* the part of it the weights use */
    unsigned table_gen;   /* bumped whenever the learned tensors change */
    float *params;        /* device buffer of at least n_floats, or of
                             resident_floats while matrices_host is set */
    size_t resident_floats; /* the leading part of the weights that every
                             forward reads in fp32: the embedding, the norms */
    float *matrices_host; /* a frozen bf16-bits model's linear matrices, the
                             weights after resident_floats, moved to the host
                             (qkd__model_round_weights) since its products
                             read weight_bits; NULL: all on the device */
    int matrices_stay;    /* the move was refused (no memory for it) since
                             the weights were last rounded: not tried again
                             in every forward */
    float *grads;         /* as params; NULL while frozen (no gradients kept) */
    int grads_cleared;    /* a zero_grad not yet applied: the gradients read
                             as zero (qkd__model_settle_grads zeroes them),
                             and a backward whose products can write the
                             weight gradients writes them instead */
    uint16_t *weight_bits; /* a frozen bf16-bits model's weights in bf16 (backend
                             to_bf16_bits), which its products read instead of
                             rounding the fp32 ones: those after resident_floats,
                             all of them where the head is tied (the products
                             read no other); NULL: none */
    int weight_bits_current; /* weight_bits holds the weights' present values;
                             cleared by qkd__model_param_dev, which every
                             writer of the weights goes through */
    qkd_tokenizer *tokenizer;
    qkd__train_acts acts;
    int logits_rows;      /* qkd_model_set_logits_rows: 0, the logits are
                             computed whole by the forward; else the head's
                             products run when the logits are read, at most
                             this many rows at a time by a loss */
    float *logits_mem;    /* all logits of a forward with logits_rows, once
                             something reads them whole (qkd__model_logits_all) */
    int logits_ready;     /* acts.logits holds the last forward's logits */
    float *dlogits_mem;   /* a bf16-bits model's fp32 logits gradient, once needed */
    int has_forward;      /* acts hold a forward's results */
    int has_dlogits;      /* acts.dlogits holds a logits gradient: QKD__DLOGITS_* */
    qkd__decode dec;
    qkd__student student;
    int matmul_bf16;      /* QKD_MATMUL_BF16: the backend's bf16 products */
    int frozen;           /* not trained: the layers share their activations */
};

/* Which logits gradient is current: none, acts.dlogits (floats), or
 * acts.dlogits_bits. */
enum { QKD__DLOGITS_NONE = 0, QKD__DLOGITS_F32 = 1, QKD__DLOGITS_BITS = 2 };

static inline qkd__backend *qkd__model_backend(const qkd_model *m)
{
    return m->ctx->backend;
}

/* Whether the model's bf16 products run on the backend's bf16-bits family
 * (backend.h) and a bf16 attention, which writes its output's bits too:
 * linear inputs and quantized weights then stay in bf16. */
static inline int qkd__model_bf16_bits(const qkd_model *m)
{
    const qkd__backend *be = qkd__model_backend(m);
    return m->matmul_bf16 && be->matmul_forward_bf16_bits &&
           be->matmul_backward_input_bf16_bits && be->matmul_backward_weight_bf16_bits &&
           be->matmul_forward_to_bf16_bits && be->matmul_backward_input_to_bf16_bits &&
           be->add_rmsnorm_forward_bf16_bits &&
           be->rmsnorm_forward_bf16_bits && be->swiglu_forward_bf16_bits &&
           be->fakequant_forward_bf16 && be->attention_forward_bf16;
}

/* Whether the model's attention is the backend's bf16 pair (backend.h),
 * which applies RoPE itself as it rounds q and k: q, k and the key cache
 * then stay un-rotated and no RoPE pass runs. Otherwise (fp32, or a
 * backend with no bf16 attention, as the SIMD one: its fp32 attention is
 * the faster one there) the model rotates q and k with rope_forward. */
static inline int qkd__model_attention_bf16(const qkd_model *m)
{
    return m->matmul_bf16 && qkd__model_backend(m)->attention_forward_bf16;
}

/* The tensor of `kind` in `layer` inside base (params or grads). The
 * output head of a tied model is token_embd. */
float *qkd__model_tensor_ptr(const qkd_model *m, float *base, qkd_tensor_kind kind,
                             int layer);

/* Bump allocator over one device buffer. With base NULL it only measures;
 * pointers are then NULL. Each slice is 64-byte aligned. */
typedef struct qkd__arena {
    float *base;
    size_t used;          /* floats */
    int overflow;
} qkd__arena;

float *qkd__arena_take(qkd__arena *a, size_t rows, size_t cols);
/* Measure with plan(arg, &arena), allocate, then plan again into the
 * buffer. INVALID_ARG (recorded, naming what) if the size overflows. */
qkd_status qkd__arena_alloc(qkd_context *ctx, const char *what,
                            void (*plan)(void *arg, qkd__arena *a), void *arg,
                            void **mem);

/* Place one layer's row buffers (h .. sw) for N rows; with own_qkv also
 * q, k and v (k and v read back by the attention as kcache/vcache; else
 * the caller sets those five); with act_quant
 * the quantized copies hq .. swq (else they alias h .. sw); with bf16_bits
 * (and no act_quant) h_bits, h2_bits, gate_bits and up_bits in place of
 * h, h2, gate and up, and sw NULL: sw_bits is the caller's, one buffer
 * for all layers (the backward writes a layer's again from gate and up).
 * x_in, x_out and proj are the caller's. */
void qkd__model_plan_layer(qkd__arena *a, qkd__layer_acts *la, const qkd_model_config *c,
                           size_t N, size_t scratch_floats, int own_qkv, int act_quant,
                           int bf16_bits);

/* One transformer layer forward and the head, shared by the training
 * forward and decoding, which run every layer in order. Layer 0
 * normalises its input itself; the residual add that ends layer l writes
 * x_out together with the norm that follows (`next`: the attention norm
 * of the layer after, whose x_in is x_out, so that layer starts at its
 * products; after the last layer the head's output norm). The head reads
 * that norm's output xf (or xf_bits); xfq: its quantized input (may alias
 * xf when activations are not quantized). */
void qkd__model_layer_forward(const qkd_model *m, int l, const qkd__layer_acts *a,
                              const qkd__norm_out *next, qkd__step s);
/* The norm that follows layer l: the attention norm of `after`, layer l +
 * 1's activations, else (after the last layer, `after` not read) the
 * head's output norm into xf or xf_bits. */
qkd__norm_out qkd__model_norm_after(const qkd_model *m, int l, const qkd__layer_acts *after,
                                    float *xf, uint16_t *xf_bits, float *rstdf);
void qkd__model_head_forward(const qkd_model *m, float *logits, float *xf,
                             const uint16_t *xf_bits, float *xfq, int N);

/* ---- students (student.c) ---------------------------------------------------
 * While a model is bound to a quantizer (and not calibrating), the passes
 * read these instead of the latent weights. */

/* The weight the forward of `kind` in `layer` reads: Q(w) for a targeted
 * tensor, else the latent weight (a tied head is token_embd). */
const float *qkd__model_weight(const qkd_model *m, qkd_tensor_kind kind, int layer);
/* Where the backward adds the gradient of that weight: dL/dQ(w) for a
 * targeted tensor (while the estimator is not the identity), else the
 * model's gradient. */
float *qkd__model_weight_grad(const qkd_model *m, qkd_tensor_kind kind, int layer);
/* out[N][OC] = inp[N][C] . W^T, dinp += dout . W (accumulate 1; 0: dinp
 * = dout . W, its old contents not needed) and dW += dout^T . inp (or, with
 * accumulate 0, which only the bf16-bits products take, dW = ...) for the
 * linear `kind` in `layer`, W as the forward reads it
 * (qkd__model_weight), in the model's matmul precision; a fused or bf16
 * student tensor goes through the backend's fused or bf16-bits products
 * (qkd__wq_form). inp and dout are fp32 unless the bf16-bits products
 * run. */
void qkd__model_linear_forward(const qkd_model *m, qkd_tensor_kind kind, int layer, float *out,
                               qkd__bf16_in inp, int N, int C, int OC);
void qkd__model_linear_backward_input(const qkd_model *m, qkd_tensor_kind kind, int layer,
                                      float *dinp, qkd__bf16_in dout, int N, int C, int OC,
                                      int accumulate);
void qkd__model_linear_backward_weight(const qkd_model *m, qkd_tensor_kind kind, int layer,
                                       qkd__bf16_in dout, qkd__bf16_in inp, int N, int C,
                                       int OC, int accumulate);
/* The forward product and the written input gradient as bf16 bits, where
 * the bf16-bits products run. */
void qkd__model_linear_forward_to_bits(const qkd_model *m, qkd_tensor_kind kind, int layer,
                                       uint16_t *out, qkd__bf16_in inp, int N, int C, int OC);
void qkd__model_linear_backward_input_to_bits(const qkd_model *m, qkd_tensor_kind kind,
                                              int layer, uint16_t *dinp, qkd__bf16_in dout,
                                              int N, int C, int OC);
enum { QKD__GROUP_MAX = 3 }; /* the largest group of linears: q, k and v */
/* The backward of n (at most QKD__GROUP_MAX) linears kinds[i] of `layer`
 * (inputs x[i] [N][C], OC[i] outputs) from their output gradients as bf16 bits in
 * dout, laid out as the backend's attention_backward_bf16 writes dq, dk
 * and dv (backend.h): dinp written, the weights' gradients added
 * (accumulate 1) or written, where the bf16-bits products run. */
void qkd__model_linears_backward_bits(const qkd_model *m, int layer,
                                      const qkd_tensor_kind *kinds, const int *OC,
                                      const qkd__bf16_in *x, int n, float *dinp,
                                      const uint16_t *dout, int N, int C, int accumulate);
/* A bf16 model stores the feed-forward's gate and up outputs, SwiGLU's
 * output gradient, attention's output and the projections added to the
 * residual in bf16 (backend round_to_bf16); where they are fp32 buffers,
 * this rounds them so. */
static inline void qkd__model_round_stored(const qkd_model *m, float *x, size_t n)
{
    if (m->matmul_bf16) {
        qkd__backend *be = qkd__model_backend(m);
        be->round_to_bf16(be, x, n);
    }
}
/* Bits of the per-token activation / key-value quantization; 0 when off. */
int qkd__model_act_bits(const qkd_model *m);
int qkd__model_kv_bits(const qkd_model *m);
/* The input the linear `kind` reads: x16 (x in bf16 bits) when not NULL,
 * xq (its per-token quantized copy of x) for a targeted linear while
 * activations are quantized, else x. */
qkd__bf16_in qkd__model_linear_input(const qkd_model *m, qkd_tensor_kind kind, int layer,
                                     const float *x, const float *xq, const uint16_t *x16);
/* Refresh Q(w) from the latent weights: the training forward (smooth for
 * the CONTINUOUS estimator) or hard rounding (decoding), in bf16 where the
 * products take bf16 bits (qkd__wq_form). Without force, nothing is done
 * when the buffers already hold that kind of values. */
void qkd__model_quantize_weights(qkd_model *m, int training, int force);
/* Around the backward pass: zero dL/dQ(w), then add dL/dw to the gradient
 * (neither when the estimator is the identity: the products then add to
 * dL/dw directly). begin fails with NO_MEMORY when dL/dQ(w) cannot be
 * allocated; nothing is then changed. */
qkd_status qkd__model_student_backward_begin(qkd_model *m);
void qkd__model_student_backward_end(qkd_model *m);
/* Size the quantized weights' buffers again for the model's matmul
 * precision (after it changed): bf16-sized where the products only read
 * Q(w) in bf16. NO_MEMORY leaves everything as it was. */
qkd_status qkd__model_student_refit(qkd_model *m);
/* Unbind (the model stays usable as a float model); the table keeps any
 * learned tensors until qkd__model_set_learned_tensors drops them. */
void qkd__model_free_student(qkd_model *m);
/* Set every learned scale and zero point to what the quantizer computes
 * from the current latent weights (binding, calibration, init_random). */
void qkd__model_init_scales(qkd_model *m);

/* Replace the tensors after the weights by extra[n_extra] (names, kinds,
 * layers and shapes; their offsets are placed here), bumping table_gen.
 * Growing reallocates the weight and gradient buffers (the weights'
 * values and gradients kept, the new tensors' zeroed); n_extra 0 only
 * truncates the table and cannot fail. Errors: NO_MEMORY, BACKEND; on
 * error nothing changes. */
qkd_status qkd__model_set_learned_tensors(qkd_model *m, const qkd__tensor_entry *extra,
                                          int n_extra);

/* A frozen model with bf16-bits products: round its weights into
 * weight_bits unless they are current (a forward's first step), then,
 * where its products read nothing else (no quantizer, no learned
 * tensors), move its matrices to the host (matrices_host) if they are not
 * there and the memory for the move can be had. Nothing for other models.
 * Errors: NO_MEMORY (the copy could not be allocated; nothing changed),
 * BACKEND. */
qkd_status qkd__model_round_weights(qkd_model *m);
/* Tensor `index` in weight_bits, or NULL while they are not current or
 * where they do not cover it (the norms, an untied embedding). */
const uint16_t *qkd__model_weight_bits(const qkd_model *m, int index);
/* Bring a model's matrices back to the device from the host (see
 * matrices_host): the first step of anything that writes the weights or
 * reads them there, other than through qkd__model_tensor_read. Errors:
 * NO_MEMORY, BACKEND; on error the model is as it was. */
qkd_status qkd__model_fetch_matrices(qkd_model *m);
/* Tensor `index`'s fp32 values into host dst (n_elements floats),
 * wherever they are. Errors: BACKEND. */
qkd_status qkd__model_tensor_read(const qkd_model *m, int index, float *dst);

/* Apply a deferred zero_grad: zero the gradient buffer, for code that
 * reads it or adds to it. */
void qkd__model_settle_grads(qkd_model *m);
/* Whether this backward's weight gradients go straight to m->grads (no
 * quantizer estimator between: not a student, or the plain STE). */
int qkd__model_grads_direct(const qkd_model *m);

/* Download n floats after the queued kernels have finished. */
qkd_status qkd__model_download(const qkd_model *m, float *dst, const float *src, size_t n);

/* Drop the training activations / the decode cache (allocated again on
 * next use). */
void qkd__model_free_acts(qkd_model *m);
void qkd__model_free_decode(qkd_model *m);

#endif
