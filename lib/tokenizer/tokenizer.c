/* The sentencepiece BPE tokenizer LLaMA uses: text is split into code
 * points, then the adjacent pair whose concatenation is the best-scoring
 * vocabulary piece is merged until no pair is in the vocabulary; code points
 * left outside the vocabulary fall back to byte tokens <0xNN>.
 *
 * Pieces are kept in two forms: the key, where a space is the U+2581 marker
 * (matching text escaped the same way, so a literal U+2581 in the text means
 * a space, as in sentencepiece), and the text shown to users, with spaces. */
#include "tokenizer/tokenizer.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#define SPACE_MARK "\xe2\x96\x81" /* U+2581, sentencepiece's space */
#define SPACE_MARK_LEN 3

typedef struct token_entry {
    const char *key;  /* spaces as U+2581: what encoding matches */
    size_t key_len;
    const char *text; /* spaces as spaces, NUL-terminated */
    size_t text_len;
    float score;
    uint8_t type;     /* qkd__token_type */
    uint8_t byte;     /* the byte of a BYTE token */
} token_entry;

struct qkd_tokenizer {
    qkd_context *ctx;
    int32_t n, bos, eos, unk;
    token_entry *tokens;
    char *strings;          /* every key and text, in one block */
    int32_t *slots;         /* open-addressing hash of the mergeable keys */
    size_t mask;            /* slot count - 1 (a power of two) */
    size_t max_key_len;
    int32_t byte_token[256]; /* id of <0xNN>, -1 if the vocabulary lacks it */
    char byte_text[512];     /* byte b as the string byte_text + 2b */
};

/* ---- construction ------------------------------------------------------ */

static size_t count_spaces(const char *s, size_t n)
{
    size_t count = 0;
    for (size_t i = 0; i < n; i++)
        count += s[i] == ' ';
    return count;
}

/* Copy s[0..n) to dst replacing each `from` by `to`; returns the length. */
static size_t copy_replace(char *dst, const char *s, size_t n, const char *from,
                           size_t from_len, const char *to, size_t to_len)
{
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        if (i + from_len <= n && memcmp(s + i, from, from_len) == 0) {
            memcpy(dst + o, to, to_len);
            o += to_len;
            i += from_len;
        } else {
            dst[o++] = s[i++];
        }
    }
    return o;
}

static int hex_digit(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

/* The byte of a "<0xNN>" piece, or -1. */
static int parse_byte_piece(const char *s, size_t n)
{
    if (n != 6 || memcmp(s, "<0x", 3) != 0 || s[5] != '>')
        return -1;
    int hi = hex_digit(s[3]), lo = hex_digit(s[4]);
    return hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
}

static uint64_t hash_bytes(const char *s, size_t n)
{
    uint64_t h = 1469598103934665603u; /* FNV-1a */
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211u;
    }
    return h;
}

/* Only these pieces are ever formed from text, as in sentencepiece: a text
 * "<s>" or "<0x41>" is not BOS or a byte token, and unused pieces stay so. */
static bool is_mergeable(uint8_t type)
{
    return type == QKD__TOKEN_NORMAL || type == QKD__TOKEN_USER_DEFINED;
}

/* The mergeable token whose key is s[0..n), or -1. */
static int32_t lookup(const qkd_tokenizer *tok, const char *s, size_t n)
{
    if (n > tok->max_key_len)
        return -1;
    for (size_t i = hash_bytes(s, n) & tok->mask;; i = (i + 1) & tok->mask) {
        int32_t id = tok->slots[i];
        if (id < 0)
            return -1;
        const token_entry *e = &tok->tokens[id];
        if (e->key_len == n && memcmp(e->key, s, n) == 0)
            return id;
    }
}

