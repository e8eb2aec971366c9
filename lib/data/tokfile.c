/* Token files (docs/formats.md, "Token file"): "QKDT", u32 version, u32
 * vocabulary size, u32 flags (0), u64 count, int32 ids[count]. */
#include <stdlib.h>
#include <string.h>

#include "data/dataset.h"
#include "data/fileio.h"

#define TOKFILE_VERSION 1u
#define TOKFILE_HEADER 24u

static const unsigned char tokfile_magic[4] = {'Q', 'K', 'D', 'T'};

qkd_status qkd_dataset_save(const qkd_dataset *ds, const char *path)
{
    if (!ds)
        return QKD_ERR_INVALID_ARG;
    qkd__wfile w;
    qkd_status st = qkd__wfile_open(ds->ctx, &w, path);
    if (st != QKD_OK)
        return st;
    qkd__wfile_bytes(&w, tokfile_magic, sizeof tokfile_magic);
    qkd__wfile_u32(&w, TOKFILE_VERSION);
    qkd__wfile_u32(&w, (uint32_t)ds->vocab_size);
    qkd__wfile_u32(&w, 0);
    qkd__wfile_u64(&w, ds->n);
    qkd__wfile_words(&w, ds->ids, ds->n);
    return qkd__wfile_commit(&w);
}

/* Check the header; *count and *vocab on success. */
static qkd_status read_header(qkd__rfile *r, uint64_t *count, uint32_t *vocab)
{
    unsigned char magic[4];
    uint32_t version, flags;
    qkd_status st = qkd__rfile_bytes(r, magic, sizeof magic, "magic");
    if (st != QKD_OK)
        return st;
    if (memcmp(magic, tokfile_magic, sizeof magic) != 0)
        return qkd_context_set_error(r->ctx, QKD_ERR_FORMAT,
                                     "%s: not a token file (magic is not QKDT)", r->path);
    if ((st = qkd__rfile_u32(r, &version, "version")) != QKD_OK ||
        (st = qkd__rfile_u32(r, vocab, "vocabulary size")) != QKD_OK ||
        (st = qkd__rfile_u32(r, &flags, "flags")) != QKD_OK ||
        (st = qkd__rfile_u64(r, count, "token count")) != QKD_OK)
        return st;
    if (version != TOKFILE_VERSION)
        return qkd_context_set_error(r->ctx, version > TOKFILE_VERSION ? QKD_ERR_UNSUPPORTED
                                                                       : QKD_ERR_FORMAT,
                                     "%s: token file version %u (this library reads %u)",
                                     r->path, version, TOKFILE_VERSION);
    if (*vocab < 1 || *vocab > INT32_MAX)
        return qkd_context_set_error(r->ctx, QKD_ERR_FORMAT,
                                     "%s: vocabulary size %u at byte 8 is invalid", r->path,
                                     *vocab);
    if (flags != 0)
        return qkd_context_set_error(r->ctx, QKD_ERR_FORMAT,
                                     "%s: flags 0x%x at byte 12 must be 0", r->path, flags);
    if (*count > qkd__rfile_left(r) / 4 || *count * 4 != qkd__rfile_left(r))
        return qkd_context_set_error(
            r->ctx, QKD_ERR_FORMAT, "%s: %llu tokens need %llu bytes of ids, the file has %llu",
            r->path, (unsigned long long)*count, (unsigned long long)*count * 4,
            (unsigned long long)qkd__rfile_left(r));
    return QKD_OK;
}

/* Ids out of range are a malformed file here, not a caller's mistake. */
static qkd_status check_ids(const qkd__rfile *r, const int32_t *ids, size_t n, uint32_t vocab)
{
    for (size_t i = 0; i < n; i++)
        if (ids[i] < 0 || (uint32_t)ids[i] >= vocab)
            return qkd_context_set_error(r->ctx, QKD_ERR_FORMAT,
                                         "%s: token %d at byte %zu is outside the vocabulary of %u",
                                         r->path, ids[i], TOKFILE_HEADER + 4 * i, vocab);
    return QKD_OK;
}

qkd_status qkd_dataset_load(qkd_context *ctx, const char *path, qkd_dataset **out)
{
    if (out)
        *out = NULL;
    if (!ctx || !path || !out)
        return qkd_context_set_error(ctx, QKD_ERR_INVALID_ARG, "dataset: NULL argument");
    qkd__rfile r;
    qkd_status st = qkd__rfile_open(ctx, &r, path);
    if (st != QKD_OK)
        return st;
    uint64_t count = 0;
    uint32_t vocab = 0;
    int32_t *ids = NULL;
    st = read_header(&r, &count, &vocab);
    if (st == QKD_OK && count > SIZE_MAX / sizeof *ids)
        st = qkd_context_set_error(ctx, QKD_ERR_NO_MEMORY, "%s: %llu tokens do not fit in memory",
                                   path, (unsigned long long)count);
    if (st == QKD_OK && !(ids = qkd_context_alloc(ctx, (size_t)count * sizeof *ids)))
        st = qkd_context_set_error(ctx, QKD_ERR_NO_MEMORY, "%s: out of memory for %llu tokens",
                                   path, (unsigned long long)count);
    if (st == QKD_OK)
        st = qkd__rfile_words(&r, ids, (size_t)count, "token ids");
    if (st == QKD_OK)
        st = check_ids(&r, ids, (size_t)count, vocab);
    qkd__rfile_close(&r);
    if (st != QKD_OK) {
        qkd_context_dealloc(ctx, ids);
        return st;
    }
    return qkd__dataset_adopt(ctx, ids, (size_t)count, (int)vocab, out);
}
