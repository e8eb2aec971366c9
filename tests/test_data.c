/* The data layer: text and token files, windows and seeded batches,
 * data-free generation. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

#define MODEL_BIN "models/stories260K/stories260K.bin"
#define TOK_BIN "models/stories260K/tok512.bin"
#define TEXT "text/tinystories/tinystories_sample.cs336.txt"

/* A dataset of ids 0..n-1 (each id its own position, so a window's origin
 * can be read off its first id). */
static qkd_dataset *ramp_dataset(qkd_context *ctx, int n)
{
    int32_t *ids = malloc((size_t)n * sizeof *ids);
    ck_assert_ptr_nonnull(ids);
    for (int i = 0; i < n; i++)
        ids[i] = i;
    qkd_dataset *ds = NULL;
    ck_assert_int_eq(qkd_dataset_from_tokens(ctx, ids, (size_t)n, n, &ds), QKD_OK);
    free(ids);
    return ds;
}

/* ---- text ----------------------------------------------------------------- */

START_TEST(text_equals_tokenizer_encode)
{
    const char *tok_path = test_shared(TOK_BIN);
    if (!tok_path)
        return;
    qkd_context *ctx = test_context(1);
    qkd_tokenizer *tok = NULL;
    ck_assert_int_eq(qkd_tokenizer_load(ctx, tok_path, &tok), QKD_OK);
    const char *text_path = test_shared(TEXT);
    size_t len;
    char *text = test_read_file(text_path, &len);
    size_t cap = len + 2, n = 0;
    int32_t *want = malloc(cap * sizeof *want);
    ck_assert_int_eq(qkd_tokenizer_encode(tok, text, len, QKD_ENCODE_BOS, want, cap, &n), QKD_OK);

    qkd_dataset *ds = NULL;
    ck_assert_int_eq(qkd_dataset_from_text(ctx, tok, text_path, &ds), QKD_OK);
    ck_assert_uint_eq(qkd_dataset_n_tokens(ds), n);
    ck_assert_int_eq(qkd_dataset_vocab_size(ds), qkd_tokenizer_vocab_size(tok));
    const int32_t *got = qkd_dataset_tokens(ds);
    ck_assert_int_eq(got[0], qkd_tokenizer_bos(tok));
    ck_assert_int_eq(memcmp(got, want, n * sizeof *want), 0);
    /* Only the start of the file gets a BOS. */
    for (size_t i = 1; i < n; i++)
        ck_assert_int_ne(got[i], qkd_tokenizer_bos(tok));
    qkd_dataset_free(ds);

    ck_assert_int_eq(qkd_dataset_from_text(ctx, tok, "/nonexistent/text.txt", &ds), QKD_ERR_IO);
    ck_assert_ptr_null(ds);
    ck_assert_ptr_nonnull(strstr(qkd_context_last_error(ctx), "/nonexistent/text.txt"));
    free(want);
    free(text);
    qkd_tokenizer_free(tok);
    qkd_context_free(ctx);
}
END_TEST

/* ---- token files ------------------------------------------------------------ */

START_TEST(token_file_round_trip)
{
    qkd_context *ctx = test_context(1);
    const int32_t ids[] = {1, 0, 511, 300, 2, 7};
    qkd_dataset *ds = NULL, *back = NULL;
    ck_assert_int_eq(qkd_dataset_from_tokens(ctx, ids, 6, 512, &ds), QKD_OK);
    char path[512];
    snprintf(path, sizeof path, "%s/ids.tok", test_tmpdir());
    ck_assert_int_eq(qkd_dataset_save(ds, path), QKD_OK);

    /* The bytes are the documented layout, independently of the reader. */
    size_t len;
    unsigned char *raw = test_read_file(path, &len);
    ck_assert_uint_eq(len, 24 + 6 * 4);
    ck_assert_int_eq(memcmp(raw, "QKDT", 4), 0);
    ck_assert_int_eq(raw[4], 1);                     /* version */
    ck_assert_int_eq(raw[8] | raw[9] << 8, 512);     /* vocabulary */
    ck_assert_int_eq(raw[16], 6);                    /* count */
    ck_assert_int_eq(raw[24 + 8] | raw[24 + 9] << 8, 511); /* ids[2], little-endian */

    ck_assert_int_eq(qkd_dataset_load(ctx, path, &back), QKD_OK);
    ck_assert_uint_eq(qkd_dataset_n_tokens(back), 6);
    ck_assert_int_eq(qkd_dataset_vocab_size(back), 512);
    ck_assert_int_eq(memcmp(qkd_dataset_tokens(back), ids, sizeof ids), 0);

    /* An empty dataset round-trips too. */
    qkd_dataset *empty = NULL, *empty_back = NULL;
    ck_assert_int_eq(qkd_dataset_from_tokens(ctx, NULL, 0, 4, &empty), QKD_OK);
    ck_assert_int_eq(qkd_dataset_save(empty, path), QKD_OK);
    ck_assert_int_eq(qkd_dataset_load(ctx, path, &empty_back), QKD_OK);
    ck_assert_uint_eq(qkd_dataset_n_tokens(empty_back), 0);
    free(raw);
    qkd_dataset_free(empty);
    qkd_dataset_free(empty_back);
    qkd_dataset_free(ds);
    qkd_dataset_free(back);
    qkd_context_free(ctx);
}
END_TEST

