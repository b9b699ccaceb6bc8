/*
 * Causal grouped-query attention: H query heads share KVH key/value heads,
 * query head h reading key/value head h / (H / KVH). Scores are scaled by
 * 1/sqrt(D). With a sliding window W > 0 (Mistral), query i attends to keys j with
 * i - W < j <= i; with W = 0 it attends to every j <= i.
 *
 * The _prefix variants put P key/value rows, shared by every sequence,
 * before each sequence's own. The prefix takes absolute positions 0..P-1
 * and query t position P + t. The mask above applies to absolute positions,
 * so without a window every query attends to the whole prefix.
 */
#ifndef CP_OPS_ATTENTION_H
#define CP_OPS_ATTENTION_H

/* q is (B, T, H, D), k and v are (B, T, KVH, D), out is (B, T, H, D).
 * att (B, H, T, T) receives the softmax probabilities for the backward pass;
 * entries outside the visible range are set to 0. */
void cp_attention_forward(float *out, float *att, const float *q, const float *k,
                          const float *v, int B, int T, int H, int KVH, int D, int window);

/* The same with a prefix: pk and pv are (P, KVH, D), and att is
 * (B, H, T, P + T), its columns the absolute key positions. */
void cp_attention_forward_prefix(float *out, float *att, const float *q, const float *k,
                                 const float *v, const float *pk, const float *pv, int B, int T,
                                 int P, int H, int KVH, int D, int window);

/* The plain scalar kernel, the test oracle for cp_attention_forward. */
void cp_attention_forward_ref(float *out, float *att, const float *q, const float *k,
                              const float *v, int B, int T, int H, int KVH, int D, int window);

/* One new query at position len - 1 against a KV cache: q is (H, D), k_cache
 * and v_cache hold len rows of (KVH, D), out is (H, D), scores is scratch of
 * (H, len). */
void cp_attention_decode(float *out, float *scores, const float *q, const float *k_cache,
                         const float *v_cache, int len, int H, int KVH, int D, int window);

/* Backward of cp_attention_forward from its saved probabilities att.
 * dout is (B, T, H, D); accumulates (+=) into dq (B, T, H, D) and dk, dv
 * (B, T, KVH, D). scratch has room for (B, H, T, T) floats. */
void cp_attention_backward(float *dq, float *dk, float *dv, float *scratch, const float *dout,
                           const float *att, const float *q, const float *k, const float *v,
                           int B, int T, int H, int KVH, int D, int window);

/* Backward of cp_attention_forward_prefix. Also accumulates into dpk and dpv
 * (B, P, KVH, D), each sequence's own prefix gradients, which the caller
 * sums. scratch has room for (B, H, T, P + T) floats. */
void cp_attention_backward_prefix(float *dq, float *dk, float *dv, float *dpk, float *dpv,
                                  float *scratch, const float *dout, const float *att,
                                  const float *q, const float *k, const float *v,
                                  const float *pk, const float *pv, int B, int T, int P, int H,
                                  int KVH, int D, int window);

#endif
