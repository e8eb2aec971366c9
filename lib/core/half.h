/* 16-bit float formats shared by every reader (GGUF, safetensors). */
#ifndef QKD_LIB_HALF_H
#define QKD_LIB_HALF_H

#include <stdint.h>

/* IEEE 754 binary16 to float, exactly: subnormals included; infinities and
 * NaNs (payload kept) map to their float counterparts. */
float qkd__f16_to_f32(uint16_t h);
/* bfloat16 is the top half of a float32. */
float qkd__bf16_to_f32(uint16_t h);

#endif
