/* Zero-shot evaluation (qkd/eval.h): the readers on every shared task file
 * (counts, gold ranges, a known item), malformed inputs with their line
 * numbers, the per-choice log-likelihoods of stories260K against a
 * double-precision computation written here from the model's logits, the
 * metrics, and `qkd eval --task`. */
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include <qkd/eval.h>

#include "testutil.h"

#define MODEL_BIN "models/stories260K/stories260K.bin"
#define TOK_BIN "models/stories260K/tok512.bin"
#define PIQA "eval/piqa/valid.jsonl"
#define HELLASWAG "eval/hellaswag/hellaswag_val_full.txt.bz2"
#define FOUNDRY(name) "eval/llm-foundry/" name

/* ---- helpers ---- */

/* The decompressed HellaSwag file (owned), or NULL when bzip2 is absent. */
static char *hellaswag_text(size_t *len)
{
    char *path = test_shared_dup(HELLASWAG);
    if (!path)
        return NULL;
    char cmd[4200];
    snprintf(cmd, sizeof cmd, "bzip2 -dc '%s' 2>/dev/null", path);
    free(path);
    FILE *f = popen(cmd, "r");
    ck_assert_ptr_nonnull(f);
    size_t cap = 1 << 20, n = 0;
    char *buf = malloc(cap);
    while ((n += fread(buf + n, 1, cap - n, f)) == cap)
        buf = realloc(buf, cap *= 2);
    if (pclose(f) != 0) {
        fprintf(stderr, "SKIP: bzip2 cannot decompress %s\n", HELLASWAG);
        free(buf);
        return NULL;
    }
    *len = n;
    return buf;
}

static qkd_eval_set *load_set(qkd_context *ctx, qkd_eval_task task, const char *rel)
{
    qkd_eval_set *set = NULL;
    if (task == QKD_EVAL_HELLASWAG) {
        size_t len;
        char *text = hellaswag_text(&len);
        if (!text)
            return NULL;
        qkd_status st = qkd_eval_set_parse(ctx, task, "hellaswag", text, len, NULL, 0, &set);
        test_expect_status(ctx, st, QKD_OK, rel);
        free(text);
        return set;
    }
    char *path = test_shared_dup(rel);
    if (!path)
        return NULL;
    test_expect_status(ctx, qkd_eval_set_load(ctx, task, path, &set), QKD_OK, rel);
    free(path);
    return set;
}

static qkd_eval_item get_item(const qkd_eval_set *set, size_t i)
{
    qkd_eval_item it = {.size = sizeof it};
    ck_assert_int_eq(qkd_eval_set_item(set, i, &it), QKD_OK);
    return it;
}

/* ---- the readers on the shared files ---- */

static const struct {
    qkd_eval_task task;
    const char *file;
    size_t count;        /* the file's items (wc -l; HellaSwag's lines / 6) */
    int n_choices;
    const char *context0;      /* item 0 */
    int gold0;
    const char *continuation0; /* item 0, the gold choice */
} files[] = {
    {QKD_EVAL_PIQA, PIQA, 1838, 2,
     "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:", 0,
     " Provide the guinea pig with a cage full of a few inches of bedding made of ripped "
     "paper strips, you will also need to supply it with a water bottle and a food dish."},
    {QKD_EVAL_PIQA, FOUNDRY("piqa.jsonl"), 1838, 2,
     "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:", 0,
     " Provide the guinea pig with a cage full of a few inches of bedding made of ripped "
     "paper strips, you will also need to supply it with a water bottle and a food dish."},
    {QKD_EVAL_HELLASWAG, HELLASWAG, 10042, 4,
     "Roof shingle removal: A man is sitting on a roof. he", 3,
     " starts pulling up roofing on a roof."},
    {QKD_EVAL_ARC_EASY, FOUNDRY("arc_easy.jsonl"), 2376, 4,
     "Question: Which statement best explains why photosynthesis is the foundation of most "
     "food webs?\nAnswer:", 0, " Sunlight is the source of energy for nearly all ecosystems."},
    {QKD_EVAL_ARC_CHALLENGE, FOUNDRY("arc_challenge.jsonl"), 1172, 4,
     "Question: An astronomer observes that a planet rotates faster after a meteorite impact. "
     "Which is the most likely effect of this increase in rotation?\nAnswer:", 2,
     " Planetary days will become shorter."},
    {QKD_EVAL_BOOLQ, FOUNDRY("boolq.jsonl"), 3270, 2, NULL, -1, NULL},
    {QKD_EVAL_WINOGRANDE, FOUNDRY("winogrande.jsonl"), 1267, 2,
     "Sarah was a much better surgeon than Maria so Maria", 1, " always got the easier cases."},
    {QKD_EVAL_LAMBADA, FOUNDRY("lambada_openai.jsonl"), 5153, 1, NULL, 0, " signs"},
    {QKD_EVAL_MC, FOUNDRY("copa.jsonl"), 100, 2, "The man turned on the faucet, therefore", 1,
     " water flowed from the spout."},
    {QKD_EVAL_MC, FOUNDRY("openbook_qa.jsonl"), 500, 4, "Predators eat", -1, NULL},
    {QKD_EVAL_WINOGRANDE, FOUNDRY("winograd_wsc.jsonl"), 273, 2, NULL, 0, " feared violence."},
};

