/* The tokenizer: llama.cpp's sentencepiece test vectors, llama2.c's greedy
 * story, the vocabularies of tok512.bin, stories260K.gguf and Llama 2 against
 * each other, hand-checked merges on a tiny vocabulary, malformed files and
 * allocation failures. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/io.h"
#include "testutil.h"
#include "tokenizer/tokenizer.h"

#define SPM_GGUF "gguf/ggml-vocab-llama-spm.gguf"
#define TOK512 "models/stories260K/tok512.bin"
#define STORIES_GGUF "models/stories260K/stories260K.gguf"
#define LLAMA2_BIN "models/llama2_tokenizer/tokenizer.bin"
#define GREEDY_IDS "models/stories260K/reference/gen_greedy_n256.input_token_ids.txt"
#define GREEDY_TEXT "models/stories260K/reference/gen_greedy_n256.txt"
#define TINYSTORIES_A "text/tinystories/TinyStories-valid.slice_My-AI_Tasks.txt"
#define TINYSTORIES_B "text/tinystories/tinystories_sample.cs336.txt"
#define SHAKESPEARE "text/tinyshakespeare_input.txt"

/* ---- helpers ------------------------------------------------------------ */

/* Load a tokenizer from ../shared; NULL (test skipped) if the file is absent. */
static qkd_tokenizer *load_shared(qkd_context *ctx, const char *rel)
{
    const char *path = test_shared(rel);
    if (!path)
        return NULL;
    qkd_tokenizer *tok = NULL;
    qkd_status st = qkd_tokenizer_load(ctx, path, &tok);
    ck_assert_msg(st == QKD_OK, "%s: %s", rel, qkd_context_last_error(ctx));
    return tok;
}

/* Encode through the size query the API documents: a first call with no
 * buffer reports the count (RANGE unless it is 0), a second fills it. */
static int32_t *encode(const qkd_tokenizer *tok, const char *text, size_t len,
                       unsigned flags, size_t *n)
{
    qkd_status st = qkd_tokenizer_encode(tok, text, len, flags, NULL, 0, n);
    ck_assert_int_eq(st, *n > 0 ? QKD_ERR_RANGE : QKD_OK);
    int32_t *ids = malloc((*n + 1) * sizeof *ids);
    ck_assert_ptr_nonnull(ids);
    size_t again = 0;
    ck_assert_int_eq(qkd_tokenizer_encode(tok, text, len, flags, ids, *n, &again), QKD_OK);
    ck_assert_uint_eq(again, *n);
    return ids;
}

/* Concatenated decode of ids, the first one following `prev` (malloc'd). */
static char *decode(const qkd_tokenizer *tok, int32_t prev, const int32_t *ids, size_t n,
                    size_t *len)
{
    size_t cap = 64, used = 0;
    char *out = malloc(cap);
    ck_assert_ptr_nonnull(out);
    for (size_t i = 0; i < n; i++) {
        size_t piece_len;
        const char *piece = qkd_tokenizer_decode(tok, prev, ids[i], &piece_len);
        if (!piece) /* no ck_assert per id: each passing assert costs a write */
            ck_abort_msg("id %d does not decode", (int)ids[i]);
        while (used + piece_len + 1 > cap) {
            cap *= 2;
            out = realloc(out, cap);
            ck_assert_ptr_nonnull(out);
        }
        memcpy(out + used, piece, piece_len);
        used += piece_len;
        prev = ids[i];
    }
    out[used] = '\0';
    *len = used;
    return out;
}

static void assert_ids_eq(const int32_t *got, size_t n_got, const int32_t *want,
                          size_t n_want, const char *what)
{
    ck_assert_msg(n_got == n_want, "%s: %zu ids, expected %zu", what, n_got, n_want);
    for (size_t i = 0; i < n_want; i++)
        if (got[i] != want[i])
            ck_abort_msg("%s: id %zu is %d, expected %d", what, i, (int)got[i], (int)want[i]);
}

/* Encoding text with BOS, then decoding it, gives the text back. */
static void assert_round_trip(const qkd_tokenizer *tok, const char *text, size_t len)
{
    size_t n, back_len;
    int32_t *ids = malloc((len + 2) * sizeof *ids); /* BOS, the space, a byte each */
    ck_assert_ptr_nonnull(ids);
    ck_assert_int_eq(qkd_tokenizer_encode(tok, text, len, QKD_ENCODE_BOS, ids, len + 2, &n),
                     QKD_OK);
    ck_assert_int_eq(ids[0], qkd_tokenizer_bos(tok));
    char *back = decode(tok, ids[0], ids + 1, n - 1, &back_len);
    ck_assert_uint_eq(back_len, len);
    ck_assert_msg(memcmp(back, text, len) == 0, "round trip changed the text");
    free(back);
    free(ids);
}

/* ---- llama.cpp's test vectors ------------------------------------------- */

/* The cases of ggml-vocab-llama-spm.gguf.inp/.out, split as llama.cpp's
 * tests/test-tokenizer-0.cpp does: .inp is read whole and cut at every
 * "\n__ggml_vocab_test__\n"; the text after the last separator is a case
 * only if it is not empty (the file ends with a separator, so it is not).
 * The separator's newlines are its own, so a case of k newlines shows in
 * the file as k + 1 empty lines, and the empty case as one. .out has one
 * line per case: the ids, each after a space; the empty case's line is
 * empty. */
typedef struct spm_case {
    const char *text;
    size_t len;
    int32_t ids[256];
    size_t n;
} spm_case;

