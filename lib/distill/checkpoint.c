/* Distillation checkpoints (docs/formats.md, "Distillation checkpoint"):
 *   "QKDC", u32 version, u64 step, u32 batch, u32 seq,
 *   u64 data tokens, u64 data hash, u64 split seed, u64 split n_eval,
 *   u32 tensor count, per tensor: u32 name length, name, u64 elements,
 *   f32[elements]; u64 optimizer state bytes, the bytes; u64 history
 *   count (= step), f32[count]; u64 FNV-1a 64 of every byte before it. */
#include <math.h>
#include <string.h>

#include <qkd/qkd.h>

#include "data/fileio.h"
#include "distill/distill_impl.h"

#define CKPT_VERSION 1u
#define CKPT_MAX_NAME 1024u

static const unsigned char ckpt_magic[4] = {'Q', 'K', 'D', 'C'};

/* What identifies the run a checkpoint belongs to, besides the shapes. */
typedef struct run_key {
    uint32_t batch, seq;
    uint64_t data_tokens, data_hash, split_seed, split_n_eval;
} run_key;

static run_key key_of(const qkd_distill *d)
{
    uint64_t seed = 0;
    int64_t n_eval = 0;
    qkd_dataset_get_split(d->data, &seed, &n_eval);
    return (run_key){
        .batch = (uint32_t)d->p.batch,
        .seq = (uint32_t)d->p.seq,
        .data_tokens = qkd_dataset_n_tokens(d->data),
        .data_hash = d->data_hash,
        .split_seed = seed,
        .split_n_eval = (uint64_t)n_eval,
    };
}

/* The element count of the largest tensor. */
static int64_t largest_tensor(const qkd_model *m)
{
    int64_t max = 0;
    for (int i = 0; i < qkd_model_n_tensors(m); i++) {
        qkd_tensor_info info = {.size = sizeof info};
        if (qkd_model_tensor_info(m, i, &info) == QKD_OK && info.n_elements > max)
            max = info.n_elements;
    }
    return max;
}

/* NON_FINITE, naming the first NaN or Inf of tensor `name`, if it holds one. */
static qkd_status check_finite(const qkd_distill *d, const char *name, const float *v, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(v[i]))
            return qkd_context_set_error(d->ctx, QKD_ERR_NON_FINITE,
                                         "checkpoint: %s[%lld] is %g; not saved (a checkpoint "
                                         "keeps only finite weights)",
                                         name, (long long)i, (double)v[i]);
    return QKD_OK;
}

static qkd_status write_tensors(const qkd_distill *d, qkd__wfile *w, float *buf)
{
    int n = qkd_model_n_tensors(d->student);
    qkd__wfile_u32(w, (uint32_t)n);
    for (int i = 0; i < n; i++) {
        qkd_tensor_info info = {.size = sizeof info};
        qkd_status st = qkd_model_tensor_info(d->student, i, &info);
        if (st == QKD_OK)
            st = qkd_model_tensor_get(d->student, i, buf, (size_t)info.n_elements);
        if (st == QKD_OK)
            st = check_finite(d, info.name, buf, info.n_elements);
        if (st != QKD_OK)
            return st;
        size_t len = strlen(info.name);
        qkd__wfile_u32(w, (uint32_t)len);
        qkd__wfile_bytes(w, info.name, len);
        qkd__wfile_u64(w, (uint64_t)info.n_elements);
        qkd__wfile_words(w, buf, (size_t)info.n_elements);
    }
    return QKD_OK;
}