START_TEST(reader_shared_file)
{
    qkd_context *ctx = test_context(1);
    qkd_eval_set *set = load_set(ctx, files[_i].task, files[_i].file);
    if (!set) {
        qkd_context_free(ctx);
        return;
    }
    ck_assert_uint_eq(qkd_eval_set_size(set), files[_i].count);
    size_t golds[4] = {0};
    size_t last_line = 0;
    for (size_t i = 0; i < files[_i].count; i++) {
        qkd_eval_item it = get_item(set, i);
        ck_assert_int_eq(it.n_choices, files[_i].n_choices);
        ck_assert_int_ge(it.gold, 0);
        ck_assert_int_lt(it.gold, it.n_choices);
        golds[it.gold]++;
        ck_assert_uint_gt(it.line, last_line);
        last_line = it.line;
        for (int c = 0; c < it.n_choices; c++) {
            ck_assert_int_eq(it.continuations[c][0], ' ');
            ck_assert_str_eq(it.continuations[c] + 1, it.choices[c]);
        }
    }
    /* every gold index occurs: the labels are read, not defaulted */
    for (int g = 0; g < files[_i].n_choices && files[_i].count >= 100; g++)
        ck_assert_uint_gt(golds[g], 0);
    qkd_eval_item it0 = get_item(set, 0);
    ck_assert_uint_eq(it0.line, 1);
    if (files[_i].task == QKD_EVAL_BOOLQ) {
        ck_assert(strncmp(it0.contexts[0], "Passage: All biomass", 20) == 0);
        ck_assert_str_eq(it0.contexts[0] + strlen(it0.contexts[0]) - 8, "\nAnswer:");
        ck_assert_str_eq(it0.continuations[0], " no");
        ck_assert_str_eq(it0.continuations[1], " yes");
    }
    if (files[_i].task == QKD_EVAL_LAMBADA)
        ck_assert(strncmp(it0.contexts[0], "In my palm is a clear stone", 27) == 0);
    if (files[_i].task == QKD_EVAL_WINOGRANDE)
        ck_assert_str_ne(it0.contexts[0], it0.contexts[1]);
    if (files[_i].gold0 >= 0)
        ck_assert_int_eq(it0.gold, files[_i].gold0);
    const char *ctx0 = files[_i].context0;
    int g = it0.gold;
    if (ctx0 && files[_i].task == QKD_EVAL_MC && files[_i].gold0 < 0) {
        it0 = get_item(set, 2); /* openbook_qa's third item */
        g = 2;
    }
    if (ctx0)
        ck_assert_str_eq(it0.contexts[g], ctx0);
    if (files[_i].continuation0)
        ck_assert_str_eq(it0.continuations[g], files[_i].continuation0);
    qkd_eval_set_free(set);
    qkd_context_free(ctx);
}
END_TEST

START_TEST(task_names)
{
    for (int t = QKD_EVAL_PIQA; t <= QKD_EVAL_MC; t++) {
        qkd_eval_task back;
        const char *name = qkd_eval_task_name((qkd_eval_task)t);
        ck_assert_ptr_nonnull(name);
        ck_assert_int_eq(qkd_eval_task_from_name(name, &back), QKD_OK);
        ck_assert_int_eq(back, t);
    }
    qkd_eval_task back;
    ck_assert_ptr_null(qkd_eval_task_name((qkd_eval_task)99));
    ck_assert_int_eq(qkd_eval_task_from_name("arc", &back), QKD_ERR_NOT_FOUND);
    ck_assert_int_eq(qkd_eval_task_from_name(NULL, &back), QKD_ERR_INVALID_ARG);
}
END_TEST

