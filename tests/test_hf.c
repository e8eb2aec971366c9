/* Hugging Face loading (safetensors + config.json) and the golden tests
 * against PyTorch: transformers' logits for the tests/fixtures/hf_tiny
 * model, and stories260K's loss and gradients from tests/golden/
 * torch_golden.py. Both fixtures were written on the GPU machine by the
 * scripts in tests/golden/. */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/io.h"
#include "io/safetensors.h"
#include "testutil.h"

/* ---- small file helpers ---- */

/* A safetensors file: u64 length `len` (normally strlen(header)), the
 * header text, then `data` (zeros when NULL). */
static void write_st(const char *path, uint64_t len, const char *header,
                     const void *data, size_t data_len)
{
    size_t hl = strlen(header);
    uint8_t *buf = calloc(1, 8 + hl + data_len + 1);
    ck_assert_ptr_nonnull(buf);
    for (int i = 0; i < 8; i++)
        buf[i] = (uint8_t)(len >> (8 * i));
    memcpy(buf + 8, header, hl);
    if (data)
        memcpy(buf + 8 + hl, data, data_len);
    test_write_file(path, buf, 8 + hl + data_len);
    free(buf);
}

static void copy_file(const char *from, const char *to, size_t keep)
{
    size_t n;
    void *buf = test_read_file(from, &n);
    test_write_file(to, buf, keep < n ? keep : n);
    free(buf);
}

/* ---- a tiny LLaMA written by the test itself ----
 * dim 8, hidden 16, 1 layer, 2 heads of 4, 1 kv head, vocab 8, untied.
 * Weight element i of tensor k is tiny_value(k, i), a float that names
 * both, so a misplaced row shows. */

static const struct {
    const char *name;
    int rows, cols; /* cols 0: a vector */
} tiny_tensors[] = {
    {"model.embed_tokens.weight", 8, 8},
    {"model.layers.0.input_layernorm.weight", 8, 0},
    {"model.layers.0.self_attn.q_proj.weight", 8, 8},
    {"model.layers.0.self_attn.k_proj.weight", 4, 8},
    {"model.layers.0.self_attn.v_proj.weight", 4, 8},
    {"model.layers.0.self_attn.o_proj.weight", 8, 8},
    {"model.layers.0.post_attention_layernorm.weight", 8, 0},
    {"model.layers.0.mlp.gate_proj.weight", 16, 8},
    {"model.layers.0.mlp.up_proj.weight", 16, 8},
    {"model.layers.0.mlp.down_proj.weight", 8, 16},
    {"model.norm.weight", 8, 0},
    {"lm_head.weight", 8, 8},
};
#define N_TINY (int)(sizeof tiny_tensors / sizeof tiny_tensors[0])
#define TINY_Q 2
#define TINY_K 3

static float tiny_value(int k, int i)
{
    return (float)k + (float)i / 1024.0f;
}

static int tiny_elems(int k)
{
    return tiny_tensors[k].rows * (tiny_tensors[k].cols ? tiny_tensors[k].cols : 1);
}

typedef struct tiny {
    json_t *config;
    json_t *header;
    float *data;
    size_t n_floats;
} tiny;

static tiny tiny_make(void)
{
    tiny t = {0};
    t.config = json_pack("{s:s, s:i, s:i, s:i, s:i, s:i, s:i, s:i, s:f, s:f, s:b, s:s}",
                         "model_type", "llama", "hidden_size", 8, "intermediate_size", 16,
                         "num_hidden_layers", 1, "num_attention_heads", 2,
                         "num_key_value_heads", 1, "vocab_size", 8,
                         "max_position_embeddings", 16, "rms_norm_eps", 1e-5,
                         "rope_theta", 10000.0, "tie_word_embeddings", 0, "hidden_act", "silu");
    t.header = json_object();
    ck_assert_ptr_nonnull(t.config);
    for (int k = 0; k < N_TINY; k++)
        t.n_floats += (size_t)tiny_elems(k);
    t.data = malloc(t.n_floats * sizeof(float));
    ck_assert_ptr_nonnull(t.data);
    size_t at = 0;
    for (int k = 0; k < N_TINY; k++) {
        int n = tiny_elems(k);
        json_t *shape = tiny_tensors[k].cols
                            ? json_pack("[i, i]", tiny_tensors[k].rows, tiny_tensors[k].cols)
                            : json_pack("[i]", tiny_tensors[k].rows);
        json_object_set_new(t.header, tiny_tensors[k].name,
                            json_pack("{s:s, s:o, s:[I, I]}", "dtype", "F32", "shape", shape,
                                      "data_offsets", (json_int_t)(at * 4),
                                      (json_int_t)((at + (size_t)n) * 4)));
        for (int i = 0; i < n; i++)
            t.data[at + (size_t)i] = tiny_value(k, i);
        at += (size_t)n;
    }
    return t;
}

static void tiny_free(tiny *t)
{
    json_decref(t->config);
    json_decref(t->header);
    free(t->data);
}