static qkd_status write_body(const qkd_distill *d, qkd__wfile *w)
{
    run_key k = key_of(d);
    qkd__wfile_bytes(w, ckpt_magic, sizeof ckpt_magic);
    qkd__wfile_u32(w, CKPT_VERSION);
    qkd__wfile_u64(w, (uint64_t)d->step);
    qkd__wfile_u32(w, k.batch);
    qkd__wfile_u32(w, k.seq);
    qkd__wfile_u64(w, k.data_tokens);
    qkd__wfile_u64(w, k.data_hash);
    qkd__wfile_u64(w, k.split_seed);
    qkd__wfile_u64(w, k.split_n_eval);

    size_t state_n = qkd_optimizer_state_bytes(d->opt);
    size_t weights_n = (size_t)largest_tensor(d->student) * sizeof(float);
    size_t buf_n = state_n > weights_n ? state_n : weights_n;
    void *buf = qkd_context_alloc(d->ctx, buf_n);
    if (!buf)
        return qkd_context_set_error(d->ctx, QKD_ERR_NO_MEMORY, "checkpoint: out of memory");
    qkd_status st = write_tensors(d, w, buf);
    if (st == QKD_OK)
        st = qkd_optimizer_state_get(d->opt, buf, state_n);
    if (st == QKD_OK) {
        qkd__wfile_u64(w, state_n);
        qkd__wfile_bytes(w, buf, state_n);
        qkd__wfile_u64(w, (uint64_t)d->step);
        qkd__wfile_words(w, d->history, (size_t)d->step);
        qkd__wfile_u64(w, w->hash);
    }
    qkd_context_dealloc(d->ctx, buf);
    return st;
}

qkd_status qkd_distill_save(const qkd_distill *d, const char *path)
{
    if (!d)
        return QKD_ERR_INVALID_ARG;
    qkd__wfile w;
    qkd_status st = qkd__wfile_open(d->ctx, &w, path);
    if (st != QKD_OK)
        return st;
    st = write_body(d, &w);
    if (st != QKD_OK) {
        qkd__wfile_abort(&w);
        return st;
    }
    return qkd__wfile_commit(&w);
}

/* ---- reading -------------------------------------------------------------- */

/* One pass over a checkpoint. The first pass (apply 0) checks everything
 * and keeps the optimizer state and history; the second (apply 1) reads
 * the same bytes again and sets the student's tensors. */
typedef struct reader {
    qkd_distill *d;
    qkd__rfile r;
    int apply;
    float *buf;          /* the largest tensor */
    void *state;         /* optimizer state (pass 1) */
    size_t state_n;
    float *history;      /* (pass 1) */
    uint64_t n_history;
    uint64_t step;
} reader;

static qkd_status fail(reader *rd, qkd_status st, const char *what, unsigned long long got,
                       unsigned long long want)
{
    return qkd_context_set_error(rd->d->ctx, st, "%s: %s is %llu, this run has %llu",
                                 rd->r.path, what, got, want);
}

static qkd_status read_header(reader *rd)
{
    qkd__rfile *r = &rd->r;
    unsigned char magic[4];
    uint32_t version;
    qkd_status st = qkd__rfile_bytes(r, magic, sizeof magic, "magic");
    if (st != QKD_OK)
        return st;
    if (memcmp(magic, ckpt_magic, sizeof magic) != 0)
        return qkd_context_set_error(rd->d->ctx, QKD_ERR_FORMAT,
                                     "%s: not a checkpoint (magic is not QKDC)", r->path);
    if ((st = qkd__rfile_u32(r, &version, "version")) != QKD_OK)
        return st;
    if (version != CKPT_VERSION)
        return qkd_context_set_error(rd->d->ctx,
                                     version > CKPT_VERSION ? QKD_ERR_UNSUPPORTED : QKD_ERR_FORMAT,
                                     "%s: checkpoint version %u (this library reads %u)", r->path,
                                     version, CKPT_VERSION);
    run_key k, want = key_of(rd->d);
    if ((st = qkd__rfile_u64(r, &rd->step, "step")) != QKD_OK ||
        (st = qkd__rfile_u32(r, &k.batch, "batch")) != QKD_OK ||
        (st = qkd__rfile_u32(r, &k.seq, "seq")) != QKD_OK ||
        (st = qkd__rfile_u64(r, &k.data_tokens, "data token count")) != QKD_OK ||
        (st = qkd__rfile_u64(r, &k.data_hash, "data hash")) != QKD_OK ||
        (st = qkd__rfile_u64(r, &k.split_seed, "split seed")) != QKD_OK ||
        (st = qkd__rfile_u64(r, &k.split_n_eval, "held-out windows")) != QKD_OK)
        return st;
    if (k.batch != want.batch)
        return fail(rd, QKD_ERR_STATE, "batch", k.batch, want.batch);
    if (k.seq != want.seq)
        return fail(rd, QKD_ERR_STATE, "seq", k.seq, want.seq);
    if (k.data_tokens != want.data_tokens)
        return fail(rd, QKD_ERR_STATE, "the data's token count", k.data_tokens, want.data_tokens);
    if (k.data_hash != want.data_hash)
        return qkd_context_set_error(rd->d->ctx, QKD_ERR_STATE,
                                     "%s: was written for other data (same length, other ids)",
                                     r->path);
    if (k.split_seed != want.split_seed)
        return fail(rd, QKD_ERR_STATE, "the data seed", k.split_seed, want.split_seed);
    if (k.split_n_eval != want.split_n_eval)
        return fail(rd, QKD_ERR_STATE, "the held-out window count", k.split_n_eval,
                    want.split_n_eval);
    return QKD_OK;
}

