/* Hugging Face LlamaForCausalLM writer: model.safetensors + config.json,
 * and the model's tokenizer as llama2.c's tokenizer.bin and as a
 * tokenizers BPE (tokenizer.json + tokenizer_config.json).
 *
 * safetensors: u64 little-endian header length N, N bytes of JSON (padded
 * with spaces so that the data starts 8-byte aligned), then the tensors'
 * data back to back, in our tensor order. The inverse of load_hf.c:
 * attention q/k rows go back from our interleaved RoPE pairs (rows 2j,
 * 2j+1 of a head) to Hugging Face's rotate-half halves (rows j, j + hd/2).
 *
 * tokenizer.json: sentencepiece's BPE expressed as tokenizers' BPE model,
 * as transformers' own LLaMA conversion does: the vocabulary with spaces
 * as U+2581, a normalizer that prepends U+2581 and maps spaces to it, byte
 * fallback for characters outside the vocabulary, and one merge (left,
 * right) for every way of splitting a mergeable piece into two mergeable
 * pieces, ranked by the merged piece's score (best first), which is the
 * order our encoder merges in. */
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "core/half.h"
#include "data/fileio.h"
#include "io/io.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"

#define SPACE_MARK "\xe2\x96\x81" /* U+2581, sentencepiece's space */
#define NAME_LEN 128
#define CHUNK_VALUES 4096 /* 16-bit values converted per write */

void qkd_safetensors_params_init(qkd_safetensors_params *p)
{
    if (p)
        *p = (qkd_safetensors_params){.size = sizeof *p, .dtype = QKD_SAVE_F32};
}

/* ---- the writer's state ---- */

typedef struct hf_saver {
    qkd_context *ctx;
    qkd_model *model;
    const char *dir;
    qkd_safetensors_params p;
    qkd_model_config cfg;
    const qkd_tokenizer *tok;
    float *buf;   /* one tensor's latent weights */
    float *wq;    /* its deployed values */
    float *perm;  /* q/k rows in Hugging Face's order */
    char **names; /* [vocab] each token's name in tokenizer.json */
    char *scratch; /* a NUL-terminated piece or merge, longest piece * 2 + 2 */
} hf_saver;

static char *join(qkd_context *ctx, const char *dir, const char *name)
{
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = qkd__alloc(ctx, n);
    if (p)
        snprintf(p, n, "%s/%s", dir, name);
    return p;
}

static qkd_status make_dir(qkd_context *ctx, const char *dir)
{
    struct stat sb;
    if (stat(dir, &sb) == 0) {
        if (S_ISDIR(sb.st_mode))
            return QKD_OK;
        return qkd__error(ctx, QKD_ERR_IO, "%s: exists and is not a folder", dir);
    }
    if (mkdir(dir, 0777) != 0)
        return qkd__error(ctx, QKD_ERR_IO, "%s: cannot create the folder: %s", dir,
                          strerror(errno));
    return QKD_OK;
}

/* Write one file of dir through "<file>.tmp" and a rename: fill() writes
 * the content. */
static qkd_status write_file(hf_saver *sv, const char *name,
                             qkd_status (*fill)(hf_saver *sv, qkd__wfile *w))
{
    char *path = join(sv->ctx, sv->dir, name);
    if (!path)
        return qkd__error(sv->ctx, QKD_ERR_NO_MEMORY, "%s: out of memory", sv->dir);
    qkd__wfile w;
    qkd_status st = qkd__wfile_open(sv->ctx, &w, path);
    if (st == QKD_OK) {
        st = fill(sv, &w);
        if (st == QKD_OK)
            st = qkd__wfile_commit(&w);
        else
            qkd__wfile_abort(&w);
    }
    qkd__free(sv->ctx, path);
    return st;
}

