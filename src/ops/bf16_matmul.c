/* Products with bfloat16 weights: see bf16_matmul.h. */
#include "ops/bf16_matmul.h"

#include <string.h>

#include "core/dtype.h"
#include "ops/tiled_matmul.h"

/* The weight and its row length, the context widen_tile decodes from. */
typedef struct bf16_matrix {
    const uint16_t *w;
    int cols;
} bf16_matrix;

static void widen_tile(const void *weight, int r0, int n_rows, int c0, int n_cols, float *tile)
{
    const bf16_matrix *m = weight;
    for (int r = 0; r < n_rows; r++)
        cp_dtype_to_f32(CP_DTYPE_BF16, m->w + (size_t)(r0 + r) * m->cols + c0,
                        tile + (size_t)r * n_cols, (size_t)n_cols);
}

static float widen(uint16_t h)
{
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

void cp_bf16_matmul_forward(float *out, const float *inp, const uint16_t *w, int rows, int cols,
                            int N)
{
    bf16_matrix m = {w, cols};
    cp_error err;
    if (cp_tiled_matmul_forward(out, inp, &m, rows, cols, widen_tile, NULL, N, &err) == CP_OK)
        return;
    /* No memory for tiles: one element at a time. */
    for (int n = 0; n < N; n++)
        for (int r = 0; r < rows; r++) {
            float sum = 0;
            for (int c = 0; c < cols; c++)
                sum += inp[(size_t)n * cols + c] * widen(w[(size_t)r * cols + c]);
            out[(size_t)n * rows + r] = sum;
        }
}

void cp_bf16_matmul_backward(float *dinp, const float *dout, const uint16_t *w, int rows,
                             int cols, int N)
{
    bf16_matrix m = {w, cols};
    cp_error err;
    if (cp_tiled_matmul_backward(dinp, dout, &m, rows, cols, widen_tile, N, &err) == CP_OK)
        return;
    for (int n = 0; n < N; n++)
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < cols; c++)
                dinp[(size_t)n * cols + c] +=
                    dout[(size_t)n * rows + r] * widen(w[(size_t)r * cols + c]);
}