static qkd_status read_tensor(reader *rd, int i)
{
    qkd__rfile *r = &rd->r;
    qkd_tensor_info info = {.size = sizeof info};
    qkd_status st = qkd_model_tensor_info(rd->d->student, i, &info);
    uint32_t len = 0;
    uint64_t n = 0;
    char name[CKPT_MAX_NAME + 1];
    if (st == QKD_OK)
        st = qkd__rfile_u32(r, &len, "tensor name length");
    if (st == QKD_OK && len > CKPT_MAX_NAME)
        st = qkd_context_set_error(rd->d->ctx, QKD_ERR_FORMAT,
                                   "%s: tensor %d's name length %u at byte %llu is too long",
                                   r->path, i, len, (unsigned long long)(r->off - 4));
    if (st == QKD_OK)
        st = qkd__rfile_bytes(r, name, len, "tensor name");
    if (st == QKD_OK)
        st = qkd__rfile_u64(r, &n, "tensor size");
    if (st != QKD_OK)
        return st;
    name[len] = '\0';
    if (strcmp(name, info.name) != 0)
        return qkd_context_set_error(rd->d->ctx, QKD_ERR_SHAPE,
                                     "%s: tensor %d is '%s', the student's is '%s'", r->path, i,
                                     name, info.name);
    if (n != (uint64_t)info.n_elements)
        return fail(rd, QKD_ERR_SHAPE, name, n, (unsigned long long)info.n_elements);
    st = qkd__rfile_words(r, rd->buf, (size_t)n, name);
    if (st == QKD_OK && rd->apply)
        st = qkd_model_tensor_set(rd->d->student, i, rd->buf, (size_t)n);
    return st;
}

static qkd_status read_tensors(reader *rd)
{
    uint32_t n;
    qkd_status st = qkd__rfile_u32(&rd->r, &n, "tensor count");
    if (st != QKD_OK)
        return st;
    int want = qkd_model_n_tensors(rd->d->student);
    if (n != (uint32_t)want)
        return fail(rd, QKD_ERR_SHAPE, "the tensor count", n, (unsigned long long)want);
    for (int i = 0; i < want && st == QKD_OK; i++)
        st = read_tensor(rd, i);
    return st;
}

/* The optimizer state and the history; pass 1 keeps them. */
static qkd_status read_state(reader *rd)
{
    qkd__rfile *r = &rd->r;
    uint64_t n, count;
    qkd_status st = qkd__rfile_u64(r, &n, "optimizer state size");
    if (st != QKD_OK)
        return st;
    if (n != rd->state_n)
        return fail(rd, QKD_ERR_SHAPE, "the optimizer state size", n, rd->state_n);
    if ((st = qkd__rfile_bytes(r, rd->state, rd->state_n, "optimizer state")) != QKD_OK ||
        (st = qkd__rfile_u64(r, &count, "history count")) != QKD_OK)
        return st;
    if (count != rd->step)
        return qkd_context_set_error(rd->d->ctx, QKD_ERR_FORMAT,
                                     "%s: history of %llu losses for step %llu", r->path,
                                     (unsigned long long)count, (unsigned long long)rd->step);
    if (count > qkd__rfile_left(r) / 4) /* before allocating what a bad count asks */
        return qkd_context_set_error(rd->d->ctx, QKD_ERR_FORMAT,
                                     "%s: truncated: a history of %llu losses at byte %llu",
                                     r->path, (unsigned long long)count,
                                     (unsigned long long)r->off);
    if (rd->apply) { /* pass 2 allocates nothing: it must not fail half-way */
        if (count != rd->n_history)
            return qkd_context_set_error(rd->d->ctx, QKD_ERR_FORMAT,
                                         "%s: changed while it was being read", r->path);
    } else {
        rd->history = qkd_context_alloc(rd->d->ctx, (size_t)count * sizeof *rd->history);
        if (!rd->history)
            return qkd_context_set_error(rd->d->ctx, QKD_ERR_NO_MEMORY,
                                         "checkpoint: out of memory");
        rd->n_history = count;
    }
    return qkd__rfile_words(r, rd->history, (size_t)count, "history");
}