/* A JSON document as the file's content (the reference is stolen). */
static qkd_status write_json(hf_saver *sv, qkd__wfile *w, json_t *root)
{
    char *text = root ? json_dumps(root, JSON_INDENT(2) | JSON_REAL_PRECISION(9)) : NULL;
    json_decref(root);
    if (!text)
        return qkd__error(sv->ctx, QKD_ERR_NO_MEMORY, "%s: out of memory building JSON",
                          sv->dir);
    qkd__wfile_bytes(w, text, strlen(text));
    qkd__wfile_bytes(w, "\n", 1);
    free(text);
    return QKD_OK;
}

/* ---- model.safetensors ---- */

static const char *dtype_name(qkd_save_dtype t)
{
    static const char *const names[] = {"F32", "F16", "BF16"};
    return names[t];
}

static size_t dtype_bytes(qkd_save_dtype t)
{
    return t == QKD_SAVE_F32 ? 4 : 2;
}

/* The safetensors header: every tensor's dtype, shape and byte range. */
static json_t *header_json(const hf_saver *sv)
{
    json_t *root = json_object();
    json_t *meta = json_pack("{s:s}", "format", "pt");
    if (!root || json_object_set_new(root, "__metadata__", meta) != 0) {
        json_decref(root);
        return NULL;
    }
    uint64_t offset = 0;
    int n = qkd__model_n_weights(sv->model);
    for (int i = 0; i < n; i++) {
        qkd_tensor_info info = {.size = sizeof info};
        char name[NAME_LEN];
        if (qkd_model_tensor_info(sv->model, i, &info) != QKD_OK)
            break;
        qkd__hf_tensor_name(&info, name, sizeof name);
        uint64_t end = offset + (uint64_t)info.n_elements * dtype_bytes(sv->p.dtype);
        json_t *shape = info.n_dims == 1 ? json_pack("[I]", (json_int_t)info.shape[0])
                                         : json_pack("[II]", (json_int_t)info.shape[0],
                                                     (json_int_t)info.shape[1]);
        json_t *entry = json_pack("{s:s,s:o,s:[II]}", "dtype", dtype_name(sv->p.dtype),
                                  "shape", shape, "data_offsets", (json_int_t)offset,
                                  (json_int_t)end);
        if (json_object_set_new(root, name, entry) != 0) {
            json_decref(root);
            return NULL;
        }
        offset = end;
    }
    return root;
}

/* Hugging Face's q/k row order, the inverse of load_hf.c's: our rows 2j and
 * 2j+1 of a head become its rows j and j + hd/2. */
static void permute_rows(const float *ours, float *hf, int n_heads, int64_t rows,
                         int64_t cols)
{
    int64_t hd = rows / n_heads, half = hd / 2;
    for (int64_t h = 0; h < n_heads; h++)
        for (int64_t j = 0; j < half; j++)
            for (int64_t s = 0; s < 2; s++)
                memcpy(hf + (h * hd + s * half + j) * cols, ours + (h * hd + 2 * j + s) * cols,
                       (size_t)cols * sizeof *hf);
}

/* Tensor index's values as stored: latent or deployed, q/k permuted. */
static qkd_status tensor_values(hf_saver *sv, int index, const qkd_tensor_info *info,
                                const float **out)
{
    size_t n = (size_t)info->n_elements;
    qkd_status st = qkd_model_tensor_get(sv->model, index, sv->buf, n);
    if (st != QKD_OK)
        return st;
    const float *w = sv->buf;
    if (sv->p.as_deployed && qkd__model_tensor_quantizer(sv->model, index)) {
        /* the student's own Q(w): its learned scales, if any, included */
        st = qkd__model_deployed_get(sv->model, index, sv->wq);
        if (st != QKD_OK)
            return st;
        w = sv->wq;
    }
    for (size_t i = 0; i < n; i++)
        if (!isfinite(w[i]))
            return qkd__error(sv->ctx, QKD_ERR_NON_FINITE, "%s: %s[%zu] is not finite",
                              sv->dir, info->name, i);
    if (info->kind == QKD_TENSOR_ATTN_Q || info->kind == QKD_TENSOR_ATTN_K) {
        int heads = info->kind == QKD_TENSOR_ATTN_Q ? sv->cfg.n_heads : sv->cfg.n_kv_heads;
        permute_rows(w, sv->perm, heads, info->shape[0], info->shape[1]);
        w = sv->perm;
    }
    *out = w;
    return QKD_OK;
}

