/* 16-bit float formats shared by every reader (GGUF, safetensors) and the
 * writers. */
#ifndef QKD_LIB_HALF_H
#define QKD_LIB_HALF_H

#include <stdint.h>

/* IEEE 754 binary16 to float, exactly: subnormals included; infinities and
 * NaNs (payload kept) map to their float counterparts. */
float qkd__f16_to_f32(uint16_t h);
/* bfloat16 is the top half of a float32. */
float qkd__bf16_to_f32(uint16_t h);

/* float to binary16, rounding to nearest with ties to even as ggml's
 * reference conversion (and the F16C instruction) does: values from 65520
 * up become infinity, results below 2^-14 are subnormal halves (rounded
 * the same way), a NaN stays a NaN with the quiet bit set and the sign and
 * top payload bits kept. */
uint16_t qkd__f32_to_f16(float f);
/* float to bfloat16, rounding to nearest with ties to even (subnormals
 * kept, overflow to infinity); a NaN stays a quiet NaN. */
uint16_t qkd__f32_to_bf16(float f);
/* f rounded to bfloat16 as qkd__f32_to_bf16 does, as a float: what a bf16
 * product reads, or a bf16 buffer holds. */
float qkd__bf16_round(float f);

#endif