/* Hash every mergeable key; on duplicate keys the lowest id wins. */
static qkd_status build_index(qkd_tokenizer *tok)
{
    size_t slots = 16;
    while (slots < 2 * (size_t)tok->n)
        slots *= 2;
    tok->slots = qkd__alloc(tok->ctx, slots * sizeof *tok->slots);
    if (!tok->slots)
        return qkd__error(tok->ctx, QKD_ERR_NO_MEMORY, "tokenizer: out of memory for the index");
    memset(tok->slots, 0xff, slots * sizeof *tok->slots); /* all -1 */
    tok->mask = slots - 1;
    for (int32_t id = 0; id < tok->n; id++) {
        const token_entry *e = &tok->tokens[id];
        if (!is_mergeable(e->type) || lookup(tok, e->key, e->key_len) >= 0)
            continue;
        size_t i = hash_bytes(e->key, e->key_len) & tok->mask;
        while (tok->slots[i] >= 0)
            i = (i + 1) & tok->mask;
        tok->slots[i] = id;
        if (e->key_len > tok->max_key_len)
            tok->max_key_len = e->key_len;
    }
    return QKD_OK;
}

static qkd_status check_vocab(qkd_context *ctx, int n, const char *const *pieces,
                              const size_t *lens, const float *scores, int32_t bos,
                              int32_t eos, int32_t unk)
{
    if (!pieces || !lens || !scores)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG, "tokenizer: NULL vocabulary arrays");
    if (n < 1)
        return qkd__error(ctx, QKD_ERR_FORMAT, "tokenizer: empty vocabulary");
    const int32_t ids[3] = {bos, eos, unk};
    const char *names[3] = {"bos", "eos", "unknown"};
    for (int k = 0; k < 3; k++)
        if (ids[k] < 0 || ids[k] >= n)
            return qkd__error(ctx, QKD_ERR_FORMAT,
                              "tokenizer: %s token id %d is out of range (%d tokens)",
                              names[k], (int)ids[k], n);
    for (int i = 0; i < n; i++) {
        if (!pieces[i] && lens[i] > 0)
            return qkd__error(ctx, QKD_ERR_FORMAT, "tokenizer: token %d has no text", i);
        if (isnan(scores[i]))
            return qkd__error(ctx, QKD_ERR_FORMAT, "tokenizer: token %d has a NaN score", i);
    }
    return QKD_OK;
}

/* The type of token id: given, or derived from its piece and the special ids. */
static qkd_status token_type(const qkd_tokenizer *tok, int32_t id, const char *piece,
                             size_t len, const int32_t *types, uint8_t *out)
{
    int byte = parse_byte_piece(piece, len);
    if (!types) {
        if (id == tok->unk)
            *out = QKD__TOKEN_UNKNOWN;
        else if (id == tok->bos || id == tok->eos)
            *out = QKD__TOKEN_CONTROL;
        else
            *out = byte >= 0 ? QKD__TOKEN_BYTE : QKD__TOKEN_NORMAL;
        return QKD_OK;
    }
    if (types[id] < QKD__TOKEN_NORMAL || types[id] > QKD__TOKEN_BYTE)
        return qkd__error(tok->ctx, QKD_ERR_FORMAT, "tokenizer: token %d has unknown type %d",
                          (int)id, (int)types[id]);
    if (types[id] == QKD__TOKEN_BYTE && byte < 0)
        return qkd__error(tok->ctx, QKD_ERR_FORMAT,
                          "tokenizer: token %d is a byte token but its piece is not <0xNN>",
                          (int)id);
    *out = (uint8_t)types[id];
    return QKD_OK;
}

/* Lay out every token's key and text in one block. */
static qkd_status store_pieces(qkd_tokenizer *tok, const char *const *pieces,
                               const size_t *lens)
{
    size_t total = 0;
    for (int32_t i = 0; i < tok->n; i++) {
        size_t spaces = count_spaces(pieces[i], lens[i]);
        size_t need = 2 * lens[i] + 2 * spaces + 1; /* key, text and its NUL */
        if (lens[i] > SIZE_MAX / 4 || need > SIZE_MAX - total)
            return qkd__error(tok->ctx, QKD_ERR_FORMAT, "tokenizer: token %d is too long",
                              (int)i);
        total += need;
    }
    tok->strings = qkd__alloc(tok->ctx, total > 0 ? total : 1);
    if (!tok->strings)
        return qkd__error(tok->ctx, QKD_ERR_NO_MEMORY,
                          "tokenizer: out of memory for %zu bytes of pieces", total);
    char *p = tok->strings;
    for (int32_t i = 0; i < tok->n; i++) {
        token_entry *e = &tok->tokens[i];
        e->key = p;
        e->key_len = copy_replace(p, pieces[i], lens[i], " ", 1, SPACE_MARK, SPACE_MARK_LEN);
        p += e->key_len;
        e->text = p;
        e->text_len = copy_replace(p, pieces[i], lens[i], SPACE_MARK, SPACE_MARK_LEN, " ", 1);
        p[e->text_len] = '\0';
        p += e->text_len + 1;
    }
    return QKD_OK;
}

