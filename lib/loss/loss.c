/* SKELETON: being implemented. */
#include "qkd/loss.h"
#include "core/core.h"

void qkd_loss_term_init(qkd_loss_term *term, qkd_loss_kind kind) { (void)term; (void)kind; }
qkd_status qkd_loss_create(qkd_context *ctx, qkd_loss **out)
{ *out = NULL; return qkd__error(ctx, QKD_ERR_UNSUPPORTED, "loss: not yet"); }
void qkd_loss_free(qkd_loss *loss) { (void)loss; }
qkd_status qkd_loss_add(qkd_loss *loss, const qkd_loss_term *term) { (void)loss; (void)term; return QKD_ERR_UNSUPPORTED; }
qkd_status qkd_loss_set_beta(qkd_loss *loss, int term, float beta) { (void)loss; (void)term; (void)beta; return QKD_ERR_UNSUPPORTED; }
qkd_status qkd_loss_compute(qkd_loss *loss, qkd_model *student, qkd_model *teacher, const int32_t *targets, float *value)
{ (void)loss; (void)student; (void)teacher; (void)targets; (void)value; return QKD_ERR_UNSUPPORTED; }
qkd_status qkd_loss_term_value(const qkd_loss *loss, int term, float *value) { (void)loss; (void)term; (void)value; return QKD_ERR_UNSUPPORTED; }
qkd_status qkd_loss_teacher_confidence(qkd_model *teacher, const int32_t *targets, float *confidence)
{ (void)teacher; (void)targets; (void)confidence; return QKD_ERR_UNSUPPORTED; }
