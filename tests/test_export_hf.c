/* The Hugging Face writer (qkd_model_save_safetensors): save -> load round
 * trips with bit-identical logits, the tests/fixtures/hf_tiny checkpoint
 * (written by transformers) rewritten byte for byte, 16-bit dtypes, a
 * student saved as deployed, the tokenizer files (tokenizer.bin read back,
 * tokenizer.json replayed by an independent BPE written here) and errors. */
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "model/model.h"
#include "testutil.h"
#include "tokenizer/tokenizer.h"

#define STORIES_GGUF "models/stories260K/stories260K.gguf"
#define LLAMA2_TOK "models/llama2_tokenizer/tokenizer.bin"
#define TEXT "text/tinystories/tinystories_sample.cs336.txt"

static const char *const written_files[] = {
    "model.safetensors", "config.json", "tokenizer.bin", "tokenizer.json",
    "tokenizer_config.json",
};

/* ---- helpers ---- */

/* A fresh folder path (not yet created) inside a new temporary folder. */
static char *new_out_dir(void)
{
    static char dir[4096];
    snprintf(dir, sizeof dir, "%s/out", test_tmpdir());
    return dir;
}

/* Remove what the writer may have put in dir, dir and its parent. */
static void remove_out_dir(const char *dir)
{
    for (size_t i = 0; i < sizeof written_files / sizeof written_files[0]; i++)
        unlink(test_path_in(dir, written_files[i]));
    rmdir(dir);
    char parent[4096];
    snprintf(parent, sizeof parent, "%s", dir);
    char *slash = strrchr(parent, '/');
    if (slash) {
        *slash = '\0';
        rmdir(parent);
    }
}

static qkd_model *tiny_model(qkd_context *ctx, int tied, uint64_t seed)
{
    qkd_model_config c;
    qkd_model_config_init(&c);
    c.dim = 32;
    c.hidden_dim = 48;
    c.n_layers = 2;
    c.n_heads = 4;
    c.n_kv_heads = 2;
    c.vocab_size = 64;
    c.max_seq_len = 32;
    c.rope_theta = 500000.0f;
    c.norm_eps = 1e-6f;
    c.tied_embeddings = tied;
    return test_model(ctx, &c, seed, 0.3f);
}

/* Logits of a fixed batch (2 x T tokens below vocab). */
static float *logits_of(qkd_model *m, int T)
{
    qkd_model_config c;
    qkd_model_config_init(&c);
    ck_assert_int_eq(qkd_model_get_config(m, &c), QKD_OK);
    int32_t tokens[2 * 64];
    ck_assert_int_le(T, 64);
    for (int i = 0; i < 2 * T; i++)
        tokens[i] = (int32_t)((i * 37 + 11) % c.vocab_size);
    ck_assert_int_eq(qkd_model_forward(m, tokens, 2, T), QKD_OK);
    size_t n = (size_t)2 * T * c.vocab_size;
    float *out = malloc(n * sizeof *out);
    ck_assert_ptr_nonnull(out);
    ck_assert_int_eq(qkd_model_logits(m, out, n), QKD_OK);
    return out;
}

static void expect_same_weights(qkd_model *a, qkd_model *b)
{
    int n = qkd_model_n_tensors(a);
    ck_assert_int_eq(qkd_model_n_tensors(b), n);
    for (int i = 0; i < n; i++) {
        qkd_tensor_info ia = {.size = sizeof ia}, ib = {.size = sizeof ib};
        ck_assert_int_eq(qkd_model_tensor_info(a, i, &ia), QKD_OK);
        ck_assert_int_eq(qkd_model_tensor_info(b, i, &ib), QKD_OK);
        ck_assert_str_eq(ia.name, ib.name);
        ck_assert_int_eq(ia.n_elements, ib.n_elements);
        float *wa = malloc((size_t)ia.n_elements * sizeof *wa);
        float *wb = malloc((size_t)ia.n_elements * sizeof *wb);
        ck_assert_int_eq(qkd_model_tensor_get(a, i, wa, (size_t)ia.n_elements), QKD_OK);
        ck_assert_int_eq(qkd_model_tensor_get(b, i, wb, (size_t)ia.n_elements), QKD_OK);
        ck_assert_msg(memcmp(wa, wb, (size_t)ia.n_elements * sizeof *wa) == 0,
                      "%s differs after the round trip", ia.name);
        free(wa);
        free(wb);
    }
}

