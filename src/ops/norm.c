/* RMSNorm forward. */
#include "ops/norm.h"

#include <math.h>
#include <stddef.h>

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