typedef struct spm_cases {
    char *inp, *out; /* the files, which the texts point into */
    spm_case cases[64];
    size_t n;
} spm_cases;

static void split_inputs(spm_cases *c, size_t inp_len)
{
    static const char sep[] = "\n__ggml_vocab_test__\n";
    const size_t sep_len = sizeof sep - 1;
    for (size_t pos = 0; pos < inp_len; c->n++) {
        ck_assert_uint_lt(c->n, 64);
        const char *next = memmem(c->inp + pos, inp_len - pos, sep, sep_len);
        size_t end = next ? (size_t)(next - c->inp) : inp_len;
        c->cases[c->n].text = c->inp + pos;
        c->cases[c->n].len = end - pos;
        pos = next ? end + sep_len : inp_len;
    }
}

static void parse_outputs(spm_cases *c, size_t out_len)
{
    size_t line = 0;
    char *p = c->out, *end = c->out + out_len;
    for (; p < end; line++) {
        ck_assert_uint_lt(line, c->n);
        char *eol = memchr(p, '\n', (size_t)(end - p));
        ck_assert_msg(eol != NULL, ".out: line %zu has no newline", line);
        *eol = '\0';
        spm_case *k = &c->cases[line];
        for (char *q = p, *stop; *q; q = stop) {
            long id = strtol(q, &stop, 10);
            if (stop == q)
                break;
            ck_assert_uint_lt(k->n, 256);
            k->ids[k->n++] = (int32_t)id;
        }
        p = eol + 1;
    }
    ck_assert_uint_eq(line, c->n);
}

static spm_cases *read_spm_cases(void)
{
    const char *inp_path = test_shared(SPM_GGUF ".inp");
    if (!inp_path)
        return NULL;
    spm_cases *c = calloc(1, sizeof *c);
    ck_assert_ptr_nonnull(c);
    size_t inp_len, out_len;
    c->inp = test_read_file(inp_path, &inp_len);
    const char *out_path = test_shared(SPM_GGUF ".out");
    ck_assert_ptr_nonnull(out_path);
    c->out = test_read_file(out_path, &out_len);
    split_inputs(c, inp_len);
    parse_outputs(c, out_len);
    ck_assert_uint_eq(c->n, 46); /* as many as llama.cpp runs from these files */
    return c;
}

static void free_spm_cases(spm_cases *c)
{
    free(c->inp);
    free(c->out);
    free(c);
}

/* Every case encodes (no BOS) to llama.cpp's ids. */
static void check_spm_cases(const qkd_tokenizer *tok, const spm_cases *c, const char *name)
{
    for (size_t i = 0; i < c->n; i++) {
        const spm_case *k = &c->cases[i];
        size_t n;
        int32_t *ids = encode(tok, k->text, k->len, 0, &n);
        char what[128];
        snprintf(what, sizeof what, "%s, case %zu \"%.40s\"", name, i, k->text);
        assert_ids_eq(ids, n, k->ids, k->n, what);
        free(ids);
    }
}

START_TEST(test_spm_vectors)
{
    qkd_context *ctx = test_context(1);
    qkd_tokenizer *tok = load_shared(ctx, SPM_GGUF);
    spm_cases *c = tok ? read_spm_cases() : NULL;
    if (c) {
        ck_assert_int_eq(qkd_tokenizer_vocab_size(tok), 32000);
        ck_assert_int_eq(qkd_tokenizer_bos(tok), 1);
        ck_assert_int_eq(qkd_tokenizer_eos(tok), 2);
        check_spm_cases(tok, c, "llama-spm gguf");
        /* The vocabulary has all 256 byte tokens, so decoding is lossless:
         * every case's ids, decoded after a BOS (which drops the space the
         * encoder put in front), give the case's text back, byte for byte. */
        for (size_t i = 0; i < c->n; i++) {
            size_t len;
            const spm_case *k = &c->cases[i];
            char *back = decode(tok, 1, k->ids, k->n, &len);
            ck_assert_msg(len == k->len && memcmp(back, k->text, len) == 0,
                          "case %zu decodes to \"%s\"", i, back);
            free(back);
        }
        free_spm_cases(c);
    }
    qkd_tokenizer_free(tok);
    qkd_context_free(ctx);
}
END_TEST

/* Llama 2's tokenizer.bin (llama2.c format) holds the same 32000 pieces as
 * the llama-spm GGUF, except that BOS and EOS are written "\n<s>\n" and
 * "\n</s>\n" there instead of "<s>" and "</s>" (its scores are the same
 * too, which the API does not show but the encodings depend on), and it
 * passes the same vectors. */
START_TEST(test_llama2_bin_agrees)
{
    qkd_context *ctx = test_context(1);
    qkd_tokenizer *bin = load_shared(ctx, LLAMA2_BIN);
    qkd_tokenizer *gguf = bin ? load_shared(ctx, SPM_GGUF) : NULL;
    spm_cases *c = gguf ? read_spm_cases() : NULL;
    if (c) {
        ck_assert_int_eq(qkd_tokenizer_vocab_size(bin), 32000);
        for (int32_t id = 0; id < 32000; id++) {
            const char *a = qkd_tokenizer_piece(bin, id), *b = qkd_tokenizer_piece(gguf, id);
            bool special = id == 1 || id == 2; /* "\n<s>\n" holds "<s>" */
            if (special ? strstr(a, b) == NULL || strcmp(a, b) == 0 : strcmp(a, b) != 0)
                ck_abort_msg("id %d: \"%s\" vs \"%s\"", (int)id, a, b);
        }
        check_spm_cases(bin, c, "llama2 tokenizer.bin");
        free_spm_cases(c);
    }
    qkd_tokenizer_free(gguf);
    qkd_tokenizer_free(bin);
    qkd_context_free(ctx);
}
END_TEST