/* Save m (F32, defaults), load it back, and compare weights and logits. */
static void round_trip(qkd_context *ctx, qkd_model *m, int T)
{
    char *dir = new_out_dir();
    test_expect_status(ctx, qkd_model_save_safetensors(m, dir, NULL), QKD_OK, "save");
    qkd_model *back = NULL;
    test_expect_status(ctx, qkd_model_load(ctx, dir, &back), QKD_OK, "load");
    qkd_model_config ca, cb;
    qkd_model_config_init(&ca);
    qkd_model_config_init(&cb);
    ck_assert_int_eq(qkd_model_get_config(m, &ca), QKD_OK);
    ck_assert_int_eq(qkd_model_get_config(back, &cb), QKD_OK);
    ck_assert_msg(memcmp(&ca, &cb, sizeof ca) == 0, "the config changed in the round trip");
    expect_same_weights(m, back);
    size_t n = (size_t)2 * T * ca.vocab_size;
    float *la = logits_of(m, T), *lb = logits_of(back, T);
    ck_assert_msg(memcmp(la, lb, n * sizeof *la) == 0, "logits differ after the round trip");
    free(la);
    free(lb);
    qkd_model_free(back);
    remove_out_dir(dir);
}

/* ---- an independent safetensors reader (the spec, with jansson) ---- */

typedef struct st_file {
    unsigned char *bytes;
    size_t len;
    uint64_t header_len;
    json_t *header;
} st_file;

static st_file st_read(const char *path)
{
    st_file f = {0};
    f.bytes = test_read_file(path, &f.len);
    ck_assert_uint_ge(f.len, 8);
    for (int i = 7; i >= 0; i--)
        f.header_len = f.header_len << 8 | f.bytes[i];
    ck_assert_uint_le(8 + f.header_len, f.len);
    json_error_t err;
    f.header = json_loadb((const char *)f.bytes + 8, f.header_len, 0, &err);
    ck_assert_msg(f.header != NULL, "%s: header is not JSON: %s", path, err.text);
    return f;
}

static void st_free(st_file *f)
{
    json_decref(f->header);
    free(f->bytes);
}

/* The data bytes of tensor name, with its dtype and shape. */
static const unsigned char *st_tensor(const st_file *f, const char *name, size_t *n,
                                      const json_t **entry)
{
    *entry = json_object_get(f->header, name);
    ck_assert_msg(*entry != NULL, "tensor %s is missing", name);
    const json_t *off = json_object_get(*entry, "data_offsets");
    size_t b = (size_t)json_integer_value(json_array_get(off, 0));
    size_t e = (size_t)json_integer_value(json_array_get(off, 1));
    ck_assert_uint_le(b, e);
    ck_assert_uint_le(8 + f->header_len + e, f->len);
    *n = e - b;
    return f->bytes + 8 + f->header_len + b;
}

/* ---- round trips ---- */

START_TEST(roundtrip_tiny_untied_and_tied)
{
    qkd_context *ctx = test_context(2);
    for (int tied = 0; tied <= 1; tied++) {
        qkd_model *m = tiny_model(ctx, tied, 7 + (uint64_t)tied);
        round_trip(ctx, m, 12);
        qkd_model_free(m);
    }
    qkd_context_free(ctx);
}
END_TEST

START_TEST(roundtrip_stories260K)
{
    const char *path = test_shared(STORIES_GGUF);
    if (!path)
        return;
    qkd_context *ctx = test_context(2);
    qkd_model *m = NULL;
    ck_assert_int_eq(qkd_model_load(ctx, path, &m), QKD_OK);
    round_trip(ctx, m, 32);
    qkd_model_free(m);
    qkd_context_free(ctx);
}
END_TEST

/* transformers' own save of hf_tiny, loaded and written again: the same
 * tensors, dtype, shapes and bytes (q/k rows back in Hugging Face's order),
 * a space-padded header, and the config keys the loader reads. */