/* Load bytes written to a file; expect status. */
static void expect_load(qkd_context *ctx, const void *bytes, size_t n, qkd_status want,
                        const char *what)
{
    char path[512];
    snprintf(path, sizeof path, "%s/bad.tok", test_tmpdir());
    test_write_file(path, bytes, n);
    qkd_dataset *ds = (qkd_dataset *)&ds; /* must be reset to NULL */
    qkd_status st = qkd_dataset_load(ctx, path, &ds);
    ck_assert_msg(st == want, "%s: got %s, want %s (%s)", what, qkd_status_name(st),
                  qkd_status_name(want), qkd_context_last_error(ctx));
    if (want == QKD_OK) {
        qkd_dataset_free(ds);
    } else {
        ck_assert_ptr_null(ds);
        ck_assert_ptr_nonnull(strstr(qkd_context_last_error(ctx), path));
    }
    remove(path);
}

START_TEST(token_file_malformed)
{
    qkd_context *ctx = test_context(1);
    unsigned char good[24 + 8] = {'Q', 'K', 'D', 'T', 1, 0, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0,
                                  2, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 15, 0, 0, 0};
    unsigned char b[sizeof good + 4];
    qkd_dataset *ds = NULL;
    expect_load(ctx, good, sizeof good, QKD_OK, "good");
    (void)ds;

    memcpy(b, good, sizeof good);
    b[0] = 'X';
    expect_load(ctx, b, sizeof good, QKD_ERR_FORMAT, "bad magic");
    expect_load(ctx, good, 10, QKD_ERR_FORMAT, "truncated header");
    expect_load(ctx, good, sizeof good - 1, QKD_ERR_FORMAT, "truncated ids");
    memcpy(b, good, sizeof good);
    memset(b + sizeof good, 0, 4);
    expect_load(ctx, b, sizeof good + 4, QKD_ERR_FORMAT, "trailing bytes");
    memcpy(b, good, sizeof good);
    b[4] = 2;
    expect_load(ctx, b, sizeof good, QKD_ERR_UNSUPPORTED, "newer version");
    memcpy(b, good, sizeof good);
    b[12] = 1;
    expect_load(ctx, b, sizeof good, QKD_ERR_FORMAT, "flags");
    memcpy(b, good, sizeof good);
    b[8] = 0;
    expect_load(ctx, b, sizeof good, QKD_ERR_FORMAT, "zero vocabulary");
    memcpy(b, good, sizeof good);
    b[28] = 16; /* id 16 in a vocabulary of 16 */
    expect_load(ctx, b, sizeof good, QKD_ERR_FORMAT, "id out of range");
    memcpy(b, good, sizeof good);
    b[31] = 0x80; /* negative id */
    expect_load(ctx, b, sizeof good, QKD_ERR_FORMAT, "negative id");
    memcpy(b, good, sizeof good);
    b[23] = 0x40; /* a count no file can hold */
    expect_load(ctx, b, sizeof good, QKD_ERR_FORMAT, "huge count");

    ck_assert_int_eq(qkd_dataset_load(ctx, "/nonexistent/x.tok", &ds), QKD_ERR_IO);
    ck_assert_int_eq(qkd_dataset_load(ctx, NULL, &ds), QKD_ERR_INVALID_ARG);
    const int32_t bad_ids[] = {0, 5};
    ck_assert_int_eq(qkd_dataset_from_tokens(ctx, bad_ids, 2, 5, &ds), QKD_ERR_RANGE);
    ck_assert_ptr_null(ds);
    ck_assert_int_eq(qkd_dataset_from_tokens(ctx, bad_ids, 2, 0, &ds), QKD_ERR_INVALID_ARG);
    qkd_context_free(ctx);
}
END_TEST