/* Write config.json and model.safetensors into a fresh folder. */
static const char *tiny_write(const tiny *t)
{
    const char *dir = test_tmpdir();
    char *cfg = json_dumps(t->config, JSON_COMPACT);
    char *hdr = json_dumps(t->header, JSON_COMPACT);
    test_write_file(test_path_in(dir, "config.json"), cfg, strlen(cfg));
    write_st(test_path_in(dir, "model.safetensors"), strlen(hdr), hdr, t->data,
             t->n_floats * sizeof(float));
    free(cfg);
    free(hdr);
    return dir;
}

static qkd_status load_dir(qkd_context *ctx, const char *dir, qkd_model **m)
{
    *m = (qkd_model *)(uintptr_t)1; /* must be reset to NULL on error */
    qkd_status s = qkd_model_load(ctx, dir, m);
    if (s != QKD_OK)
        ck_assert_ptr_null(*m);
    return s;
}

/* ---- the transformers fixture ---- */

static void read_ids(const char *path, int32_t *ids, int n)
{
    FILE *f = fopen(path, "r");
    ck_assert_msg(f != NULL, "cannot open %s", path);
    for (int i = 0; i < n; i++)
        ck_assert_int_eq(fscanf(f, "%d", &ids[i]), 1);
    fclose(f);
}

enum { HF_B = 2, HF_T = 12, HF_V = 96 };

static void check_hf_logits(const char *model_path)
{
    qkd_context *ctx = test_context(2);
    qkd_model *m;
    test_expect_status(ctx, load_dir(ctx, model_path, &m), QKD_OK, model_path);

    qkd_model_config cfg;
    qkd_model_config_init(&cfg);
    ck_assert_int_eq(qkd_model_get_config(m, &cfg), QKD_OK);
    ck_assert_int_eq(cfg.dim, 32);
    ck_assert_int_eq(cfg.hidden_dim, 56);
    ck_assert_int_eq(cfg.n_layers, 2);
    ck_assert_int_eq(cfg.n_heads, 4);
    ck_assert_int_eq(cfg.n_kv_heads, 2);
    ck_assert_int_eq(cfg.vocab_size, HF_V);
    ck_assert_int_eq(cfg.max_seq_len, 64);
    ck_assert_int_eq(cfg.tied_embeddings, 0);
    ck_assert_float_eq_tol(cfg.rope_theta, 10000.0f, 1e-3f);
    ck_assert_float_eq_tol(cfg.norm_eps, 1e-5f, 1e-10f);

    int32_t ids[HF_B * HF_T];
    read_ids(test_source("tests/fixtures/hf_tiny/input_ids.txt"), ids, HF_B * HF_T);
    size_t n;
    float *want = test_read_file(test_source("tests/fixtures/hf_tiny/logits.f32"), &n);
    ck_assert_uint_eq(n, sizeof(float) * HF_B * HF_T * HF_V);
    float *got = malloc(n);
    ck_assert_ptr_nonnull(got);
    ck_assert_int_eq(qkd_model_forward(m, ids, HF_B, HF_T), QKD_OK);
    ck_assert_int_eq(qkd_model_logits(m, got, n / sizeof(float)), QKD_OK);
    for (size_t i = 0; i < n / sizeof(float); i++)
        ck_assert_msg(fabsf(got[i] - want[i]) <= 1e-4f, "logit %zu (row %zu): %.7f vs "
                      "transformers %.7f", i, i / HF_V, got[i], want[i]);
    free(got);
    free(want);
    qkd_model_free(m);
    qkd_context_free(ctx);
}

START_TEST(hf_fixture_logits_folder)
{
    check_hf_logits(test_source("tests/fixtures/hf_tiny"));
}
END_TEST

START_TEST(hf_fixture_logits_file)
{
    check_hf_logits(test_source("tests/fixtures/hf_tiny/model.safetensors"));
}
END_TEST

START_TEST(hf_fixture_logits_sharded)
{
    check_hf_logits(test_source("tests/fixtures/hf_tiny_sharded"));
}
END_TEST

/* The index file itself as the path (reached through the loader, since
 * qkd_model_load sniffs .json files as something else). */
START_TEST(hf_sharded_index_path_same_weights)
{
    qkd_context *ctx = test_context(1);
    qkd_model *a, *b;
    ck_assert_int_eq(load_dir(ctx, test_source("tests/fixtures/hf_tiny"), &a), QKD_OK);
    const char *index = test_source("tests/fixtures/hf_tiny_sharded/model.safetensors.index.json");
    test_expect_status(ctx, qkd__load_hf(ctx, index, &b), QKD_OK, index);
    ck_assert_int_eq(qkd_model_n_tensors(a), qkd_model_n_tensors(b));
    for (int i = 0; i < qkd_model_n_tensors(a); i++) {
        qkd_tensor_info info = {.size = sizeof info};
        ck_assert_int_eq(qkd_model_tensor_info(a, i, &info), QKD_OK);
        size_t n = (size_t)info.n_elements;
        float *wa = malloc(n * sizeof(float)), *wb = malloc(n * sizeof(float));
        ck_assert_int_eq(qkd_model_tensor_get(a, i, wa, n), QKD_OK);
        ck_assert_int_eq(qkd_model_tensor_get(b, i, wb, n), QKD_OK);
        ck_assert_msg(memcmp(wa, wb, n * sizeof(float)) == 0, "tensor %s differs", info.name);
        free(wa);
        free(wb);
    }
    qkd_model_free(a);
    qkd_model_free(b);
    qkd_context_free(ctx);
}
END_TEST