static qkd_status read_checksum(reader *rd)
{
    qkd__rfile *r = &rd->r;
    uint64_t want = r->hash, got;
    qkd_status st = qkd__rfile_u64(r, &got, "checksum");
    if (st != QKD_OK)
        return st;
    if (got != want)
        return qkd_context_set_error(rd->d->ctx, QKD_ERR_FORMAT,
                                     "%s: checksum mismatch (the file is corrupt)", r->path);
    if (qkd__rfile_left(r) != 0)
        return qkd_context_set_error(rd->d->ctx, QKD_ERR_FORMAT,
                                     "%s: %llu unexpected bytes after the checksum", r->path,
                                     (unsigned long long)qkd__rfile_left(r));
    return QKD_OK;
}

static qkd_status read_pass(reader *rd, const char *path)
{
    qkd_status st = qkd__rfile_open(rd->d->ctx, &rd->r, path);
    if (st != QKD_OK)
        return st;
    st = read_header(rd);
    if (st == QKD_OK)
        st = read_tensors(rd);
    if (st == QKD_OK)
        st = read_state(rd);
    if (st == QKD_OK)
        st = read_checksum(rd);
    qkd__rfile_close(&rd->r);
    return st;
}

/* Everything checked: room for the history first (an allocation that can
 * fail must come before anything changes), then the optimizer (the one
 * step that can still refuse), the tensors, the history and the step. */
static qkd_status apply(reader *rd, const char *path)
{
    qkd_distill *d = rd->d;
    qkd_status st = qkd__distill_reserve(d, (int64_t)rd->step);
    if (st == QKD_OK)
        st = qkd_optimizer_state_set(d->opt, rd->state, rd->state_n);
    if (st != QKD_OK)
        return st;
    rd->apply = 1;
    st = read_pass(rd, path);
    if (st != QKD_OK)
        return st;
    if (rd->step)
        memcpy(d->history, rd->history, (size_t)rd->step * sizeof *d->history);
    d->step = (int64_t)rd->step;
    d->bad_streak = 0; /* a checkpoint holds a good state */
    return QKD_OK;
}

qkd_status qkd_distill_resume(qkd_distill *d, const char *path)
{
    if (!d)
        return QKD_ERR_INVALID_ARG;
    if (!path)
        return qkd_context_set_error(d->ctx, QKD_ERR_INVALID_ARG, "resume: NULL path");
    reader rd = {.d = d, .state_n = qkd_optimizer_state_bytes(d->opt)};
    rd.buf = qkd_context_alloc(d->ctx, (size_t)largest_tensor(d->student) * sizeof *rd.buf);
    rd.state = qkd_context_alloc(d->ctx, rd.state_n);
    qkd_status st = QKD_OK;
    if (!rd.buf || !rd.state)
        st = qkd_context_set_error(d->ctx, QKD_ERR_NO_MEMORY, "resume: out of memory");
    if (st == QKD_OK)
        st = read_pass(&rd, path);
    if (st == QKD_OK)
        st = apply(&rd, path);
    qkd_context_dealloc(d->ctx, rd.buf);
    qkd_context_dealloc(d->ctx, rd.state);
    qkd_context_dealloc(d->ctx, rd.history);
    return st;
}
