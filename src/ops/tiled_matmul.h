/*
 * Products with a weight stored in a compact form (NF4 codes, bfloat16),
 * decoded a tile at a time into a per-thread float32 buffer for sgemm, so
 * the whole float32 matrix never exists. Used with the weight frozen: no
 * weight gradient.
 */
#ifndef CP_TILED_MATMUL_H
#define CP_TILED_MATMUL_H

#include "core/error.h"

/* Writes rows r0 .. r0 + n_rows - 1, columns c0 .. c0 + n_cols - 1 of the
 * (rows, cols) matrix weight to tile, (n_rows, n_cols) row-major. */
typedef void (*cp_tile_decoder)(const void *weight, int r0, int n_rows, int c0, int n_cols,
                                float *tile);

/* out (N, rows) = inp (N, cols) · Wᵀ (+ bias (rows), unless NULL). Each
 * OpenMP thread takes a block of W's rows. Returns CP_ERR_NOMEM, with out
 * unchanged, when the tile buffers cannot be allocated. */
cp_status cp_tiled_matmul_forward(float *out, const float *inp, const void *weight, int rows,
                                  int cols, cp_tile_decoder decode, const float *bias, int N,
                                  cp_error *err);

/* dinp (N, cols) += dout (N, rows) · W. Each thread takes a block of dinp's
 * columns, so threads never write the same element. Returns CP_ERR_NOMEM,
 * with dinp unchanged, when the tile buffers cannot be allocated. */
cp_status cp_tiled_matmul_backward(float *dinp, const float *dout, const void *weight, int rows,
                                   int cols, cp_tile_decoder decode, int N, cp_error *err);

#endif