/* ---- malformed inputs ---- */

static const struct {
    qkd_eval_task task;
    const char *text;
    const char *labels;
    const char *message; /* what the error must say */
} bad_inputs[] = {
    {QKD_EVAL_ARC_EASY, "{\"query\": \"q\", \"choices\": [\"a\", \"b\"], \"gold\": 0}\n{\"query\": ",
     NULL, "t.jsonl:2: invalid JSON"},
    {QKD_EVAL_ARC_EASY, "\n\n[1, 2]\n", NULL, "t.jsonl:3: not a JSON object"},
    {QKD_EVAL_ARC_EASY, "{\"query\": \"q\", \"choices\": [\"a\", \"b\"], \"gold\": 2}", NULL,
     "t.jsonl:1: gold index 2 is outside 0..1"},
    {QKD_EVAL_BOOLQ, "{\"query\": \"q\", \"choices\": [\"no\", \"yes\"], \"gold\": -1}", NULL,
     "gold index -1"},
    {QKD_EVAL_ARC_CHALLENGE, "{\"query\": \"q\", \"gold\": 0}", NULL,
     "t.jsonl:1: missing field 'choices'"},
    {QKD_EVAL_ARC_EASY, "{\"query\": \"q\", \"choices\": [\"a\", \"b\"], \"gold\": \"1\"}", NULL,
     "bad field 'gold'"},
    {QKD_EVAL_ARC_EASY, "{\"query\": \"q\", \"choices\": [\"a\", 3], \"gold\": 0}", NULL,
     "bad field 'choices'"},
    {QKD_EVAL_ARC_EASY, "{\"query\": \"q\", \"choices\": [\"a\", \"\"], \"gold\": 0}", NULL,
     "choice 1 is empty"},
    {QKD_EVAL_MC, "{\"query\": \"q\", \"choices\": [\"a\"], \"gold\": 0}", NULL,
     "needs at least 2"},
    {QKD_EVAL_WINOGRANDE, "{\"context_options\": [\"a\", \"b\"], \"gold\": 0}", NULL,
     "missing field 'continuation'"},
    {QKD_EVAL_LAMBADA, "{\"context\": \"a b\", \"continuation\": 5}", NULL,
     "bad field 'continuation'"},
    {QKD_EVAL_PIQA, "{\"goal\": \"g\", \"sol1\": \"a\", \"sol2\": \"b\"}", NULL,
     "needs the labels file"},
    {QKD_EVAL_PIQA, "{\"goal\": \"g\", \"sol1\": \"a\", \"sol2\": \"b\"}\n"
                    "{\"goal\": \"g\", \"sol1\": \"a\", \"sol2\": \"b\"}\n", "1\n",
     "t.jsonl:2: no label left"},
    {QKD_EVAL_PIQA, "{\"goal\": \"g\", \"sol1\": \"a\", \"sol2\": \"b\"}\n", "0\n1\n",
     "labels:2: more labels than items"},
    {QKD_EVAL_PIQA, "{\"goal\": \"g\", \"sol1\": \"a\", \"sol2\": \"b\"}\n", "x\n",
     "labels:1: 'x' is not a label"},
    {QKD_EVAL_PIQA, "{\"goal\": \"g\", \"sol1\": \"a\", \"sol2\": \"b\"}\n", "2\n",
     "gold index 2"},
    {QKD_EVAL_HELLASWAG, "ctx\n1\na\nb\nc\nd\nctx2\n", NULL,
     "t.jsonl:7: the item starting here has 1 of its 6 lines"},
    {QKD_EVAL_HELLASWAG, "ctx\nx\na\nb\nc\nd\n", NULL, "t.jsonl:2: gold index 'x'"},
    {QKD_EVAL_HELLASWAG, "ctx\n4\na\nb\nc\nd\n", NULL, "t.jsonl:1: gold index 4"},
    {QKD_EVAL_HELLASWAG, "ctx\n0\na\n\nc\nd\n", NULL, "choice 1 is empty"},
    {QKD_EVAL_ARC_EASY, "\n  \n", NULL, "no items"},
};