static qkd_status fill_tokens(qkd_tokenizer *tok, const char *const *pieces,
                              const size_t *lens, const float *scores, const int32_t *types)
{
    qkd_status st = store_pieces(tok, pieces, lens);
    for (int32_t i = 0; i < tok->n && st == QKD_OK; i++) {
        token_entry *e = &tok->tokens[i];
        e->score = scores[i];
        st = token_type(tok, i, pieces[i], lens[i], types, &e->type);
        if (st == QKD_OK && e->type == QKD__TOKEN_BYTE) {
            e->byte = (uint8_t)parse_byte_piece(pieces[i], lens[i]);
            if (tok->byte_token[e->byte] < 0)
                tok->byte_token[e->byte] = i;
        }
    }
    return st;
}

qkd_status qkd__tokenizer_create(qkd_context *ctx, int n, const char *const *pieces,
                                 const size_t *lens, const float *scores,
                                 const int32_t *types, int32_t bos, int32_t eos,
                                 int32_t unk, qkd_tokenizer **out)
{
    if (!out)
        return qkd__error(ctx, QKD_ERR_INVALID_ARG, "tokenizer: NULL out");
    *out = NULL;
    qkd_status st = check_vocab(ctx, n, pieces, lens, scores, bos, eos, unk);
    if (st != QKD_OK)
        return st;
    qkd_tokenizer *tok = qkd__calloc(ctx, 1, sizeof *tok);
    if (!tok)
        return qkd__error(ctx, QKD_ERR_NO_MEMORY, "tokenizer: out of memory");
    tok->ctx = ctx;
    tok->n = n;
    tok->bos = bos;
    tok->eos = eos;
    tok->unk = unk;
    for (int b = 0; b < 256; b++) {
        tok->byte_token[b] = -1;
        tok->byte_text[2 * b] = (char)b;
    }
    tok->tokens = qkd__calloc(ctx, (size_t)n, sizeof *tok->tokens);
    if (!tok->tokens)
        st = qkd__error(ctx, QKD_ERR_NO_MEMORY, "tokenizer: out of memory for %d tokens", n);
    if (st == QKD_OK)
        st = fill_tokens(tok, pieces, lens, scores, types);
    if (st == QKD_OK)
        st = build_index(tok);
    if (st != QKD_OK) {
        qkd_tokenizer_free(tok);
        return st;
    }
    *out = tok;
    return QKD_OK;
}

qkd_status qkd_tokenizer_create_bytes(qkd_context *ctx, qkd_tokenizer **out)
{
    if (!ctx || !out)
        return ctx ? qkd__error(ctx, QKD_ERR_INVALID_ARG, "tokenizer: NULL out")
                   : QKD_ERR_INVALID_ARG;
    enum { N = QKD_BYTE_VOCAB_SIZE };
    char text[N][8];
    const char *pieces[N];
    size_t lens[N];
    float scores[N] = {0};
    int32_t types[N];
    static const char *const special[3] = {"<unk>", "<s>", "</s>"};
    for (int i = 0; i < N; i++) {
        if (i < 3)
            snprintf(text[i], sizeof text[i], "%s", special[i]);
        else if (i < 259)
            snprintf(text[i], sizeof text[i], "<0x%02X>", i - 3);
        else
            snprintf(text[i], sizeof text[i], "%s", SPACE_MARK);
        pieces[i] = text[i];
        lens[i] = strlen(text[i]);
        types[i] = i == 0 ? QKD__TOKEN_UNKNOWN : i < 3 ? QKD__TOKEN_CONTROL
                 : i < 259 ? QKD__TOKEN_BYTE : QKD__TOKEN_NORMAL;
    }
    return qkd__tokenizer_create(ctx, N, pieces, lens, scores, types, 1, 2, 0, out);
}