/* n values as 16-bit floats, little-endian; RANGE if one overflows F16. */
static qkd_status write_half(hf_saver *sv, qkd__wfile *w, const qkd_tensor_info *info,
                             const float *v, size_t n)
{
    unsigned char chunk[2 * CHUNK_VALUES];
    for (size_t done = 0; done < n;) {
        size_t k = n - done < CHUNK_VALUES ? n - done : CHUNK_VALUES;
        for (size_t i = 0; i < k; i++) {
            float x = v[done + i];
            uint16_t h = sv->p.dtype == QKD_SAVE_F16 ? qkd__f32_to_f16(x) : qkd__f32_to_bf16(x);
            if (sv->p.dtype == QKD_SAVE_F16 && (h & 0x7c00) == 0x7c00)
                return qkd__error(sv->ctx, QKD_ERR_RANGE, "%s: %s[%zu] = %g does not fit F16",
                                  sv->dir, info->name, done + i, (double)x);
            chunk[2 * i] = (unsigned char)(h & 0xff);
            chunk[2 * i + 1] = (unsigned char)(h >> 8);
        }
        qkd__wfile_bytes(w, chunk, 2 * k);
        done += k;
    }
    return QKD_OK;
}

static qkd_status write_tensor(hf_saver *sv, qkd__wfile *w, int index)
{
    qkd_tensor_info info = {.size = sizeof info};
    const float *v = NULL;
    qkd_status st = qkd_model_tensor_info(sv->model, index, &info);
    if (st == QKD_OK)
        st = tensor_values(sv, index, &info, &v);
    if (st != QKD_OK)
        return st;
    if (sv->p.dtype == QKD_SAVE_F32) {
        qkd__wfile_words(w, v, (size_t)info.n_elements);
        return QKD_OK;
    }
    return write_half(sv, w, &info, v, (size_t)info.n_elements);
}

static qkd_status fill_safetensors(hf_saver *sv, qkd__wfile *w)
{
    json_t *root = header_json(sv);
    char *header = root ? json_dumps(root, JSON_COMPACT) : NULL;
    json_decref(root);
    if (!header)
        return qkd__error(sv->ctx, QKD_ERR_NO_MEMORY, "%s: out of memory building the "
                          "safetensors header", sv->dir);
    /* spaces pad the header so that the data starts at a multiple of 8 */
    size_t len = strlen(header), padded = (len + 7) & ~(size_t)7;
    qkd__wfile_u64(w, padded);
    qkd__wfile_bytes(w, header, len);
    qkd__wfile_bytes(w, "       ", padded - len);
    free(header);
    qkd_status st = QKD_OK;
    int n = qkd__model_n_weights(sv->model);
    for (int i = 0; i < n && st == QKD_OK; i++)
        st = write_tensor(sv, w, i);
    return st;
}

/* ---- config.json ---- */

/* The shortest decimal that reads back as f, so that "1e-05" is written
 * rather than float 1e-5's 17-digit double expansion. */
static json_t *real_of_float(float f)
{
    char text[32];
    for (int digits = 1; digits <= 9; digits++) {
        snprintf(text, sizeof text, "%.*g", digits, (double)f);
        if (strtof(text, NULL) == f)
            break;
    }
    return json_real(strtod(text, NULL));
}

static const char *torch_dtype(qkd_save_dtype t)
{
    static const char *const names[] = {"float32", "float16", "bfloat16"};
    return names[t];
}

