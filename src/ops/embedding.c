/* Token embedding lookup and its backward. */
#include "ops/embedding.h"

#include <stddef.h>
#include <string.h>

#include <omp.h>

void cp_embedding_forward(float *out, const int32_t *ids, const float *table, int N, int C)
{
    for (int n = 0; n < N; n++)
        memcpy(out + (size_t)n * C, table + (size_t)ids[n] * C, (size_t)C * sizeof *out);
}

/* dtable is (V, C), dout (N, C). Undoes the row copy of the forward. A token
 * repeated in ids adds into the same dtable row, so threads split the columns
 * rather than the rows, each thread walking every row of dout. */
void cp_embedding_backward(float *dtable, const float *dout, const int32_t *ids, int N, int C)
{
#pragma omp parallel if ((size_t)N * C > 65536)
    {
        int n_threads = omp_get_num_threads(), id = omp_get_thread_num();
        int lines = (C + 15) / 16; /* blocks of 16 columns: 64-byte lines */
        int lo = 16 * (lines * id / n_threads), hi = 16 * (lines * (id + 1) / n_threads);
        hi = hi < C ? hi : C;
        for (int n = 0; n < N; n++) {
            float *row = dtable + (size_t)ids[n] * C;
            const float *g = dout + (size_t)n * C;
#pragma omp simd
            for (int i = lo; i < hi; i++)
                row[i] += g[i];
        }
    }
}
