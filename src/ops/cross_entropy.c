/* Cross-entropy forward with a max-shifted log-sum-exp. */
#include "ops/cross_entropy.h"

#include <math.h>
#include <stddef.h>

void cp_cross_entropy_forward(float *losses, const float *logits, const int32_t *targets, int N,
                              int V)
{
#pragma omp parallel for if (N > 16)
    for (int n = 0; n < N; n++) {
        const float *row = logits + (size_t)n * V;
        float max = row[0];
        for (int i = 1; i < V; i++)
            if (row[i] > max)
                max = row[i];
        double sum = 0.0;
        for (int i = 0; i < V; i++)
            sum += exp((double)row[i] - max);
        losses[n] = (float)(log(sum) + max - row[targets[n]]);
    }
}