static qkd_status fill_config(hf_saver *sv, qkd__wfile *w)
{
    const qkd_model_config *c = &sv->cfg;
    int bos = sv->tok ? qkd_tokenizer_bos(sv->tok) : 1;
    int eos = sv->tok ? qkd_tokenizer_eos(sv->tok) : 2;
    json_t *root = json_pack(
        "{s:[s],s:s,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:o,s:o,s:{s:s,s:o},s:n,s:b,s:s,"
        "s:b,s:b,s:f,s:i,s:i,s:s,s:b}",
        "architectures", "LlamaForCausalLM", "model_type", "llama",
        "hidden_size", c->dim, "intermediate_size", c->hidden_dim,
        "num_hidden_layers", c->n_layers, "num_attention_heads", c->n_heads,
        "num_key_value_heads", c->n_kv_heads, "head_dim", c->dim / c->n_heads,
        "vocab_size", c->vocab_size, "max_position_embeddings", c->max_seq_len,
        "rms_norm_eps", real_of_float(c->norm_eps), "rope_theta", real_of_float(c->rope_theta),
        /* transformers 5 reads the RoPE base here, 4.x from rope_theta */
        "rope_parameters", "rope_type", "default", "rope_theta", real_of_float(c->rope_theta),
        "rope_scaling", "tie_word_embeddings", c->tied_embeddings, "hidden_act", "silu",
        "attention_bias", 0, "mlp_bias", 0, "initializer_range", 0.02,
        "bos_token_id", bos, "eos_token_id", eos, "torch_dtype", torch_dtype(sv->p.dtype),
        "use_cache", 1);
    return write_json(sv, w, root);
}

/* ---- tokenizer.bin (llama2.c) ---- */

/* int32 max_token_length, then per token: float score, int32 length,
 * the piece's bytes with spaces as spaces (qkd_tokenizer_piece's form). */
static qkd_status fill_tokenizer_bin(hf_saver *sv, qkd__wfile *w)
{
    int n = qkd_tokenizer_vocab_size(sv->tok);
    size_t max_len = 0;
    for (int32_t id = 0; id < n; id++) {
        size_t len = strlen(qkd_tokenizer_piece(sv->tok, id));
        max_len = len > max_len ? len : max_len;
    }
    if (max_len > INT32_MAX)
        return qkd__error(sv->ctx, QKD_ERR_RANGE, "%s: a token piece is too long", sv->dir);
    qkd__wfile_u32(w, (uint32_t)max_len);
    for (int32_t id = 0; id < n; id++) {
        qkd__token_info t;
        qkd__tokenizer_token(sv->tok, id, &t);
        const char *text = qkd_tokenizer_piece(sv->tok, id);
        qkd__wfile_words(w, &t.score, 1);
        qkd__wfile_u32(w, (uint32_t)strlen(text));
        qkd__wfile_bytes(w, text, strlen(text));
    }
    return QKD_OK;
}

/* ---- tokenizer.json (tokenizers' BPE) ---- */

static bool is_special(qkd__token_type t)
{
    return t == QKD__TOKEN_CONTROL || t == QKD__TOKEN_UNKNOWN;
}

static bool is_mergeable(qkd__token_type t)
{
    return t == QKD__TOKEN_NORMAL || t == QKD__TOKEN_USER_DEFINED;
}

static char *dup_range(qkd_context *ctx, const char *s, size_t n)
{
    char *d = qkd__alloc(ctx, n + 1);
    if (d) {
        memcpy(d, s, n);
        d[n] = '\0';
    }
    return d;
}

/* A special token's name: its piece without surrounding white space
 * (llama2.c's BOS is "\n<s>\n"), unless another piece is named so. */
static char *special_name(qkd_context *ctx, const qkd__token_info *t, const json_t *pieces)
{
    const char *s = t->piece, *e = t->piece + t->len;
    while (s < e && strchr(" \t\r\n", *s))
        s++;
    while (e > s && strchr(" \t\r\n", e[-1]))
        e--;
    char *name = dup_range(ctx, s, (size_t)(e - s));
    if (name && (s == e || ((size_t)(e - s) != t->len && json_object_get(pieces, name)))) {
        qkd__free(ctx, name);
        name = dup_range(ctx, t->piece, t->len);
    }
    return name;
}