START_TEST(reader_malformed)
{
    qkd_context *ctx = test_context(1);
    const char *text = bad_inputs[_i].text, *labels = bad_inputs[_i].labels;
    qkd_eval_set *set = (qkd_eval_set *)&set; /* must be reset to NULL */
    qkd_status st = qkd_eval_set_parse(ctx, bad_inputs[_i].task, "t.jsonl", text, strlen(text),
                                       labels, labels ? strlen(labels) : 0, &set);
    test_expect_status(ctx, st, QKD_ERR_FORMAT, text);
    ck_assert_ptr_null(set);
    ck_assert_msg(strstr(qkd_context_last_error(ctx), bad_inputs[_i].message) != NULL,
                  "message \"%s\" lacks \"%s\"", qkd_context_last_error(ctx),
                  bad_inputs[_i].message);
    qkd_context_free(ctx);
}
END_TEST

START_TEST(reader_good_edge_cases)
{
    qkd_context *ctx = test_context(1);
    /* blank lines are skipped yet counted, CRLF is accepted, the HellaSwag
     * file may end with blank lines */
    const char *jsonl = "\n{\"query\": \"Q\", \"choices\": [\"\xc3\xa9t\xc3\xa9\", \"b\"], "
                        "\"gold\": 1}\r\n\r\n";
    qkd_eval_set *set = NULL;
    test_expect_status(ctx, qkd_eval_set_parse(ctx, QKD_EVAL_ARC_EASY, "t", jsonl, strlen(jsonl),
                                               NULL, 0, &set), QKD_OK, "jsonl");
    ck_assert_uint_eq(qkd_eval_set_size(set), 1);
    qkd_eval_item it = get_item(set, 0);
    ck_assert_uint_eq(it.line, 2);
    ck_assert_str_eq(it.contexts[0], "Q\nAnswer:");
    ck_assert_ptr_eq(it.contexts[0], it.contexts[1]);
    ck_assert_str_eq(it.continuations[0], " \xc3\xa9t\xc3\xa9");
    it.size = 4;
    ck_assert_int_eq(qkd_eval_set_item(set, 0, &it), QKD_ERR_INVALID_ARG);
    it.size = sizeof it;
    ck_assert_int_eq(qkd_eval_set_item(set, 1, &it), QKD_ERR_RANGE);
    qkd_eval_set_free(set);

    const char *hs = "c1\n0\na\nb\nc\nd\nc2\n2\ne\nf\ng\nh\n\n\n";
    test_expect_status(ctx, qkd_eval_set_parse(ctx, QKD_EVAL_HELLASWAG, "h", hs, strlen(hs), NULL,
                                               0, &set), QKD_OK, "hellaswag");
    ck_assert_uint_eq(qkd_eval_set_size(set), 2);
    it = get_item(set, 1);
    ck_assert_uint_eq(it.line, 7);
    ck_assert_int_eq(it.gold, 2);
    ck_assert_str_eq(it.continuations[3], " h");
    qkd_eval_set_free(set);

    ck_assert_int_eq(qkd_eval_set_parse(ctx, (qkd_eval_task)42, "t", "", 0, NULL, 0, &set),
                     QKD_ERR_INVALID_ARG);
    ck_assert_int_eq(qkd_eval_set_parse(ctx, QKD_EVAL_MC, NULL, "", 0, NULL, 0, &set),
                     QKD_ERR_INVALID_ARG);
    test_expect_status(ctx, qkd_eval_set_load(ctx, QKD_EVAL_MC, "/nonexistent/x.jsonl", &set),
                       QKD_ERR_IO, "missing file");
    ck_assert_ptr_null(set);
    qkd_eval_set_free(NULL);
    ck_assert_uint_eq(qkd_eval_set_size(NULL), 0);
    qkd_context_free(ctx);
}
END_TEST

/* ---- scoring against an independent computation ---- */

typedef struct lm {
    qkd_context *ctx;
    qkd_model *model;
    qkd_tokenizer *tok;
} lm;

static bool lm_open(lm *l)
{
    char *model = test_shared_dup(MODEL_BIN), *tok = model ? test_shared_dup(TOK_BIN) : NULL;
    if (!tok) {
        free(model);
        return false;
    }
    l->ctx = test_context(2);
    ck_assert_int_eq(qkd_model_load(l->ctx, model, &l->model), QKD_OK);
    ck_assert_int_eq(qkd_tokenizer_load(l->ctx, tok, &l->tok), QKD_OK);
    free(model);
    free(tok);
    return true;
}

static void lm_close(lm *l)
{
    qkd_tokenizer_free(l->tok);
    qkd_model_free(l->model);
    qkd_context_free(l->ctx);
}