/* ---- the tiny model: mapping, q/k order, defaults ---- */

/* Our row r of a q/k tensor with `heads` heads of hd rows comes from the
 * Hugging Face row: for each head, ours 2j <- hf j, ours 2j+1 <- hf j+hd/2. */
static int hf_row_of(int r, int hd)
{
    int base = r - r % hd, j = (r % hd) / 2, odd = r % 2;
    return base + j + odd * hd / 2;
}

START_TEST(hf_tiny_mapping_and_qk_order)
{
    tiny t = tiny_make();
    const char *dir = tiny_write(&t);
    qkd_context *ctx = test_context(1);
    qkd_model *m;
    test_expect_status(ctx, load_dir(ctx, dir, &m), QKD_OK, dir);
    ck_assert_int_eq(qkd_model_n_tensors(m), N_TINY);
    for (int i = 0; i < N_TINY; i++) {
        qkd_tensor_info info = {.size = sizeof info};
        ck_assert_int_eq(qkd_model_tensor_info(m, i, &info), QKD_OK);
        /* our tensor order puts ffn_down before ffn_up; HF lists up first */
        int k = i == 8 ? 9 : i == 9 ? 8 : i;
        ck_assert_int_eq(info.n_elements, tiny_elems(k));
        float w[128];
        ck_assert_int_eq(qkd_model_tensor_get(m, i, w, (size_t)info.n_elements), QKD_OK);
        int cols = tiny_tensors[k].cols ? tiny_tensors[k].cols : 1;
        for (int e = 0; e < info.n_elements; e++) {
            int r = e / cols, c = e % cols;
            int src_row = (k == TINY_Q || k == TINY_K) ? hf_row_of(r, 4) : r;
            ck_assert_msg(w[e] == tiny_value(k, src_row * cols + c),
                          "%s[%d][%d] = %g, want element of HF row %d", info.name, r, c,
                          (double)w[e], src_row);
        }
    }
    qkd_model_free(m);
    qkd_context_free(ctx);
    tiny_free(&t);
}
END_TEST

/* transformers 5 keeps rope_theta in rope_parameters; architectures alone
 * identifies the model; optional keys take LlamaConfig's defaults. */
START_TEST(hf_tiny_config_variants)
{
    tiny t = tiny_make();
    json_object_del(t.config, "model_type");
    json_object_del(t.config, "rope_theta");
    json_object_del(t.config, "rms_norm_eps");
    json_object_del(t.config, "max_position_embeddings");
    json_object_set_new(t.config, "architectures", json_pack("[s]", "LlamaForCausalLM"));
    json_object_set_new(t.config, "rope_parameters",
                        json_pack("{s:s, s:f}", "rope_type", "default", "rope_theta", 5e5));
    json_object_set_new(t.config, "rope_scaling", json_null());
    json_object_set_new(t.config, "head_dim", json_integer(4));
    const char *dir = tiny_write(&t);
    qkd_context *ctx = test_context(1);
    qkd_model *m;
    test_expect_status(ctx, load_dir(ctx, dir, &m), QKD_OK, dir);
    qkd_model_config cfg;
    qkd_model_config_init(&cfg);
    ck_assert_int_eq(qkd_model_get_config(m, &cfg), QKD_OK);
    ck_assert_float_eq(cfg.rope_theta, 5e5f);
    ck_assert_float_eq(cfg.norm_eps, 1e-6f);
    ck_assert_int_eq(cfg.max_seq_len, 2048);
    ck_assert_int_eq(cfg.n_kv_heads, 1);
    ck_assert_int_eq(cfg.tied_embeddings, 0);
    qkd_model_free(m);
    qkd_context_free(ctx);
    tiny_free(&t);
}
END_TEST

/* Tied: no lm_head needed, and one present is ignored. */
START_TEST(hf_tiny_tied)
{
    tiny t = tiny_make();
    json_object_set_new(t.config, "tie_word_embeddings", json_true());
    const char *dir = tiny_write(&t);
    qkd_context *ctx = test_context(1);
    qkd_model *m;
    test_expect_status(ctx, load_dir(ctx, dir, &m), QKD_OK, dir);
    ck_assert_int_eq(qkd_model_n_tensors(m), N_TINY - 1);
    qkd_model_free(m);
    json_object_del(t.header, "lm_head.weight");
    dir = tiny_write(&t);
    test_expect_status(ctx, load_dir(ctx, dir, &m), QKD_OK, dir);
    qkd_model_free(m);
    qkd_context_free(ctx);
    tiny_free(&t);
}
END_TEST

