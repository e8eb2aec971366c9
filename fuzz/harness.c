/* One libFuzzer harness; FUZZ_TARGET (a string, set by fuzz/meson.build)
 * names the target of targets.c it drives. A broken contract aborts, so
 * libFuzzer keeps the input as a crash. */
#include <stdio.h>
#include <stdlib.h>

#include "targets.h"

#ifndef FUZZ_TARGET
#error "FUZZ_TARGET must name a target"
#endif

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const fuzz_target *t;
    if (!t && !(t = fuzz_target_find(FUZZ_TARGET))) {
        fprintf(stderr, "fuzz: no target %s\n", FUZZ_TARGET);
        abort();
    }
    if (t->run(data, size) == FUZZ_BROKEN)
        abort();
    return 0;
}
