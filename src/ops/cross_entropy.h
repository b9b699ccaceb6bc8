/* Next-token cross-entropy over a vocabulary of V logits per row. */
#ifndef CP_OPS_CROSS_ENTROPY_H
#define CP_OPS_CROSS_ENTROPY_H

#include <stdint.h>

/* logits is (N, V), targets (N); losses (N) receives -log softmax(logits)[target].
 * A target below 0 marks a masked row (padding, or a prompt token that takes
 * no loss): its loss is 0. */
void cp_cross_entropy_forward(float *losses, const float *logits, const int32_t *targets, int N,
                              int V);

/* Backward of the per-row losses of cp_cross_entropy_forward: dlogits (N, V) =
 * (softmax(logits) - onehot(target)) * dloss[n], overwriting. dloss (N) is
 * each row's scale, 1/count for a mean over count tokens. A masked row (target
 * below 0) gets a zero dlogits row. dlogits may equal logits (in place). */
void cp_cross_entropy_backward(float *dlogits, const float *logits, const int32_t *targets,
                               const float *dloss, int N, int V);

#endif
