/* Internal loaders: one per file format, dispatched by qkd_model_load and
 * qkd_tokenizer_load from the file's content. */
#ifndef QKD_LIB_IO_H
#define QKD_LIB_IO_H

#include "qkd/model.h"
#include "qkd/tokenizer.h"
#include "core/core.h"
#include "io/gguf.h"

qkd_status qkd__load_llama2c(qkd_context *ctx, const char *path, qkd_model **out);
qkd_status qkd__load_gguf(qkd_context *ctx, const char *path, qkd_model **out);
/* path: a folder with config.json and *.safetensors, or a .safetensors
 * file with config.json beside it. */
qkd_status qkd__load_hf(qkd_context *ctx, const char *path, qkd_model **out);
/* The Hugging Face LlamaForCausalLM name of one of our tensors
 * ("model.layers.3.self_attn.q_proj.weight"), for the reader and the
 * writer; defined in load_hf.c. */
void qkd__hf_tensor_name(const qkd_tensor_info *info, char *buf, size_t n);

qkd_status qkd__tokenizer_load_llama2c(qkd_context *ctx, const char *path,
                                       qkd_tokenizer **out);
/* The tokenizer in a GGUF's tokenizer.ggml.* keys; NOT_FOUND (not
 * recorded) if the file carries none. */
qkd_status qkd__tokenizer_from_gguf(qkd_context *ctx, const qkd__gguf *g,
                                    qkd_tokenizer **out);

/* FORMAT (recorded) when cfg describes far more weights than the `held`
 * elements of the file's tensors: loaders call it before allocating the
 * model, so that a few header bytes cannot make them allocate and zero
 * gigabytes. The margin leaves small mismatches to their precise checks. */
qkd_status qkd__check_backed(qkd_context *ctx, const char *path, const qkd_model_config *cfg,
                             uint64_t held);

/* Read a whole file into owned memory (qkd__free), refusing files larger
 * than max_bytes (FORMAT). IO/NO_MEMORY recorded on ctx with the path. */
qkd_status qkd__read_file(qkd_context *ctx, const char *path, size_t max_bytes,
                          uint8_t **data, size_t *len);

#endif