/* ---- malformed config.json ---- */

static const struct {
    const char *key;
    const char *value; /* JSON text; NULL removes the key */
    qkd_status want;
} bad_configs[] = {
    {"hidden_size", NULL, QKD_ERR_FORMAT},
    {"hidden_size", "\"8\"", QKD_ERR_FORMAT},
    {"hidden_size", "8.0", QKD_ERR_FORMAT},
    {"hidden_size", "-8", QKD_ERR_FORMAT},
    {"hidden_size", "1000000000", QKD_ERR_FORMAT},
    {"hidden_size", "9", QKD_ERR_FORMAT},          /* not a multiple of the heads */
    {"intermediate_size", "0", QKD_ERR_FORMAT},
    {"num_hidden_layers", "100000", QKD_ERR_FORMAT},
    {"num_attention_heads", "0", QKD_ERR_FORMAT},
    {"num_key_value_heads", "3", QKD_ERR_FORMAT},  /* does not divide the heads */
    {"num_key_value_heads", NULL, QKD_ERR_SHAPE},  /* default 2: k_proj too small */
    {"vocab_size", "null", QKD_ERR_FORMAT},
    {"vocab_size", "16", QKD_ERR_SHAPE},
    {"max_position_embeddings", "0", QKD_ERR_FORMAT},
    {"rms_norm_eps", "-1e-5", QKD_ERR_FORMAT},
    {"rms_norm_eps", "\"tiny\"", QKD_ERR_FORMAT},
    {"rope_theta", "0", QKD_ERR_FORMAT},
    {"rope_theta", "1e300", QKD_ERR_FORMAT},
    {"tie_word_embeddings", "\"yes\"", QKD_ERR_FORMAT},
    {"rope_scaling", "{\"type\": \"linear\", \"factor\": 2.0}", QKD_ERR_UNSUPPORTED},
    {"rope_scaling", "{\"rope_type\": \"llama3\", \"factor\": 8.0}", QKD_ERR_UNSUPPORTED},
    {"rope_scaling", "{\"factor\": 8.0}", QKD_ERR_UNSUPPORTED},
    {"rope_scaling", "[2]", QKD_ERR_FORMAT},
    {"rope_parameters", "{\"rope_type\": \"yarn\", \"rope_theta\": 1e4}", QKD_ERR_UNSUPPORTED},
    {"rope_parameters", "{\"rope_type\": \"default\", \"rope_theta\": -1}", QKD_ERR_FORMAT},
    {"head_dim", "8", QKD_ERR_UNSUPPORTED},
    {"hidden_act", "\"gelu\"", QKD_ERR_UNSUPPORTED},
    {"attention_bias", "true", QKD_ERR_UNSUPPORTED},
    {"mlp_bias", "true", QKD_ERR_UNSUPPORTED},
    {"model_type", "\"gpt2\"", QKD_ERR_UNSUPPORTED},
    {"model_type", NULL, QKD_ERR_UNSUPPORTED},
};

START_TEST(hf_bad_config)
{
    tiny t = tiny_make();
    const char *key = bad_configs[_i].key, *value = bad_configs[_i].value;
    if (value) {
        json_error_t jerr;
        json_t *v = json_loads(value, JSON_DECODE_ANY, &jerr);
        ck_assert_msg(v != NULL, "test table: %s", jerr.text);
        json_object_set_new(t.config, key, v);
    } else {
        json_object_del(t.config, key);
    }
    const char *dir = tiny_write(&t);
    qkd_context *ctx = test_context(1);
    qkd_model *m;
    char what[128];
    snprintf(what, sizeof what, "config %s = %s", key, value ? value : "(absent)");
    test_expect_status(ctx, load_dir(ctx, dir, &m), bad_configs[_i].want, what);
    qkd_context_free(ctx);
    tiny_free(&t);
}
END_TEST

START_TEST(hf_config_file_broken)
{
    tiny t = tiny_make();
    const char *dir = tiny_write(&t);
    qkd_context *ctx = test_context(1);
    qkd_model *m;
    static const char *const texts[] = {"", "{\"hidden_size\": 8,", "[1, 2]", "{} {}",
                                        "{\"a\": 1, \"a\": 2}"};
    for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++) {
        test_write_file(test_path_in(dir, "config.json"), texts[i], strlen(texts[i]));
        test_expect_status(ctx, load_dir(ctx, dir, &m), QKD_ERR_FORMAT, texts[i]);
    }
    remove(test_path_in(dir, "config.json"));
    test_expect_status(ctx, load_dir(ctx, dir, &m), QKD_ERR_IO, "no config.json");
    remove(test_path_in(dir, "model.safetensors"));
    test_expect_status(ctx, load_dir(ctx, dir, &m), QKD_ERR_IO, "no weights");
    qkd_context_free(ctx);
    tiny_free(&t);
}
END_TEST