/* Every piece as stored, as the keys of a JSON object (for collisions);
 * UNSUPPORTED if one is not UTF-8, which JSON cannot hold. */
static qkd_status piece_set(hf_saver *sv, json_t **out)
{
    json_t *pieces = json_object();
    int n = qkd_tokenizer_vocab_size(sv->tok);
    for (int32_t id = 0; pieces && id < n; id++) {
        qkd__token_info t;
        qkd__tokenizer_token(sv->tok, id, &t);
        json_t *str = json_stringn(t.piece, t.len);
        if (!str) {
            json_decref(pieces);
            return qkd__error(sv->ctx, QKD_ERR_UNSUPPORTED, "%s: token %d's piece is not "
                              "UTF-8 text, which tokenizer.json cannot hold", sv->dir, (int)id);
        }
        if (json_object_set_new(pieces, json_string_value(str), json_null()) != 0) {
            json_decref(pieces);
            pieces = NULL;
        }
        json_decref(str);
    }
    *out = pieces;
    return pieces ? QKD_OK : qkd__error(sv->ctx, QKD_ERR_NO_MEMORY, "%s: out of memory", sv->dir);
}

/* sv->names and sv->scratch for the tokenizer.json writers. */
static qkd_status names_build(hf_saver *sv)
{
    qkd_context *ctx = sv->ctx;
    int n = qkd_tokenizer_vocab_size(sv->tok);
    json_t *pieces = NULL;
    qkd_status st = piece_set(sv, &pieces);
    if (st != QKD_OK)
        return st;
    size_t longest = 0;
    sv->names = qkd__calloc(ctx, (size_t)n, sizeof *sv->names);
    bool ok = sv->names != NULL;
    for (int32_t id = 0; ok && id < n; id++) {
        qkd__token_info t;
        qkd__tokenizer_token(sv->tok, id, &t);
        sv->names[id] = is_special(t.type) ? special_name(ctx, &t, pieces)
                                           : dup_range(ctx, t.piece, t.len);
        ok = sv->names[id] != NULL;
        longest = t.len > longest ? t.len : longest;
    }
    json_decref(pieces);
    sv->scratch = ok ? qkd__alloc(ctx, 2 * longest + 2) : NULL;
    return sv->scratch ? QKD_OK : qkd__error(ctx, QKD_ERR_NO_MEMORY, "%s: out of memory", sv->dir);
}

static void names_free(hf_saver *sv)
{
    int n = qkd_tokenizer_vocab_size(sv->tok);
    for (int i = 0; sv->names && i < n; i++)
        qkd__free(sv->ctx, sv->names[i]);
    qkd__free(sv->ctx, sv->names);
    qkd__free(sv->ctx, sv->scratch);
}

/* A merge (left + right = merged) and its rank keys. */
typedef struct bpe_merge {
    float score;     /* of the merged piece: higher merges first */
    int32_t merged;  /* then lower ids first */
    int32_t left, right;
} bpe_merge;

static int merge_order(const void *a, const void *b)
{
    const bpe_merge *x = a, *y = b;
    if (x->score != y->score)
        return x->score > y->score ? -1 : 1;
    if (x->merged != y->merged)
        return x->merged < y->merged ? -1 : 1;
    return (x->left > y->left) - (x->left < y->left);
}

/* The mergeable token named s[0..n), or -1 (the lowest id on duplicates,
 * as our encoder). */
static int32_t mergeable_id(const hf_saver *sv, const json_t *vocab, const char *s, size_t n)
{
    memcpy(sv->scratch, s, n);
    sv->scratch[n] = '\0';
    const json_t *v = json_object_get(vocab, sv->scratch);
    if (!v)
        return -1;
    qkd__token_info t;
    qkd__tokenizer_token(sv->tok, (int32_t)json_integer_value(v), &t);
    return is_mergeable(t.type) ? (int32_t)json_integer_value(v) : -1;
}

