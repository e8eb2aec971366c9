/* The fuzz targets: one per parser of libqkd, driven through the public
 * API exactly as a host would, each checking the library's contract on
 * every input. Shared by the libFuzzer harnesses (harness.c), the seed
 * writer (seeds.c) and the unit test that replays tests/fixtures/fuzz/
 * and the seeds (tests/test_reliability.c). Not thread-safe: one process
 * runs one input at a time. */
#ifndef QKD_FUZZ_TARGETS_H
#define QKD_FUZZ_TARGETS_H

#include <stddef.h>
#include <stdint.h>

/* A target's result that is not a qkd_status: the library broke its
 * contract (a leak, an out-pointer left set on error, an error without a
 * message, a status the API does not document, a failed call on a handle
 * that loaded). The reason is printed on stderr. */
#define FUZZ_BROKEN 1

typedef struct fuzz_target {
    const char *name;
    /* Feed one input: the status of the parse (QKD_OK or an error, <= 0),
     * or FUZZ_BROKEN. */
    int (*run)(const uint8_t *data, size_t size);
    /* Write seed inputs into the existing folder dir, from the files of
     * shared (../shared) and source (the checkout). Returns how many were
     * written, -1 on error (printed). A missing shared file is skipped. */
    int (*seed)(const char *dir, const char *shared, const char *source);
} fuzz_target;

/* Every target, then an entry whose name is NULL. */
extern const fuzz_target fuzz_targets[];

/* The target called name, or NULL. */
const fuzz_target *fuzz_target_find(const char *name);

#endif
