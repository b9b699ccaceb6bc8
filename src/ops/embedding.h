/* Token embedding lookup. */
#ifndef CP_OPS_EMBEDDING_H
#define CP_OPS_EMBEDDING_H

#include <stdint.h>

/* out is (N, C), ids (N) index rows of table (V, C); ids are checked by the caller. */
void cp_embedding_forward(float *out, const int32_t *ids, const float *table, int N, int C);

#endif
