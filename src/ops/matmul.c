/* Linear layers through OpenBLAS, with a plain reference kernel beside. */
#include "ops/matmul.h"

#include <cblas.h>
#include <omp.h>
#include <pthread.h>

static void set_one_thread(void) { openblas_set_num_threads(1); }

void cp_blas_single_threaded(void)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, set_one_thread);
}

/* Splits the rows (or, for few rows, the output columns) into one block per
 * OpenMP thread, each a single-threaded sgemm. */
void cp_matmul_forward(float *out, const float *inp, const float *weight, const float *bias,
                       int N, int IC, int OC)
{
    cp_blas_single_threaded();
    int split_rows = N >= 64;
#pragma omp parallel if ((size_t)N * IC * OC > 32768)
    {
        int n_threads = omp_get_num_threads(), id = omp_get_thread_num();
        int total = split_rows ? N : OC;
        int lo = (int)((long)total * id / n_threads), hi = (int)((long)total * (id + 1) / n_threads);
        if (hi > lo && split_rows)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, hi - lo, OC, IC, 1.0f,
                        inp + (size_t)lo * IC, IC, weight, IC, 0.0f, out + (size_t)lo * OC, OC);
        else if (hi > lo)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, hi - lo, IC, 1.0f, inp, IC,
                        weight + (size_t)lo * IC, IC, 0.0f, out + lo, OC);
    }
    if (!bias)
        return;
#pragma omp parallel for if (N > 16)
    for (int n = 0; n < N; n++)
        for (int o = 0; o < OC; o++)
            out[(size_t)n * OC + o] += bias[o];
}

void cp_matmul_forward_ref(float *out, const float *inp, const float *weight, const float *bias,
                           int N, int IC, int OC)
{
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * IC;
        for (int o = 0; o < OC; o++) {
            const float *w = weight + (size_t)o * IC;
            double sum = bias ? bias[o] : 0.0;
            for (int i = 0; i < IC; i++)
                sum += (double)x[i] * w[i];
            out[(size_t)n * OC + o] = (float)sum;
        }
    }
}
