"""The shared library, its structures and the prototype of every function
the binding calls.

One loader: the package folder first (a copy of libqkd shipped inside the
package), then QKD_LIB_PATH (a file, or a folder holding libqkd.so.MAJOR),
then the system's search path. The library's major version must equal the
binding's: ABI_MAJOR, the soname's number.
"""
import ctypes
import ctypes.util
import os
from ctypes import (CFUNCTYPE, POINTER, Structure, c_char_p, c_double, c_float,
                    c_int, c_int32, c_int64, c_size_t, c_uint, c_uint64, c_void_p)

ABI_MAJOR = 0
SONAME = "libqkd.so.%d" % ABI_MAJOR
_NAMES = (SONAME, "libqkd.so")


class LibraryNotFound(ImportError):
    """No libqkd could be loaded from any place the loader looks."""


def _candidates():
    """Paths to try, in order, and a description of where they came from."""
    here = os.path.dirname(os.path.abspath(__file__))
    for name in _NAMES:
        path = os.path.join(here, name)
        if os.path.exists(path):
            return [(path, "the package folder")]
    env = os.environ.get("QKD_LIB_PATH")
    if env:
        # An explicit choice is never replaced by another copy.
        if os.path.isdir(env):
            return [(os.path.join(env, name), "QKD_LIB_PATH") for name in _NAMES]
        return [(env, "QKD_LIB_PATH")]
    found = ctypes.util.find_library("qkd")
    return [(found or SONAME, "the system search path")]


def _load():
    tried = []
    for path, origin in _candidates():
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            tried.append("%s (%s): %s" % (path, origin, e))
            continue
        return lib, path
    raise LibraryNotFound("libqkd not found; tried " + "; ".join(tried) +
                          ". Set QKD_LIB_PATH to the library or its folder.")


lib, path = _load()


def _proto(name, restype, *argtypes):
    fn = getattr(lib, name)
    fn.restype = restype
    fn.argtypes = argtypes


class LibraryVersionError(ImportError):
    """The loaded libqkd has another major version than the binding."""