/* ---- tensors that do not fit the config ---- */

static void set_entry(tiny *t, const char *name, const char *json)
{
    json_error_t jerr;
    json_t *v = json_loads(json, 0, &jerr);
    ck_assert_msg(v != NULL, "test entry: %s", jerr.text);
    json_object_set_new(t->header, name, v);
}

START_TEST(hf_bad_tensors)
{
    static const char *const q = "model.layers.0.self_attn.q_proj.weight";
    /* q_proj's data sits at bytes [288, 544) of the data section */
    static const struct {
        const char *entry; /* new q_proj entry; NULL: remove it */
        qkd_status want;
    } cases[] = {
        {NULL, QKD_ERR_FORMAT},
        {"{\"dtype\": \"F32\", \"shape\": [4, 16], \"data_offsets\": [288, 544]}", QKD_ERR_SHAPE},
        {"{\"dtype\": \"F32\", \"shape\": [64], \"data_offsets\": [288, 544]}", QKD_ERR_SHAPE},
        {"{\"dtype\": \"F32\", \"shape\": [8, 8, 1], \"data_offsets\": [288, 544]}", QKD_ERR_SHAPE},
        {"{\"dtype\": \"I32\", \"shape\": [8, 8], \"data_offsets\": [288, 544]}",
         QKD_ERR_UNSUPPORTED},
        {"{\"dtype\": \"F16\", \"shape\": [8, 8], \"data_offsets\": [288, 544]}", QKD_ERR_FORMAT},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        tiny t = tiny_make();
        if (cases[c].entry)
            set_entry(&t, q, cases[c].entry);
        else
            json_object_del(t.header, q);
        const char *dir = tiny_write(&t);
        qkd_context *ctx = test_context(1);
        qkd_model *m;
        test_expect_status(ctx, load_dir(ctx, dir, &m), cases[c].want,
                           cases[c].entry ? cases[c].entry : "q_proj missing");
        qkd_context_free(ctx);
        tiny_free(&t);
    }
}
END_TEST

START_TEST(hf_missing_lm_head_and_nan)
{
    tiny t = tiny_make();
    json_object_del(t.header, "lm_head.weight");
    const char *dir = tiny_write(&t);
    qkd_context *ctx = test_context(1);
    qkd_model *m;
    test_expect_status(ctx, load_dir(ctx, dir, &m), QKD_ERR_FORMAT, "untied without lm_head");
    tiny_free(&t);

    t = tiny_make();
    t.data[100] = NAN; /* inside q_proj (floats 72..136) */
    dir = tiny_write(&t);
    test_expect_status(ctx, load_dir(ctx, dir, &m), QKD_ERR_NON_FINITE, "NaN weight");
    qkd_context_free(ctx);
    tiny_free(&t);
}
END_TEST

/* Sharded folders: bad index files and missing shards. */
START_TEST(hf_bad_index)
{
    tiny t = tiny_make();
    const char *dir = tiny_write(&t);
    rename(test_path_in(dir, "model.safetensors"), test_path_in(dir, "part-1.safetensors"));
    json_t *map = json_object();
    for (int k = 0; k < N_TINY; k++)
        json_object_set_new(map, tiny_tensors[k].name, json_string("part-1.safetensors"));
    const char *index = test_path_in(dir, "model.safetensors.index.json");
    qkd_context *ctx = test_context(1);
    qkd_model *m;

    json_t *root = json_pack("{s:{}, s:O}", "metadata", "weight_map", map);
    json_dump_file(root, index, 0);
    test_expect_status(ctx, load_dir(ctx, dir, &m), QKD_OK, "good index");
    qkd_model_free(m);

    json_object_set_new(map, "lm_head.weight", json_string("part-2.safetensors"));
    json_dump_file(root, index, 0);
    test_expect_status(ctx, load_dir(ctx, dir, &m), QKD_ERR_IO, "shard file absent");

    json_object_set_new(map, "lm_head.weight", json_string("../part-1.safetensors"));
    json_dump_file(root, index, 0);
    test_expect_status(ctx, load_dir(ctx, dir, &m), QKD_ERR_FORMAT, "path in weight_map");

    json_object_set_new(map, "lm_head.weight", json_integer(3));
    json_dump_file(root, index, 0);
    test_expect_status(ctx, load_dir(ctx, dir, &m), QKD_ERR_FORMAT, "number in weight_map");

    json_object_del(map, "lm_head.weight");
    json_dump_file(root, index, 0);
    test_expect_status(ctx, load_dir(ctx, dir, &m), QKD_ERR_FORMAT, "tensor not in the index");

    json_object_del(root, "weight_map");
    json_dump_file(root, index, 0);
    test_expect_status(ctx, load_dir(ctx, dir, &m), QKD_ERR_FORMAT, "no weight_map");

    json_decref(root);
    json_decref(map);
    qkd_context_free(ctx);
    tiny_free(&t);
}
END_TEST

