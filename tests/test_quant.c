#include "testutil.h"

Suite *suite_quant(void)
{
    return suite_create("quant");
}
