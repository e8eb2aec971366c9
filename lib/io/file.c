/* Whole-file reading for the loaders. */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "io/io.h"

/* The readers in this folder copy little-endian numbers straight out of
 * the files (GGUF, llama2.c and safetensors are all little-endian). */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "libqkd's file readers assume a little-endian host"
#endif

static qkd_status read_all(qkd_context *ctx, const char *path, int fd,
                           uint8_t *buf, size_t len)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = read(fd, buf + done, len - done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return qkd__error(ctx, QKD_ERR_IO, "%s: read failed at byte %zu: %s",
                              path, done, strerror(errno));
        if (n == 0)
            return qkd__error(ctx, QKD_ERR_IO, "%s: file shrank while reading "
                              "(%zu of %zu bytes)", path, done, len);
        done += (size_t)n;
    }
    return QKD_OK;
}

qkd_status qkd__read_file(qkd_context *ctx, const char *path, size_t max_bytes,
                          uint8_t **data, size_t *len)
{
    *data = NULL;
    *len = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return qkd__error(ctx, QKD_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    qkd_status s = QKD_OK;
    if (fstat(fd, &st) != 0)
        s = qkd__error(ctx, QKD_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
    else if (!S_ISREG(st.st_mode))
        s = qkd__error(ctx, QKD_ERR_IO, "%s: not a regular file", path);
    else if ((uint64_t)st.st_size > max_bytes)
        s = qkd__error(ctx, QKD_ERR_FORMAT, "%s: file is %lld bytes, more than the "
                       "%zu-byte limit", path, (long long)st.st_size, max_bytes);
    if (s != QKD_OK) {
        close(fd);
        return s;
    }
    size_t size = (size_t)st.st_size;
    uint8_t *buf = qkd__alloc(ctx, size ? size : 1);
    if (!buf) {
        close(fd);
        return qkd__error(ctx, QKD_ERR_NO_MEMORY, "%s: no memory for %zu bytes", path, size);
    }
    s = read_all(ctx, path, fd, buf, size);
    close(fd);
    if (s != QKD_OK) {
        qkd__free(ctx, buf);
        return s;
    }
    *data = buf;
    *len = size;
    return QKD_OK;
}