/* Every allocation of a load fails in turn: an error each time, nothing
 * left allocated, then a success. */
START_TEST(hf_allocation_failures)
{
    tiny t = tiny_make();
    const char *dir = tiny_write(&t);
    test_alloc a;
    qkd_context *ctx = test_counting_context(&a, 1);
    long baseline = a.live;
    qkd_status s = QKD_ERR_NO_MEMORY;
    long n;
    for (n = 0; n < 10000 && s != QKD_OK; n++) {
        a.n = 0;
        a.fail_at = n;
        qkd_model *m;
        s = load_dir(ctx, dir, &m);
        if (s == QKD_OK)
            qkd_model_free(m);
        else
            ck_assert_msg(qkd_context_last_error(ctx)[0] != '\0', "failure %ld: no message", n);
        ck_assert_msg(a.live == baseline, "failing allocation %ld (%s): %ld blocks leaked", n,
                      qkd_status_name(s), a.live - baseline);
    }
    ck_assert_int_eq(s, QKD_OK);
    ck_assert_int_gt(n, 3);
    qkd_context_free(ctx);
    tiny_free(&t);
}
END_TEST

/* ---- the safetensors reader on hand-made and damaged files ---- */

static const struct {
    const char *header;
    size_t data_len;
    qkd_status want;
} bad_headers[] = {
    {"[]", 0, QKD_ERR_FORMAT},
    {"{\"w\": ", 0, QKD_ERR_FORMAT},
    {"{} x", 0, QKD_ERR_FORMAT},
    {"{\"w\": 5}", 16, QKD_ERR_FORMAT},
    {"{\"w\": {\"shape\": [4], \"data_offsets\": [0, 16]}}", 16, QKD_ERR_FORMAT},
    {"{\"w\": {\"dtype\": 4, \"shape\": [4], \"data_offsets\": [0, 16]}}", 16, QKD_ERR_FORMAT},
    {"{\"w\": {\"dtype\": \"Q4_K\", \"shape\": [4], \"data_offsets\": [0, 16]}}", 16,
     QKD_ERR_UNSUPPORTED},
    {"{\"w\": {\"dtype\": \"F32\", \"shape\": \"4\", \"data_offsets\": [0, 16]}}", 16,
     QKD_ERR_FORMAT},
    {"{\"w\": {\"dtype\": \"F32\", \"shape\": [-4], \"data_offsets\": [0, 16]}}", 16,
     QKD_ERR_FORMAT},
    {"{\"w\": {\"dtype\": \"F32\", \"shape\": [2.5], \"data_offsets\": [0, 16]}}", 16,
     QKD_ERR_FORMAT},
    {"{\"w\": {\"dtype\": \"F32\", \"shape\": [1,1,1,1,1,1,1,1,4], \"data_offsets\": [0, 16]}}",
     16, QKD_ERR_FORMAT},
    {"{\"w\": {\"dtype\": \"F32\", \"shape\": [4294967296, 4294967296, 4], "
     "\"data_offsets\": [0, 16]}}", 16, QKD_ERR_FORMAT},
    {"{\"w\": {\"dtype\": \"F32\", \"shape\": [4]}}", 16, QKD_ERR_FORMAT},
    {"{\"w\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [0]}}", 16, QKD_ERR_FORMAT},
    {"{\"w\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [0, 32]}}", 16,
     QKD_ERR_FORMAT},
    {"{\"w\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [8, 4]}}", 16,
     QKD_ERR_FORMAT},
    {"{\"w\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [-16, 0]}}", 16,
     QKD_ERR_FORMAT},
    {"{\"w\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [0, 12]}}", 16,
     QKD_ERR_FORMAT},
    {"{\"w\": {\"dtype\": \"F16\", \"shape\": [4], \"data_offsets\": [0, 16]}}", 16,
     QKD_ERR_FORMAT},
    {"{\"w\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [0, 16]}, "
     "\"w\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [0, 16]}}", 16,
     QKD_ERR_FORMAT},
    {"{\"__metadata__\": {\"format\": \"pt\"}, "
     "\"w\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [0, 16]}}", 16, QKD_OK},
};

START_TEST(st_bad_header)
{
    const char *path = test_path_in(test_tmpdir(), "x.safetensors");
    const char *h = bad_headers[_i].header;
    write_st(path, strlen(h), h, NULL, bad_headers[_i].data_len);
    qkd_context *ctx = test_context(1);
    qkd__safetensors *st = (qkd__safetensors *)(uintptr_t)1;
    test_expect_status(ctx, qkd__st_open(ctx, path, &st), bad_headers[_i].want, h);
    if (bad_headers[_i].want == QKD_OK)
        ck_assert_ptr_nonnull(qkd__st_find(st, "w"));
    else
        ck_assert_ptr_null(st);
    qkd__st_close(st);
    qkd_context_free(ctx);
}
END_TEST