static int32_t *encode(const lm *l, const char *text, size_t len, size_t *n)
{
    size_t cap = 4 * len + 8;
    int32_t *ids = malloc(cap * sizeof *ids);
    ck_assert_int_eq(qkd_tokenizer_encode(l->tok, text, len, 0, ids, cap, n), QKD_OK);
    return ids;
}

/* The definition, step by step: the context's trailing spaces go to the
 * continuation; the continuation's tokens are the whole text's after the
 * context's count; BOS first (always with add_bos); the model reads the
 * sequence minus its last token, keeping the last max_seq_len; each
 * continuation token's log-probability is a log-softmax in double of one
 * row of logits from a B = 1 forward. */
static double reference_ll(const lm *l, const char *context, const char *continuation,
                           int add_bos, int *greedy)
{
    size_t n_ctx_text = strlen(context);
    while (n_ctx_text > 0 && strchr(" \t\n\r\f\v", context[n_ctx_text - 1]))
        n_ctx_text--;
    char *whole = malloc(strlen(context) + strlen(continuation) + 1);
    strcpy(whole, context);
    strcat(whole, continuation);
    size_t n_ctx = 0, n_whole;
    int32_t *ctx_ids = n_ctx_text ? encode(l, context, n_ctx_text, &n_ctx) : NULL;
    int32_t *whole_ids = encode(l, whole, strlen(whole), &n_whole);
    int bos = add_bos || n_ctx_text == 0;
    size_t n = n_whole + (size_t)bos, n_cont = n_whole - n_ctx;
    int32_t *seq = malloc(n * sizeof *seq);
    seq[0] = qkd_tokenizer_bos(l->tok);
    memcpy(seq + bos, whole_ids, n_whole * sizeof *seq);
    qkd_model_config c;
    qkd_model_config_init(&c);
    ck_assert_int_eq(qkd_model_get_config(l->model, &c), QKD_OK);
    size_t skip = n - 1 > (size_t)c.max_seq_len ? n - 1 - (size_t)c.max_seq_len : 0;
    int T = (int)(n - 1 - skip);
    ck_assert_int_eq(qkd_model_forward(l->model, seq + skip, 1, T), QKD_OK);
    float *logits = malloc((size_t)T * c.vocab_size * sizeof *logits);
    ck_assert_int_eq(qkd_model_logits(l->model, logits, (size_t)T * c.vocab_size), QKD_OK);
    double ll = 0.0;
    *greedy = 1;
    for (size_t k = 0; k < n_cont; k++) {
        size_t pos = n - 1 - n_cont + k; /* predicts seq[pos + 1] */
        const float *row = logits + (pos - skip) * c.vocab_size;
        double max = -INFINITY, sum = 0.0;
        int best = 0;
        for (int v = 0; v < c.vocab_size; v++) {
            if (row[v] > max) {
                max = row[v];
                best = v;
            }
        }
        for (int v = 0; v < c.vocab_size; v++)
            sum += exp((double)row[v] - max);
        int32_t target = seq[pos + 1];
        ll += (double)row[target] - (max + log(sum));
        *greedy &= best == target;
    }
    free(logits);
    free(seq);
    free(whole_ids);
    free(ctx_ids);
    free(whole);
    return ll;
}

static size_t code_points(const char *s)
{
    size_t n = 0;
    for (; *s; s++)
        n += ((unsigned char)*s & 0xc0) != 0x80;
    return n;
}

typedef struct expected {
    size_t n;
    double acc, acc_norm, greedy, ll_sum;
} expected;

/* Score items [0, n) both ways and check every choice; tallies what the
 * metrics must be. */
static expected check_items(const lm *l, const qkd_eval_set *set, size_t n, int add_bos)
{
    expected e = {.n = n};
    for (size_t i = 0; i < n; i++) {
        qkd_eval_item it = get_item(set, i);
        double lls[8], ref[8];
        int greedy[8], ref_greedy = 0;
        ck_assert_int_le(it.n_choices, 8);
        test_expect_status(l->ctx, qkd_eval_item_score(l->ctx, l->model, l->tok, set, i, add_bos,
                                                       lls, greedy), QKD_OK, "item_score");
        int best = 0, best_norm = 0;
        for (int c = 0; c < it.n_choices; c++) {
            ref[c] = reference_ll(l, it.contexts[c], it.continuations[c], add_bos, &ref_greedy);
            ck_assert_msg(fabs(lls[c] - ref[c]) <= 1e-4, "item %zu choice %d: %.8f vs %.8f", i,
                          c, lls[c], ref[c]);
            ck_assert_int_eq(greedy[c], ref_greedy);
            ck_assert(ref[c] < 0.0);
            if (ref[c] > ref[best])
                best = c;
            if (ref[c] / code_points(it.choices[c]) >
                ref[best_norm] / code_points(it.choices[best_norm]))
                best_norm = c;
        }
        e.acc += best == it.gold;
        e.acc_norm += best_norm == it.gold;
        e.greedy += ref_greedy;
        e.ll_sum += ref[0];
    }
    e.acc /= (double)n;
    e.acc_norm /= (double)n;
    e.greedy /= (double)n;
    return e;
}

