/* NF4 quantization, double quantization and the fused products. nf4.h
 * describes the format and where it follows bitsandbytes. */
#include "ops/nf4.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "ops/matmul.h"
#include "ops/tiled_matmul.h"

const float cp_nf4_values[16] = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};

#define NF4_ZERO_CODE 7

/* Tables built once per process: the decision thresholds between
 * neighboring NF4 values, the dynamic map and its thresholds. */
static float nf4_thresholds[15];
static float dynamic_map[256];
static float dynamic_thresholds[255];
static uint8_t dynamic_zero_code;

static int compare_floats(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* Fills the dynamic map: for decade k = 0..6, the 2^k midpoints of equal
 * subintervals of [0.1, 1], times 10^(k-6), with both signs, then 0 and 1.
 * That is 2 * 127 + 2 = 256 distinct values. */
static void build_dynamic_map(void)
{
    static const double decades[7] = {1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0};
    int n = 0;
    for (int k = 0; k < 7; k++) {
        int count = 1 << k;
        for (int j = 0; j < count; j++) {
            double value = decades[k] * (0.1 + 0.9 * (2 * j + 1) / (2.0 * count));
            dynamic_map[n++] = (float)value;
            dynamic_map[n++] = (float)-value;
        }
    }
    dynamic_map[n++] = 0.0f;
    dynamic_map[n++] = 1.0f;
    CP_ASSERT(n == 256);
    qsort(dynamic_map, 256, sizeof *dynamic_map, compare_floats);
}

/* Midpoints of neighboring sorted values, computed in double and rounded
 * once. For NF4 these equal the float32 constants of bitsandbytes'
 * dQuantizeNF4 (tools/ref_nf4.py checks that they are exact midpoints). */
static void build_thresholds(const float *values, int n, float *thresholds)
{
    for (int i = 0; i + 1 < n; i++)
        thresholds[i] = (float)(0.5 * ((double)values[i] + (double)values[i + 1]));
}

static void build_tables(void)
{
    build_thresholds(cp_nf4_values, 16, nf4_thresholds);
    build_dynamic_map();
    build_thresholds(dynamic_map, 256, dynamic_thresholds);
    for (int i = 0; i < 256; i++)
        if (dynamic_map[i] == 0.0f)
            dynamic_zero_code = (uint8_t)i;
}

static void ensure_tables(void)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, build_tables);
}

const float *cp_nf4_dynamic_map(void)
{
    ensure_tables();
    return dynamic_map;
}

/* Returns how many of the n ascending thresholds are below x: the index of
 * the nearest value, the lower one at an exact midpoint, and 0 for NaN. */
