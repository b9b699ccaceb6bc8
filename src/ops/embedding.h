/* Token embedding lookup. */
#ifndef CP_OPS_EMBEDDING_H
#define CP_OPS_EMBEDDING_H

#include <stdint.h>

/* out is (N, C), ids (N) index rows of table (V, C); ids are checked by the caller. */
void cp_embedding_forward(float *out, const int32_t *ids, const float *table, int N, int C);

/* Backward of cp_embedding_forward: accumulates (+=) row n of dout into
 * row ids[n] of dtable (V, C). */
void cp_embedding_backward(float *dtable, const float *dout, const int32_t *ids, int N, int C);

#endif
