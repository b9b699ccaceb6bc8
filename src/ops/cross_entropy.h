/* Next-token cross-entropy over a vocabulary of V logits per row. */
#ifndef CP_OPS_CROSS_ENTROPY_H
#define CP_OPS_CROSS_ENTROPY_H

#include <stdint.h>

/* logits is (N, V), targets (N); losses (N) receives -log softmax(logits)[target]. */
void cp_cross_entropy_forward(float *losses, const float *logits, const int32_t *targets, int N,
                              int V);

#endif