static void check_run(const lm *l, const qkd_eval_set *set, qkd_eval_task task, size_t n,
                      int add_bos)
{
    expected e = check_items(l, set, n, add_bos);
    qkd_eval_params p;
    qkd_eval_params_init(&p);
    p.limit = n;
    p.add_bos = add_bos;
    qkd_eval_result r = {.size = sizeof r};
    test_expect_status(l->ctx, qkd_eval_run(l->ctx, l->model, l->tok, set, &p, &r), QKD_OK, "run");
    ck_assert_uint_eq(r.n_items, n);
    ck_assert_int_eq(r.task, task);
    if (task == QKD_EVAL_LAMBADA) {
        ck_assert_double_eq_tol(r.acc, e.greedy, 1e-12);
        ck_assert_double_eq_tol(r.perplexity, exp(-e.ll_sum / (double)n),
                                1e-6 * r.perplexity);
        ck_assert(isnan(r.acc_norm));
        return;
    }
    ck_assert_double_eq_tol(r.acc, e.acc, 1e-12);
    ck_assert_double_eq_tol(r.acc_norm, e.acc_norm, 1e-12);
    ck_assert_double_eq_tol(r.acc_stderr, sqrt(e.acc * (1 - e.acc) / (double)(n - 1)), 1e-12);
    ck_assert(isnan(r.perplexity));
}

static const struct {
    qkd_eval_task task;
    const char *file;
    size_t n;
} scored[] = {
    {QKD_EVAL_ARC_EASY, FOUNDRY("arc_easy.jsonl"), 6},
    {QKD_EVAL_PIQA, PIQA, 5},
    {QKD_EVAL_HELLASWAG, HELLASWAG, 3},
    {QKD_EVAL_WINOGRANDE, FOUNDRY("winogrande.jsonl"), 5},
    {QKD_EVAL_LAMBADA, FOUNDRY("lambada_openai.jsonl"), 5},
    {QKD_EVAL_MC, FOUNDRY("copa.jsonl"), 5},
};

START_TEST(scores_match_reference)
{
    lm l;
    if (!lm_open(&l))
        return;
    qkd_eval_set *set = load_set(l.ctx, scored[_i].task, scored[_i].file);
    if (set) {
        check_run(&l, set, scored[_i].task, scored[_i].n, 1);
        if (_i == 0)
            check_run(&l, set, scored[_i].task, 3, 0); /* no BOS, as lm-eval's default */
        qkd_eval_set_free(set);
    }
    lm_close(&l);
}
END_TEST

/* A long BoolQ passage through a short window: the sequence keeps its
 * last tokens, as lm-eval truncates. */
START_TEST(scores_truncated_context)
{
    lm l;
    if (!lm_open(&l))
        return;
    qkd_eval_set *set = load_set(l.ctx, QKD_EVAL_BOOLQ, FOUNDRY("boolq.jsonl"));
    if (set) {
        ck_assert_int_eq(qkd_model_set_max_seq_len(l.model, 40), QKD_OK);
        check_run(&l, set, QKD_EVAL_BOOLQ, 2, 1);
        qkd_eval_set_free(set);
    }
    lm_close(&l);
}
END_TEST