void qkd_tokenizer_free(qkd_tokenizer *tok)
{
    if (!tok)
        return;
    qkd__free(tok->ctx, tok->slots);
    qkd__free(tok->ctx, tok->strings);
    qkd__free(tok->ctx, tok->tokens);
    qkd__free(tok->ctx, tok);
}

/* ---- queries ------------------------------------------------------------ */

int qkd_tokenizer_vocab_size(const qkd_tokenizer *tok)
{
    return tok ? tok->n : 0;
}

int32_t qkd_tokenizer_bos(const qkd_tokenizer *tok)
{
    return tok ? tok->bos : -1;
}

int32_t qkd_tokenizer_eos(const qkd_tokenizer *tok)
{
    return tok ? tok->eos : -1;
}

const char *qkd_tokenizer_piece(const qkd_tokenizer *tok, int32_t id)
{
    if (!tok || id < 0 || id >= tok->n)
        return NULL;
    return tok->tokens[id].text;
}

void qkd__tokenizer_token(const qkd_tokenizer *tok, int32_t id, qkd__token_info *info)
{
    const token_entry *e = &tok->tokens[id];
    *info = (qkd__token_info){e->key, e->key_len, e->score, (qkd__token_type)e->type};
}

int32_t qkd__tokenizer_unk(const qkd_tokenizer *tok)
{
    return tok->unk;
}

const char *qkd_tokenizer_decode(const qkd_tokenizer *tok, int32_t prev, int32_t token,
                                 size_t *len)
{
    if (len)
        *len = 0;
    if (!tok || token < 0 || token >= tok->n)
        return NULL;
    const token_entry *e = &tok->tokens[token];
    const char *s = e->text;
    size_t n = e->text_len;
    if (e->type == QKD__TOKEN_BYTE) {
        s = tok->byte_text + 2 * e->byte;
        n = 1;
    } else if (e->type == QKD__TOKEN_CONTROL) {
        s = "";  /* BOS/EOS and the like stand for no text */
        n = 0;
    } else if (prev == tok->bos && n > 0 && s[0] == ' ') {
        s++;     /* the space sentencepiece adds at the start */
        n--;
    }
    if (len)
        *len = n;
    return s;
}

/* ---- encoding ------------------------------------------------------------ */

/* A run of the escaped text; merged runs keep the left one's index. */
typedef struct symbol {
    uint32_t off, len;
    int32_t prev, next; /* neighbours in the chain, -1 at the ends */
    int32_t id;         /* the token this run is, -1 if none */
} symbol;

/* A candidate merge of symbol `left` and its next neighbour into token id.
 * It is stale once either side has grown, which len tells. */
typedef struct bigram {
    float score;
    int32_t left;
    uint32_t len;
    int32_t id;
} bigram;

typedef struct encoder {
    const qkd_tokenizer *tok;
    const char *text; /* escaped: a leading marker, spaces as markers */
    symbol *sym;
    int32_t n_sym;
    bigram *heap;     /* binary max-heap by (score, then leftmost) */
    size_t n_heap, cap_heap;
} encoder;

static bool before(const bigram *a, const bigram *b)
{
    return a->score > b->score || (a->score == b->score && a->left < b->left);
}

static void swap_bigrams(bigram *a, bigram *b)
{
    bigram t = *a;
    *a = *b;
    *b = t;
}

