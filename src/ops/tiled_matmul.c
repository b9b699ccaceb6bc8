/* Tile-decoding matrix products: see tiled_matmul.h. */
#include "ops/tiled_matmul.h"

#include <cblas.h>
#include <omp.h>
#include <stdlib.h>

#include "ops/matmul.h"

/* Tiles of W that one thread decodes before each sgemm: TILE_ROWS rows of
 * W by TILE_COLS columns, 128 KiB, well inside a 512 KiB L2 cache. With
 * N = 128 on NF4 W (768, 3072) and (3072, 768), on a shared 2-core AMD
 * EPYC, tiles from 32 x 256 to 128 x 512 all ran as fast as plain float32
 * sgemm within the run-to-run noise (about 10%); 64 x 512 was never the
 * slowest. */
#define TILE_ROWS 64
#define TILE_COLS 512
#define TILE_FLOATS (TILE_ROWS * TILE_COLS)

static void thread_range(int total, int id, int n_threads, int *lo, int *hi)
{
    *lo = (int)((long)total * id / n_threads);
    *hi = (int)((long)total * (id + 1) / n_threads);
}

static int min_int(int a, int b) { return a < b ? a : b; }

/* Allocates one tile buffer per thread that a region of n_threads can use. */
static float *allocate_tiles(int n_threads, cp_error *err)
{
    size_t bytes = (size_t)n_threads * TILE_FLOATS * sizeof(float);
    float *tiles = malloc(bytes);
    if (!tiles)
        cp_error_nomem(err, "matmul tile buffers", bytes);
    return tiles;
}

/* Computes out[:, lo:hi] = inp · W[lo:hi, :]ᵀ (+ bias) a tile at a time:
 * TILE_ROWS rows of W by up to TILE_COLS of its columns, the partial
 * products over column chunks summed by sgemm's beta = 1. */
static void forward_rows(float *out, const float *inp, const void *w, int rows, int cols,
                         cp_tile_decoder decode, const float *bias, int N, int lo, int hi,
                         float *tile)
{
    for (int r0 = lo; r0 < hi; r0 += TILE_ROWS) {
        int n_rows = min_int(TILE_ROWS, hi - r0);
        for (int c0 = 0; c0 < cols; c0 += TILE_COLS) {
            int n_cols = min_int(TILE_COLS, cols - c0);
            decode(w, r0, n_rows, c0, n_cols, tile);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, n_rows, n_cols, 1.0f,
                        inp + c0, cols, tile, n_cols, c0 ? 1.0f : 0.0f, out + r0, rows);
        }
        if (bias)
            for (int n = 0; n < N; n++)
                for (int r = r0; r < r0 + n_rows; r++)
                    out[(size_t)n * rows + r] += bias[r];
    }
}

cp_status cp_tiled_matmul_forward(float *out, const float *inp, const void *weight, int rows,
                                  int cols, cp_tile_decoder decode, const float *bias, int N,
                                  cp_error *err)
{
    cp_blas_single_threaded();
    int parallel = (size_t)N * rows * cols > 32768;
    int n_threads = parallel ? omp_get_max_threads() : 1;
    float *tiles = allocate_tiles(n_threads, err);
    if (!tiles)
        return CP_ERR_NOMEM;

#pragma omp parallel if (parallel) num_threads(n_threads)
    {
        int id = omp_get_thread_num(), lo, hi;
        thread_range(rows, id, omp_get_num_threads(), &lo, &hi);
        forward_rows(out, inp, weight, rows, cols, decode, bias, N, lo, hi,
                     tiles + (size_t)id * TILE_FLOATS);
    }
    free(tiles);
    return CP_OK;
}

/* Accumulates dinp[:, lo:hi] += dout · W[:, lo:hi], undoing out = inp · Wᵀ
 * for inp, a tile of TILE_COLS columns by TILE_ROWS rows of W at a time. */
static void backward_cols(float *dinp, const float *dout, const void *w, int rows, int cols,
                          cp_tile_decoder decode, int N, int lo, int hi, float *tile)
{
    for (int c0 = lo; c0 < hi; c0 += TILE_COLS) {
        int n_cols = min_int(TILE_COLS, hi - c0);
        for (int r0 = 0; r0 < rows; r0 += TILE_ROWS) {
            int n_rows = min_int(TILE_ROWS, rows - r0);
            decode(w, r0, n_rows, c0, n_cols, tile);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, n_cols, n_rows, 1.0f,
                        dout + r0, rows, tile, n_cols, 1.0f, dinp + c0, cols);
        }
    }
}

cp_status cp_tiled_matmul_backward(float *dinp, const float *dout, const void *weight, int rows,
                                   int cols, cp_tile_decoder decode, int N, cp_error *err)
{
    cp_blas_single_threaded();
    int parallel = (size_t)N * rows * cols > 32768;
    int n_threads = parallel ? omp_get_max_threads() : 1;
    float *tiles = allocate_tiles(n_threads, err);
    if (!tiles)
        return CP_ERR_NOMEM;

#pragma omp parallel if (parallel) num_threads(n_threads)
    {
        int id = omp_get_thread_num(), lo, hi;
        thread_range(cols, id, omp_get_num_threads(), &lo, &hi);
        backward_cols(dinp, dout, weight, rows, cols, decode, N, lo, hi,
                      tiles + (size_t)id * TILE_FLOATS);
    }
    free(tiles);
    return CP_OK;
}