START_TEST(single_pair_and_errors)
{
    lm l;
    if (!lm_open(&l))
        return;
    double ll;
    int n_tokens, greedy, ref_greedy;
    const char *context = "Once upon a time, there was a little girl named Lily. ";
    test_expect_status(l.ctx, qkd_eval_loglikelihood(l.ctx, l.model, l.tok, context,
                                                     "She liked to play.", 1, &ll, &n_tokens,
                                                     &greedy), QKD_OK, "pair");
    double ref = reference_ll(&l, context, "She liked to play.", 1, &ref_greedy);
    ck_assert_double_eq_tol(ll, ref, 1e-4);
    ck_assert_int_eq(greedy, ref_greedy);
    ck_assert_int_gt(n_tokens, 2);
    /* an empty context gets BOS even without add_bos */
    test_expect_status(l.ctx, qkd_eval_loglikelihood(l.ctx, l.model, l.tok, "", "Lily", 0, &ll,
                                                     NULL, NULL), QKD_OK, "empty context");
    ck_assert_double_eq_tol(ll, reference_ll(&l, "", "Lily", 0, &ref_greedy), 1e-4);

    test_expect_status(l.ctx, qkd_eval_loglikelihood(l.ctx, l.model, l.tok, "Once", "", 1, &ll,
                                                     NULL, NULL),
                       QKD_ERR_INVALID_ARG, "empty cont");
    test_expect_status(l.ctx, qkd_eval_loglikelihood(l.ctx, l.model, NULL, context, "x", 1, &ll,
                                                     NULL, NULL), QKD_ERR_INVALID_ARG, "NULL tok");
    ck_assert_int_eq(qkd_model_set_max_seq_len(l.model, 4), QKD_OK);
    test_expect_status(l.ctx, qkd_eval_loglikelihood(l.ctx, l.model, l.tok, "a",
                                                     " the little girl was happy and sad", 1, &ll,
                                                     NULL, NULL), QKD_ERR_RANGE, "too long");
    /* a tokenizer larger than the model's vocabulary */
    qkd_model_config c;
    qkd_model_config_init(&c);
    c.vocab_size = 256;
    c.max_seq_len = 16;
    qkd_model *small = NULL;
    ck_assert_int_eq(qkd_model_create(l.ctx, &c, &small), QKD_OK);
    test_expect_status(l.ctx, qkd_eval_loglikelihood(l.ctx, small, l.tok, "a", " b", 1, &ll, NULL,
                                                     NULL), QKD_ERR_SHAPE, "vocab");
    qkd_model_free(small);
    lm_close(&l);
}
END_TEST

static int cancel_after_two(void *user, size_t done, size_t total)
{
    (void)total;
    *(size_t *)user = done;
    return done >= 2;
}

START_TEST(run_params_and_cancel)
{
    lm l;
    if (!lm_open(&l))
        return;
    qkd_eval_set *set = load_set(l.ctx, QKD_EVAL_MC, FOUNDRY("copa.jsonl"));
    if (!set) {
        lm_close(&l);
        return;
    }
    size_t seen = 0;
    qkd_eval_params p;
    qkd_eval_params_init(&p);
    ck_assert_int_eq(p.add_bos, 1);
    ck_assert_uint_eq(p.limit, 0);
    p.progress = cancel_after_two;
    p.progress_user = &seen;
    qkd_eval_result r = {.size = sizeof r};
    test_expect_status(l.ctx, qkd_eval_run(l.ctx, l.model, l.tok, set, &p, &r), QKD_ERR_CANCELLED,
                       "cancel");
    ck_assert_uint_eq(seen, 2);
    ck_assert_uint_eq(r.n_items, 2);
    p.size = 3;
    test_expect_status(l.ctx, qkd_eval_run(l.ctx, l.model, l.tok, set, &p, &r), QKD_ERR_INVALID_ARG,
                       "params size");
    r.size = 0;
    test_expect_status(l.ctx, qkd_eval_run(l.ctx, l.model, l.tok, set, NULL, &r),
                       QKD_ERR_INVALID_ARG,
                       "result size");
    double lls[2];
    test_expect_status(l.ctx, qkd_eval_item_score(l.ctx, l.model, l.tok, set, 100, 1, lls, NULL),
                       QKD_ERR_RANGE, "index");
    qkd_eval_set_free(set);
    lm_close(&l);
}
END_TEST

/* ---- qkd eval --task ---- */

/* Run the qkd tool (QKD_CLI) with args; its stdout and stderr together. */
static char *run_cli(const char *args, int *status)
{
    const char *cli = getenv("QKD_CLI");
    ck_assert_msg(cli && *cli, "QKD_CLI is not set (meson test sets it)");
    size_t len = strlen(cli) + strlen(args) + 16;
    char *cmd = malloc(len);
    snprintf(cmd, len, "'%s' %s 2>&1", cli, args);
    FILE *f = popen(cmd, "r");
    free(cmd);
    ck_assert_ptr_nonnull(f);
    size_t cap = 1 << 16, n = 0;
    char *out = malloc(cap);
    while ((n += fread(out + n, 1, cap - 1 - n, f)) == cap - 1)
        out = realloc(out, cap *= 2);
    out[n] = '\0';
    int w = pclose(f);
    *status = WIFEXITED(w) ? WEXITSTATUS(w) : -1;
    return out;
}