START_TEST(hf_fixture_bytes_identical)
{
    const char *fixture = test_source("tests/fixtures/hf_tiny");
    qkd_context *ctx = test_context(1);
    qkd_model *m = NULL;
    ck_assert_int_eq(qkd_model_load(ctx, fixture, &m), QKD_OK);
    char *dir = new_out_dir();
    test_expect_status(ctx, qkd_model_save_safetensors(m, dir, NULL), QKD_OK, "save");

    st_file want = st_read(test_path_in(fixture, "model.safetensors"));
    st_file got = st_read(test_path_in(dir, "model.safetensors"));
    /* the data starts 8-byte aligned, the header padded with spaces */
    ck_assert_uint_eq(got.header_len % 8, 0);
    size_t end = (size_t)got.header_len;
    while (end > 0 && got.bytes[8 + end - 1] == ' ')
        end--;
    ck_assert_int_eq(got.bytes[8 + end - 1], '}');
    ck_assert_uint_lt(got.header_len - end, 8);
    const char *key;
    json_t *value;
    size_t n_tensors = 0;
    json_object_foreach(want.header, key, value) {
        if (strcmp(key, "__metadata__") == 0)
            continue;
        n_tensors++;
        size_t nw, ng;
        const json_t *ew, *eg;
        const unsigned char *dw = st_tensor(&want, key, &nw, &ew);
        const unsigned char *dg = st_tensor(&got, key, &ng, &eg);
        ck_assert_str_eq(json_string_value(json_object_get(eg, "dtype")), "F32");
        ck_assert_msg(json_equal(json_object_get(ew, "shape"), json_object_get(eg, "shape")),
                      "%s: shape differs", key);
        ck_assert_uint_eq(nw, ng);
        ck_assert_msg(memcmp(dw, dg, nw) == 0, "%s: data differs", key);
    }
    ck_assert_uint_eq(json_object_size(got.header) - 1, n_tensors);

    json_t *cw = json_load_file(test_path_in(fixture, "config.json"), 0, NULL);
    json_t *cg = json_load_file(test_path_in(dir, "config.json"), 0, NULL);
    ck_assert_ptr_nonnull(cw);
    ck_assert_ptr_nonnull(cg);
    static const char *const keys[] = {
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps",
        "tie_word_embeddings", "model_type", "hidden_act", "head_dim", "architectures",
    };
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++)
        ck_assert_msg(json_equal(json_object_get(cw, keys[i]), json_object_get(cg, keys[i])),
                      "config.json: %s differs", keys[i]);
    ck_assert(json_equal(json_object_get(json_object_get(cw, "rope_parameters"), "rope_theta"),
                         json_object_get(cg, "rope_theta")));
    ck_assert_str_eq(json_string_value(json_object_get(cg, "torch_dtype")), "float32");
    ck_assert(!test_exists(test_path_in(dir, "tokenizer.bin"))); /* the fixture has no tokenizer */
    json_decref(cw);
    json_decref(cg);
    st_free(&want);
    st_free(&got);
    qkd_model_free(m);
    remove_out_dir(dir);
    qkd_context_free(ctx);
}
END_TEST

/* ---- 16-bit dtypes ---- */

/* bfloat16 by the definition: the float's top 16 bits after adding half
 * of the dropped part, ties to even. */
static float bf16_round(float x)
{
    uint32_t b;
    memcpy(&b, &x, sizeof b);
    uint32_t low = b & 0xffff, keep = b & 0xffff0000u;
    if (low > 0x8000 || (low == 0x8000 && (keep & 0x10000)))
        keep += 0x10000;
    float r;
    memcpy(&r, &keep, sizeof r);
    return r;
}

static float half_round(qkd_save_dtype t, float x)
{
#ifdef __FLT16_MAX__
    if (t == QKD_SAVE_F16)
        return (float)(_Float16)x;
#endif
    return t == QKD_SAVE_BF16 ? bf16_round(x) : x;
}

