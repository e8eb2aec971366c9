#include "testutil.h"

Suite *suite_optim(void)
{
    return suite_create("optim");
}
