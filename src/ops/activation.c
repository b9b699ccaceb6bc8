/* SwiGLU forward and backward. */
#include "ops/activation.h"

#include <math.h>

void cp_swiglu_forward(float *out, const float *gate, const float *up, size_t n)
{
#pragma omp parallel for if (n > 4096)
    for (size_t i = 0; i < n; i++) {
        float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

/* All arrays are (n). Undoes out[i] = g σ(g) * up[i] with σ the logistic
 * sigmoid: d(g σ(g))/dg = σ(g) + g σ(g)(1 - σ(g)) = σ(g)(1 + g(1 - σ(g))). */
void cp_swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate,
                        const float *up, size_t n)
{
#pragma omp parallel for if (n > 4096)
    for (size_t i = 0; i < n; i++) {
        float g = gate[i], sig = 1.0f / (1.0f + expf(-g));
        dgate[i] += dout[i] * up[i] * sig * (1.0f + g * (1.0f - sig));
        dup[i] += dout[i] * g * sig;
    }
}
