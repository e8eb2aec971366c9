/* SKELETON (temporary, being implemented). */
#include "qkd/optim.h"
#include "core/core.h"

void qkd_optim_params_init(qkd_optim_params *p) { (void)p; }
qkd_status qkd_optimizer_create(qkd_model *model, const qkd_optim_params *p, qkd_optimizer **out)
{ (void)model; (void)p; if (out) *out = NULL; return QKD_ERR_UNSUPPORTED; }
void qkd_optimizer_free(qkd_optimizer *opt) { (void)opt; }
qkd_status qkd_optimizer_set_group(qkd_optimizer *opt, int index, float lr_scale, int frozen)
{ (void)opt; (void)index; (void)lr_scale; (void)frozen; return QKD_ERR_UNSUPPORTED; }
qkd_status qkd_optimizer_apply_preset(qkd_optimizer *opt, unsigned presets)
{ (void)opt; (void)presets; return QKD_ERR_UNSUPPORTED; }
qkd_status qkd_optimizer_step(qkd_optimizer *opt, qkd_step_info *info)
{ (void)opt; (void)info; return QKD_ERR_UNSUPPORTED; }
size_t qkd_optimizer_state_bytes(const qkd_optimizer *opt) { (void)opt; return 0; }
qkd_status qkd_optimizer_state_get(const qkd_optimizer *opt, void *dst, size_t n)
{ (void)opt; (void)dst; (void)n; return QKD_ERR_UNSUPPORTED; }
qkd_status qkd_optimizer_state_set(qkd_optimizer *opt, const void *src, size_t n)
{ (void)opt; (void)src; (void)n; return QKD_ERR_UNSUPPORTED; }
float qkd_optimizer_lr_at(const qkd_optimizer *opt, int64_t t) { (void)opt; (void)t; return 0; }
