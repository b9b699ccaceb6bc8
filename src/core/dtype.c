/* Element types of stored tensors and conversions to and from float32. */
#include "core/dtype.h"

#include "core/error.h"

#include <math.h>
#include <string.h>

static const struct {
    const char *name;
    size_t size;
} dtype_info[CP_DTYPE_COUNT] = {
    [CP_DTYPE_F32] = {"F32", 4},
    [CP_DTYPE_F16] = {"F16", 2},
    [CP_DTYPE_BF16] = {"BF16", 2},
};

size_t cp_dtype_size(cp_dtype t) { return dtype_info[t].size; }

const char *cp_dtype_name(cp_dtype t) { return dtype_info[t].name; }

int cp_dtype_parse(const char *name, cp_dtype *out)
{
    for (int t = 0; t < CP_DTYPE_COUNT; t++) {
        if (strcmp(name, dtype_info[t].name) == 0) {
            *out = (cp_dtype)t;
            return 0;
        }
    }
    return -1;
}

static float bits_to_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static uint32_t f32_to_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

float cp_bf16_to_f32(uint16_t b) { return bits_to_f32((uint32_t)b << 16); }

uint16_t cp_f32_to_bf16(float f)
{
    uint32_t u = f32_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) /* NaN: keep it quiet, never round to inf */
        return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

float cp_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;

    if (exp == 0x1f) /* inf or NaN */
        return bits_to_f32(sign | 0x7f800000u | (mant << 13));
    if (exp == 0) { /* zero or subnormal: mant * 2^-24 */
        float v = ldexpf((float)mant, -24);
        return sign ? -v : v;
    }
    return bits_to_f32(sign | ((exp + 112) << 23) | (mant << 13));
}

uint16_t cp_f32_to_f16(float f)
{
    uint32_t u = f32_to_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t abs = u & 0x7fffffffu;

    if (abs > 0x7f800000u) /* NaN */
        return sign | 0x7e00u;
    if (abs >= 0x477ff000u) /* rounds to a value past the largest finite half */
        return sign | 0x7c00u;
    if (abs < 0x38800000u) { /* below the smallest normal half: subnormal or zero */
        float a = bits_to_f32(abs);
        return sign | (uint16_t)lrintf(a * 16777216.0f); /* a / 2^-24, ties to even */
    }
    uint32_t rounded = abs + 0xfffu + ((abs >> 13) & 1u);
    return sign | (uint16_t)((rounded - (112u << 23)) >> 13);
}

void cp_dtype_to_f32(cp_dtype t, const void *src, float *dst, size_t n)
{
    const uint16_t *h = src;
    switch (t) {
    case CP_DTYPE_F32:
        memcpy(dst, src, n * sizeof(float));
        break;
    case CP_DTYPE_F16:
        for (size_t i = 0; i < n; i++)
            dst[i] = cp_f16_to_f32(h[i]);
        break;
    case CP_DTYPE_BF16:
        for (size_t i = 0; i < n; i++)
            dst[i] = cp_bf16_to_f32(h[i]);
        break;
    default:
        CP_ASSERT(0 && "unknown dtype");
    }
}
