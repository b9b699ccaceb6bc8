/* RMSNorm and LayerNorm, forward and backward. */
#include "ops/norm.h"

#include <math.h>
#include <stddef.h>

#include <omp.h>

void cp_rmsnorm_forward(float *out, float *rstd, const float *inp, const float *weight, int N,
                        int C, float eps)
{
#pragma omp parallel for if (N > 16)
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C;
        float *y = out + (size_t)n * C;
        double ss = 0.0;
        for (int i = 0; i < C; i++)
            ss += (double)x[i] * x[i];
        float r = 1.0f / sqrtf((float)(ss / C) + eps);
        for (int i = 0; i < C; i++)
            y[i] = x[i] * r * weight[i];
        if (rstd)
            rstd[n] = r;
    }
}

/* dinp and dout are (N, C). Undoes y[i] = x[i] * r * weight[i] with
 * r = (mean(x²) + eps)^(-1/2) the saved rstd:
 * dr/dx_i = -r³ x_i / C, so
 *   dx_i = r w_i dy_i - x_i r³ mean(x ⊙ w ⊙ dy),
 *   dw_i = Σ_n dy_i x_i r.
 * Threads split the rows for dinp. dweight sums over rows, so for it they
 * split the columns instead, each thread walking every row. */
void cp_rmsnorm_backward(float *dinp, float *dweight, const float *dout, const float *inp,
                         const float *weight, const float *rstd, int N, int C)
{
#pragma omp parallel if ((size_t)N * C > 16384)
    {
#pragma omp for nowait
        for (int n = 0; n < N; n++) {
            const float *x = inp + (size_t)n * C, *dy = dout + (size_t)n * C;
            float *dx = dinp + (size_t)n * C;
            float r = rstd[n];
            double dot = 0.0;
#pragma omp simd reduction(+ : dot)
            for (int i = 0; i < C; i++)
                dot += (double)x[i] * weight[i] * dy[i];
            float coef = (float)(dot / C) * r * r * r;
#pragma omp simd
            for (int i = 0; i < C; i++)
                dx[i] += r * weight[i] * dy[i] - x[i] * coef;
        }

        /* dweight in blocks of 16 columns, one 64-byte cache line when
         * dweight is aligned, so that threads do not write the same line. */
        if (dweight) {
            int n_threads = omp_get_num_threads(), id = omp_get_thread_num();
            int lines = (C + 15) / 16;
            int lo = 16 * (lines * id / n_threads), hi = 16 * (lines * (id + 1) / n_threads);
            hi = hi < C ? hi : C;
            for (int n = 0; n < N; n++) {
                const float *x = inp + (size_t)n * C, *dy = dout + (size_t)n * C;
                float r = rstd[n];
#pragma omp simd
                for (int i = lo; i < hi; i++)
                    dweight[i] += dy[i] * x[i] * r;
            }
        }
    }
}

void cp_layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
                          const float *weight, const float *bias, int N, int C, float eps)
{
#pragma omp parallel for if (N > 16)
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C;
        float *y = out + (size_t)n * C;
        double sum = 0.0, sq = 0.0;
        for (int i = 0; i < C; i++)
            sum += x[i];
        float m = (float)(sum / C);
        for (int i = 0; i < C; i++)
            sq += (double)(x[i] - m) * (x[i] - m);
        float r = 1.0f / sqrtf((float)(sq / C) + eps); /* biased variance, as PyTorch */
        for (int i = 0; i < C; i++)
            y[i] = (x[i] - m) * r * weight[i] + bias[i];
        if (mean)
            mean[n] = m;
        if (rstd)
            rstd[n] = r;
    }
}

/* With x̂ = (x - mean) · rstd and g = dout ⊙ weight, the forward's
 * y = x̂ ⊙ weight + bias gives dx = rstd · (g - mean(g) - x̂ · mean(g ⊙ x̂)). */
void cp_layernorm_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                           const float *inp, const float *weight, const float *mean,
                           const float *rstd, int N, int C)
{
#pragma omp parallel for if (N > 16)
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C, *dy = dout + (size_t)n * C;
        float *dx = dinp + (size_t)n * C;
        double g_sum = 0.0, gx_sum = 0.0;
        for (int i = 0; i < C; i++) {
            float xhat = (x[i] - mean[n]) * rstd[n], g = dy[i] * weight[i];
            g_sum += g;
            gx_sum += (double)g * xhat;
        }
        float g_mean = (float)(g_sum / C), gx_mean = (float)(gx_sum / C);
        for (int i = 0; i < C; i++) {
            float xhat = (x[i] - mean[n]) * rstd[n];
            dx[i] += rstd[n] * (dy[i] * weight[i] - g_mean - xhat * gx_mean);
        }
    }
    /* Parameter gradients sum over rows; columns are split so no two
     * threads add into one element. */
    if (!dweight && !dbias)
        return;
#pragma omp parallel for if (N > 16)
    for (int i = 0; i < C; i++) {
        for (int n = 0; n < N; n++) {
            float dy = dout[(size_t)n * C + i];
            if (dweight)
                dweight[i] += dy * (inp[(size_t)n * C + i] - mean[n]) * rstd[n];
            if (dbias)
                dbias[i] += dy;
        }
    }
}
