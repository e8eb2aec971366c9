/* The one Check runner: every suite, one summary line at the end. */
#include <stdlib.h>

#include "testutil.h"

int main(void)
{
    SRunner *sr = srunner_create(suite_core());
    srunner_add_suite(sr, suite_backend_ref());
    srunner_add_suite(sr, suite_model());
    srunner_add_suite(sr, suite_loaders());
    srunner_add_suite(sr, suite_hf());
    srunner_add_suite(sr, suite_tokenizer());
    srunner_add_suite(sr, suite_generate());
    srunner_add_suite(sr, suite_cli());
    srunner_add_suite(sr, suite_quant());
    srunner_add_suite(sr, suite_loss());
    srunner_add_suite(sr, suite_optim());
    srunner_add_suite(sr, suite_data());
    srunner_add_suite(sr, suite_distill());
    srunner_add_suite(sr, suite_kdqat_golden());
    srunner_add_suite(sr, suite_backend_simd());
    srunner_add_suite(sr, suite_export_hf());
    srunner_add_suite(sr, suite_zeroshot());
    srunner_add_suite(sr, suite_formats());
    srunner_add_suite(sr, suite_export_gguf());
    srunner_add_suite(sr, suite_backend_cuda());
    srunner_add_suite(sr, suite_reliability());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
