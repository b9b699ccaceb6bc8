/* RMSNorm as Llama uses it: out = x / sqrt(mean(x²) + eps) * weight. */
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

#endif
