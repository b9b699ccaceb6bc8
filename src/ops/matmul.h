/*
 * Linear layers: out = inp · Wᵀ (+ bias), with W stored (OC, IC) row-major as
 * PyTorch's nn.Linear keeps it. The fast kernel is OpenBLAS sgemm; the plain
 * reference kernel is the test oracle.
 */
#ifndef CP_OPS_MATMUL_H
#define CP_OPS_MATMUL_H

/* Makes OpenBLAS single-threaded, once per process: cpeft parallelizes with
 * OpenMP around BLAS calls, and two thread pools would oversubscribe. */
void cp_blas_single_threaded(void);

/* out is (N, OC), inp is (N, IC), weight is (OC, IC), bias is (OC) or NULL. */
void cp_matmul_forward(float *out, const float *inp, const float *weight, const float *bias,
                       int N, int IC, int OC);
void cp_matmul_forward_ref(float *out, const float *inp, const float *weight, const float *bias,
                           int N, int IC, int OC);

/* Backward of cp_matmul_forward. Accumulates (+=) into each gradient that is
 * not NULL: dinp (N, IC) += dout · W, dweight (OC, IC) += doutᵀ · inp,
 * dbias (OC) += column sums of dout. A frozen weight passes dweight NULL, so
 * no weight gradient is computed for it. */
void cp_matmul_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                        const float *inp, const float *weight, int N, int IC, int OC);
void cp_matmul_backward_ref(float *dinp, float *dweight, float *dbias, const float *dout,
                            const float *inp, const float *weight, int N, int IC, int OC);

/* The same products for weights stored (IC, OC), as GPT-2's Conv1D layers
 * keep them: out (N, OC) = inp (N, IC) · weight (IC, OC) (+ bias). */
void cp_matmul_kn_forward(float *out, const float *inp, const float *weight, const float *bias,
                          int N, int IC, int OC);
void cp_matmul_kn_backward(float *dinp, float *dweight, float *dbias, const float *dout,
                           const float *inp, const float *weight, int N, int IC, int OC);

#endif
