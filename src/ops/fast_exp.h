/*
 * A fast float exp for softmax loops: exp(x) = 2^n * e^r with
 * r = x - n·ln2 in [-ln2/2, ln2/2] and e^r from a degree-6 Taylor polynomial
 * (relative error below 2e-7 on that range, about 2 ulp). Inputs below -87
 * return 0 and inputs above 88 are clamped, so it never produces inf or a
 * subnormal; softmax inputs are shifted by their maximum and stay <= 0.
 *
 * cp_fast_expf8 does 8 lanes at once through GCC vector extensions, which
 * compile to AVX on CPUs that have it and to pairs of SSE operations otherwise.
 */
#ifndef CP_FAST_EXP_H
#define CP_FAST_EXP_H

#include <stdint.h>
#include <string.h>

typedef float cp_v8sf __attribute__((vector_size(32)));
typedef int32_t cp_v8si __attribute__((vector_size(32)));

#define CP_EXP_LOG2E 1.44269504088896341f
#define CP_EXP_LN2_HI 0.693145751953125f
#define CP_EXP_LN2_LO 1.42860682030941723e-6f

static inline float cp_fast_expf(float x)
{
    float xc = x > 88.0f ? 88.0f : (x < -87.0f ? -87.0f : x);
    float n = __builtin_floorf(xc * CP_EXP_LOG2E + 0.5f);
    float r = xc - n * CP_EXP_LN2_HI - n * CP_EXP_LN2_LO;
    float p = 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;

    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x < -87.0f ? 0.0f : p * scale;
}

static inline cp_v8sf cp_fast_expf8(cp_v8sf x)
{
    const cp_v8sf lo = {-87, -87, -87, -87, -87, -87, -87, -87};
    const cp_v8sf hi = {88, 88, 88, 88, 88, 88, 88, 88};
    cp_v8si above = x > hi, below = x < lo; /* lanes all ones where true */
    cp_v8sf xc = (cp_v8sf)(((cp_v8si)hi & above) | ((cp_v8si)x & ~above));
    xc = (cp_v8sf)(((cp_v8si)lo & below) | ((cp_v8si)xc & ~below));

    /* floor(t): convert truncates toward zero, so step down where that rounded up. */
    cp_v8sf t = xc * CP_EXP_LOG2E + 0.5f;
    cp_v8si ni = __builtin_convertvector(t, cp_v8si);
    ni -= (__builtin_convertvector(ni, cp_v8sf) > t) & 1;
    cp_v8sf n = __builtin_convertvector(ni, cp_v8sf);
    cp_v8sf r = xc - n * CP_EXP_LN2_HI - n * CP_EXP_LN2_LO;
    cp_v8sf p = r * (1.0f / 720) + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;

    cp_v8sf scale = (cp_v8sf)((ni + 127) << 23);
    return (cp_v8sf)((cp_v8si)(p * scale) & ~below); /* 0 below -87 */
}

#endif
