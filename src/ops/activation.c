/* SwiGLU forward. */
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
