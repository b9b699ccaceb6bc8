/* MLP activations: SwiGLU (Llama), out = silu(gate) * up, and GELU with the
 * tanh approximation (GPT-2). */
#ifndef CP_OPS_ACTIVATION_H
#define CP_OPS_ACTIVATION_H

#include <stddef.h>

/* out, gate and up are (n) elements; out may equal gate or up. */
void cp_swiglu_forward(float *out, const float *gate, const float *up, size_t n);

/* Backward of cp_swiglu_forward: accumulates (+=) into dgate and dup (n). */
void cp_swiglu_backward(float *dgate, float *dup, const float *dout, const float *gate,
                        const float *up, size_t n);

/* GELU with the tanh approximation (GPT-2's "gelu_new"); out and inp are (n). */
void cp_gelu_tanh_forward(float *out, const float *inp, size_t n);

/* Backward of cp_gelu_tanh_forward: accumulates (+=) into dinp (n). */
void cp_gelu_tanh_backward(float *dinp, const float *dout, const float *inp, size_t n);

#endif
