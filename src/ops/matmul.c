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

/* Sets [lo, hi) to the block of total items that thread id of n_threads takes. */
static void thread_range(int total, int id, int n_threads, int *lo, int *hi)
{
    *lo = (int)((long)total * id / n_threads);
    *hi = (int)((long)total * (id + 1) / n_threads);
}

/* Computes thread id's share of dinp (N, IC) += dout (N, OC) · W (OC, IC),
 * undoing out = inp · Wᵀ for inp: a block of rows, or of columns when there
 * are too few rows to share out. */
static void dinp_block(float *dinp, const float *dout, const float *weight, int N, int IC,
                       int OC, int id, int n_threads)
{
    int lo, hi;
    if (N >= 64) {
        thread_range(N, id, n_threads, &lo, &hi);
        if (hi > lo)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, hi - lo, IC, OC, 1.0f,
                        dout + (size_t)lo * OC, OC, weight, IC, 1.0f, dinp + (size_t)lo * IC,
                        IC);
        return;
    }
    thread_range(IC, id, n_threads, &lo, &hi);
    if (hi > lo)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, hi - lo, OC, 1.0f, dout, OC,
                    weight + lo, IC, 1.0f, dinp + lo, IC);
}

/* Computes thread id's share of dweight (OC, IC) += doutᵀ (OC, N) · inp
 * (N, IC), each element a sum over all N rows. The longer side of dweight is
 * split, so that every thread's sgemm keeps a wide block, and every thread
 * packs the whole of the other operand. */
static void dweight_block(float *dweight, const float *dout, const float *inp, int N, int IC,
                          int OC, int id, int n_threads)
{
    int lo, hi;
    if (OC >= IC) {
        thread_range(OC, id, n_threads, &lo, &hi);
        if (hi > lo)
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, hi - lo, IC, N, 1.0f,
                        dout + lo, OC, inp, IC, 1.0f, dweight + (size_t)lo * IC, IC);
        return;
    }
    thread_range(IC, id, n_threads, &lo, &hi);
    if (hi > lo)
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, OC, hi - lo, N, 1.0f, dout, OC,
                    inp + lo, IC, 1.0f, dweight + lo, IC);
}

/* Backward of out = inp · Wᵀ + bias: dout is (N, OC), inp (N, IC), weight
 * (OC, IC). In one parallel region each thread takes its own block of dinp,
 * of dweight and of dbias, so no two threads write the same element and the
 * three need no barrier between them. */
void cp_matmul_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                        const float *inp, const float *weight, int N, int IC, int OC)
{
    cp_blas_single_threaded();
#pragma omp parallel if ((size_t)N * IC * OC > 32768)
    {
        int n_threads = omp_get_num_threads(), id = omp_get_thread_num(), lo, hi;
        if (dinp)
            dinp_block(dinp, dout, weight, N, IC, OC, id, n_threads);
        if (dweight)
            dweight_block(dweight, dout, inp, N, IC, OC, id, n_threads);

        /* The bias is added to every row, so its gradient is dout's column sums. */
        thread_range(OC, id, n_threads, &lo, &hi);
        if (dbias)
            for (int n = 0; n < N; n++)
#pragma omp simd
                for (int o = lo; o < hi; o++)
                    dbias[o] += dout[(size_t)n * OC + o];
    }
}

void cp_matmul_backward_ref(float *dinp, float *dweight, float *dbias, const float *dout,
                            const float *inp, const float *weight, int N, int IC, int OC)
{
    if (dinp)
        for (int n = 0; n < N; n++)
            for (int i = 0; i < IC; i++) {
                double sum = 0.0;
                for (int o = 0; o < OC; o++)
                    sum += (double)dout[(size_t)n * OC + o] * weight[(size_t)o * IC + i];
                dinp[(size_t)n * IC + i] += (float)sum;
            }
    if (dweight)
        for (int o = 0; o < OC; o++)
            for (int i = 0; i < IC; i++) {
                double sum = 0.0;
                for (int n = 0; n < N; n++)
                    sum += (double)dout[(size_t)n * OC + o] * inp[(size_t)n * IC + i];
                dweight[(size_t)o * IC + i] += (float)sum;
            }
    if (dbias)
        for (int o = 0; o < OC; o++) {
            double sum = 0.0;
            for (int n = 0; n < N; n++)
                sum += dout[(size_t)n * OC + o];
            dbias[o] += (float)sum;
        }
}

/* Conv1D layout (GPT-2): weight (IC, OC), out = inp · weight. Rows are split
 * across threads as in cp_matmul_forward. */
void cp_matmul_kn_forward(float *out, const float *inp, const float *weight, const float *bias,
                          int N, int IC, int OC)
{
    cp_blas_single_threaded();
#pragma omp parallel if ((size_t)N * IC * OC > 32768)
    {
        int lo, hi;
        thread_range(N, omp_get_thread_num(), omp_get_num_threads(), &lo, &hi);
        if (hi > lo)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, hi - lo, OC, IC, 1.0f,
                        inp + (size_t)lo * IC, IC, weight, OC, 0.0f, out + (size_t)lo * OC, OC);
        if (bias)
            for (int n = lo; n < hi; n++)
                for (int o = 0; o < OC; o++)
                    out[(size_t)n * OC + o] += bias[o];
    }
}

/* Backward of cp_matmul_kn_forward, accumulating like cp_matmul_backward:
 * dinp (N, IC) += dout · weightᵀ, dweight (IC, OC) += inpᵀ · dout, dbias += column
 * sums of dout. NULL gradients are skipped. */
void cp_matmul_kn_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                           const float *inp, const float *weight, int N, int IC, int OC)
{
    cp_blas_single_threaded();
#pragma omp parallel if ((size_t)N * IC * OC > 32768)
    {
        int id = omp_get_thread_num(), n_threads = omp_get_num_threads(), lo, hi;
        thread_range(N, id, n_threads, &lo, &hi);
        if (dinp && hi > lo)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, hi - lo, IC, OC, 1.0f,
                        dout + (size_t)lo * OC, OC, weight, OC, 1.0f, dinp + (size_t)lo * IC, IC);
        /* dweight rows (input features) are split, so no two threads share one. */
        thread_range(IC, id, n_threads, &lo, &hi);
        if (dweight && hi > lo)
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, hi - lo, OC, N, 1.0f, inp + lo,
                        IC, dout, OC, 1.0f, dweight + (size_t)lo * OC, OC);
        thread_range(OC, id, n_threads, &lo, &hi);
        if (dbias)
            for (int n = 0; n < N; n++)
                for (int o = lo; o < hi; o++)
                    dbias[o] += dout[(size_t)n * OC + o];
    }
}