static size_t utf8_step(const unsigned char *s, size_t n)
{
    size_t k = *s < 0x80 ? 1 : *s >= 0xf0 ? 4 : *s >= 0xe0 ? 3 : *s >= 0xc0 ? 2 : 1;
    return k <= n ? k : n;
}

/* Every split of every mergeable piece into two mergeable pieces, ranked. */
static qkd_status collect_merges(hf_saver *sv, const json_t *vocab, bpe_merge **out,
                                 size_t *n_out)
{
    size_t cap = 1024, n = 0;
    bpe_merge *m = qkd__alloc(sv->ctx, cap * sizeof *m);
    int n_tok = qkd_tokenizer_vocab_size(sv->tok);
    for (int32_t id = 0; m && id < n_tok; id++) {
        qkd__token_info t;
        qkd__tokenizer_token(sv->tok, id, &t);
        if (!is_mergeable(t.type) || mergeable_id(sv, vocab, t.piece, t.len) != id)
            continue;
        const unsigned char *s = (const unsigned char *)t.piece;
        for (size_t k = utf8_step(s, t.len); m && k < t.len; k += utf8_step(s + k, t.len - k)) {
            int32_t l = mergeable_id(sv, vocab, t.piece, k);
            int32_t r = mergeable_id(sv, vocab, t.piece + k, t.len - k);
            if (l < 0 || r < 0)
                continue;
            if (n == cap) {
                bpe_merge *grown = qkd__alloc(sv->ctx, 2 * cap * sizeof *m);
                if (grown)
                    memcpy(grown, m, n * sizeof *m);
                qkd__free(sv->ctx, m);
                m = grown;
                cap *= 2;
                if (!m)
                    break;
            }
            m[n++] = (bpe_merge){t.score, id, l, r};
        }
    }
    if (!m)
        return qkd__error(sv->ctx, QKD_ERR_NO_MEMORY, "%s: out of memory for merges", sv->dir);
    qsort(m, n, sizeof *m, merge_order);
    *out = m;
    *n_out = n;
    return QKD_OK;
}

/* "left right": pieces never hold a space (it is U+2581), so the oldest
 * merges syntax, which every tokenizers version reads, is unambiguous. */
static json_t *merges_json(const hf_saver *sv, const bpe_merge *m, size_t n)
{
    json_t *arr = json_array();
    for (size_t i = 0; arr && i < n; i++) {
        const char *l = sv->names[m[i].left], *r = sv->names[m[i].right];
        size_t ll = strlen(l), rl = strlen(r);
        memcpy(sv->scratch, l, ll);
        sv->scratch[ll] = ' ';
        memcpy(sv->scratch + ll + 1, r, rl + 1);
        if (json_array_append_new(arr, json_string(sv->scratch)) != 0) {
            json_decref(arr);
            arr = NULL;
        }
    }
    return arr;
}

static json_t *vocab_json(const hf_saver *sv)
{
    json_t *vocab = json_object();
    int n = qkd_tokenizer_vocab_size(sv->tok);
    for (int32_t id = 0; vocab && id < n; id++) {
        if (json_object_get(vocab, sv->names[id]))
            continue; /* a duplicate piece: the lowest id keeps the name */
        if (json_object_set_new(vocab, sv->names[id], json_integer(id)) != 0) {
            json_decref(vocab);
            vocab = NULL;
        }
    }
    return vocab;
}

static json_t *added_tokens_json(const hf_saver *sv)
{
    json_t *arr = json_array();
    int n = qkd_tokenizer_vocab_size(sv->tok);
    for (int32_t id = 0; arr && id < n; id++) {
        qkd__token_info t;
        qkd__tokenizer_token(sv->tok, id, &t);
        if (!is_special(t.type))
            continue;
        json_t *e = json_pack("{s:i,s:s,s:b,s:b,s:b,s:b,s:b}", "id", id, "content",
                              sv->names[id], "single_word", 0, "lstrip", 0, "rstrip", 0,
                              "normalized", 0, "special", 1);
        if (json_array_append_new(arr, e) != 0) {
            json_decref(arr);
            arr = NULL;
        }
    }
    return arr;
}

