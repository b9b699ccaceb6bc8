/* RMSNorm as Llama uses it, out = x / sqrt(mean(x²) + eps) * weight, and
 * LayerNorm as GPT-2 uses it. */
#ifndef CP_OPS_NORM_H
#define CP_OPS_NORM_H

/* out and inp are (N, C), weight is (C); rstd (N) receives 1/sqrt(mean(x²)+eps)
 * for the backward pass, or is NULL. out may equal inp. */
void cp_rmsnorm_forward(float *out, float *rstd, const float *inp, const float *weight, int N,
                        int C, float eps);

/* Backward of cp_rmsnorm_forward, from the saved rstd. Accumulates (+=)
 * into dinp (N, C) and, unless NULL, dweight (C). */
void cp_rmsnorm_backward(float *dinp, float *dweight, const float *dout, const float *inp,
                         const float *weight, const float *rstd, int N, int C);

/* LayerNorm as GPT-2 uses it: out = (x - mean) / sqrt(var + eps) * weight + bias
 * with the biased variance. out and inp are (N, C), weight and bias (C);
 * mean and rstd (N) receive the row statistics for the backward pass, or
 * are NULL. */
void cp_layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
                          const float *weight, const float *bias, int N, int C, float eps);

/* Backward of cp_layernorm_forward from the saved mean and rstd. Accumulates
 * (+=) into dinp (N, C) and, unless NULL, dweight and dbias (C). */
void cp_layernorm_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                           const float *inp, const float *weight, const float *mean,
                           const float *rstd, int N, int C);

#endif