/* ---- stories260K's 512-token vocabulary ----------------------------------- */

static int32_t *read_ids(const char *path, size_t *n)
{
    size_t len;
    char *text = test_read_file(path, &len);
    text = realloc(text, len + 1); /* NUL-terminated for strtol */
    ck_assert_ptr_nonnull(text);
    text[len] = '\0';
    int32_t *ids = malloc((len / 2 + 1) * sizeof *ids);
    ck_assert_ptr_nonnull(ids);
    *n = 0;
    for (char *p = text, *stop;; p = stop) {
        long v = strtol(p, &stop, 10);
        if (stop == p)
            break;
        ids[(*n)++] = (int32_t)v;
    }
    free(text);
    return ids;
}

/* gen_greedy_n256.input_token_ids.txt holds the 256 ids llama2.c fed the
 * model (BOS, then each greedy choice); gen_greedy_n256.txt is what it
 * printed: the pieces of ids 1..255, the piece "." of the 256th choice
 * (which was never fed back, so it is not in the id file), and a final
 * newline. We check the decode of ids 1..255 is the text without that
 * ".\n", and that encoding this text with BOS gives all 256 ids back. A
 * model may well emit a split of a word that BPE would not choose; this
 * one never does, so every position is compared, none skipped. */
START_TEST(test_greedy_story)
{
    qkd_context *ctx = test_context(1);
    qkd_tokenizer *tok = load_shared(ctx, TOK512);
    const char *ids_path = tok ? test_shared(GREEDY_IDS) : NULL;
    if (ids_path) {
        size_t n_ids, text_len, n, back_len;
        int32_t *want = read_ids(ids_path, &n_ids);
        const char *text_path = test_shared(GREEDY_TEXT);
        ck_assert_ptr_nonnull(text_path);
        char *text = test_read_file(text_path, &text_len);
        ck_assert_uint_eq(n_ids, 256);
        ck_assert_int_eq(want[0], 1);
        ck_assert_uint_gt(text_len, 2);
        ck_assert_mem_eq(text + text_len - 2, ".\n", 2);
        size_t story_len = text_len - 2;

        char *back = decode(tok, want[0], want + 1, n_ids - 1, &back_len);
        ck_assert_uint_eq(back_len, story_len);
        ck_assert_mem_eq(back, text, story_len);

        int32_t *ids = encode(tok, text, story_len, QKD_ENCODE_BOS, &n);
        assert_ids_eq(ids, n, want, n_ids, "greedy story");
        free(ids);
        free(back);
        free(text);
        free(want);
    }
    qkd_tokenizer_free(tok);
    qkd_context_free(ctx);
}
END_TEST

START_TEST(test_tok512_round_trip)
{
    qkd_context *ctx = test_context(1);
    qkd_tokenizer *tok = load_shared(ctx, TOK512);
    const char *files[] = {TINYSTORIES_A, TINYSTORIES_B};
    for (int f = 0; tok && f < 2; f++) {
        const char *path = test_shared(files[f]);
        if (!path)
            break;
        size_t len;
        char *text = test_read_file(path, &len);
        assert_round_trip(tok, text, len);
        free(text);
    }
    qkd_tokenizer_free(tok);
    qkd_context_free(ctx);
}
END_TEST

/* The vocabulary inside stories260K.gguf is tok512's (written by llama.cpp's
 * converter), so both encode every text alike. */
START_TEST(test_gguf_vocab_matches_bin)
{
    qkd_context *ctx = test_context(1);
    qkd_tokenizer *bin = load_shared(ctx, TOK512);
    qkd_tokenizer *gguf = bin ? load_shared(ctx, STORIES_GGUF) : NULL;
    spm_cases *c = gguf ? read_spm_cases() : NULL;
    const char *story = c ? test_shared(TINYSTORIES_A) : NULL;
    if (story) {
        ck_assert_int_eq(qkd_tokenizer_vocab_size(gguf), 512);
        ck_assert_int_eq(qkd_tokenizer_bos(gguf), qkd_tokenizer_bos(bin));
        ck_assert_int_eq(qkd_tokenizer_eos(gguf), qkd_tokenizer_eos(bin));
        size_t len;
        char *text = test_read_file(story, &len);
        spm_case texts[65] = {{.text = text, .len = len}};
        memcpy(texts + 1, c->cases, c->n * sizeof *texts);
        for (size_t i = 0; i <= c->n; i++) {
            size_t n_bin, n_gguf;
            int32_t *a = encode(bin, texts[i].text, texts[i].len, QKD_ENCODE_BOS, &n_bin);
            int32_t *b = encode(gguf, texts[i].text, texts[i].len, QKD_ENCODE_BOS, &n_gguf);
            assert_ids_eq(b, n_gguf, a, n_bin, "stories260K.gguf vs tok512.bin");
            free(a);
            free(b);
        }
        free(text);
    }
    if (c)
        free_spm_cases(c);
    qkd_tokenizer_free(gguf);
    qkd_tokenizer_free(bin);
    qkd_context_free(ctx);
}
END_TEST

