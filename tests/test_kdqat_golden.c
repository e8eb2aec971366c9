#include "testutil.h"

Suite *suite_kdqat_golden(void)
{
    return suite_create("kdqat_golden");
}