static double metric(const char *out, const char *name)
{
    const char *p = strstr(out, name);
    ck_assert_msg(p != NULL, "no '%s' in: %s", name, out);
    return strtod(p + strlen(name), NULL);
}

START_TEST(cli_task_metrics)
{
    lm l;
    if (!lm_open(&l))
        return;
    char *model = test_shared_dup(MODEL_BIN), *tok = test_shared_dup(TOK_BIN);
    char *data = test_shared_dup(FOUNDRY("arc_easy.jsonl"));
    char args[8192];
    snprintf(args, sizeof args, "eval '%s' --tokenizer '%s' --task arc_easy --data '%s' "
             "--limit 6 --backend ref", model, tok, data);
    int status;
    char *out = run_cli(args, &status);
    ck_assert_msg(status == 0, "qkd eval failed: %s", out);
    qkd_eval_set *set = load_set(l.ctx, QKD_EVAL_ARC_EASY, FOUNDRY("arc_easy.jsonl"));
    qkd_eval_params p;
    qkd_eval_params_init(&p);
    p.limit = 6;
    qkd_eval_result r = {.size = sizeof r};
    ck_assert_int_eq(qkd_eval_run(l.ctx, l.model, l.tok, set, &p, &r), QKD_OK);
    ck_assert_double_eq(metric(out, "items: "), 6);
    ck_assert_double_eq_tol(metric(out, "\nacc: "), r.acc, 1e-4);
    ck_assert_double_eq_tol(metric(out, "acc_norm: "), r.acc_norm, 1e-4);
    free(out);
    qkd_eval_set_free(set);

    /* HellaSwag straight from its .bz2 */
    char *hs = test_shared_dup(HELLASWAG);
    snprintf(args, sizeof args, "eval '%s' --tokenizer '%s' --task hellaswag --data '%s' "
             "--limit 2", model, tok, hs);
    out = run_cli(args, &status);
    ck_assert_msg(status == 0 || strstr(out, "bzip2"), "hellaswag: %s", out);
    if (status == 0)
        ck_assert_double_eq(metric(out, "items: "), 2);
    free(out);

    /* command-line and data errors */
    static const struct {
        const char *args;
        int status;
        const char *says;
    } bad[] = {
        {"--task nope --data x", 2, "unknown task 'nope'"},
        {"--task piqa", 2, "--task needs --data"},
        {"--task piqa --data x --text y", 2, "exclude each other"},
        {"--task piqa --data x --seq 8", 2, "--text only"},
        {"--task piqa --data x --limit -1", 2, "negative"},
        {"--text x --limit 3", 2, "--task only"},
        {"--task piqa --data /nonexistent.jsonl", 1, "QKD_ERR_IO"},
        {"--task hellaswag --data /nonexistent.bz2", 1, "bzip2"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        snprintf(args, sizeof args, "eval '%s' --tokenizer '%s' %s", model, tok, bad[i].args);
        out = run_cli(args, &status);
        ck_assert_msg(status == bad[i].status && strstr(out, bad[i].says),
                      "'%s': status %d, output: %s", bad[i].args, status, out);
        free(out);
    }
    free(hs);
    free(data);
    free(tok);
    free(model);
    lm_close(&l);
}
END_TEST

Suite *suite_zeroshot(void)
{
    Suite *s = suite_create("zeroshot");
    TCase *tc = tcase_create("readers");
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, reader_shared_file, 0, (int)(sizeof files / sizeof files[0]));
    tcase_add_test(tc, task_names);
    tcase_add_loop_test(tc, reader_malformed, 0, (int)(sizeof bad_inputs / sizeof bad_inputs[0]));
    tcase_add_test(tc, reader_good_edge_cases);
    suite_add_tcase(s, tc);

    tc = tcase_create("scoring");
    tcase_set_timeout(tc, 300);
    tcase_add_loop_test(tc, scores_match_reference, 0, (int)(sizeof scored / sizeof scored[0]));
    tcase_add_test(tc, scores_truncated_context);
    tcase_add_test(tc, single_pair_and_errors);
    tcase_add_test(tc, run_params_and_cancel);
    tcase_add_test(tc, cli_task_metrics);
    suite_add_tcase(s, tc);
    return s;
}