def _check_version():
    """Before anything else is looked up: another major may lack it."""
    # unsigned qkd_version(void);
    _proto("qkd_version", c_uint)
    # const char *qkd_version_string(void);
    _proto("qkd_version_string", c_char_p)
    number = lib.qkd_version()
    if number // 10000 != ABI_MAJOR:
        raise LibraryVersionError(
            "%s is libqkd %s (major %d); this binding needs major %d"
            % (path, lib.qkd_version_string().decode(), number // 10000, ABI_MAJOR))


_check_version()

# ---- opaque handles ----------------------------------------------------------


def _opaque(name):
    return POINTER(type(name, (Structure,), {}))


ContextP = _opaque("qkd_context")
ModelP = _opaque("qkd_model")
TokenizerP = _opaque("qkd_tokenizer")
QuantizerP = _opaque("qkd_quantizer")
LossP = _opaque("qkd_loss")
OptimizerP = _opaque("qkd_optimizer")
DatasetP = _opaque("qkd_dataset")
DistillP = _opaque("qkd_distill")

c_float_p = POINTER(c_float)
c_int32_p = POINTER(c_int32)
status_t = c_int  # qkd_status; C enums are int-sized here

# ---- callbacks -----------------------------------------------------------------

# typedef void *(*qkd_alloc_fn)(void *user, size_t size);
AllocFn = CFUNCTYPE(c_void_p, c_void_p, c_size_t)
# typedef void (*qkd_free_fn)(void *user, void *ptr);
FreeFn = CFUNCTYPE(None, c_void_p, c_void_p)
# typedef void (*qkd_log_fn)(void *user, qkd_log_level level, const char *msg);
LogFn = CFUNCTYPE(None, c_void_p, c_int, c_char_p)
# typedef int (*qkd_progress_fn)(void *user, int64_t done, int64_t total);
ProgressFn = CFUNCTYPE(c_int, c_void_p, c_int64, c_int64)

# ---- structures (field for field as in include/qkd/*.h) -------------------------


class ContextParams(Structure):
    _fields_ = [("size", c_size_t), ("alloc", AllocFn), ("free", FreeFn),
                ("alloc_user", c_void_p), ("log", LogFn), ("log_user", c_void_p),
                ("log_level", c_int), ("n_threads", c_int), ("backend", c_int)]


class ModelConfig(Structure):
    _fields_ = [("size", c_size_t), ("dim", c_int), ("hidden_dim", c_int),
                ("n_layers", c_int), ("n_heads", c_int), ("n_kv_heads", c_int),
                ("vocab_size", c_int), ("max_seq_len", c_int), ("rope_theta", c_float),
                ("norm_eps", c_float), ("tied_embeddings", c_int)]


class TensorInfo(Structure):
    _fields_ = [("size", c_size_t), ("name", c_char_p), ("kind", c_int), ("layer", c_int),
                ("n_dims", c_int), ("shape", c_int64 * 2), ("n_elements", c_int64)]


class GgufParams(Structure):
    _fields_ = [("size", c_size_t), ("type", c_int), ("embd_type", c_int),
                ("name", c_char_p), ("tokenizer", TokenizerP)]


class SafetensorsParams(Structure):
    _fields_ = [("size", c_size_t), ("dtype", c_int), ("as_deployed", c_int)]


class QuantParams(Structure):
    _fields_ = [("size", c_size_t), ("scheme", c_int), ("bits", c_int),
                ("group_size", c_int), ("clip", c_int), ("clip_ratio", c_float),
                ("estimator", c_int), ("round_sharpness", c_float),
                ("clamp_sharpness", c_float), ("act_bits", c_int), ("kv_bits", c_int),
                ("learn_scales", c_int)]


class LossTerm(Structure):
    _fields_ = [("size", c_size_t), ("kind", c_int), ("weight", c_float),
                ("temperature", c_float), ("beta", c_float), ("tsld_tau", c_float),
                ("beta_from_teacher", c_int)]


class OptimParams(Structure):
    _fields_ = [("size", c_size_t), ("kind", c_int), ("lr", c_float), ("beta1", c_float),
                ("beta2", c_float), ("eps", c_float), ("momentum", c_float),
                ("weight_decay", c_float), ("schedule", c_int), ("warmup_steps", c_int64),
                ("total_steps", c_int64), ("min_lr_ratio", c_float),
                ("max_grad_norm", c_float)]


class StepInfo(Structure):
    _fields_ = [("size", c_size_t), ("step", c_int64), ("lr", c_float),
                ("grad_norm", c_float), ("clipped", c_int), ("skipped", c_int)]


class DistillStats(Structure):
    _fields_ = [("size", c_size_t), ("step", c_int64), ("total_steps", c_int64),
                ("loss", c_float), ("lr", c_float), ("grad_norm", c_float),
                ("clipped", c_int), ("skipped", c_int), ("step_seconds", c_double),
                ("tokens_per_s", c_double), ("n_skipped", c_int64), ("bad_streak", c_int64)]


# typedef int (*qkd_distill_fn)(void *user, const qkd_distill_stats *stats);
DistillFn = CFUNCTYPE(c_int, c_void_p, POINTER(DistillStats))


class DistillParams(Structure):
    _fields_ = [("size", c_size_t), ("batch", c_int), ("seq", c_int),
                ("total_steps", c_int64), ("on_step", DistillFn), ("user", c_void_p),
                ("max_bad_steps", c_int)]


# ---- core.h --------------------------------------------------------------------
# const char *qkd_status_name(qkd_status status);
_proto("qkd_status_name", c_char_p, status_t)
# const char *qkd_status_str(qkd_status status);
_proto("qkd_status_str", c_char_p, status_t)
# void qkd_context_params_init(qkd_context_params *params);
_proto("qkd_context_params_init", None, POINTER(ContextParams))
# qkd_status qkd_context_create(const qkd_context_params *params, qkd_context **out);
_proto("qkd_context_create", status_t, POINTER(ContextParams), POINTER(ContextP))
# void qkd_context_free(qkd_context *ctx);
_proto("qkd_context_free", None, ContextP)
# const char *qkd_context_last_error(const qkd_context *ctx);
_proto("qkd_context_last_error", c_char_p, ContextP)
# int qkd_context_n_threads(const qkd_context *ctx);
_proto("qkd_context_n_threads", c_int, ContextP)
# const char *qkd_context_backend_name(const qkd_context *ctx);
_proto("qkd_context_backend_name", c_char_p, ContextP)

# ---- model.h -------------------------------------------------------------------
# void qkd_model_config_init(qkd_model_config *cfg);
_proto("qkd_model_config_init", None, POINTER(ModelConfig))
# qkd_status qkd_model_create(qkd_context *ctx, const qkd_model_config *cfg, qkd_model **out);
_proto("qkd_model_create", status_t, ContextP, POINTER(ModelConfig), POINTER(ModelP))
# qkd_status qkd_model_load(qkd_context *ctx, const char *path, qkd_model **out);
_proto("qkd_model_load", status_t, ContextP, c_char_p, POINTER(ModelP))
# void qkd_model_free(qkd_model *model);
_proto("qkd_model_free", None, ModelP)
# qkd_status qkd_model_get_config(const qkd_model *model, qkd_model_config *cfg);
_proto("qkd_model_get_config", status_t, ModelP, POINTER(ModelConfig))
# int64_t qkd_model_n_params(const qkd_model *model);
_proto("qkd_model_n_params", c_int64, ModelP)
# qkd_status qkd_model_init_random(qkd_model *model, uint64_t seed, float std);
_proto("qkd_model_init_random", status_t, ModelP, c_uint64, c_float)
# int qkd_model_n_tensors(const qkd_model *model);
_proto("qkd_model_n_tensors", c_int, ModelP)
# qkd_status qkd_model_tensor_info(const qkd_model *model, int index, qkd_tensor_info *info);
_proto("qkd_model_tensor_info", status_t, ModelP, c_int, POINTER(TensorInfo))
# qkd_status qkd_model_tensor_find(const qkd_model *model, const char *name, int *index);
_proto("qkd_model_tensor_find", status_t, ModelP, c_char_p, POINTER(c_int))
# qkd_status qkd_model_tensor_get(const qkd_model *model, int index, float *dst, size_t n);
_proto("qkd_model_tensor_get", status_t, ModelP, c_int, c_float_p, c_size_t)
# qkd_status qkd_model_tensor_set(qkd_model *model, int index, const float *src, size_t n);
_proto("qkd_model_tensor_set", status_t, ModelP, c_int, c_float_p, c_size_t)
# qkd_status qkd_model_grad_get(const qkd_model *model, int index, float *dst, size_t n);
_proto("qkd_model_grad_get", status_t, ModelP, c_int, c_float_p, c_size_t)
# qkd_status qkd_model_forward(qkd_model *model, const int32_t *tokens, int B, int T);
_proto("qkd_model_forward", status_t, ModelP, c_int32_p, c_int, c_int)
# qkd_status qkd_model_logits(const qkd_model *model, float *dst, size_t n);
_proto("qkd_model_logits", status_t, ModelP, c_float_p, c_size_t)
# qkd_status qkd_model_cross_entropy(qkd_model *model, const int32_t *targets,
#                                    int compute_grad, float *loss);
_proto("qkd_model_cross_entropy", status_t, ModelP, c_int32_p, c_int, c_float_p)
# qkd_status qkd_model_backward(qkd_model *model, const float *dlogits);
_proto("qkd_model_backward", status_t, ModelP, c_float_p)
# qkd_status qkd_model_zero_grad(qkd_model *model);
_proto("qkd_model_zero_grad", status_t, ModelP)
# qkd_status qkd_model_set_trainable(qkd_model *model, int trainable);
_proto("qkd_model_set_trainable", status_t, ModelP, c_int)
# qkd_status qkd_model_set_logits_rows(qkd_model *model, int rows);
_proto("qkd_model_set_logits_rows", status_t, ModelP, c_int)
# qkd_status qkd_model_set_matmul_precision(qkd_model *model, qkd_matmul_precision precision);
_proto("qkd_model_set_matmul_precision", status_t, ModelP, c_int)
# void qkd_gguf_params_init(qkd_gguf_params *p);
_proto("qkd_gguf_params_init", None, POINTER(GgufParams))
# qkd_status qkd_gguf_type_from_name(const char *name, qkd_gguf_type *out);
_proto("qkd_gguf_type_from_name", status_t, c_char_p, POINTER(c_int))
# qkd_status qkd_model_save_gguf(qkd_model *model, const char *path, const qkd_gguf_params *p);
_proto("qkd_model_save_gguf", status_t, ModelP, c_char_p, POINTER(GgufParams))
# void qkd_safetensors_params_init(qkd_safetensors_params *p);
_proto("qkd_safetensors_params_init", None, POINTER(SafetensorsParams))
# qkd_status qkd_model_save_safetensors(qkd_model *model, const char *dir,
#                                       const qkd_safetensors_params *p);
_proto("qkd_model_save_safetensors", status_t, ModelP, c_char_p, POINTER(SafetensorsParams))

# ---- tokenizer.h ---------------------------------------------------------------
# qkd_status qkd_tokenizer_load(qkd_context *ctx, const char *path, qkd_tokenizer **out);
_proto("qkd_tokenizer_load", status_t, ContextP, c_char_p, POINTER(TokenizerP))
# qkd_status qkd_tokenizer_create_bytes(qkd_context *ctx, qkd_tokenizer **out);
_proto("qkd_tokenizer_create_bytes", status_t, ContextP, POINTER(TokenizerP))
# void qkd_tokenizer_free(qkd_tokenizer *tok);
_proto("qkd_tokenizer_free", None, TokenizerP)
# int qkd_tokenizer_vocab_size(const qkd_tokenizer *tok);
_proto("qkd_tokenizer_vocab_size", c_int, TokenizerP)
# int32_t qkd_tokenizer_bos(const qkd_tokenizer *tok);
_proto("qkd_tokenizer_bos", c_int32, TokenizerP)
# int32_t qkd_tokenizer_eos(const qkd_tokenizer *tok);
_proto("qkd_tokenizer_eos", c_int32, TokenizerP)
# qkd_status qkd_tokenizer_encode(const qkd_tokenizer *tok, const char *text, size_t len,
#                                 unsigned flags, int32_t *out, size_t cap, size_t *n_out);
_proto("qkd_tokenizer_encode", status_t, TokenizerP, c_char_p, c_size_t, c_uint, c_int32_p,
       c_size_t, POINTER(c_size_t))
# const char *qkd_tokenizer_decode(const qkd_tokenizer *tok, int32_t prev, int32_t token,
#                                  size_t *len);
# (a c_void_p result: the text may hold NUL bytes, so it is read with its length)
_proto("qkd_tokenizer_decode", c_void_p, TokenizerP, c_int32, c_int32, POINTER(c_size_t))

# ---- quant.h -------------------------------------------------------------------
# void qkd_quant_params_init(qkd_quant_params *p);
_proto("qkd_quant_params_init", None, POINTER(QuantParams))
# qkd_status qkd_quantizer_create(qkd_context *ctx, const qkd_quant_params *p,
#                                 qkd_quantizer **out);
_proto("qkd_quantizer_create", status_t, ContextP, POINTER(QuantParams), POINTER(QuantizerP))
# void qkd_quantizer_free(qkd_quantizer *q);
_proto("qkd_quantizer_free", None, QuantizerP)
# int64_t qkd_quantizer_n_groups(const qkd_quantizer *q, int64_t rows, int64_t cols);
_proto("qkd_quantizer_n_groups", c_int64, QuantizerP, c_int64, c_int64)
# qkd_status qkd_quantizer_quantize(qkd_quantizer *q, const float *w, int64_t rows,
#                                   int64_t cols, float *wq, int32_t *codes, float *scales,
#                                   float *zeros);
_proto("qkd_quantizer_quantize", status_t, QuantizerP, c_float_p, c_int64, c_int64, c_float_p,
       c_int32_p, c_float_p, c_float_p)
# qkd_status qkd_model_set_quantizer(qkd_model *model, qkd_quantizer *q, unsigned targets);
_proto("qkd_model_set_quantizer", status_t, ModelP, QuantizerP, c_uint)
# qkd_status qkd_quantizer_set_estimator(qkd_quantizer *q, qkd_estimator estimator);
_proto("qkd_quantizer_set_estimator", status_t, QuantizerP, c_int)

# ---- loss.h --------------------------------------------------------------------
# void qkd_loss_term_init(qkd_loss_term *term, qkd_loss_kind kind);
_proto("qkd_loss_term_init", None, POINTER(LossTerm), c_int)
# qkd_status qkd_loss_create(qkd_context *ctx, qkd_loss **out);
_proto("qkd_loss_create", status_t, ContextP, POINTER(LossP))
# void qkd_loss_free(qkd_loss *loss);
_proto("qkd_loss_free", None, LossP)
# qkd_status qkd_loss_add(qkd_loss *loss, const qkd_loss_term *term);
_proto("qkd_loss_add", status_t, LossP, POINTER(LossTerm))
# qkd_status qkd_loss_compute(qkd_loss *loss, qkd_model *student, qkd_model *teacher,
#                             const int32_t *targets, float *value);
_proto("qkd_loss_compute", status_t, LossP, ModelP, ModelP, c_int32_p, c_float_p)
# qkd_status qkd_loss_value(const qkd_loss *loss, float *value);
_proto("qkd_loss_value", status_t, LossP, c_float_p)
# qkd_status qkd_loss_term_value(const qkd_loss *loss, int term, float *value);
_proto("qkd_loss_term_value", status_t, LossP, c_int, c_float_p)

# ---- optim.h -------------------------------------------------------------------
# void qkd_optim_params_init(qkd_optim_params *p);
_proto("qkd_optim_params_init", None, POINTER(OptimParams))
# qkd_status qkd_optimizer_create(qkd_model *model, const qkd_optim_params *p,
#                                 qkd_optimizer **out);
_proto("qkd_optimizer_create", status_t, ModelP, POINTER(OptimParams), POINTER(OptimizerP))
# void qkd_optimizer_free(qkd_optimizer *opt);
_proto("qkd_optimizer_free", None, OptimizerP)
# qkd_status qkd_optimizer_set_group(qkd_optimizer *opt, int index, float lr_scale, int frozen);
_proto("qkd_optimizer_set_group", status_t, OptimizerP, c_int, c_float, c_int)
# qkd_status qkd_optimizer_step(qkd_optimizer *opt, qkd_step_info *info);
_proto("qkd_optimizer_step", status_t, OptimizerP, POINTER(StepInfo))
# qkd_status qkd_optimizer_step_deferred(qkd_optimizer *opt);
_proto("qkd_optimizer_step_deferred", status_t, OptimizerP)
# qkd_status qkd_optimizer_last_step(qkd_optimizer *opt, qkd_step_info *info);
_proto("qkd_optimizer_last_step", status_t, OptimizerP, POINTER(StepInfo))
# float qkd_optimizer_lr_at(const qkd_optimizer *opt, int64_t t);
_proto("qkd_optimizer_lr_at", c_float, OptimizerP, c_int64)

# ---- data.h --------------------------------------------------------------------
# qkd_status qkd_dataset_from_tokens(qkd_context *ctx, const int32_t *ids, size_t n,
#                                    int vocab_size, qkd_dataset **out);
_proto("qkd_dataset_from_tokens", status_t, ContextP, c_int32_p, c_size_t, c_int,
       POINTER(DatasetP))
# qkd_status qkd_dataset_from_text(qkd_context *ctx, const qkd_tokenizer *tok,
#                                  const char *path, qkd_dataset **out);
_proto("qkd_dataset_from_text", status_t, ContextP, TokenizerP, c_char_p, POINTER(DatasetP))
# void qkd_dataset_free(qkd_dataset *ds);
_proto("qkd_dataset_free", None, DatasetP)
# size_t qkd_dataset_n_tokens(const qkd_dataset *ds);
_proto("qkd_dataset_n_tokens", c_size_t, DatasetP)
# qkd_status qkd_dataset_set_split(qkd_dataset *ds, uint64_t seed, int64_t n_eval);
_proto("qkd_dataset_set_split", status_t, DatasetP, c_uint64, c_int64)
# int64_t qkd_dataset_n_windows(const qkd_dataset *ds, int T, qkd_split split);
_proto("qkd_dataset_n_windows", c_int64, DatasetP, c_int, c_int)
# qkd_status qkd_dataset_batch(const qkd_dataset *ds, int64_t step, int B, int T,
#                              int32_t *tokens, int32_t *targets);
_proto("qkd_dataset_batch", status_t, DatasetP, c_int64, c_int, c_int, c_int32_p, c_int32_p)

# ---- distill.h -----------------------------------------------------------------
# void qkd_distill_params_init(qkd_distill_params *p);
_proto("qkd_distill_params_init", None, POINTER(DistillParams))
# qkd_status qkd_distill_create(qkd_context *ctx, qkd_model *teacher, qkd_model *student,
#                               qkd_loss *loss, qkd_optimizer *opt, const qkd_dataset *data,
#                               const qkd_distill_params *p, qkd_distill **out);
_proto("qkd_distill_create", status_t, ContextP, ModelP, ModelP, LossP, OptimizerP, DatasetP,
       POINTER(DistillParams), POINTER(DistillP))
# void qkd_distill_free(qkd_distill *d);
_proto("qkd_distill_free", None, DistillP)
# qkd_status qkd_distill_run(qkd_distill *d, int64_t n_steps);
_proto("qkd_distill_run", status_t, DistillP, c_int64)
# int64_t qkd_distill_step(const qkd_distill *d);
_proto("qkd_distill_step", c_int64, DistillP)
# int64_t qkd_distill_history(const qkd_distill *d, const float **losses);
_proto("qkd_distill_history", c_int64, DistillP, POINTER(c_float_p))
# qkd_status qkd_distill_eval_ce(qkd_context *ctx, qkd_model *model, const qkd_dataset *data,
#                                int B, int T, double *mean_ce, int64_t *n_tokens);
_proto("qkd_distill_eval_ce", status_t, ContextP, ModelP, DatasetP, c_int, c_int,
       POINTER(c_double), POINTER(c_int64))

