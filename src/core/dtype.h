/*
 * Element types of stored tensors and conversions to and from float32.
 *
 * Compute is float32 throughout; F16 and BF16 are storage formats that are
 * widened on load. Conversions to F16/BF16 round to nearest even.
 */
#ifndef CP_DTYPE_H
#define CP_DTYPE_H

#include <stddef.h>
#include <stdint.h>

typedef enum cp_dtype {
    CP_DTYPE_F32 = 0,
    CP_DTYPE_F16,
    CP_DTYPE_BF16,
    CP_DTYPE_COUNT,
} cp_dtype;

/* Bytes per element. */
size_t cp_dtype_size(cp_dtype t);

/* The safetensors spelling: "F32", "F16", "BF16". */
const char *cp_dtype_name(cp_dtype t);

/* Parses a safetensors dtype string; returns 0 and sets *out, or -1. */
int cp_dtype_parse(const char *name, cp_dtype *out);

float cp_f16_to_f32(uint16_t h);
float cp_bf16_to_f32(uint16_t b);
uint16_t cp_f32_to_f16(float f);
uint16_t cp_f32_to_bf16(float f);

/* Widens n elements of type t at src into dst. */
void cp_dtype_to_f32(cp_dtype t, const void *src, float *dst, size_t n);

#endif
