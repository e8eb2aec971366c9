/* Little-endian binary files for the data and distillation layers (token
 * files, checkpoints): a writer that goes through "<path>.tmp", fsync and
 * rename, and a bounds-checked streaming reader. Both keep a running
 * FNV-1a 64 hash of the bytes they pass, for checksums. Public API only. */
#ifndef QKD_LIB_DATA_FILEIO_H
#define QKD_LIB_DATA_FILEIO_H

#include <stdint.h>
#include <stdio.h>

#include <qkd/core.h>

#define QKD__FNV_OFFSET UINT64_C(0xcbf29ce484222325)

/* FNV-1a 64 of n bytes, continuing from h (start with QKD__FNV_OFFSET). */
uint64_t qkd__fnv1a(uint64_t h, const void *p, size_t n);

typedef struct qkd__wfile {
    qkd_context *ctx;
    FILE *f;
    char *tmp;        /* "<path>.tmp" (owned, through ctx's hooks) */
    const char *path; /* borrowed */
    uint64_t hash;
    int failed;       /* a write failed: commit reports IO */
} qkd__wfile;

/* Open "<path>.tmp" for writing. Errors: INVALID_ARG, IO, NO_MEMORY. */
qkd_status qkd__wfile_open(qkd_context *ctx, qkd__wfile *w, const char *path);
void qkd__wfile_bytes(qkd__wfile *w, const void *p, size_t n);
void qkd__wfile_u32(qkd__wfile *w, uint32_t v);
void qkd__wfile_u64(qkd__wfile *w, uint64_t v);
/* Arrays of 4-byte values (int32 or float), written little-endian. */
void qkd__wfile_words(qkd__wfile *w, const void *p, size_t n);
/* Flush, fsync, close and rename over the final path (then fsync the
 * directory). On any failure the temporary file is removed and IO is
 * returned with the reason. */
qkd_status qkd__wfile_commit(qkd__wfile *w);
/* Close and remove the temporary file (after an error of the caller). */
void qkd__wfile_abort(qkd__wfile *w);

typedef struct qkd__rfile {
    qkd_context *ctx;
    FILE *f;
    const char *path; /* borrowed */
    uint64_t size;    /* file size in bytes */
    uint64_t off;     /* bytes read so far */
    uint64_t hash;
} qkd__rfile;

/* Open path for reading. Errors: INVALID_ARG, IO. */
qkd_status qkd__rfile_open(qkd_context *ctx, qkd__rfile *r, const char *path);
void qkd__rfile_close(qkd__rfile *r);
/* Read n bytes of `what`; a short file is FORMAT ("<path>: truncated at
 * byte X: <what> needs N bytes"), a read error IO. */
qkd_status qkd__rfile_bytes(qkd__rfile *r, void *p, size_t n, const char *what);
qkd_status qkd__rfile_u32(qkd__rfile *r, uint32_t *v, const char *what);
qkd_status qkd__rfile_u64(qkd__rfile *r, uint64_t *v, const char *what);
/* n 4-byte little-endian values (int32 or float) into p. */
qkd_status qkd__rfile_words(qkd__rfile *r, void *p, size_t n, const char *what);
/* Bytes left after the current position. */
uint64_t qkd__rfile_left(const qkd__rfile *r);

#endif