/* ---- windows and batches ------------------------------------------------------ */

START_TEST(batches_deterministic_in_range)
{
    enum { N = 1000, T = 9, B = 4, N_EVAL = 5 };
    qkd_context *ctx = test_context(1);
    qkd_dataset *ds = ramp_dataset(ctx, N);
    ck_assert_int_eq(qkd_dataset_set_split(ds, 42, N_EVAL), QKD_OK);
    const int64_t n_all = N / (T + 1), n_train = n_all - N_EVAL;
    ck_assert_int_eq(qkd_dataset_n_windows(ds, T, QKD_SPLIT_TRAIN), n_train);
    ck_assert_int_eq(qkd_dataset_n_windows(ds, T, QKD_SPLIT_EVAL), N_EVAL);

    int32_t tok[B * T], tgt[B * T], tok2[B * T], tgt2[B * T];
    int seen[N / (T + 1)] = {0};
    /* Steps covering exactly three epochs (n_train = 95 windows is not a
     * multiple of B: epochs straddle batches). */
    const int64_t samples = 3 * n_train;
    for (int64_t step = 0; step * B < samples; step++) {
        ck_assert_int_eq(qkd_dataset_batch(ds, step, B, T, tok, tgt), QKD_OK);
        ck_assert_int_eq(qkd_dataset_batch(ds, step, B, T, tok2, tgt2), QKD_OK);
        ck_assert_int_eq(memcmp(tok, tok2, sizeof tok), 0);
        ck_assert_int_eq(memcmp(tgt, tgt2, sizeof tgt), 0);
        for (int b = 0; b < B && step * B + b < samples; b++) {
            int start = tok[b * T];
            ck_assert_int_eq(start % (T + 1), 0);          /* a window start */
            ck_assert_int_lt(start / (T + 1), n_train);    /* never held out */
            for (int t = 0; t < T; t++) {
                ck_assert_int_eq(tok[b * T + t], start + t);
                ck_assert_int_eq(tgt[b * T + t], start + t + 1); /* the next token */
            }
            seen[start / (T + 1)]++;
        }
    }
    /* Every training window exactly once per epoch. */
    for (int w = 0; w < n_train; w++)
        ck_assert_int_eq(seen[w], 3);

    /* Shuffled, and the order depends on the seed. */
    int in_order = 1;
    ck_assert_int_eq(qkd_dataset_batch(ds, 0, B, T, tok, NULL), QKD_OK);
    for (int b = 0; b < B; b++)
        in_order &= tok[b * T] == b * (T + 1);
    ck_assert(!in_order);
    ck_assert_int_eq(qkd_dataset_set_split(ds, 43, N_EVAL), QKD_OK);
    ck_assert_int_eq(qkd_dataset_batch(ds, 0, B, T, tok2, NULL), QKD_OK);
    ck_assert_int_ne(memcmp(tok, tok2, sizeof tok), 0);
    uint64_t seed;
    int64_t n_eval;
    ck_assert_int_eq(qkd_dataset_get_split(ds, &seed, &n_eval), QKD_OK);
    ck_assert_uint_eq(seed, 43);
    ck_assert_int_eq(n_eval, N_EVAL);
    qkd_dataset_free(ds);
    qkd_context_free(ctx);
}
END_TEST