START_TEST(half_dtypes)
{
    qkd_context *ctx = test_context(1);
    qkd_model *m = tiny_model(ctx, 0, 3);
    const qkd_save_dtype types[] = {QKD_SAVE_F16, QKD_SAVE_BF16};
    const char *torch[] = {"float16", "bfloat16"};
    const char *st_names[] = {"F16", "BF16"};
    for (int k = 0; k < 2; k++) {
#ifndef __FLT16_MAX__
        if (types[k] == QKD_SAVE_F16)
            continue; /* no independent binary16 rounding on this compiler */
#endif
        qkd_safetensors_params p;
        qkd_safetensors_params_init(&p);
        p.dtype = types[k];
        char *dir = new_out_dir();
        test_expect_status(ctx, qkd_model_save_safetensors(m, dir, &p), QKD_OK, "save 16-bit");
        json_t *cfg = json_load_file(test_path_in(dir, "config.json"), 0, NULL);
        ck_assert_str_eq(json_string_value(json_object_get(cfg, "torch_dtype")), torch[k]);
        json_decref(cfg);
        st_file f = st_read(test_path_in(dir, "model.safetensors"));
        const json_t *e = json_object_get(f.header, "model.norm.weight");
        ck_assert_str_eq(json_string_value(json_object_get(e, "dtype")), st_names[k]);
        st_free(&f);
        qkd_model *back = NULL;
        test_expect_status(ctx, qkd_model_load(ctx, dir, &back), QKD_OK, "load 16-bit");
        for (int i = 0; i < qkd_model_n_tensors(m); i++) {
            qkd_tensor_info info = {.size = sizeof info};
            ck_assert_int_eq(qkd_model_tensor_info(m, i, &info), QKD_OK);
            size_t n = (size_t)info.n_elements;
            float *w = malloc(n * sizeof *w), *b = malloc(n * sizeof *b);
            ck_assert_int_eq(qkd_model_tensor_get(m, i, w, n), QKD_OK);
            ck_assert_int_eq(qkd_model_tensor_get(back, i, b, n), QKD_OK);
            for (size_t j = 0; j < n; j++)
                ck_assert_msg(half_round(types[k], w[j]) == b[j], "%s %s[%zu]: %.9g -> %.9g",
                              st_names[k], info.name, j, (double)w[j], (double)b[j]);
            free(w);
            free(b);
        }
        qkd_model_free(back);
        remove_out_dir(dir);
    }
    /* a weight beyond binary16's range */
    int idx;
    ck_assert_int_eq(qkd_model_tensor_find(m, "blk.1.ffn_up.weight", &idx), QKD_OK);
    qkd_tensor_info info = {.size = sizeof info};
    ck_assert_int_eq(qkd_model_tensor_info(m, idx, &info), QKD_OK);
    float *w = calloc((size_t)info.n_elements, sizeof *w);
    w[5] = 70000.0f;
    ck_assert_int_eq(qkd_model_tensor_set(m, idx, w, (size_t)info.n_elements), QKD_OK);
    qkd_safetensors_params p;
    qkd_safetensors_params_init(&p);
    p.dtype = QKD_SAVE_F16;
    char *dir = new_out_dir();
    test_expect_status(ctx, qkd_model_save_safetensors(m, dir, &p), QKD_ERR_RANGE, "F16 overflow");
    ck_assert_ptr_nonnull(strstr(qkd_context_last_error(ctx), "ffn_up"));
    ck_assert(!test_exists(test_path_in(dir, "model.safetensors")));
    ck_assert(!test_exists(test_path_in(dir, "model.safetensors.tmp")));
    p.dtype = QKD_SAVE_BF16; /* bfloat16 holds it */
    test_expect_status(ctx, qkd_model_save_safetensors(m, dir, &p), QKD_OK, "BF16 large value");
    remove_out_dir(dir);
    free(w);
    qkd_model_free(m);
    qkd_context_free(ctx);
}
END_TEST

/* ---- a student as deployed ---- */

START_TEST(deployed_student)
{
    qkd_context *ctx = test_context(2);
    for (int tied = 0; tied <= 1; tied++) {
        qkd_model *m = tiny_model(ctx, tied, 11);
        qkd_quant_params qp;
        qkd_quant_params_init(&qp);
        qp.scheme = QKD_QUANT_ASYM;
        qp.bits = 3;
        qp.group_size = 16;
        qkd_quantizer *q = NULL;
        ck_assert_int_eq(qkd_quantizer_create(ctx, &qp, &q), QKD_OK);
        unsigned targets = QKD_QUANT_TARGET_LINEAR | QKD_QUANT_TARGET(QKD_TENSOR_OUTPUT);
        ck_assert_int_eq(qkd_model_set_quantizer(m, q, targets), QKD_OK);
        const int T = 10;
        float *student = logits_of(m, T); /* STE: the forward rounds hard */

        qkd_safetensors_params p;
        qkd_safetensors_params_init(&p);
        p.as_deployed = 1;
        char *dir = new_out_dir();
        test_expect_status(ctx, qkd_model_save_safetensors(m, dir, &p), QKD_OK, "save deployed");
        qkd_model *back = NULL;
        test_expect_status(ctx, qkd_model_load(ctx, dir, &back), QKD_OK, "load deployed");
        float *loaded = logits_of(back, T);
        size_t n = (size_t)2 * T * 64;
        ck_assert_msg(memcmp(student, loaded, n * sizeof *student) == 0,
                      "deployed weights do not reproduce the student's logits (tied %d)", tied);
        /* a targeted tensor holds at most 2^3 levels per group of 16 */
        int idx;
        ck_assert_int_eq(qkd_model_tensor_find(back, "blk.0.attn_v.weight", &idx), QKD_OK);
        float w[16 * 32];
        ck_assert_int_eq(qkd_model_tensor_get(back, idx, w, 16 * 32), QKD_OK);
        for (int g = 0; g < 16 * 32; g += 16) {
            int distinct = 0;
            for (int i = 0; i < 16; i++) {
                int seen = 0;
                for (int j = 0; j < i; j++)
                    seen |= w[g + j] == w[g + i];
                distinct += !seen;
            }
            ck_assert_int_le(distinct, 8);
        }
        qkd_model_free(back);
        remove_out_dir(dir);

        /* not as deployed: the latent weights */
        dir = new_out_dir();
        test_expect_status(ctx, qkd_model_save_safetensors(m, dir, NULL), QKD_OK, "save latent");
        test_expect_status(ctx, qkd_model_load(ctx, dir, &back), QKD_OK, "load latent");
        expect_same_weights(m, back);
        qkd_model_free(back);
        remove_out_dir(dir);
        free(student);
        free(loaded);
        qkd_model_free(m);
        qkd_quantizer_free(q);
    }
    qkd_context_free(ctx);
}
END_TEST