static bool heap_push(encoder *enc, bigram b)
{
    if (enc->n_heap == enc->cap_heap) {
        size_t cap = 2 * enc->cap_heap;
        bigram *grown = qkd__alloc(enc->tok->ctx, cap * sizeof *grown);
        if (!grown)
            return false;
        memcpy(grown, enc->heap, enc->n_heap * sizeof *grown);
        qkd__free(enc->tok->ctx, enc->heap);
        enc->heap = grown;
        enc->cap_heap = cap;
    }
    size_t i = enc->n_heap++;
    enc->heap[i] = b;
    while (i > 0 && before(&enc->heap[i], &enc->heap[(i - 1) / 2])) {
        swap_bigrams(&enc->heap[i], &enc->heap[(i - 1) / 2]);
        i = (i - 1) / 2;
    }
    return true;
}

static bigram heap_pop(encoder *enc)
{
    bigram top = enc->heap[0];
    enc->heap[0] = enc->heap[--enc->n_heap];
    for (size_t i = 0;;) {
        size_t best = i, l = 2 * i + 1, r = l + 1;
        if (l < enc->n_heap && before(&enc->heap[l], &enc->heap[best]))
            best = l;
        if (r < enc->n_heap && before(&enc->heap[r], &enc->heap[best]))
            best = r;
        if (best == i)
            break;
        swap_bigrams(&enc->heap[i], &enc->heap[best]);
        i = best;
    }
    return top;
}

/* Queue the merge of symbol left with its next one if the vocabulary has it. */
static bool try_bigram(encoder *enc, int32_t left)
{
    if (left < 0 || enc->sym[left].next < 0)
        return true;
    const symbol *l = &enc->sym[left], *r = &enc->sym[l->next];
    uint32_t len = l->len + r->len;
    int32_t id = lookup(enc->tok, enc->text + l->off, len);
    if (id < 0)
        return true;
    bigram b = {enc->tok->tokens[id].score, left, len, id};
    return heap_push(enc, b);
}

/* Length of the valid UTF-8 sequence at s (n bytes available), or 1 for a
 * byte that does not start one. */
static uint32_t utf8_len(const unsigned char *s, size_t n)
{
    unsigned char c = s[0];
    uint32_t len = c >= 0xc2 && c <= 0xdf ? 2 : c >= 0xe0 && c <= 0xef ? 3
                 : c >= 0xf0 && c <= 0xf4 ? 4 : 1;
    if (len == 1 || len > n)
        return 1;
    /* second-byte limits exclude overlong forms, surrogates and > U+10FFFF */
    unsigned char lo = c == 0xe0 ? 0xa0 : c == 0xf0 ? 0x90 : 0x80;
    unsigned char hi = c == 0xed ? 0x9f : c == 0xf4 ? 0x8f : 0xbf;
    if (s[1] < lo || s[1] > hi)
        return 1;
    for (uint32_t i = 2; i < len; i++)
        if ((s[i] & 0xc0) != 0x80)
            return 1;
    return len;
}

/* One symbol per code point, each looked up as a token. */
static void split_symbols(encoder *enc, size_t len)
{
    const unsigned char *s = (const unsigned char *)enc->text;
    int32_t n = 0;
    for (size_t off = 0; off < len; n++) {
        symbol *sym = &enc->sym[n];
        sym->off = (uint32_t)off;
        sym->len = utf8_len(s + off, len - off);
        sym->prev = n - 1;
        sym->next = n + 1;
        sym->id = lookup(enc->tok, enc->text + off, sym->len);
        off += sym->len;
    }
    enc->sym[n - 1].next = -1;
    enc->n_sym = n;
}

/* Merge the best pair until none is left; false on allocation failure. */
static bool merge_all(encoder *enc)
{
    for (int32_t i = 0; i < enc->n_sym; i++)
        if (!try_bigram(enc, i))
            return false;
    while (enc->n_heap > 0) {
        bigram b = heap_pop(enc);
        symbol *l = &enc->sym[b.left];
        if (l->len == 0 || l->next < 0 || l->len + enc->sym[l->next].len != b.len)
            continue; /* a side was merged since: stale */
        symbol *r = &enc->sym[l->next];
        l->len = b.len;
        l->id = b.id;
        l->next = r->next;
        r->len = 0;
        if (l->next >= 0)
            enc->sym[l->next].prev = b.left;
        if (!try_bigram(enc, l->prev) || !try_bigram(enc, b.left))
            return false;
    }
    return true;
}

