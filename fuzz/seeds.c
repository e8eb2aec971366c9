/* qkd-fuzz-seeds OUT SHARED SOURCE: write every target's seed corpus into
 * OUT/<target>/ from the real files of SHARED (../shared) and SOURCE (the
 * checkout), and inputs made with the library itself (checkpoints, token
 * files, tiny models). Run at fuzzing time: seeds are never committed. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "targets.h"

static int make_dir(const char *path)
{
    if (mkdir(path, 0755) == 0 || errno == EEXIST)
        return 0;
    fprintf(stderr, "qkd-fuzz-seeds: cannot create %s: %s\n", path, strerror(errno));
    return -1;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: qkd-fuzz-seeds OUT SHARED SOURCE\n");
        return 2;
    }
    if (make_dir(argv[1]) != 0)
        return 1;
    int rc = 0;
    for (const fuzz_target *t = fuzz_targets; t->name; t++) {
        char dir[4096];
        snprintf(dir, sizeof dir, "%s/%s", argv[1], t->name);
        int n = make_dir(dir) == 0 ? t->seed(dir, argv[2], argv[3]) : -1;
        if (n < 0) {
            fprintf(stderr, "qkd-fuzz-seeds: %s: cannot write its seeds\n", t->name);
            rc = 1;
        } else {
            printf("%-12s %d seeds\n", t->name, n);
        }
    }
    return rc;
}
