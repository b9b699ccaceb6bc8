/*
 * Rotary position embeddings in Hugging Face's rotate-half layout: within a
 * head of size D, element i (i < D/2) is paired with element i + D/2 and the
 * pair is rotated by the angle pos * inv_freq[i].
 */
#ifndef CP_OPS_ROPE_H
#define CP_OPS_ROPE_H

#include "io/hf_config.h"

/* Fills inv_freq (head_dim / 2) from the config's theta and rope_scaling. */
void cp_rope_inv_freq(float *inv_freq, const cp_model_config *cfg);

/* x is (N, n_heads, head_dim), rotated in place; pos (N) is each row's position. */
void cp_rope_forward(float *x, const int *pos, int N, int n_heads, int head_dim,
                     const float *inv_freq);

/* Backward of cp_rope_forward: the rotation is orthogonal, so the gradient
 * dx (N, n_heads, head_dim) is rotated back by -angle, in place. */
void cp_rope_backward(float *dx, const int *pos, int N, int n_heads, int head_dim,
                      const float *inv_freq);

#endif
