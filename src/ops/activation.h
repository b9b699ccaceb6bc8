/* SwiGLU, the gated MLP activation of Llama: out = silu(gate) * up. */
#ifndef CP_OPS_ACTIVATION_H
#define CP_OPS_ACTIVATION_H

#include <stddef.h>

/* out, gate and up are (n) elements; out may equal gate or up. */
void cp_swiglu_forward(float *out, const float *gate, const float *up, size_t n);

/* Backward of cp_swiglu_forward: accumulates (+=) into dgate and dup (n). */
void cp_swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate,
                        const float *up, size_t n);

#endif