/* 1.1 MB in one call: a quadratic merge loop would not finish in time. */
START_TEST(test_long_text)
{
    qkd_context *ctx = test_context(1);
    qkd_tokenizer *tok = load_shared(ctx, TOK512);
    const char *path = tok ? test_shared(SHAKESPEARE) : NULL;
    if (path) {
        size_t len;
        char *text = test_read_file(path, &len);
        ck_assert_uint_gt(len, 1000000);
        assert_round_trip(tok, text, len);
        free(text);
    }
    qkd_tokenizer_free(tok);
    qkd_context_free(ctx);
}
END_TEST

/* Arbitrary bytes, invalid UTF-8 included, come back unchanged: tok512 has
 * all 256 byte tokens. (0xE2 is left out: E2 96 81 is U+2581, which
 * decodes as a space, by design.) */
START_TEST(test_random_bytes)
{
    qkd_context *ctx = test_context(1);
    qkd_tokenizer *tok = load_shared(ctx, TOK512);
    uint64_t state = 42;
    char text[4096];
    for (int round = 0; tok && round < 50; round++) {
        size_t len = test_lcg_next(&state) % sizeof text;
        for (size_t i = 0; i < len; i++) {
            uint32_t r = test_lcg_next(&state);
            /* half printable ASCII, half any byte, so merges happen too */
            text[i] = (char)(r & 1 ? ' ' + (r >> 1) % 95 : (r >> 1) & 0xff);
            if ((unsigned char)text[i] == 0xe2)
                text[i] = 'x';
        }
        assert_round_trip(tok, text, len);
    }
    qkd_tokenizer_free(tok);
    qkd_context_free(ctx);
}
END_TEST

/* ---- a tiny vocabulary, merges worked out by hand --------------------------- */

enum { T_UNK, T_BOS, T_EOS, T_SPACE, T_A, T_B, T_AB, T_BA, T_C_BYTE, T_FF_BYTE, T_N };

/* space: how the vocabulary writes a space (U+2581 or a plain space). */
static qkd_tokenizer *tiny(qkd_context *ctx, const char *space, float ab, float ba)
{
    const char *pieces[T_N] = {"<unk>", "<s>", "</s>", space, "a", "b", "ab", "ba",
                               "<0x63>", "<0xFF>"};
    size_t lens[T_N];
    float scores[T_N] = {0, 0, 0, -5, -6, -7, ab, ba, 0, 0};
    for (int i = 0; i < T_N; i++)
        lens[i] = strlen(pieces[i]);
    qkd_tokenizer *tok = NULL;
    ck_assert_int_eq(qkd__tokenizer_create(ctx, T_N, pieces, lens, scores, NULL, T_BOS,
                                           T_EOS, T_UNK, &tok), QKD_OK);
    return tok;
}

static void assert_encodes(const qkd_tokenizer *tok, const char *text, const int32_t *want,
                           size_t n_want)
{
    size_t n;
    int32_t *ids = encode(tok, text, strlen(text), 0, &n);
    assert_ids_eq(ids, n, want, n_want, text);
    free(ids);
}

START_TEST(test_tiny_merges)
{
    qkd_context *ctx = test_context(1);
    for (int s = 0; s < 2; s++) {
        const char *space = s == 0 ? "\xe2\x96\x81" : " ";
        /* "aba" is "_" "a" "b" "a": "ab" and "ba" tie, the leftmost wins */
        qkd_tokenizer *tie = tiny(ctx, space, -1, -1);
        assert_encodes(tie, "aba", (int32_t[]){T_SPACE, T_AB, T_A}, 3);
        /* a higher score wins over position */
        qkd_tokenizer *ba = tiny(ctx, space, -2, -1);
        assert_encodes(ba, "aba", (int32_t[]){T_SPACE, T_A, T_BA}, 3);
        /* no "_a" piece: the spaces stay apart; a literal U+2581 is a space */
        assert_encodes(ba, " a", (int32_t[]){T_SPACE, T_SPACE, T_A}, 3);
        assert_encodes(ba, "\xe2\x96\x81" "a", (int32_t[]){T_SPACE, T_SPACE, T_A}, 3);
        /* byte fallback: "c" has a byte token, 'd' and the two bytes of
         * U+00E9 have none (UNK each), a lone 0xFF is invalid UTF-8 */
        assert_encodes(ba, "c", (int32_t[]){T_SPACE, T_C_BYTE}, 2);
        assert_encodes(ba, "d\xc3\xa9", (int32_t[]){T_SPACE, T_UNK, T_UNK, T_UNK}, 4);
        assert_encodes(ba, "\xff" "a", (int32_t[]){T_SPACE, T_FF_BYTE, T_A}, 3);
        assert_encodes(ba, "", NULL, 0);

        size_t len;
        ck_assert_str_eq(qkd_tokenizer_piece(ba, T_SPACE), " ");
        ck_assert_str_eq(qkd_tokenizer_piece(ba, T_C_BYTE), "<0x63>");
        ck_assert_ptr_null(qkd_tokenizer_piece(ba, T_N));
        ck_assert_ptr_null(qkd_tokenizer_piece(ba, -1));
        ck_assert_str_eq(qkd_tokenizer_decode(ba, -1, T_SPACE, &len), " ");
        ck_assert_str_eq(qkd_tokenizer_decode(ba, T_BOS, T_SPACE, &len), "");
        ck_assert_str_eq(qkd_tokenizer_decode(ba, T_A, T_SPACE, &len), " ");
        ck_assert_str_eq(qkd_tokenizer_decode(ba, -1, T_C_BYTE, &len), "c");
        ck_assert_uint_eq(len, 1);
        ck_assert_ptr_nonnull(qkd_tokenizer_decode(ba, -1, T_FF_BYTE, &len));
        ck_assert_uint_eq(len, 1);
        ck_assert_str_eq(qkd_tokenizer_decode(ba, -1, T_EOS, &len), "");
        ck_assert_ptr_null(qkd_tokenizer_decode(ba, -1, T_N, &len));
        qkd_tokenizer_free(tie);
        qkd_tokenizer_free(ba);
    }
    qkd_context_free(ctx);
}
END_TEST

