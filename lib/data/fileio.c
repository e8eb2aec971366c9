/* Binary file helpers: crash-safe writes (temp file, fsync, rename) and
 * bounds-checked little-endian reads. */
#include "data/fileio.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define HOST_BIG_ENDIAN 1
#else
#define HOST_BIG_ENDIAN 0
#endif

uint64_t qkd__fnv1a(uint64_t h, const void *p, size_t n)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= UINT64_C(0x100000001b3);
    }
    return h;
}

/* Reverse the bytes of each 4-byte word in place (big-endian hosts). */
static void swap_words(void *p, size_t n)
{
    unsigned char *b = p;
    for (size_t i = 0; i < n; i++, b += 4) {
        unsigned char t0 = b[0], t1 = b[1];
        b[0] = b[3];
        b[1] = b[2];
        b[2] = t1;
        b[3] = t0;
    }
}

/* ---- writer --------------------------------------------------------------- */

qkd_status qkd__wfile_open(qkd_context *ctx, qkd__wfile *w, const char *path)
{
    memset(w, 0, sizeof *w);
    w->ctx = ctx;
    if (!path || !*path)
        return qkd_context_set_error(ctx, QKD_ERR_INVALID_ARG, "save: empty path");
    size_t len = strlen(path);
    w->tmp = qkd_context_alloc(ctx, len + 5);
    if (!w->tmp)
        return qkd_context_set_error(ctx, QKD_ERR_NO_MEMORY, "%s: out of memory", path);
    memcpy(w->tmp, path, len);
    memcpy(w->tmp + len, ".tmp", 5);
    w->path = path;
    w->hash = QKD__FNV_OFFSET;
    w->f = fopen(w->tmp, "wb");
    if (!w->f) {
        qkd_status st = qkd_context_set_error(ctx, QKD_ERR_IO, "%s: cannot create: %s", w->tmp,
                                              strerror(errno));
        qkd_context_dealloc(ctx, w->tmp);
        w->tmp = NULL;
        return st;
    }
    return QKD_OK;
}

void qkd__wfile_bytes(qkd__wfile *w, const void *p, size_t n)
{
    if (w->failed || n == 0)
        return;
    w->hash = qkd__fnv1a(w->hash, p, n);
    if (fwrite(p, 1, n, w->f) != n)
        w->failed = errno ? errno : EIO;
}

void qkd__wfile_u32(qkd__wfile *w, uint32_t v)
{
    unsigned char b[4];
    for (int i = 0; i < 4; i++)
        b[i] = (unsigned char)(v >> (8 * i));
    qkd__wfile_bytes(w, b, sizeof b);
}

void qkd__wfile_u64(qkd__wfile *w, uint64_t v)
{
    unsigned char b[8];
    for (int i = 0; i < 8; i++)
        b[i] = (unsigned char)(v >> (8 * i));
    qkd__wfile_bytes(w, b, sizeof b);
}

void qkd__wfile_words(qkd__wfile *w, const void *p, size_t n)
{
    if (!HOST_BIG_ENDIAN) {
        qkd__wfile_bytes(w, p, n * 4);
        return;
    }
    unsigned char chunk[4096];
    const unsigned char *src = p;
    for (size_t done = 0; done < n;) {
        size_t k = n - done < sizeof chunk / 4 ? n - done : sizeof chunk / 4;
        memcpy(chunk, src + done * 4, k * 4);
        swap_words(chunk, k);
        qkd__wfile_bytes(w, chunk, k * 4);
        done += k;
    }
}

void qkd__wfile_abort(qkd__wfile *w)
{
    if (w->f)
        fclose(w->f);
    if (w->tmp)
        remove(w->tmp);
    qkd_context_dealloc(w->ctx, w->tmp);
    memset(w, 0, sizeof *w);
}

/* Make the rename itself durable. Best effort: some file systems refuse
 * fsync on a directory, which does not make the data less written. name
 * (a path in that directory) is cut down to the directory's in place, so
 * that nothing is allocated once the file is in place. */
static void sync_dir(char *name)
{
    int fd = open(dirname(name), O_RDONLY | O_DIRECTORY);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
}

