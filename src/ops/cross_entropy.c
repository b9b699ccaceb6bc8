/* Cross-entropy forward with a max-shifted log-sum-exp, and its backward. */
#include "ops/cross_entropy.h"

#include <math.h>
#include <stddef.h>
#include <string.h>

#include "ops/fast_exp.h"

void cp_cross_entropy_forward(float *losses, const float *logits, const int32_t *targets, int N,
                              int V)
{
#pragma omp parallel for if (N > 16)
    for (int n = 0; n < N; n++) {
        if (targets[n] < 0) {
            losses[n] = 0.0f;
            continue;
        }
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

/* Writes e^(x[i] - max) into out[i] (out may equal x) and returns their sum. */
static double exp_shifted(float *out, const float *x, float max, int V)
{
    cp_v8sf sum8 = {0};
    int i = 0;
    for (; i + 8 <= V; i += 8) {
        cp_v8sf e;
        memcpy(&e, x + i, sizeof e);
        e = cp_fast_expf8(e - max);
        memcpy(out + i, &e, sizeof e);
        sum8 += e;
    }
    double sum = 0.0;
    for (int j = 0; j < 8; j++)
        sum += sum8[j];
    for (; i < V; i++) {
        out[i] = cp_fast_expf(x[i] - max);
        sum += out[i];
    }
    return sum;
}

/* logits and dlogits are (N, V), targets and dloss (N). Undoes
 * loss = log Σ e^x - x[target]: its gradient is softmax(x) - onehot(target).
 * Each row stores its exponentials in dlogits and then scales them, so the
 * row is read once before it is overwritten, which keeps in place safe. */
void cp_cross_entropy_backward(float *dlogits, const float *logits, const int32_t *targets,
                               const float *dloss, int N, int V)
{
#pragma omp parallel for if (N > 16)
    for (int n = 0; n < N; n++) {
        const float *x = logits + (size_t)n * V;
        float *dx = dlogits + (size_t)n * V;
        if (targets[n] < 0) {
            memset(dx, 0, (size_t)V * sizeof *dx);
            continue;
        }

        float max = x[0];
#pragma omp simd reduction(max : max)
        for (int i = 1; i < V; i++)
            max = x[i] > max ? x[i] : max;
        float scale = (float)(dloss[n] / exp_shifted(dx, x, max, V));
        for (int i = 0; i < V; i++)
            dx[i] *= scale;
        dx[targets[n]] -= dloss[n];
    }
}
