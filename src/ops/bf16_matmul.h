/*
 * Products with a frozen bfloat16 weight (an embedding table used as the
 * output head), widened a tile at a time so the float32 matrix never exists.
 */
#ifndef CP_BF16_MATMUL_H
#define CP_BF16_MATMUL_H

#include <stdint.h>

#include "core/error.h"

/* out (N, rows) = inp (N, cols) · Wᵀ for W (rows, cols) in bfloat16.
 * Without memory for the tile buffers it computes one element at a time,
 * so the result is always written. */
void cp_bf16_matmul_forward(float *out, const float *inp, const uint16_t *w, int rows, int cols,
                            int N);

/* dinp (N, cols) += dout (N, rows) · W, with the same fallback. */
void cp_bf16_matmul_backward(float *dinp, const float *dout, const uint16_t *w, int rows,
                             int cols, int N);

#endif