/* ---- tokenizer files ---- */

/* Encode text with BOS, growing the buffer as the API asks. */
static int32_t *encode_all(const qkd_tokenizer *tok, const char *text, size_t len, size_t *n)
{
    size_t cap = len + 2;
    int32_t *ids = malloc(cap * sizeof *ids);
    qkd_status st = qkd_tokenizer_encode(tok, text, len, QKD_ENCODE_BOS, ids, cap, n);
    if (st == QKD_ERR_RANGE) {
        ids = realloc(ids, *n * sizeof *ids);
        st = qkd_tokenizer_encode(tok, text, len, QKD_ENCODE_BOS, ids, *n, n);
    }
    ck_assert_int_eq(st, QKD_OK);
    return ids;
}

/* tokenizers' BPE as its documentation defines it, on one "word" (no
 * pre-tokenizer): the normalizer prepends U+2581 and maps spaces to it;
 * characters start as symbols (a character outside the vocabulary as its
 * <0xNN> byte tokens); the adjacent pair of best merge rank (leftmost on
 * ties) merges until none is left; the post-processor puts BOS first. */
typedef struct bpe {
    json_t *root;
    const json_t *vocab;
    json_t *ranks; /* "left right" -> rank */
    int32_t bos;
} bpe;

static bpe bpe_load(const char *path)
{
    bpe b = {0};
    json_error_t err;
    b.root = json_load_file(path, 0, &err);
    ck_assert_msg(b.root != NULL, "%s: %s", path, err.text);
    const json_t *model = json_object_get(b.root, "model");
    ck_assert_str_eq(json_string_value(json_object_get(model, "type")), "BPE");
    ck_assert(json_is_true(json_object_get(model, "byte_fallback")));
    b.vocab = json_object_get(model, "vocab");
    b.ranks = json_object();
    size_t i;
    const json_t *m;
    json_array_foreach(json_object_get(model, "merges"), i, m)
        if (!json_object_get(b.ranks, json_string_value(m)))
            json_object_set_new(b.ranks, json_string_value(m), json_integer((json_int_t)i));
    const json_t *single = json_object_get(json_object_get(b.root, "post_processor"), "single");
    const char *bos = json_string_value(
        json_object_get(json_object_get(json_array_get(single, 0), "SpecialToken"), "id"));
    b.bos = (int32_t)json_integer_value(json_object_get(b.vocab, bos));
    return b;
}

static int32_t vocab_id(const bpe *b, const char *piece)
{
    const json_t *v = json_object_get(b->vocab, piece);
    return v ? (int32_t)json_integer_value(v) : -1;
}

typedef struct sym {
    char text[256];
} sym;

