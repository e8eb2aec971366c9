#include "testutil.h"

Suite *suite_loss(void)
{
    return suite_create("loss");
}