START_TEST(st_bad_length_prefix)
{
    const char *dir = test_tmpdir();
    qkd_context *ctx = test_context(1);
    qkd__safetensors *st;
    const char *path = test_path_in(dir, "x.safetensors");
    static const uint64_t lengths[] = {3, 1000, UINT64_MAX, (uint64_t)1 << 63, 0};
    for (size_t i = 0; i < sizeof lengths / sizeof lengths[0]; i++) {
        write_st(path, lengths[i], "{}", NULL, 0);
        test_expect_status(ctx, qkd__st_open(ctx, path, &st), QKD_ERR_FORMAT, "length prefix");
        ck_assert_ptr_null(st);
    }
    for (size_t n = 0; n < 8; n++) {
        test_write_file(path, "\x02\0\0\0\0\0\0\0", n);
        test_expect_status(ctx, qkd__st_open(ctx, path, &st), QKD_ERR_FORMAT, "under 8 bytes");
    }
    test_expect_status(ctx, qkd__st_open(ctx, test_path_in(dir, "absent"), &st), QKD_ERR_IO,
                       "absent");
    qkd_context_free(ctx);
}
END_TEST

/* Cut the fixture anywhere: the reader and the loader refuse it. */
START_TEST(st_truncated_fixture)
{
    const char *src = test_source("tests/fixtures/hf_tiny/model.safetensors");
    size_t size;
    free(test_read_file(src, &size));
    const char *dir = test_tmpdir();
    copy_file(test_source("tests/fixtures/hf_tiny/config.json"), test_path_in(dir, "config.json"),
              SIZE_MAX);
    qkd_context *ctx = test_context(1);
    const size_t cuts[] = {0, 7, 8, 9, 100, 1000, size / 2, size - 4, size - 1};
    for (size_t i = 0; i < sizeof cuts / sizeof cuts[0]; i++) {
        copy_file(src, test_path_in(dir, "model.safetensors"), cuts[i]);
        qkd_model *m;
        char what[64];
        snprintf(what, sizeof what, "cut at %zu of %zu", cuts[i], size);
        test_expect_status(ctx, load_dir(ctx, dir, &m), QKD_ERR_FORMAT, what);
    }
    qkd_context_free(ctx);
}
END_TEST

/* Random bytes behind a plausible length prefix. */
START_TEST(st_garbage)
{
    const char *path = test_path_in(test_tmpdir(), "g.safetensors");
    qkd_context *ctx = test_context(1);
    uint64_t x = 0x9E3779B97F4A7C15u;
    for (int round = 0; round < 50; round++) {
        uint8_t buf[600];
        size_t n = 8 + (size_t)(round * 11 % 590);
        for (size_t i = 0; i < n; i++) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            buf[i] = (uint8_t)x;
        }
        uint64_t len = round % 2 ? n - 8 : (uint64_t)(x % 600);
        for (int b = 0; b < 8; b++)
            buf[b] = (uint8_t)(len >> (8 * b));
        if (round % 3 == 0 && n > 9)
            buf[8] = '{';
        test_write_file(path, buf, n);
        qkd__safetensors *st;
        qkd_status s = qkd__st_open(ctx, path, &st);
        ck_assert_msg(s == QKD_ERR_FORMAT || s == QKD_ERR_UNSUPPORTED, "round %d: %s", round,
                      qkd_status_name(s));
        ck_assert_ptr_null(st);
    }
    qkd_context_free(ctx);
}
END_TEST

/* F32, F16 and BF16 decode to the values IEEE 754 defines for the bits. */
START_TEST(st_read_dtypes)
{
    static const uint8_t data[] = {
        /* F32 [2]: 1.5, -0.25 */
        0x00, 0x00, 0xc0, 0x3f, 0x00, 0x00, 0x80, 0xbe,
        /* F16 [5]: 1, -2, 65504, 2^-24 (smallest subnormal), 2^-14 */
        0x00, 0x3c, 0x00, 0xc0, 0xff, 0x7b, 0x01, 0x00, 0x00, 0x04,
        /* BF16 [3]: 1, -3, 2^-126 */
        0x80, 0x3f, 0x40, 0xc0, 0x80, 0x00,
        /* I32 [1] */
        1, 0, 0, 0,
    };
    const char *header = "{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]},"
                         "\"h\": {\"dtype\": \"F16\", \"shape\": [5], \"data_offsets\": [8, 18]},"
                         "\"b\": {\"dtype\": \"BF16\", \"shape\": [1, 3], \"data_offsets\": [18, 24]},"
                         "\"i\": {\"dtype\": \"I32\", \"shape\": [], \"data_offsets\": [24, 28]}}";
    const char *path = test_path_in(test_tmpdir(), "d.safetensors");
    write_st(path, strlen(header), header, data, sizeof data);
    qkd_context *ctx = test_context(1);
    qkd__safetensors *st;
    ck_assert_int_eq(qkd__st_open(ctx, path, &st), QKD_OK);
    float v[5];
    const qkd__st_tensor *t = qkd__st_find(st, "a");
    ck_assert_int_eq(qkd__st_read_f32(st, t, v, 2), QKD_OK);
    ck_assert(v[0] == 1.5f && v[1] == -0.25f);
    t = qkd__st_find(st, "h");
    ck_assert_int_eq(qkd__st_read_f32(st, t, v, 5), QKD_OK);
    ck_assert(v[0] == 1.0f && v[1] == -2.0f && v[2] == 65504.0f);
    ck_assert(v[3] == ldexpf(1.0f, -24) && v[4] == ldexpf(1.0f, -14));
    t = qkd__st_find(st, "b");
    ck_assert_int_eq(t->n_dims, 2);
    ck_assert_int_eq(qkd__st_read_f32(st, t, v, 3), QKD_OK);
    ck_assert(v[0] == 1.0f && v[1] == -3.0f && v[2] == ldexpf(1.0f, -126));
    test_expect_status(ctx, qkd__st_read_f32(st, t, v, 4), QKD_ERR_SHAPE, "wrong count");
    t = qkd__st_find(st, "i");
    ck_assert_int_eq(t->n_elements, 1);
    test_expect_status(ctx, qkd__st_read_f32(st, t, v, 1), QKD_ERR_UNSUPPORTED, "I32");
    ck_assert_ptr_null(qkd__st_find(st, "zz"));
    qkd__st_close(st);
    qkd_context_free(ctx);
}
END_TEST

