#include <math.h>
#include <string.h>

#include "core/half.h"

float qkd__f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t mant = h & 0x3ff;
    if (exp == 0) {
        float f = ldexpf((float)mant, -24);
        return sign ? -f : f;
    }
    uint32_t bits = exp == 0x1f ? sign | 0x7f800000u | mant << 13
                                : sign | (exp + 112) << 23 | mant << 13;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

float qkd__bf16_to_f32(uint16_t h)
{
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

float qkd__bf16_round(float f)
{
    return qkd__bf16_to_f32(qkd__f32_to_bf16(f));
}

/* m >> s (s >= 1), rounding to nearest with ties to even. */
static uint32_t shift_rne(uint32_t m, unsigned s)
{
    uint32_t q = m >> s, rem = m & ((1u << s) - 1), half = 1u << (s - 1);
    return q + (rem > half || (rem == half && (q & 1)));
}

uint16_t qkd__f32_to_f16(float f)
{
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    const uint32_t ax = x & 0x7fffffffu, exp = ax >> 23;
    if (ax > 0x7f800000u) /* NaN */
        return sign | 0x7e00 | (uint16_t)((ax >> 13) & 0x1ff);
    if (ax >= 0x477ff000u) /* 65520 and up (65504 + half an ulp ties to even) */
        return sign | 0x7c00;
    if (exp >= 113) /* normal half: round the low 13 bits away */
        return sign | (uint16_t)(shift_rne(ax - (112u << 23), 13));
    if (exp < 102) /* below 2^-25: rounds to zero */
        return sign;
    /* subnormal half: units of 2^-24; a carry gives the smallest normal */
    return sign | (uint16_t)shift_rne((ax & 0x7fffffu) | 0x800000u, 126 - exp);
}

uint16_t qkd__f32_to_bf16(float f)
{
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    if ((x & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((x >> 16) | 0x40);
    return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1)) >> 16);
}