/* BOS before the sequence, as the model was trained. */
static json_t *post_processor_json(const char *bos, int32_t bos_id)
{
    return json_pack("{s:s,s:[{s:{s:s,s:i}},{s:{s:s,s:i}}],"
                     "s:[{s:{s:s,s:i}},{s:{s:s,s:i}},{s:{s:s,s:i}},{s:{s:s,s:i}}],"
                     "s:{s:{s:s,s:[i],s:[s]}}}",
                     "type", "TemplateProcessing",
                     "single", "SpecialToken", "id", bos, "type_id", 0,
                     "Sequence", "id", "A", "type_id", 0,
                     "pair", "SpecialToken", "id", bos, "type_id", 0,
                     "Sequence", "id", "A", "type_id", 0,
                     "SpecialToken", "id", bos, "type_id", 1,
                     "Sequence", "id", "B", "type_id", 1,
                     "special_tokens", bos, "id", bos, "ids", bos_id, "tokens", bos);
}

static json_t *tokenizer_json(const hf_saver *sv, json_t *vocab, json_t *merges)
{
    const char *bos = sv->names[qkd_tokenizer_bos(sv->tok)];
    const char *unk = sv->names[qkd__tokenizer_unk(sv->tok)];
    return json_pack(
        "{s:s,s:n,s:n,s:o,"
        "s:{s:s,s:[{s:s,s:s},{s:s,s:{s:s},s:s}]},s:n,s:o,"
        "s:{s:s,s:[{s:s,s:{s:s},s:s},{s:s},{s:s},{s:s,s:s,s:i,s:i}]},"
        "s:{s:s,s:n,s:s,s:n,s:n,s:b,s:b,s:o,s:o}}",
        "version", "1.0", "truncation", "padding", "added_tokens", added_tokens_json(sv),
        "normalizer", "type", "Sequence", "normalizers", "type", "Prepend", "prepend",
        SPACE_MARK, "type", "Replace", "pattern", "String", " ", "content", SPACE_MARK,
        "pre_tokenizer", "post_processor",
        post_processor_json(bos, qkd_tokenizer_bos(sv->tok)),
        "decoder", "type", "Sequence", "decoders", "type", "Replace", "pattern", "String",
        SPACE_MARK, "content", " ", "type", "ByteFallback", "type", "Fuse", "type", "Strip",
        "content", " ", "start", 1, "stop", 0,
        "model", "type", "BPE", "dropout", "unk_token", unk, "continuing_subword_prefix",
        "end_of_word_suffix", "fuse_unk", 1, "byte_fallback", 1,
        "vocab", vocab, "merges", merges);
}

static json_t *tokenizer_config_json(const hf_saver *sv)
{
    return json_pack("{s:s,s:s,s:s,s:s,s:b,s:b,s:b,s:i}",
                     "tokenizer_class", "PreTrainedTokenizerFast",
                     "bos_token", sv->names[qkd_tokenizer_bos(sv->tok)],
                     "eos_token", sv->names[qkd_tokenizer_eos(sv->tok)],
                     "unk_token", sv->names[qkd__tokenizer_unk(sv->tok)],
                     "add_bos_token", 1, "add_eos_token", 0,
                     "clean_up_tokenization_spaces", 0,
                     "model_max_length", sv->cfg.max_seq_len);
}