/* ---- golden loss and gradients of stories260K (torch_golden.py) ---- */

START_TEST(golden_stories260K_loss_and_grads)
{
    const char *model_path = test_shared("models/stories260K/stories260K.bin");
    if (!model_path)
        return;
    test_golden g =
        test_golden_open(test_source("tests/fixtures/stories260K_golden.bin"), "QKDGOLD1");
    int B = test_golden_i32(&g), T = test_golden_i32(&g);
    ck_assert(B == 2 && T == 32);
    int32_t tokens[2 * 32], targets[2 * 32];
    memcpy(tokens, test_golden_take(&g, sizeof tokens), sizeof tokens);
    memcpy(targets, test_golden_take(&g, sizeof targets), sizeof targets);
    double loss_want = test_golden_f64(&g);

    qkd_context *ctx = test_context(2);
    qkd_model *m;
    test_expect_status(ctx, qkd_model_load(ctx, model_path, &m), QKD_OK, model_path);
    float loss;
    ck_assert_int_eq(qkd_model_zero_grad(m), QKD_OK);
    ck_assert_int_eq(qkd_model_forward(m, tokens, B, T), QKD_OK);
    ck_assert_int_eq(qkd_model_cross_entropy(m, targets, 1, &loss), QKD_OK);
    ck_assert_int_eq(qkd_model_backward(m, NULL), QKD_OK);
    ck_assert_msg(fabs(loss - loss_want) <= 1e-5, "loss %.8f vs PyTorch %.8f", (double)loss,
                  loss_want);

    int n_tensors = test_golden_i32(&g);
    ck_assert_int_eq(n_tensors, qkd_model_n_tensors(m));
    for (int k = 0; k < n_tensors; k++)
        test_golden_check_grad(&g, m);
    ck_assert_uint_eq(g.at, g.len);
    free(g.raw);
    qkd_model_free(m);
    qkd_context_free(ctx);
}
END_TEST

Suite *suite_hf(void)
{
    Suite *s = suite_create("hf");
    TCase *tc = tcase_create("fixtures");
    tcase_add_test(tc, hf_fixture_logits_folder);
    tcase_add_test(tc, hf_fixture_logits_file);
    tcase_add_test(tc, hf_fixture_logits_sharded);
    tcase_add_test(tc, hf_sharded_index_path_same_weights);
    suite_add_tcase(s, tc);

    tc = tcase_create("golden");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, golden_stories260K_loss_and_grads);
    suite_add_tcase(s, tc);

    tc = tcase_create("loader");
    tcase_add_test(tc, hf_tiny_mapping_and_qk_order);
    tcase_add_test(tc, hf_tiny_config_variants);
    tcase_add_test(tc, hf_tiny_tied);
    tcase_add_loop_test(tc, hf_bad_config, 0, sizeof bad_configs / sizeof bad_configs[0]);
    tcase_add_test(tc, hf_config_file_broken);
    tcase_add_test(tc, hf_bad_tensors);
    tcase_add_test(tc, hf_missing_lm_head_and_nan);
    tcase_add_test(tc, hf_bad_index);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, hf_allocation_failures);
    suite_add_tcase(s, tc);

    tc = tcase_create("safetensors");
    tcase_add_loop_test(tc, st_bad_header, 0, sizeof bad_headers / sizeof bad_headers[0]);
    tcase_add_test(tc, st_bad_length_prefix);
    tcase_add_test(tc, st_truncated_fixture);
    tcase_add_test(tc, st_garbage);
    tcase_add_test(tc, st_read_dtypes);
    suite_add_tcase(s, tc);
    return s;
}