static int count_below(const float *thresholds, int n, float x)
{
    int lo = 0, hi = n;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (thresholds[mid] < x)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* ---- quantization ---- */

/* Quantizes count (1 to 64) elements of one block into (count + 1) / 2
 * bytes and returns the block's absmax. The weight has no NaN, so plain
 * comparisons replace fmaxf, and both loops vectorize. */
static float quantize_block(const float *restrict w, size_t count, uint8_t *restrict bytes)
{
    float absmax = 0.0f;
#pragma omp simd reduction(max : absmax)
    for (size_t i = 0; i < count; i++)
        absmax = fabsf(w[i]) > absmax ? fabsf(w[i]) : absmax;

    uint8_t codes[CP_NF4_BLOCK + 1];
    if (absmax == 0.0f) {
        memset(codes, NF4_ZERO_CODE, count);
    } else {
        /* Counting the thresholds below x gives the same code as
         * count_below, with no branch. */
        float inverse = 1.0f / absmax;
#pragma omp simd
        for (size_t i = 0; i < count; i++) {
            float x = w[i] * inverse;
            int code = 0;
#pragma GCC unroll 15
            for (int k = 0; k < 15; k++)
                code += x > nf4_thresholds[k];
            codes[i] = (uint8_t)code;
        }
    }
    codes[count] = 0; /* the low nibble after an odd count */
    for (size_t i = 0; i < count; i += 2)
        bytes[i / 2] = (uint8_t)(codes[i] << 4 | codes[i + 1]);
    return absmax;
}

/* Returns the index of the first NaN or infinite element, or n if none. */
static size_t find_non_finite(const float *w, size_t n)
{
    size_t first = n;
#pragma omp parallel for reduction(min : first) if (n > 65536)
    for (size_t i = 0; i < n; i++)
        if (!isfinite(w[i]) && i < first)
            first = i;
    return first;
}

/* Quantizes the float32 block scales as nf4.h describes and records the
 * reconstruction error in q. */
static void double_quantize(cp_nf4_matrix *q, const float *absmax)
{
    size_t n = q->n_blocks;

    /* A sequential sum in double, so tools/ref_nf4.py gets the same mean. */
    double sum = 0.0;
    for (size_t b = 0; b < n; b++)
        sum += absmax[b];
    q->scale_mean = (float)(sum / (double)n);

    for (size_t g0 = 0; g0 < n; g0 += CP_NF4_SCALE_BLOCK) {
        size_t g1 = g0 + CP_NF4_SCALE_BLOCK < n ? g0 + CP_NF4_SCALE_BLOCK : n;
        float group_max = 0.0f;
        for (size_t b = g0; b < g1; b++)
            group_max = fmaxf(group_max, fabsf(absmax[b] - q->scale_mean));
        q->scale_absmax[g0 / CP_NF4_SCALE_BLOCK] = group_max;

        if (group_max == 0.0f) {
            memset(q->scale_codes + g0, dynamic_zero_code, g1 - g0);
            continue;
        }
        float inverse = 1.0f / group_max;
        for (size_t b = g0; b < g1; b++) {
            float x = (absmax[b] - q->scale_mean) * inverse;
            q->scale_codes[b] = (uint8_t)count_below(dynamic_thresholds, 255, x);
        }
    }

    double sum_sq = 0.0, max_rel = 0.0;
    for (size_t b = 0; b < n; b++) {
        double diff = (double)cp_nf4_block_scale(q, b) - absmax[b];
        sum_sq += diff * diff;
        if (absmax[b] > 0.0f)
            max_rel = fmax(max_rel, fabs(diff) / absmax[b]);
    }
    q->scale_rms_error = sqrt(sum_sq / (double)n);
    q->scale_max_rel_error = max_rel;
}

/* Makes the one allocation of q: the float arrays first, for alignment,
 * then the byte arrays. */
static cp_status allocate_storage(cp_nf4_matrix *q, size_t n_elements, int double_quant,
                                  cp_error *err)
{
    size_t code_bytes = (n_elements + 1) / 2;
    size_t n_groups = (q->n_blocks + CP_NF4_SCALE_BLOCK - 1) / CP_NF4_SCALE_BLOCK;
    size_t float_count = double_quant ? n_groups : q->n_blocks;
    size_t scale_code_bytes = double_quant ? q->n_blocks : 0;
    size_t bytes = float_count * sizeof(float) + scale_code_bytes + code_bytes;

    char *storage = malloc(bytes);
    if (!storage)
        return cp_error_nomem(err, "NF4 weight", bytes);
    q->storage = storage;
    if (double_quant) {
        q->scale_absmax = (float *)storage;
        q->scale_codes = (uint8_t *)(storage + float_count * sizeof(float));
    } else {
        q->absmax = (float *)storage;
    }
    q->codes = (uint8_t *)(storage + float_count * sizeof(float) + scale_code_bytes);
    return CP_OK;
}

cp_status cp_nf4_quantize(cp_nf4_matrix *q, const float *weight, int rows, int cols,
                          int double_quant, cp_error *err)
{
    memset(q, 0, sizeof *q);
    if (rows < 1 || cols < 1)
        return cp_error_set(err, CP_ERR_INPUT,
                            "NF4 quantization: invalid weight shape (%d, %d); rows and columns "
                            "must be at least 1",
                            rows, cols);
    size_t n = (size_t)rows * (size_t)cols;
    size_t bad = find_non_finite(weight, n);
    if (bad < n)
        return cp_error_set(err, CP_ERR_INPUT,
                            "NF4 quantization: weight (%d, %d) has the non-finite value %g at "
                            "row %zu, column %zu; the checkpoint is corrupt or overflowed",
                            rows, cols, (double)weight[bad], bad / (size_t)cols,
                            bad % (size_t)cols);
    ensure_tables();

    q->rows = rows;
    q->cols = cols;
    q->n_blocks = (n + CP_NF4_BLOCK - 1) / CP_NF4_BLOCK;
    cp_status status = allocate_storage(q, n, double_quant, err);
    if (status != CP_OK)
        return status;

    /* With double quantization the float32 scales exist only until they are
     * quantized. */
    float *absmax = q->absmax;
    if (double_quant && !(absmax = malloc(q->n_blocks * sizeof *absmax)))
        return cp_error_nomem(err, "NF4 block scales", q->n_blocks * sizeof *absmax);

    long n_blocks = (long)q->n_blocks;
#pragma omp parallel for schedule(static) if (n > 65536)
    for (long b = 0; b < n_blocks; b++) {
        size_t start = (size_t)b * CP_NF4_BLOCK;
        size_t count = n - start < CP_NF4_BLOCK ? n - start : CP_NF4_BLOCK;
        absmax[b] = quantize_block(weight + start, count, q->codes + start / 2);
    }

    if (double_quant) {
        double_quantize(q, absmax);
        free(absmax);
    }
    return CP_OK;
}

void cp_nf4_free(cp_nf4_matrix *q)
{
    if (!q)
        return;
    free(q->storage);
    memset(q, 0, sizeof *q);
}

size_t cp_nf4_bytes(const cp_nf4_matrix *q)
{
    size_t bytes = ((size_t)q->rows * (size_t)q->cols + 1) / 2;
    if (q->absmax)
        return bytes + q->n_blocks * sizeof(float);
    size_t n_groups = (q->n_blocks + CP_NF4_SCALE_BLOCK - 1) / CP_NF4_SCALE_BLOCK;
    return bytes + q->n_blocks + n_groups * sizeof(float) + sizeof q->scale_mean;
}

/* ---- dequantization ---- */

/* Returns block b's scale. The caller has built the tables. */
static inline float block_scale(const cp_nf4_matrix *q, size_t b)
{
    if (q->absmax)
        return q->absmax[b];
    return dynamic_map[q->scale_codes[b]] * q->scale_absmax[b / CP_NF4_SCALE_BLOCK] +
           q->scale_mean;
}

float cp_nf4_block_scale(const cp_nf4_matrix *q, size_t b)
{
    ensure_tables();
    return block_scale(q, b);
}

/* Dequantizes elements [start, start + count) of the flattened weight. The
 * caller has built the tables. Blocks start at even elements, so only the
 * first element of the range can sit in a low nibble. */
static void dequantize_range(const cp_nf4_matrix *q, size_t start, size_t count, float *out)
{
    const uint8_t *codes = q->codes;
    size_t i = start, end = start + count;
    while (i < end) {
        size_t b = i / CP_NF4_BLOCK;
        size_t block_end = (b + 1) * CP_NF4_BLOCK < end ? (b + 1) * CP_NF4_BLOCK : end;
        float scale = block_scale(q, b);

        if (i & 1)
            *out++ = cp_nf4_values[codes[i / 2] & 15] * scale, i++;
        for (; i + 1 < block_end; i += 2, out += 2) {
            uint8_t byte = codes[i / 2];
            out[0] = cp_nf4_values[byte >> 4] * scale;
            out[1] = cp_nf4_values[byte & 15] * scale;
        }
        if (i < block_end)
            *out++ = cp_nf4_values[codes[i / 2] >> 4] * scale, i++;
    }
}

void cp_nf4_dequantize_range(const cp_nf4_matrix *q, size_t start, size_t count, float *out)
{
    CP_ASSERT(start + count <= (size_t)q->rows * (size_t)q->cols);
    ensure_tables();
    dequantize_range(q, start, count, out);
}

void cp_nf4_dequantize(const cp_nf4_matrix *q, float *out)
{
    ensure_tables();
#pragma omp parallel for schedule(static) if ((size_t)q->rows * q->cols > 65536)
    for (int r = 0; r < q->rows; r++)
        dequantize_range(q, (size_t)r * q->cols, (size_t)q->cols, out + (size_t)r * q->cols);
}

/* Writes W[r0 : r0 + n_rows, c0 : c0 + n_cols] to tile (n_rows, n_cols). */
static void dequantize_tile(const void *weight, int r0, int n_rows, int c0, int n_cols,
                            float *tile)
{
    const cp_nf4_matrix *w = weight;
    for (int r = 0; r < n_rows; r++)
        dequantize_range(w, (size_t)(r0 + r) * w->cols + c0, (size_t)n_cols,
                         tile + (size_t)r * n_cols);
}

cp_status cp_nf4_matmul_forward(float *out, const float *inp, const cp_nf4_matrix *w,
                                const float *bias, int N, cp_error *err)
{
    ensure_tables();
    return cp_tiled_matmul_forward(out, inp, w, w->rows, w->cols, dequantize_tile, bias, N, err);
}

cp_status cp_nf4_matmul_backward(float *dinp, const float *dout, const cp_nf4_matrix *w, int N,
                                 cp_error *err)
{
    ensure_tables();
    return cp_tiled_matmul_backward(dinp, dout, w, w->rows, w->cols, dequantize_tile, N, err);
}

/* ---- reference kernels ---- */

static float element(const cp_nf4_matrix *q, size_t i)
{
    uint8_t byte = q->codes[i / 2];
    int code = (i & 1) ? byte & 15 : byte >> 4;
    return cp_nf4_values[code] * block_scale(q, i / CP_NF4_BLOCK);
}

void cp_nf4_matmul_forward_ref(float *out, const float *inp, const cp_nf4_matrix *w,
                               const float *bias, int N)
{
    ensure_tables();
    int rows = w->rows, cols = w->cols;
    for (int n = 0; n < N; n++)
        for (int r = 0; r < rows; r++) {
            double sum = bias ? bias[r] : 0.0;
            for (int c = 0; c < cols; c++)
                sum += (double)inp[(size_t)n * cols + c] * element(w, (size_t)r * cols + c);
            out[(size_t)n * rows + r] = (float)sum;
        }
}

void cp_nf4_matmul_backward_ref(float *dinp, const float *dout, const cp_nf4_matrix *w, int N)
{
    ensure_tables();
    int rows = w->rows, cols = w->cols;
    for (int n = 0; n < N; n++)
        for (int c = 0; c < cols; c++) {
            double sum = 0.0;
            for (int r = 0; r < rows; r++)
                sum += (double)dout[(size_t)n * rows + r] * element(w, (size_t)r * cols + c);
            dinp[(size_t)n * cols + c] += (float)sum;
        }
}