static int32_t *bpe_encode(const bpe *b, const char *text, size_t *n_out)
{
    size_t cap = 4 * strlen(text) + 8, n = 0;
    sym *s = malloc(cap * sizeof *s);
    /* normalize: a leading marker, spaces as markers */
    char *norm = malloc(3 * strlen(text) + 4), *o = norm;
    o += sprintf(o, "\xe2\x96\x81");
    for (const char *p = text; *p; p++)
        o += *p == ' ' ? sprintf(o, "\xe2\x96\x81") : sprintf(o, "%c", *p);
    for (const unsigned char *p = (const unsigned char *)norm; *p;) {
        int k = *p < 0x80 ? 1 : *p >= 0xf0 ? 4 : *p >= 0xe0 ? 3 : 2;
        char ch[5] = {0};
        memcpy(ch, p, (size_t)k);
        if (vocab_id(b, ch) >= 0)
            snprintf(s[n++].text, sizeof s->text, "%s", ch);
        else
            for (int j = 0; j < k; j++)
                snprintf(s[n++].text, sizeof s->text, "<0x%02X>", p[j]);
        p += k;
    }
    free(norm);
    for (;;) {
        long best = -1;
        size_t at = 0;
        for (size_t i = 0; i + 1 < n; i++) {
            char key[600];
            snprintf(key, sizeof key, "%s %s", s[i].text, s[i + 1].text);
            const json_t *r = json_object_get(b->ranks, key);
            if (r && (best < 0 || json_integer_value(r) < best)) {
                best = (long)json_integer_value(r);
                at = i;
            }
        }
        if (best < 0)
            break;
        size_t la = strlen(s[at].text), lb = strlen(s[at + 1].text);
        ck_assert_uint_lt(la + lb, sizeof s->text);
        memcpy(s[at].text + la, s[at + 1].text, lb + 1);
        memmove(s + at + 1, s + at + 2, (n - at - 2) * sizeof *s);
        n--;
    }
    int32_t *ids = malloc((n + 1) * sizeof *ids);
    ids[0] = b->bos;
    for (size_t i = 0; i < n; i++) {
        ids[i + 1] = vocab_id(b, s[i].text);
        ck_assert_msg(ids[i + 1] >= 0, "symbol '%s' is not in the vocabulary", s[i].text);
    }
    free(s);
    *n_out = n + 1;
    return ids;
}

static void expect_same_line(const qkd_tokenizer *tok, const bpe *b, const char *s)
{
    size_t na, nb;
    int32_t *a = encode_all(tok, s, strlen(s), &na);
    int32_t *bb = bpe_encode(b, s, &nb);
    ck_assert_msg(na == nb && memcmp(a, bb, na * sizeof *a) == 0,
                  "tokenizer.json encodes '%s' differently (%zu vs %zu ids)", s, nb, na);
    free(a);
    free(bb);
}

/* The first max_lines lines of the sample text, and strings with
 * characters outside the vocabulary (byte fallback), encode the same
 * through tokenizer.json's BPE as through tok. */
static void expect_same_encoding(const qkd_tokenizer *tok, const char *json_path,
                                 const char *text_path, int max_lines)
{
    bpe b = bpe_load(json_path);
    ck_assert_int_eq(b.bos, qkd_tokenizer_bos(tok));
    size_t len;
    char *text = test_read_file(text_path, &len);
    text = realloc(text, len + 1);
    text[len] = '\0';
    int lines = 0;
    for (char *line = strtok(text, "\n"); line && lines < max_lines; line = strtok(NULL, "\n")) {
        expect_same_line(tok, &b, line);
        lines++;
    }
    ck_assert_int_eq(lines, max_lines);
    const char *extra[] = {"caf\xc3\xa9 na\xc3\xafve \xe2\x9c\x93 \xf0\x9f\x98\x80 end",
                           "  two  spaces", "x"};
    for (size_t i = 0; i < sizeof extra / sizeof extra[0]; i++)
        expect_same_line(tok, &b, extra[i]);
    free(text);
    json_decref(b.ranks);
    json_decref(b.root);
}

/* tokenizer.bin reads back as the same vocabulary. */
static void expect_same_vocab(qkd_context *ctx, const qkd_tokenizer *tok, const char *dir)
{
    qkd_tokenizer *back = NULL;
    test_expect_status(ctx, qkd_tokenizer_load(ctx, test_path_in(dir, "tokenizer.bin"), &back),
                       QKD_OK, "load tokenizer.bin");
    ck_assert_int_eq(qkd_tokenizer_vocab_size(back), qkd_tokenizer_vocab_size(tok));
    for (int32_t id = 0; id < qkd_tokenizer_vocab_size(tok); id++) {
        qkd__token_info a, b;
        qkd__tokenizer_token(tok, id, &a);
        qkd__tokenizer_token(back, id, &b);
        ck_assert_msg(a.len == b.len && memcmp(a.piece, b.piece, a.len) == 0,
                      "token %d's piece differs", (int)id);
        ck_assert_msg(a.score == b.score, "token %d's score differs", (int)id);
    }
    qkd_tokenizer_free(back);
}