static qkd_status fill_tokenizer_json(hf_saver *sv, qkd__wfile *w)
{
    bpe_merge *m = NULL;
    size_t n_merges = 0;
    json_t *vocab = vocab_json(sv);
    qkd_status st = vocab ? collect_merges(sv, vocab, &m, &n_merges)
                          : qkd__error(sv->ctx, QKD_ERR_NO_MEMORY, "%s: out of memory", sv->dir);
    if (st == QKD_OK)
        st = write_json(sv, w, tokenizer_json(sv, json_incref(vocab), merges_json(sv, m, n_merges)));
    json_decref(vocab);
    qkd__free(sv->ctx, m);
    return st;
}

static qkd_status fill_tokenizer_config(hf_saver *sv, qkd__wfile *w)
{
    return write_json(sv, w, tokenizer_config_json(sv));
}

/* ---- entry point ---- */

static qkd_status check_args(qkd_context *ctx, const char *dir, const qkd_safetensors_params *p)
{
    if (!dir || !*dir)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG, "save_safetensors: NULL or empty dir");
    if (p->size < sizeof *p)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG, "save_safetensors: params size field is "
                          "not set (use qkd_safetensors_params_init)");
    if ((unsigned)p->dtype > QKD_SAVE_BF16)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG, "save_safetensors: unknown dtype %d",
                          (int)p->dtype);
    return QKD_OK;
}

/* Host buffers for the largest tensor. */
static qkd_status saver_alloc(hf_saver *sv)
{
    int64_t largest = 0;
    int n = qkd__model_n_weights(sv->model);
    for (int i = 0; i < n; i++) {
        qkd_tensor_info info = {.size = sizeof info};
        if (qkd_model_tensor_info(sv->model, i, &info) == QKD_OK && info.n_elements > largest)
            largest = info.n_elements;
    }
    sv->buf = qkd__calloc(sv->ctx, (size_t)largest, sizeof(float));
    sv->wq = qkd__calloc(sv->ctx, (size_t)largest, sizeof(float));
    sv->perm = qkd__calloc(sv->ctx, (size_t)largest, sizeof(float));
    if (!sv->buf || !sv->wq || !sv->perm)
        return qkd__error(sv->ctx, QKD_ERR_NO_MEMORY, "%s: out of memory for %lld floats",
                          sv->dir, (long long)largest);
    return QKD_OK;
}

static qkd_status save(hf_saver *sv)
{
    qkd_status st = make_dir(sv->ctx, sv->dir);
    if (st == QKD_OK)
        st = saver_alloc(sv);
    if (st == QKD_OK)
        st = write_file(sv, "model.safetensors", fill_safetensors);
    if (st == QKD_OK)
        st = write_file(sv, "config.json", fill_config);
    if (st == QKD_OK && sv->tok)
        st = write_file(sv, "tokenizer.bin", fill_tokenizer_bin);
    if (st == QKD_OK && sv->tok)
        st = names_build(sv);
    if (st == QKD_OK && sv->tok)
        st = write_file(sv, "tokenizer.json", fill_tokenizer_json);
    if (st == QKD_OK && sv->tok)
        st = write_file(sv, "tokenizer_config.json", fill_tokenizer_config);
    return st;
}

qkd_status qkd_model_save_safetensors(qkd_model *model, const char *dir,
                                      const qkd_safetensors_params *p)
{
    if (!model)
        return QKD_ERR_INVALID_ARG;
    qkd_safetensors_params defaults;
    qkd_safetensors_params_init(&defaults);
    hf_saver sv = {.ctx = qkd__model_context(model), .model = model, .dir = dir,
                   .tok = qkd_model_tokenizer(model)};
    qkd_status st = check_args(sv.ctx, dir, p ? p : &defaults);
    if (st != QKD_OK)
        return st;
    sv.p = p ? *p : defaults;
    qkd_model_config_init(&sv.cfg);
    st = qkd_model_get_config(model, &sv.cfg);
    if (st == QKD_OK)
        st = save(&sv);
    qkd__free(sv.ctx, sv.buf);
    qkd__free(sv.ctx, sv.wq);
    qkd__free(sv.ctx, sv.perm);
    if (sv.names)
        names_free(&sv);
    return st;
}