/* RANGE with the needed count and a filled prefix; bad arguments. */
START_TEST(test_encode_buffer)
{
    qkd_context *ctx = test_context(1);
    qkd_tokenizer *tok = tiny(ctx, " ", -1, -1);
    const char *text = "ab ab";
    int32_t full[8] = {0}, part[8];
    size_t n = 0, m = 0;
    ck_assert_int_eq(qkd_tokenizer_encode(tok, text, 5, QKD_ENCODE_BOS | QKD_ENCODE_EOS,
                                          full, 8, &n), QKD_OK);
    int32_t want[] = {T_BOS, T_SPACE, T_AB, T_SPACE, T_AB, T_EOS};
    assert_ids_eq(full, n, want, 6, "ab ab");
    for (size_t cap = 0; cap < n; cap++) {
        for (int i = 0; i < 8; i++)
            part[i] = -7;
        ck_assert_int_eq(qkd_tokenizer_encode(tok, text, 5, QKD_ENCODE_BOS | QKD_ENCODE_EOS,
                                              part, cap, &m), QKD_ERR_RANGE);
        ck_assert_uint_eq(m, n);
        ck_assert_str_ne(qkd_context_last_error(ctx), "");
        for (size_t i = 0; i < 8; i++)
            ck_assert_int_eq(part[i], i < cap ? full[i] : -7);
    }
    ck_assert_int_eq(qkd_tokenizer_encode(tok, "", 0, QKD_ENCODE_BOS | QKD_ENCODE_EOS,
                                          part, 8, &m), QKD_OK);
    assert_ids_eq(part, m, (int32_t[]){T_BOS, T_EOS}, 2, "empty");
    ck_assert_int_eq(qkd_tokenizer_encode(tok, NULL, 0, 0, NULL, 0, &m), QKD_OK);
    ck_assert_uint_eq(m, 0);
    ck_assert_int_eq(qkd_tokenizer_encode(tok, NULL, 3, 0, part, 8, &m), QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(qkd_tokenizer_encode(tok, text, 5, 0, part, 8, NULL), QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(qkd_tokenizer_encode(tok, text, 5, 0, NULL, 8, &m), QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(qkd_tokenizer_encode(tok, text, 5, 8, part, 8, &m), QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(qkd_tokenizer_encode(NULL, text, 5, 0, part, 8, &m), QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(qkd_tokenizer_vocab_size(NULL), 0);
    ck_assert_ptr_null(qkd_tokenizer_decode(NULL, -1, 0, &m));
    qkd_tokenizer_free(NULL);
    qkd_tokenizer_free(tok);
    qkd_context_free(ctx);
}
END_TEST

/* ---- malformed files ---------------------------------------------------------- */

/* Write data to dir/name; the path is in a static buffer. */
static const char *write_tmp(const char *dir, const char *name, const void *data, size_t len)
{
    const char *path = test_path_in(dir, name);
    test_write_file(path, data, len);
    return path;
}

/* Load path expecting status want; on failure the message names the file. */
static void expect_load(qkd_context *ctx, const char *path, qkd_status want)
{
    static char sentinel;
    qkd_tokenizer *tok = (qkd_tokenizer *)&sentinel; /* a failed load must reset it */
    qkd_status st = qkd_tokenizer_load(ctx, path, &tok);
    ck_assert_msg(st == want, "%s: %s, expected %s (%s)", path, qkd_status_name(st),
                  qkd_status_name(want), qkd_context_last_error(ctx));
    if (st == QKD_OK) {
        ck_assert_ptr_nonnull(tok);
        qkd_tokenizer_free(tok);
        return;
    }
    ck_assert_ptr_null(tok);
    ck_assert_msg(strstr(qkd_context_last_error(ctx), path) != NULL,
                  "message does not name the file: %s", qkd_context_last_error(ctx));
}

/* Cut tok512.bin at every byte of its first 300 (the header and the first
 * 21 records), every 23rd byte after and each of the last 20. The token
 * count is not stored, so a cut at a record boundary is a valid shorter
 * vocabulary (if it still holds ids 0..2); any other cut is FORMAT. */
START_TEST(test_truncated_bin)
{
    qkd_context *ctx = test_context(1);
    const char *src = test_shared(TOK512);
    if (src) {
        const char *dir = test_tmpdir();
        size_t len;
        unsigned char *data = test_read_file(src, &len);
        char *boundary = calloc(len + 1, 1);
        int *count = calloc(len + 1, sizeof *count);
        ck_assert(boundary && count);
        int n = 0;
        for (size_t pos = 4; pos <= len;) {
            boundary[pos] = 1;
            count[pos] = n++;
            if (pos == len)
                break;
            int32_t l;
            memcpy(&l, data + pos + 4, 4);
            pos += 8 + (size_t)l;
        }
        ck_assert_int_eq(n - 1, 512);
        for (size_t cut = 0; cut < len; cut += cut < 300 || cut + 20 >= len ? 1 : 23) {
            const char *path = write_tmp(dir, "cut.bin", data, cut);
            bool ok = boundary[cut] && count[cut] >= 3;
            expect_load(ctx, path, ok ? QKD_OK : QKD_ERR_FORMAT);
            if (ok) {
                qkd_tokenizer *tok;
                ck_assert_int_eq(qkd_tokenizer_load(ctx, path, &tok), QKD_OK);
                ck_assert_int_eq(qkd_tokenizer_vocab_size(tok), count[cut]);
                qkd_tokenizer_free(tok);
            }
        }
        free(count);
        free(boundary);
        free(data);
    }
    qkd_context_free(ctx);
}
END_TEST

/* tok512.bin with a few random bytes overwritten: each load is OK or
 * FORMAT (a changed length or NaN score), never a crash. */
START_TEST(test_mutated_bin)
{
    qkd_context *ctx = test_context(1);
    const char *src = test_shared(TOK512);
    if (src) {
        const char *dir = test_tmpdir();
        size_t len;
        unsigned char *orig = test_read_file(src, &len), *data = malloc(len);
        ck_assert_ptr_nonnull(data);
        uint64_t state = 7;
        int failed = 0;
        for (int round = 0; round < 150; round++) {
            memcpy(data, orig, len);
            for (int k = 0; k < 4; k++)
                data[test_lcg_next(&state) % len] = (unsigned char)test_lcg_next(&state);
            qkd_tokenizer *tok = NULL;
            qkd_status st = qkd_tokenizer_load(ctx, write_tmp(dir, "mut.bin", data, len), &tok);
            ck_assert_msg(st == QKD_OK || st == QKD_ERR_FORMAT, "round %d: %s", round,
                          qkd_status_name(st));
            failed += st != QKD_OK;
            qkd_tokenizer_free(tok);
        }
        ck_assert_int_gt(failed, 0); /* some mutations hit a length field */
        free(data);
        free(orig);
    }
    qkd_context_free(ctx);
}
END_TEST

/* A tokenizer.bin of the 3 tokens "<unk>" "<s>" "</s>" and max_token_length
 * max_len, the third record's length field and score patched to last_len
 * and last_score (4 and 0 are right). */
static const char *write_bin(const char *dir, int32_t max_len, int32_t last_len,
                             float last_score)
{
    unsigned char buf[64];
    size_t n = 0;
    memcpy(buf, &max_len, 4);
    n += 4;
    const char *pieces[3] = {"<unk>", "<s>", "</s>"};
    for (int i = 0; i < 3; i++) {
        float score = i == 2 ? last_score : 0.0f;
        int32_t l = i == 2 ? last_len : (int32_t)strlen(pieces[i]);
        memcpy(buf + n, &score, 4);
        memcpy(buf + n + 4, &l, 4);
        memcpy(buf + n + 8, pieces[i], strlen(pieces[i]));
        n += 8 + strlen(pieces[i]);
    }
    return write_tmp(dir, "bad.bin", buf, n);
}

START_TEST(test_malformed_bin)
{
    qkd_context *ctx = test_context(1);
    const char *dir = test_tmpdir();
    expect_load(ctx, write_bin(dir, 8, 4, 0.0f), QKD_OK);       /* the writer is right */
    expect_load(ctx, write_bin(dir, 8, -1, 0.0f), QKD_ERR_FORMAT);
    expect_load(ctx, write_bin(dir, 8, INT32_MIN, 0.0f), QKD_ERR_FORMAT);
    expect_load(ctx, write_bin(dir, 8, INT32_MAX, 0.0f), QKD_ERR_FORMAT);
    expect_load(ctx, write_bin(dir, 8, 5, 0.0f), QKD_ERR_FORMAT); /* past the end */
    expect_load(ctx, write_bin(dir, INT32_MAX, 1000, 0.0f), QKD_ERR_FORMAT);
    expect_load(ctx, write_bin(dir, 3, 4, 0.0f), QKD_ERR_FORMAT); /* over max_token_length */
    expect_load(ctx, write_bin(dir, 0, 4, 0.0f), QKD_ERR_FORMAT);
    expect_load(ctx, write_bin(dir, -5, 4, 0.0f), QKD_ERR_FORMAT);
    expect_load(ctx, write_bin(dir, 8, 4, NAN), QKD_ERR_FORMAT);
    expect_load(ctx, write_tmp(dir, "header.bin", "\x07\0\0\0", 4), QKD_ERR_FORMAT);
    expect_load(ctx, write_tmp(dir, "gguf.bin", "GGUF\x03\0", 6), QKD_ERR_FORMAT);
    qkd_tokenizer *tok = NULL;
    ck_assert_int_eq(qkd_tokenizer_load(ctx, "/nonexistent/tokenizer.bin", &tok), QKD_ERR_IO);
    ck_assert_ptr_null(tok);
    ck_assert_int_eq(qkd_tokenizer_load(ctx, NULL, &tok), QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(qkd_tokenizer_load(NULL, "x", &tok), QKD_ERR_INVALID_ARG);
    qkd_context_free(ctx);
}
END_TEST

/* A minimal GGUF v3 writer for vocab-only files (no tensors). */
typedef struct gguf_buf {
    unsigned char data[4096];
    size_t len;
    uint64_t n_kv;
} gguf_buf;

static void put(gguf_buf *b, const void *p, size_t n)
{
    ck_assert_uint_le(b->len + n, sizeof b->data);
    memcpy(b->data + b->len, p, n);
    b->len += n;
}

static void put_u32(gguf_buf *b, uint32_t v) { put(b, &v, 4); }
static void put_u64(gguf_buf *b, uint64_t v) { put(b, &v, 8); }

static void put_str(gguf_buf *b, const char *s)
{
    put_u64(b, strlen(s));
    put(b, s, strlen(s));
}

static void put_key(gguf_buf *b, const char *key, uint32_t type)
{
    put_str(b, key);
    put_u32(b, type);
    b->n_kv++;
}

static void kv_str(gguf_buf *b, const char *key, const char *v)
{
    put_key(b, key, QKD__GGUF_STRING);
    put_str(b, v);
}

static void kv_u32(gguf_buf *b, const char *key, uint32_t v)
{
    put_key(b, key, QKD__GGUF_U32);
    put_u32(b, v);
}

static void kv_arr(gguf_buf *b, const char *key, uint32_t elem, uint64_t n)
{
    put_key(b, key, QKD__GGUF_ARRAY);
    put_u32(b, elem);
    put_u64(b, n);
}

/* What a test GGUF holds; the defaults make a valid 5-token vocabulary. */
typedef struct gguf_spec {
    const char *model;  /* NULL: no tokenizer.ggml.model */
    int n_tokens;       /* 0: no tokenizer.ggml.tokens */
    int n_scores, n_types;
    int32_t type_of_last;
    uint32_t bos;
} gguf_spec;

static const gguf_spec valid_spec = {"llama", 5, 5, 5, QKD__TOKEN_NORMAL, 1};

static const char *write_gguf(const char *dir, const gguf_spec *s)
{
    static const char *pieces[] = {"<unk>", "<s>", "</s>", "\xe2\x96\x81" "a", "a", "b"};
    gguf_buf body = {.len = 0}, file = {.len = 0};
    if (s->model)
        kv_str(&body, "tokenizer.ggml.model", s->model);
    if (s->n_tokens) {
        kv_arr(&body, "tokenizer.ggml.tokens", QKD__GGUF_STRING, (uint64_t)s->n_tokens);
        for (int i = 0; i < s->n_tokens; i++)
            put_str(&body, pieces[i]);
    }
    kv_arr(&body, "tokenizer.ggml.scores", QKD__GGUF_F32, (uint64_t)s->n_scores);
    for (int i = 0; i < s->n_scores; i++) {
        float score = (float)-i;
        put(&body, &score, 4);
    }
    kv_arr(&body, "tokenizer.ggml.token_type", QKD__GGUF_I32, (uint64_t)s->n_types);
    for (int i = 0; i < s->n_types; i++)
        put_u32(&body, i == s->n_types - 1 ? (uint32_t)s->type_of_last
                                           : i < 3 ? QKD__TOKEN_CONTROL : QKD__TOKEN_NORMAL);
    kv_u32(&body, "tokenizer.ggml.bos_token_id", s->bos);
    put(&file, "GGUF", 4);
    put_u32(&file, 3);
    put_u64(&file, 0);
    put_u64(&file, body.n_kv);
    put(&file, body.data, body.len);
    return write_tmp(dir, "vocab.gguf", file.data, file.len);
}

START_TEST(test_malformed_gguf)
{
    qkd_context *ctx = test_context(1);
    const char *dir = test_tmpdir();
    gguf_spec s = valid_spec;
    qkd_tokenizer *tok = NULL;
    ck_assert_int_eq(qkd_tokenizer_load(ctx, write_gguf(dir, &s), &tok), QKD_OK);
    assert_encodes(tok, "a", (int32_t[]){3}, 1); /* "_a" */
    qkd_tokenizer_free(tok);

    s = valid_spec, s.model = "gpt2";
    expect_load(ctx, write_gguf(dir, &s), QKD_ERR_UNSUPPORTED);
    s = valid_spec, s.model = NULL;
    expect_load(ctx, write_gguf(dir, &s), QKD_ERR_FORMAT);
    s = valid_spec, s.n_scores = 4;
    expect_load(ctx, write_gguf(dir, &s), QKD_ERR_FORMAT);
    s = valid_spec, s.n_tokens = 6;
    expect_load(ctx, write_gguf(dir, &s), QKD_ERR_FORMAT);
    s = valid_spec, s.n_types = 4;
    expect_load(ctx, write_gguf(dir, &s), QKD_ERR_FORMAT);
    s = valid_spec, s.type_of_last = 9;
    expect_load(ctx, write_gguf(dir, &s), QKD_ERR_FORMAT);
    s = valid_spec, s.type_of_last = QKD__TOKEN_BYTE; /* "a" is no <0xNN> */
    expect_load(ctx, write_gguf(dir, &s), QKD_ERR_FORMAT);
    s = valid_spec, s.bos = 5;
    expect_load(ctx, write_gguf(dir, &s), QKD_ERR_FORMAT);
    s = valid_spec, s.bos = UINT32_MAX;
    expect_load(ctx, write_gguf(dir, &s), QKD_ERR_FORMAT);
    s = valid_spec, s.n_tokens = 0;
    expect_load(ctx, write_gguf(dir, &s), QKD_ERR_FORMAT);

    /* Inside: a GGUF without tokenizer.ggml.tokens is NOT_FOUND, unrecorded. */
    qkd_context *fresh = test_context(1);
    qkd__gguf *g = NULL;
    ck_assert_int_eq(qkd__gguf_open(fresh, write_gguf(dir, &s), &g), QKD_OK);
    ck_assert_int_eq(qkd__tokenizer_from_gguf(fresh, g, &tok), QKD_ERR_NOT_FOUND);
    ck_assert_ptr_null(tok);
    ck_assert_str_eq(qkd_context_last_error(fresh), "");
    qkd__gguf_close(g);
    qkd_context_free(fresh);
    qkd_context_free(ctx);
}
END_TEST

/* ---- allocation failures ---------------------------------------------------- */

/* Fail the 1st, 2nd, ... allocation of a load and of an encode until they
 * succeed: each failure is NO_MEMORY and frees everything it took. */
static void fail_each_allocation(const char *rel)
{
    const char *path = test_shared(rel);
    if (!path)
        return;
    test_alloc c;
    qkd_context *ctx = test_counting_context(&c, 1);
    long base = c.live;
    qkd_tokenizer *tok = NULL;
    qkd_status st = QKD_ERR_NO_MEMORY;
    for (long k = 0; st == QKD_ERR_NO_MEMORY; k++) {
        c.n = 0, c.fail_at = k;
        st = qkd_tokenizer_load(ctx, path, &tok);
        ck_assert_msg(st == QKD_OK || (st == QKD_ERR_NO_MEMORY && c.live == base),
                      "%s, allocation %ld: %s, %ld blocks live", rel, k,
                      qkd_status_name(st), c.live - base);
    }
    st = QKD_ERR_NO_MEMORY;
    size_t n;
    int32_t ids[64];
    long loaded = c.live;
    for (long k = 0; st == QKD_ERR_NO_MEMORY; k++) {
        c.n = 0, c.fail_at = k;
        st = qkd_tokenizer_encode(tok, "Once upon a time", 16, 0, ids, 64, &n);
        ck_assert_int_eq(c.live, loaded);
        ck_assert(st == QKD_OK || st == QKD_ERR_NO_MEMORY);
    }
    c.fail_at = -1;
    qkd_tokenizer_free(tok);
    ck_assert_int_eq(c.live, base);
    qkd_context_free(ctx);
}

START_TEST(test_allocation_failures)
{
    fail_each_allocation(TOK512);
    fail_each_allocation(STORIES_GGUF);
}
END_TEST

/* The built-in byte-level tokenizer: every byte string round-trips, a space
 * is one token, and a byte is id 3 + its value. */
START_TEST(test_byte_tokenizer)
{
    qkd_context *ctx = test_context(1);
    qkd_tokenizer *tok = NULL;
    ck_assert_int_eq(qkd_tokenizer_create_bytes(ctx, &tok), QKD_OK);
    ck_assert_int_eq(qkd_tokenizer_vocab_size(tok), QKD_BYTE_VOCAB_SIZE);
    ck_assert_int_eq(qkd_tokenizer_bos(tok), 1);
    ck_assert_int_eq(qkd_tokenizer_eos(tok), 2);

    size_t n;
    int32_t *ids = encode(tok, "a b", 3, 0, &n);
    const int32_t want[] = {259, 3 + 'a', 259, 3 + 'b'}; /* the added leading space */
    assert_ids_eq(ids, n, want, 4, "byte tokenizer 'a b'");
    free(ids);

    const char text[] = "Grüße \xff\x01 end\n\ttab";
    assert_round_trip(tok, text, sizeof text - 1);
    uint64_t state = 7;
    for (int rep = 0; rep < 20; rep++) {
        char buf[64];
        for (size_t i = 0; i < sizeof buf; i++)
            buf[i] = (char)(test_lcg_next(&state) & 0xff);
        assert_round_trip(tok, buf, sizeof buf);
    }
    qkd_tokenizer_free(tok);
    ck_assert_int_eq(qkd_tokenizer_create_bytes(ctx, NULL), QKD_ERR_INVALID_ARG);
    qkd_context_free(ctx);
}
END_TEST

Suite *suite_tokenizer(void)
{
    Suite *s = suite_create("tokenizer");
    TCase *vectors = tcase_create("vectors");
    tcase_set_timeout(vectors, 60);
    tcase_add_test(vectors, test_spm_vectors);
    tcase_add_test(vectors, test_llama2_bin_agrees);
    tcase_add_test(vectors, test_greedy_story);
    tcase_add_test(vectors, test_tok512_round_trip);
    tcase_add_test(vectors, test_gguf_vocab_matches_bin);
    tcase_add_test(vectors, test_long_text);
    tcase_add_test(vectors, test_random_bytes);
    suite_add_tcase(s, vectors);

    TCase *unit = tcase_create("unit");
    tcase_add_test(unit, test_tiny_merges);
    tcase_add_test(unit, test_encode_buffer);
    tcase_add_test(unit, test_byte_tokenizer);
    suite_add_tcase(s, unit);

    TCase *bad = tcase_create("malformed");
    tcase_set_timeout(bad, 60);
    tcase_add_test(bad, test_truncated_bin);
    tcase_add_test(bad, test_malformed_bin);
    tcase_add_test(bad, test_mutated_bin);
    tcase_add_test(bad, test_malformed_gguf);
    tcase_add_test(bad, test_allocation_failures);
    suite_add_tcase(s, bad);
    return s;
}