START_TEST(tokenizer_files_stories260K)
{
    /* test_shared's buffer is static: keep a copy */
    char text[4096];
    if (!test_shared(TEXT))
        return;
    snprintf(text, sizeof text, "%s", test_shared(TEXT));
    const char *path = test_shared(STORIES_GGUF);
    if (!path)
        return;
    qkd_context *ctx = test_context(1);
    qkd_model *m = NULL;
    ck_assert_int_eq(qkd_model_load(ctx, path, &m), QKD_OK);
    const qkd_tokenizer *tok = qkd_model_tokenizer(m);
    ck_assert_ptr_nonnull(tok);
    char *dir = new_out_dir();
    test_expect_status(ctx, qkd_model_save_safetensors(m, dir, NULL), QKD_OK, "save");
    expect_same_vocab(ctx, tok, dir);
    expect_same_encoding(tok, test_path_in(dir, "tokenizer.json"), text, 20);
    json_t *tc = json_load_file(test_path_in(dir, "tokenizer_config.json"), 0, NULL);
    ck_assert_ptr_nonnull(tc);
    ck_assert_str_eq(json_string_value(json_object_get(tc, "bos_token")), "<s>");
    ck_assert_str_eq(json_string_value(json_object_get(tc, "eos_token")), "</s>");
    json_decref(tc);
    json_t *cfg = json_load_file(test_path_in(dir, "config.json"), 0, NULL);
    ck_assert_int_eq(json_integer_value(json_object_get(cfg, "bos_token_id")),
                     qkd_tokenizer_bos(tok));
    json_decref(cfg);
    qkd_model_free(m);
    remove_out_dir(dir);
    qkd_context_free(ctx);
}
END_TEST

/* The 32000-token Llama 2 vocabulary: its tokenizer.json encodes as ours
 * (llama2.c's tokenizer.bin names BOS "\n<s>\n"; the JSON says "<s>"). */
START_TEST(tokenizer_json_llama2)
{
    char text[4096];
    if (!test_shared(TEXT))
        return;
    snprintf(text, sizeof text, "%s", test_shared(TEXT));
    const char *tpath = test_shared(LLAMA2_TOK);
    if (!tpath)
        return;
    qkd_context *ctx = test_context(1);
    qkd_tokenizer *tok = NULL;
    ck_assert_int_eq(qkd_tokenizer_load(ctx, tpath, &tok), QKD_OK);
    qkd_model_config c;
    qkd_model_config_init(&c);
    c.dim = 8;
    c.hidden_dim = 8;
    c.n_layers = 1;
    c.n_heads = 2;
    c.n_kv_heads = 2;
    c.vocab_size = qkd_tokenizer_vocab_size(tok);
    qkd_model *m = NULL;
    ck_assert_int_eq(qkd_model_create(ctx, &c, &m), QKD_OK);
    qkd__model_attach_tokenizer(m, tok);
    char *dir = new_out_dir();
    test_expect_status(ctx, qkd_model_save_safetensors(m, dir, NULL), QKD_OK, "save");
    expect_same_vocab(ctx, tok, dir);
    expect_same_encoding(tok, test_path_in(dir, "tokenizer.json"), text, 12);
    json_t *tc = json_load_file(test_path_in(dir, "tokenizer_config.json"), 0, NULL);
    ck_assert_str_eq(json_string_value(json_object_get(tc, "bos_token")), "<s>");
    json_decref(tc);
    qkd_model_free(m);
    remove_out_dir(dir);
    qkd_context_free(ctx);
}
END_TEST

/* ---- errors ---- */

