/*
 * NF4 (4-bit NormalFloat) weights for QLoRA. A frozen nn.Linear weight W
 * (rows = out features, cols = in features) is stored as 4-bit codes with
 * one scale per block of 64 consecutive elements of the flattened weight.
 * The two products that training with a frozen W needs dequantize small
 * tiles of W inside the kernel. There is no weight gradient, and a GPT-2
 * Conv1D weight, stored (in, out), must be transposed before quantizing.
 *
 * Quantization follows the QLoRA paper (Dettmers et al. 2023, "QLoRA:
 * Efficient Finetuning of Quantized LLMs") as bitsandbytes implements it
 * in csrc/kernels.cu (kQuantizeBlockwise with the NF4 data type):
 *   - absmax is the max |w| over the block, or over the remaining elements
 *     for a last, partial block.
 *   - Each element is multiplied by the float32 reciprocal 1.0f / absmax
 *     (not divided by absmax) and gets the index of the nearest of the 16
 *     NF4 values. The thresholds are the midpoints of neighboring values.
 *     A value equal to a midpoint gets the lower index, because
 *     bitsandbytes tests x > midpoint.
 *   - Element 2i of the flattened weight goes in the high nibble of byte i
 *     and element 2i + 1 in the low nibble. An odd element count leaves the
 *     last low nibble 0.
 *   - An element dequantizes to nf4_value[code] * absmax.
 * One case differs: a block of zeros gets absmax 0 and code 7 (the NF4
 * zero). bitsandbytes computes 0 * (1 / 0) = NaN there and stores code 0,
 * and both dequantize to zero.
 *
 * Double quantization, as bitsandbytes' quantize_4bit does it with
 * compress_statistics (bitsandbytes/functional.py), replaces the float32
 * absmax array. Its mean is subtracted, and the centered scales are
 * quantized to 8 bits in blocks of 256, with a float32 absmax per block.
 * The 8-bit codes index bitsandbytes' signed dynamic map (create_dynamic_map),
 * which has, for each decade 10^-6 .. 10^0, 2^k evenly spaced values in
 * (0.1, 1) times the decade, with both signs, plus 0 and 1. This map is a
 * small float format (sign, decimal exponent, fraction), so it keeps about
 * 3 significant digits for small centered scales too. A linear int8 grid
 * would round every scale to a step set by the largest one in its block.
 * The map's entries are computed in double and rounded once, so they may
 * differ from bitsandbytes' float32 map in the last bit. A value halfway
 * between two entries gets the lower one.
 */
#ifndef CP_OPS_NF4_H
#define CP_OPS_NF4_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"

#define CP_NF4_BLOCK 64        /* weight elements per absmax scale */
#define CP_NF4_SCALE_BLOCK 256 /* absmax scales per float32 scale with double quantization */

/* The 16 NF4 values in code order, from -1 to 1 with 0 at code 7, as the
 * QLoRA paper publishes them (the float32 values bitsandbytes stores). */
extern const float cp_nf4_values[16];

/* A quantized (rows, cols) weight. cp_nf4_quantize fills every field and
 * makes one allocation that cp_nf4_free releases; the arrays point into it. */
typedef struct cp_nf4_matrix {
    int rows, cols;
    size_t n_blocks;    /* ceil(rows * cols / 64) */
    uint8_t *codes;     /* ceil(rows * cols / 2) bytes, two codes a byte, high nibble first */
    float *absmax;      /* (n_blocks) block scales, or NULL with double quantization */

    /* Double quantization fields, all NULL or 0 without it. Block b's scale is
     * cp_nf4_dynamic_map()[scale_codes[b]] * scale_absmax[b / 256] + scale_mean. */
    uint8_t *scale_codes; /* (n_blocks) */
    float *scale_absmax;  /* (ceil(n_blocks / 256)) */
    float scale_mean;     /* mean of the float32 absmax values, subtracted before quantizing */

    /* Reconstruction error of the scales under double quantization, against
     * the float32 absmax they replace: root mean square of the differences,
     * and the max |difference| / absmax over the blocks with absmax > 0. */
    double scale_rms_error;
    double scale_max_rel_error;

    void *storage; /* the one allocation the arrays point into */
} cp_nf4_matrix;

/* Returns the 256 entries of the signed dynamic map, sorted ascending. */
const float *cp_nf4_dynamic_map(void);

/* Quantizes weight (rows, cols), row-major, into *q, which the caller
 * releases with cp_nf4_free, also after a failure. With double_quant
 * nonzero the block scales are stored in 8 bits. Returns CP_ERR_INPUT for
 * rows or cols below 1 or a weight that is NaN or infinite (the message
 * names the row and column), and CP_ERR_NOMEM when the storage cannot be
 * allocated. */
cp_status cp_nf4_quantize(cp_nf4_matrix *q, const float *weight, int rows, int cols,
                          int double_quant, cp_error *err);
void cp_nf4_free(cp_nf4_matrix *q);

/* Returns the scale of block b: its float32 absmax, or the value decoded
 * from the 8-bit code under double quantization. */
float cp_nf4_block_scale(const cp_nf4_matrix *q, size_t b);

/* Writes the count elements of the flattened weight that start at element
 * start (start + count <= rows * cols) to out. */
void cp_nf4_dequantize_range(const cp_nf4_matrix *q, size_t start, size_t count, float *out);

/* Writes the whole weight, (rows, cols) row-major, to out. */
void cp_nf4_dequantize(const cp_nf4_matrix *q, float *out);

/* Returns the size in bytes of the quantized data: codes, scales and, with
 * double quantization, the float32 scale of each 256 scales and the mean. */
size_t cp_nf4_bytes(const cp_nf4_matrix *q);

/* out (N, rows) = inp (N, cols) · Wᵀ (+ bias (rows), unless NULL).
 * Each OpenMP thread takes a block of W's rows and dequantizes it a tile at
 * a time into its own buffer for sgemm, so the whole float32 W never
 * exists. Returns CP_ERR_NOMEM, with out unchanged, when the tile buffers
 * cannot be allocated. */
cp_status cp_nf4_matmul_forward(float *out, const float *inp, const cp_nf4_matrix *w,
                                const float *bias, int N, cp_error *err);

/* Backward of cp_nf4_matmul_forward for its input: accumulates dinp (N, cols)
 * += dout (N, rows) · W. Each thread takes a block of dinp's columns, so
 * threads never write the same element. Returns CP_ERR_NOMEM, with dinp
 * unchanged, when the tile buffers cannot be allocated. */
cp_status cp_nf4_matmul_backward(float *dinp, const float *dout, const cp_nf4_matrix *w, int N,
                                 cp_error *err);

/* Reference kernels, the test oracles: one element at a time, sums in
 * double, no allocation. The backward also accumulates. */
void cp_nf4_matmul_forward_ref(float *out, const float *inp, const cp_nf4_matrix *w,
                               const float *bias, int N);
void cp_nf4_matmul_backward_ref(float *dinp, const float *dout, const cp_nf4_matrix *w, int N);

#endif
