#include "testutil.h"

Suite *suite_distill(void)
{
    return suite_create("distill");
}