START_TEST(held_out_windows)
{
    enum { N = 105, T = 9 };
    qkd_context *ctx = test_context(1);
    qkd_dataset *ds = ramp_dataset(ctx, N); /* 10 windows, a tail of 5 unused */
    ck_assert_int_eq(qkd_dataset_set_split(ds, 1, 3), QKD_OK);
    int32_t tok[T], tgt[T];
    for (int i = 0; i < 3; i++) {
        ck_assert_int_eq(qkd_dataset_window(ds, QKD_SPLIT_EVAL, i, T, tok, tgt), QKD_OK);
        ck_assert_int_eq(tok[0], (7 + i) * (T + 1));
        ck_assert_int_eq(tgt[T - 1], (7 + i) * (T + 1) + T);
    }
    ck_assert_int_eq(qkd_dataset_window(ds, QKD_SPLIT_TRAIN, 6, T, tok, NULL), QKD_OK);
    ck_assert_int_eq(tok[0], 60);
    ck_assert_int_eq(qkd_dataset_window(ds, QKD_SPLIT_EVAL, 3, T, tok, tgt), QKD_ERR_RANGE);
    ck_assert_int_eq(qkd_dataset_window(ds, QKD_SPLIT_TRAIN, 7, T, tok, tgt), QKD_ERR_RANGE);
    ck_assert_int_eq(qkd_dataset_window(ds, QKD_SPLIT_TRAIN, -1, T, tok, tgt), QKD_ERR_RANGE);

    /* Everything held out: no training batch, with a clear error. */
    ck_assert_int_eq(qkd_dataset_set_split(ds, 1, 100), QKD_OK);
    ck_assert_int_eq(qkd_dataset_n_windows(ds, T, QKD_SPLIT_EVAL), 10);
    ck_assert_int_eq(qkd_dataset_batch(ds, 0, 1, T, tok, tgt), QKD_ERR_STATE);
    ck_assert_ptr_nonnull(strstr(qkd_context_last_error(ctx), "no training window"));
    /* Windows longer than the data. */
    ck_assert_int_eq(qkd_dataset_set_split(ds, 1, 0), QKD_OK);
    ck_assert_int_eq(qkd_dataset_n_windows(ds, N, QKD_SPLIT_TRAIN), 0);
    ck_assert_int_eq(qkd_dataset_batch(ds, -1, 1, T, tok, tgt), QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(qkd_dataset_batch(ds, 0, 0, T, tok, tgt), QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(qkd_dataset_set_split(ds, 1, -1), QKD_ERR_INVALID_ARG);
    qkd_dataset_free(ds);
    qkd_context_free(ctx);
}
END_TEST

/* ---- data-free generation ------------------------------------------------------ */

typedef struct teacher_fixture {
    qkd_context *ctx;
    qkd_model *model;
    qkd_tokenizer *tok;
} teacher_fixture;

static int open_teacher(teacher_fixture *f)
{
    const char *model = test_shared(MODEL_BIN);
    if (!model)
        return 0;
    f->ctx = test_context(2);
    ck_assert_int_eq(qkd_model_load(f->ctx, model, &f->model), QKD_OK);
    ck_assert_int_eq(qkd_tokenizer_load(f->ctx, test_shared(TOK_BIN), &f->tok), QKD_OK);
    return 1;
}

static void close_teacher(teacher_fixture *f)
{
    qkd_tokenizer_free(f->tok);
    qkd_model_free(f->model);
    qkd_context_free(f->ctx);
}

static qkd_dataset *generate(teacher_fixture *f, const qkd_datafree_params *p)
{
    qkd_dataset *ds = NULL;
    qkd_status st = qkd_dataset_generate(f->ctx, f->model, f->tok, p, &ds);
    ck_assert_msg(st == QKD_OK, "%s", qkd_context_last_error(f->ctx));
    return ds;
}

/* Number of logits strictly above logits[id]. */
static int rank_of(const float *logits, int n, int32_t id)
{
    int r = 0;
    for (int i = 0; i < n; i++)
        r += logits[i] > logits[id];
    return r;
}

START_TEST(datafree_deterministic_greedy_prefix)
{
    teacher_fixture f;
    if (!open_teacher(&f))
        return;
    enum { N_SEQ = 4, LEN = 24, GREEDY = 4, TOP_K = 5, VOCAB = 512 };
    qkd_datafree_params p;
    qkd_datafree_params_init(&p);
    p.n_sequences = N_SEQ;
    p.seq_len = LEN;
    p.greedy_min = p.greedy_max = GREEDY;
    p.top_k = TOP_K;
    p.seed = 7;
    qkd_dataset *a = generate(&f, &p), *b = generate(&f, &p);
    ck_assert_uint_eq(qkd_dataset_n_tokens(a), N_SEQ * LEN);
    ck_assert_int_eq(memcmp(qkd_dataset_tokens(a), qkd_dataset_tokens(b),
                            N_SEQ * LEN * sizeof(int32_t)), 0);
    p.seed = 8;
    qkd_dataset *c = generate(&f, &p);
    ck_assert_int_ne(memcmp(qkd_dataset_tokens(a), qkd_dataset_tokens(c),
                            N_SEQ * LEN * sizeof(int32_t)), 0);

    /* Replay each sequence through the teacher: BOS, a non-control walk
     * token, argmax continuations, then tokens within the top k. */
    const int32_t *ids = qkd_dataset_tokens(a);
    float logits[VOCAB];
    int32_t firsts[N_SEQ];
    for (int s = 0; s < N_SEQ; s++) {
        const int32_t *seq = ids + s * LEN;
        ck_assert_int_eq(seq[0], qkd_tokenizer_bos(f.tok));
        const char *piece = qkd_tokenizer_piece(f.tok, seq[1]);
        ck_assert(seq[1] != qkd_tokenizer_eos(f.tok) && seq[1] != qkd_tokenizer_bos(f.tok));
        ck_assert_msg(piece[0] != '<' || !strncmp(piece, "<0x", 3), "walk token %d is '%s'",
                      seq[1], piece);
        firsts[s] = seq[1];
        for (int pos = 0; pos + 1 < LEN; pos++) {
            ck_assert_int_eq(qkd_model_decode(f.model, seq[pos], pos, logits), QKD_OK);
            if (pos == 0)
                continue;
            int rank = rank_of(logits, VOCAB, seq[pos + 1]);
            if (pos + 1 <= GREEDY)
                ck_assert_msg(rank == 0, "seq %d pos %d: not the argmax", s, pos + 1);
            else
                ck_assert_int_lt(rank, TOP_K);
        }
    }
    /* The walk does not repeat a start token within a pass. */
    for (int s = 0; s < N_SEQ; s++)
        for (int t = s + 1; t < N_SEQ; t++)
            ck_assert_int_ne(firsts[s], firsts[t]);

    /* The cache: save and reload give the same ids. */
    char path[512];
    snprintf(path, sizeof path, "%s/datafree.tok", test_tmpdir());
    qkd_dataset *back = NULL;
    ck_assert_int_eq(qkd_dataset_save(a, path), QKD_OK);
    ck_assert_int_eq(qkd_dataset_load(f.ctx, path, &back), QKD_OK);
    ck_assert_int_eq(qkd_dataset_vocab_size(back), VOCAB);
    ck_assert_int_eq(memcmp(qkd_dataset_tokens(a), qkd_dataset_tokens(back),
                            N_SEQ * LEN * sizeof(int32_t)), 0);
    /* One sequence of LEN tokens is one window of LEN - 1. */
    ck_assert_int_eq(qkd_dataset_n_windows(back, LEN - 1, QKD_SPLIT_TRAIN), N_SEQ);
    qkd_dataset_free(a);
    qkd_dataset_free(b);
    qkd_dataset_free(c);
    qkd_dataset_free(back);
    close_teacher(&f);
}
END_TEST

/* With a byte-level vocabulary the walk starts on printable characters
 * only: the space piece and the byte tokens of '!'..'~' (the space's byte
 * token never: the space has a piece of its own). */
START_TEST(datafree_byte_vocabulary_starts)
{
    qkd_context *ctx = test_context(1);
    qkd_tokenizer *tok = NULL;
    ck_assert_int_eq(qkd_tokenizer_create_bytes(ctx, &tok), QKD_OK);
    qkd_model_config cfg;
    qkd_model_config_init(&cfg);
    cfg.dim = 8;
    cfg.hidden_dim = 16;
    cfg.n_layers = 1;
    cfg.n_heads = 2;
    cfg.n_kv_heads = 1;
    cfg.vocab_size = QKD_BYTE_VOCAB_SIZE;
    cfg.max_seq_len = 8;
    qkd_model *m = NULL;
    ck_assert_int_eq(qkd_model_create(ctx, &cfg, &m), QKD_OK);
    ck_assert_int_eq(qkd_model_init_random(m, 3, 0.5f), QKD_OK);
    qkd_datafree_params p;
    qkd_datafree_params_init(&p);
    p.n_sequences = 200; /* more than the 95 candidates: the walk goes
                            round, each pass a permutation of them */
    p.seq_len = 2;
    qkd_dataset *ds = NULL;
    ck_assert_int_eq(qkd_dataset_generate(ctx, m, tok, &p, &ds), QKD_OK);
    const int32_t *ids = qkd_dataset_tokens(ds);
    int first_pass[QKD_BYTE_VOCAB_SIZE] = {0};
    for (int s = 0; s < 200; s++) {
        size_t len;
        const char *text = qkd_tokenizer_decode(tok, -1, ids[2 * s + 1], &len);
        ck_assert_uint_eq(len, 1);
        ck_assert_msg(text[0] >= 0x20 && text[0] < 0x7f, "start byte 0x%02x", text[0]);
        ck_assert_int_ne(ids[2 * s + 1], 3 + ' '); /* the space's byte token */
        if (s < 95)
            ck_assert_int_eq(first_pass[ids[2 * s + 1]]++, 0);
    }
    qkd_dataset_free(ds);
    qkd_model_free(m);
    qkd_tokenizer_free(tok);
    qkd_context_free(ctx);
}
END_TEST

static int cancel_after_one(void *user, int64_t done, int64_t total)
{
    (void)total;
    *(int64_t *)user = done;
    return 1;
}

START_TEST(datafree_bad_params)
{
    teacher_fixture f;
    if (!open_teacher(&f))
        return;
    qkd_datafree_params p;
    qkd_datafree_params_init(&p);
    ck_assert_int_eq(p.greedy_min, 3);
    ck_assert_int_eq(p.greedy_max, 5);
    ck_assert_int_eq(p.top_k, 50);
    qkd_dataset *ds = NULL;
    p.seq_len = 1;
    ck_assert_int_eq(qkd_dataset_generate(f.ctx, f.model, f.tok, &p, &ds), QKD_ERR_INVALID_ARG);
    qkd_datafree_params_init(&p);
    p.greedy_min = 4;
    p.greedy_max = 3;
    ck_assert_int_eq(qkd_dataset_generate(f.ctx, f.model, f.tok, &p, &ds), QKD_ERR_INVALID_ARG);
    qkd_datafree_params_init(&p);
    p.temperature = 0.0f;
    ck_assert_int_eq(qkd_dataset_generate(f.ctx, f.model, f.tok, &p, &ds), QKD_ERR_INVALID_ARG);
    qkd_datafree_params_init(&p);
    p.seq_len = 600; /* stories260K takes 512 positions */
    ck_assert_int_eq(qkd_dataset_generate(f.ctx, f.model, f.tok, &p, &ds), QKD_ERR_RANGE);
    ck_assert_ptr_nonnull(strstr(qkd_context_last_error(f.ctx), "qkd_model_set_max_seq_len"));
    qkd_datafree_params_init(&p);
    p.size = 0;
    ck_assert_int_eq(qkd_dataset_generate(f.ctx, f.model, f.tok, &p, &ds), QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(qkd_dataset_generate(f.ctx, f.model, NULL, &p, &ds), QKD_ERR_INVALID_ARG);

    /* A tokenizer of another vocabulary. */
    qkd_tokenizer *bytes = NULL;
    ck_assert_int_eq(qkd_tokenizer_create_bytes(f.ctx, &bytes), QKD_OK);
    qkd_datafree_params_init(&p);
    ck_assert_int_eq(qkd_dataset_generate(f.ctx, f.model, bytes, &p, &ds), QKD_ERR_SHAPE);

    /* Cancelling through the progress callback. */
    int64_t done = 0;
    p.n_sequences = 3;
    p.seq_len = 8;
    p.progress = cancel_after_one;
    p.progress_user = &done;
    ck_assert_int_eq(qkd_dataset_generate(f.ctx, f.model, f.tok, &p, &ds), QKD_ERR_CANCELLED);
    ck_assert_int_eq(done, 1);
    ck_assert_ptr_null(ds);
    qkd_tokenizer_free(bytes);
    close_teacher(&f);
}
END_TEST

Suite *suite_data(void)
{
    Suite *s = suite_create("data");
    TCase *tc = tcase_create("files");
    tcase_add_test(tc, text_equals_tokenizer_encode);
    tcase_add_test(tc, token_file_round_trip);
    tcase_add_test(tc, token_file_malformed);
    suite_add_tcase(s, tc);
    tc = tcase_create("batches");
    tcase_add_test(tc, batches_deterministic_in_range);
    tcase_add_test(tc, held_out_windows);
    suite_add_tcase(s, tc);
    tc = tcase_create("datafree");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, datafree_deterministic_greedy_prefix);
    tcase_add_test(tc, datafree_bad_params);
    tcase_add_test(tc, datafree_byte_vocabulary_starts);
    suite_add_tcase(s, tc);
    return s;
}
