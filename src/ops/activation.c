/* MLP activations, forward and backward: SwiGLU and tanh-approximated GELU. */
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

/* GPT-2's "gelu_new": 0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³))). */
#define GELU_SCALE 0.7978845608028654f /* √(2/π) */
#define GELU_CUBIC 0.044715f

void cp_gelu_tanh_forward(float *out, const float *inp, size_t n)
{
#pragma omp parallel for if (n > 4096)
    for (size_t i = 0; i < n; i++) {
        float x = inp[i];
        out[i] = 0.5f * x * (1.0f + tanhf(GELU_SCALE * (x + GELU_CUBIC * x * x * x)));
    }
}

/* d/dx = 0.5 (1 + t) + 0.5 x (1 - t²) √(2/π) (1 + 3 · 0.044715 x²), t the tanh above. */
void cp_gelu_tanh_backward(float *dinp, const float *dout, const float *inp, size_t n)
{
#pragma omp parallel for if (n > 4096)
    for (size_t i = 0; i < n; i++) {
        float x = inp[i];
        float t = tanhf(GELU_SCALE * (x + GELU_CUBIC * x * x * x));
        float dt = GELU_SCALE * (1.0f + 3.0f * GELU_CUBIC * x * x);
        dinp[i] += dout[i] * (0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * dt);
    }
}
