#include "testutil.h"

Suite *suite_backend_simd(void)
{
    return suite_create("backend_simd");
}