START_TEST(save_errors)
{
    qkd_context *ctx = test_context(1);
    qkd_model *m = tiny_model(ctx, 0, 5);
    ck_assert_int_eq(qkd_model_save_safetensors(NULL, "x", NULL), QKD_ERR_INVALID_ARG);
    test_expect_status(ctx, qkd_model_save_safetensors(m, NULL, NULL), QKD_ERR_INVALID_ARG,
                       "NULL dir");
    test_expect_status(ctx, qkd_model_save_safetensors(m, "", NULL), QKD_ERR_INVALID_ARG,
                       "empty dir");
    qkd_safetensors_params p;
    qkd_safetensors_params_init(&p);
    p.size = 4;
    test_expect_status(ctx, qkd_model_save_safetensors(m, "x", &p), QKD_ERR_INVALID_ARG,
                       "size field");
    qkd_safetensors_params_init(&p);
    p.dtype = (qkd_save_dtype)7;
    test_expect_status(ctx, qkd_model_save_safetensors(m, "x", &p), QKD_ERR_INVALID_ARG, "dtype");

    const char *tmp = test_tmpdir();
    char path[4096];
    snprintf(path, sizeof path, "%s/no/such/parent", tmp);
    test_expect_status(ctx, qkd_model_save_safetensors(m, path, NULL), QKD_ERR_IO,
                       "missing parent");
    ck_assert_ptr_nonnull(strstr(qkd_context_last_error(ctx), "no/such/parent"));
    snprintf(path, sizeof path, "%s/file", tmp);
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    fclose(f);
    test_expect_status(ctx, qkd_model_save_safetensors(m, path, NULL), QKD_ERR_IO, "dir is a file");
    unlink(path);
    if (geteuid() != 0) { /* root writes anywhere */
        snprintf(path, sizeof path, "%s/ro", tmp);
        ck_assert_int_eq(mkdir(path, 0500), 0);
        test_expect_status(ctx, qkd_model_save_safetensors(m, path, NULL), QKD_ERR_IO, "read-only");
        rmdir(path);
    }
    /* a non-finite weight is refused, and nothing is left behind */
    float nan_w[32] = {0};
    nan_w[3] = NAN;
    int idx;
    ck_assert_int_eq(qkd_model_tensor_find(m, "output_norm.weight", &idx), QKD_OK);
    ck_assert_int_eq(qkd_model_tensor_set(m, idx, nan_w, 32), QKD_OK);
    snprintf(path, sizeof path, "%s/out", tmp);
    test_expect_status(ctx, qkd_model_save_safetensors(m, path, NULL), QKD_ERR_NON_FINITE, "NaN");
    ck_assert(!test_exists(test_path_in(path, "model.safetensors")));
    ck_assert(!test_exists(test_path_in(path, "model.safetensors.tmp")));
    remove_out_dir(path);
    qkd_model_free(m);
    qkd_context_free(ctx);
}
END_TEST

/* Every failing allocation of the writer gives NO_MEMORY, no leak. */
START_TEST(save_allocation_failures)
{
    const char *path = test_shared(STORIES_GGUF);
    if (!path)
        return;
    test_alloc a;
    qkd_context *ctx = test_counting_context(&a, 1);
    qkd_model *m = NULL;
    ck_assert_int_eq(qkd_model_load(ctx, path, &m), QKD_OK);
    long baseline = a.live;
    char *dir = new_out_dir();
    qkd_status s = QKD_ERR_NO_MEMORY;
    long n;
    for (n = 0; n < 1000 && s != QKD_OK; n++) {
        a.n = 0;
        a.fail_at = n;
        s = qkd_model_save_safetensors(m, dir, NULL);
        ck_assert_msg(s == QKD_OK || s == QKD_ERR_NO_MEMORY, "failure %ld: %s", n,
                      qkd_status_name(s));
        ck_assert_msg(a.live == baseline, "failing allocation %ld: %ld blocks leaked", n,
                      a.live - baseline);
    }
    ck_assert_int_eq(s, QKD_OK);
    ck_assert_int_gt(n, 3);
    remove_out_dir(dir);
    qkd_model_free(m);
    qkd_context_free(ctx);
}
END_TEST

Suite *suite_export_hf(void)
{
    Suite *s = suite_create("export_hf");
    TCase *tc = tcase_create("safetensors");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, roundtrip_tiny_untied_and_tied);
    tcase_add_test(tc, roundtrip_stories260K);
    tcase_add_test(tc, hf_fixture_bytes_identical);
    tcase_add_test(tc, half_dtypes);
    tcase_add_test(tc, deployed_student);
    tcase_add_test(tc, save_errors);
    tcase_add_test(tc, save_allocation_failures);
    suite_add_tcase(s, tc);

    tc = tcase_create("tokenizer");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, tokenizer_files_stories260K);
    tcase_add_test(tc, tokenizer_json_llama2);
    suite_add_tcase(s, tc);
    return s;
}