static void emit(int32_t id, int32_t *out, size_t cap, size_t *count)
{
    if (*count < cap)
        out[*count] = id;
    (*count)++;
}

static void emit_symbols(const encoder *enc, int32_t *out, size_t cap, size_t *count)
{
    const qkd_tokenizer *tok = enc->tok;
    for (int32_t i = 0; i >= 0; i = enc->sym[i].next) {
        const symbol *s = &enc->sym[i];
        if (s->id >= 0) {
            emit(s->id, out, cap, count);
            continue;
        }
        for (uint32_t k = 0; k < s->len; k++) {
            int32_t b = tok->byte_token[(unsigned char)enc->text[s->off + k]];
            emit(b >= 0 ? b : tok->unk, out, cap, count);
        }
    }
}

/* The text with a leading space, every space as the marker; NULL on OOM. */
static char *escape_text(const qkd_tokenizer *tok, const char *text, size_t len,
                         size_t escaped_len)
{
    char *esc = qkd__alloc(tok->ctx, escaped_len);
    if (esc) {
        memcpy(esc, SPACE_MARK, SPACE_MARK_LEN);
        copy_replace(esc + SPACE_MARK_LEN, text, len, " ", 1, SPACE_MARK, SPACE_MARK_LEN);
    }
    return esc;
}

static qkd_status encode_text(const qkd_tokenizer *tok, const char *text, size_t len,
                              int32_t *out, size_t cap, size_t *count)
{
    /* symbol offsets and indices are 32-bit */
    if (len > INT32_MAX / SPACE_MARK_LEN - 1)
        return qkd__error(tok->ctx, QKD_ERR_INVALID_ARG,
                          "tokenizer: text of %zu bytes is too long to encode at once", len);
    size_t escaped_len = SPACE_MARK_LEN + len + (SPACE_MARK_LEN - 1) * count_spaces(text, len);
    encoder enc = {.tok = tok, .cap_heap = escaped_len};
    char *esc = escape_text(tok, text, len, escaped_len);
    enc.text = esc;
    enc.sym = qkd__alloc(tok->ctx, escaped_len * sizeof *enc.sym);
    enc.heap = qkd__alloc(tok->ctx, enc.cap_heap * sizeof *enc.heap);
    bool ok = esc && enc.sym && enc.heap;
    if (ok) {
        split_symbols(&enc, escaped_len);
        ok = merge_all(&enc);
    }
    if (ok)
        emit_symbols(&enc, out, cap, count);
    qkd__free(tok->ctx, enc.heap);
    qkd__free(tok->ctx, enc.sym);
    qkd__free(tok->ctx, esc);
    if (!ok)
        return qkd__error(tok->ctx, QKD_ERR_NO_MEMORY,
                          "tokenizer: out of memory encoding %zu bytes", len);
    return QKD_OK;
}

qkd_status qkd_tokenizer_encode(const qkd_tokenizer *tok, const char *text, size_t len,
                                unsigned flags, int32_t *out, size_t cap, size_t *n_out)
{
    if (!tok)
        return QKD_ERR_INVALID_ARG;
    if ((!text && len > 0) || (!out && cap > 0) || !n_out ||
        (flags & ~(unsigned)(QKD_ENCODE_BOS | QKD_ENCODE_EOS)))
        return qkd__error(tok->ctx, QKD_ERR_INVALID_ARG,
                          "tokenizer: encode needs text, an output buffer, n_out and "
                          "known flags");
    size_t count = 0;
    if (flags & QKD_ENCODE_BOS)
        emit(tok->bos, out, cap, &count);
    if (len > 0) {
        qkd_status st = encode_text(tok, text, len, out, cap, &count);
        if (st != QKD_OK)
            return st;
    }
    if (flags & QKD_ENCODE_EOS)
        emit(tok->eos, out, cap, &count);
    *n_out = count;
    if (count > cap)
        return qkd__error(tok->ctx, QKD_ERR_RANGE,
                          "tokenizer: the text needs %zu ids, the buffer holds %zu", count, cap);
    return QKD_OK;
}