qkd_status qkd__wfile_commit(qkd__wfile *w)
{
    const char *step = "write";
    int err = w->failed;
    if (!err && fflush(w->f) != 0)
        err = errno;
    if (!err && fsync(fileno(w->f)) != 0) {
        step = "fsync";
        err = errno;
    }
    if (fclose(w->f) != 0 && !err)
        err = errno;
    w->f = NULL;
    if (!err && rename(w->tmp, w->path) != 0) {
        step = "rename";
        err = errno;
    }
    qkd_status st = QKD_OK;
    if (err) {
        st = qkd_context_set_error(w->ctx, QKD_ERR_IO, "%s: %s failed: %s", w->tmp, step,
                                   strerror(err));
    } else { /* the temporary name is gone: abort must not remove() what is left of it */
        sync_dir(w->tmp);
        qkd_context_dealloc(w->ctx, w->tmp);
        w->tmp = NULL;
    }
    qkd__wfile_abort(w);
    return st;
}

/* ---- reader --------------------------------------------------------------- */

qkd_status qkd__rfile_open(qkd_context *ctx, qkd__rfile *r, const char *path)
{
    memset(r, 0, sizeof *r);
    r->ctx = ctx;
    if (!path)
        return qkd_context_set_error(ctx, QKD_ERR_INVALID_ARG, "load: NULL path");
    r->path = path;
    r->hash = QKD__FNV_OFFSET;
    r->f = fopen(path, "rb");
    struct stat sb;
    if (!r->f || fstat(fileno(r->f), &sb) != 0 || !S_ISREG(sb.st_mode)) {
        qkd_status st = qkd_context_set_error(ctx, QKD_ERR_IO, "%s: cannot open: %s", path,
                                              r->f ? "not a regular file" : strerror(errno));
        qkd__rfile_close(r);
        return st;
    }
    r->size = (uint64_t)sb.st_size;
    return QKD_OK;
}

void qkd__rfile_close(qkd__rfile *r)
{
    if (r->f)
        fclose(r->f);
    r->f = NULL;
}

uint64_t qkd__rfile_left(const qkd__rfile *r)
{
    return r->size - r->off;
}

qkd_status qkd__rfile_bytes(qkd__rfile *r, void *p, size_t n, const char *what)
{
    if (n > qkd__rfile_left(r))
        return qkd_context_set_error(r->ctx, QKD_ERR_FORMAT,
                                     "%s: truncated at byte %llu of %llu: %s needs %zu bytes",
                                     r->path, (unsigned long long)r->off,
                                     (unsigned long long)r->size, what, n);
    if (fread(p, 1, n, r->f) != n)
        return qkd_context_set_error(r->ctx, QKD_ERR_IO, "%s: read error at byte %llu (%s)",
                                     r->path, (unsigned long long)r->off, what);
    r->off += n;
    r->hash = qkd__fnv1a(r->hash, p, n);
    return QKD_OK;
}

qkd_status qkd__rfile_u32(qkd__rfile *r, uint32_t *v, const char *what)
{
    unsigned char b[4];
    qkd_status st = qkd__rfile_bytes(r, b, sizeof b, what);
    if (st != QKD_OK)
        return st;
    *v = 0;
    for (int i = 3; i >= 0; i--)
        *v = (*v << 8) | b[i];
    return QKD_OK;
}

qkd_status qkd__rfile_u64(qkd__rfile *r, uint64_t *v, const char *what)
{
    unsigned char b[8];
    qkd_status st = qkd__rfile_bytes(r, b, sizeof b, what);
    if (st != QKD_OK)
        return st;
    *v = 0;
    for (int i = 7; i >= 0; i--)
        *v = (*v << 8) | b[i];
    return QKD_OK;
}

qkd_status qkd__rfile_words(qkd__rfile *r, void *p, size_t n, const char *what)
{
    if (n > SIZE_MAX / 4)
        return qkd_context_set_error(r->ctx, QKD_ERR_FORMAT, "%s: %s: %zu values is too many",
                                     r->path, what, n);
    qkd_status st = qkd__rfile_bytes(r, p, n * 4, what);
    if (st == QKD_OK && HOST_BIG_ENDIAN)
        swap_words(p, n);
    return st;
}
