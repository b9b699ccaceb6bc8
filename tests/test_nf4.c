/*
 * NF4 quantization (src/ops/nf4.c). The codes and scales of real stories260K
 * weights must equal tools/ref_nf4.py's fixture bit for bit, with and
 * without double quantization. Also checked: the round-trip error bound,
 * partial blocks and odd element counts, the fused products against
 * dequantize-then-sgemm and the reference kernels, a finite-difference
 * check of the input gradient, the storage budget and invalid input.
 */
#include <cJSON.h>
#include <stdlib.h>

#include "core/rng.h"
#include "io/safetensors.h"
#include "ops/matmul.h"
#include "ops/nf4.h"
#include "test.h"

#define FIXTURE "tests/fixtures/nf4/stories260K_nf4.json"

/* Fused against dequantize-then-sgemm: both sum float32 products, in other
 * orders, over up to 1100 terms. */
#define FUSED_TOL 1e-5

/* The largest distance from a value in [-1, 1] to the nearest NF4 value, as
 * a fraction of absmax: half the widest gap, from -1 to -0.6961928. */
#define NF4_MAX_HALF_GAP 0.1519036f

/* The largest distance from a value in [-1, 1] to the nearest entry of the
 * dynamic map: half the step 0.9 / 64 between the entries from 0.1 to 1.
 * The gap from -0.99297 to -1 (the map has no -1) is 0.00703, just below. */
#define DYNAMIC_MAX_HALF_GAP (0.9 / 128)

static float *normal_array(size_t n, uint64_t seed, float std)
{
    float *x = malloc(n * sizeof *x);
    cp_rng rng;
    cp_rng_seed(&rng, seed);
    for (size_t i = 0; i < n; i++) {
        double u1 = 1.0 - cp_rng_uniform(&rng), u2 = cp_rng_uniform(&rng);
        x[i] = (float)(std * sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2));
    }
    return x;
}

static float *uniform_array(size_t n, uint64_t seed, float lo, float hi)
{
    float *x = malloc(n * sizeof *x);
    cp_rng rng;
    cp_rng_seed(&rng, seed);
    for (size_t i = 0; i < n; i++)
        x[i] = lo + (hi - lo) * cp_rng_uniform(&rng);
    return x;
}

static float *copy_array(const float *x, size_t n)
{
    float *y = malloc(n * sizeof *y);
    memcpy(y, x, n * sizeof *y);
    return y;
}

/* Max |a - b| over max |b| (or over 1 if b is all zeros). */
static double relative_diff(const float *a, const float *b, size_t n)
{
    double max_diff = 0.0, max_b = 0.0;
    for (size_t i = 0; i < n; i++) {
        max_diff = fmax(max_diff, fabs((double)a[i] - b[i]));
        max_b = fmax(max_b, fabs((double)b[i]));
    }
    return max_diff / (max_b > 0.0 ? max_b : 1.0);
}

static double rms_diff(const float *a, const float *b, size_t n)
{
    double sum = 0.0;
    for (size_t i = 0; i < n; i++)
        sum += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
    return sqrt(sum / (double)n);
}

/* Quantizes or records a failure with the library's message; returns 1 on success. */
static int quantize_ok(cp_nf4_matrix *q, const float *w, int rows, int cols, int double_quant)
{
    cp_error err = {0};
    cp_status status = cp_nf4_quantize(q, w, rows, cols, double_quant, &err);
    CHECK_MSG(status == CP_OK, "quantize (%d, %d): %s", rows, cols, err.msg);
    return status == CP_OK;
}

static float *dequantized(const cp_nf4_matrix *q)
{
    float *w = malloc((size_t)q->rows * q->cols * sizeof *w);
    cp_nf4_dequantize(q, w);
    return w;
}

/* ---- the table ---- */

TEST(nf4_table_values)
{
    /* The values published with QLoRA, as bitsandbytes stores them. */
    static const double published[16] = {
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0};
    for (int i = 0; i < 16; i++) {
        CHECK_MSG((double)cp_nf4_values[i] == published[i], "value %d: %.17g != %.17g", i,
                  (double)cp_nf4_values[i], published[i]);
        if (i > 0)
            CHECK(cp_nf4_values[i] > cp_nf4_values[i - 1]);
    }

    const float *map = cp_nf4_dynamic_map();
    int zeros = 0;
    for (int i = 0; i < 256; i++) {
        zeros += map[i] == 0.0f;
        if (i > 0)
            CHECK_MSG(map[i] > map[i - 1], "dynamic map entry %d: %g <= %g", i, map[i],
                      map[i - 1]);
    }
    CHECK_EQ_INT(zeros, 1);
    CHECK(map[255] == 1.0f);
    CHECK_CLOSE(map[0], -(0.1 + 0.9 * 127 / 128), 1e-7);
    CHECK_CLOSE(map[128], 1e-6 * 0.55, 1e-7); /* the smallest positive entry */
}

/* With absmax 1 (a 1.0 in the block), x = w exactly: each NF4 value gets
 * its own code, a value at a midpoint gets the lower code, and the next
 * float above it the upper one. */
TEST(nf4_midpoint_ties_take_lower_code)
{
    float w[64];
    int expected[64];
    int n = 0;
    for (int i = 0; i < 16; i++) {
        w[n] = cp_nf4_values[i], expected[n++] = i;
        if (i == 15)
            break;
        float mid = (float)(0.5 * ((double)cp_nf4_values[i] + cp_nf4_values[i + 1]));
        w[n] = mid, expected[n++] = i;
        w[n] = nextafterf(mid, 2.0f), expected[n++] = i + 1;
    }
    CHECK_EQ_INT(n, 46);
    cp_nf4_matrix q;
    if (!quantize_ok(&q, w, 1, n, 0))
        return;
    CHECK(q.absmax[0] == 1.0f);
    for (int i = 0; i < n; i++) {
        int code = (i & 1) ? q.codes[i / 2] & 15 : q.codes[i / 2] >> 4;
        CHECK_MSG(code == expected[i], "w %.9g: code %d, expected %d", (double)w[i], code,
                  expected[i]);
    }
    cp_nf4_free(&q);
}

/* bitsandbytes multiplies by the float32 reciprocal of absmax. In these
 * blocks of {absmax, w} (found by search) dividing by absmax instead would
 * put w * (1 / absmax) on the other side of a midpoint. */
TEST(nf4_reciprocal_decides_codes)
{
    static const float cases[][3] = {
        /* absmax, w, code */
        {1.4554425477981567f, 0.057912278920412064f, 8},
        {1.4099537134170532f, 1.2146447896957397f, 14},
        {1.9026086330413818f, -0.4463660418987274f, 4},
        {1.9958149194717407f, -0.2752462923526764f, 6},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        float absmax = cases[i][0], w[2] = {absmax, cases[i][1]};
        int code = (int)cases[i][2];
        float by_reciprocal = w[1] * (1.0f / absmax), by_division = w[1] / absmax;
        CHECK_MSG(by_reciprocal != by_division, "case %zu does not separate the two", i);

        cp_nf4_matrix q;
        if (!quantize_ok(&q, w, 1, 2, 0))
            continue;
        CHECK_MSG((q.codes[0] & 15) == code, "case %zu: w %.9g / absmax %.9g: code %d, expected %d",
                  i, (double)w[1], (double)absmax, q.codes[0] & 15, code);
        cp_nf4_free(&q);
    }
}

/* ---- real weights against tools/ref_nf4.py ---- */

/* Decodes a hex string into a malloc'd buffer of *n bytes. */
static uint8_t *hex_decode(const char *hex, size_t *n)
{
    size_t len = strlen(hex);
    uint8_t *out = malloc(len / 2 + 1);
    for (size_t i = 0; i + 1 < len; i += 2) {
        unsigned byte;
        sscanf(hex + i, "%2x", &byte);
        out[i / 2] = (uint8_t)byte;
    }
    *n = len / 2;
    return out;
}

/* Compares a byte array with the fixture's hex string, naming the first difference. */
static void check_bytes(const char *label, const char *name, const uint8_t *got, size_t n_got,
                        const char *hex)
{
    size_t n_want;
    uint8_t *want = hex_decode(hex, &n_want);
    size_t i = 0;
    while (i < n_got && i < n_want && got[i] == want[i])
        i++;
    CHECK_MSG(i == n_got && i == n_want,
              "%s %s: byte %zu differs (%zu bytes, expected %zu; got 0x%02x, expected 0x%02x)",
              name, label, i, n_got, n_want, i < n_got ? got[i] : 0, i < n_want ? want[i] : 0);
    free(want);
}

/* Compares float32 values with a JSON array exactly, naming the first difference. */
static void check_floats(const char *label, const char *name, const float *got, size_t n,
                         const cJSON *array)
{
    CHECK_MSG((size_t)cJSON_GetArraySize(array) == n, "%s %s: %zu values, expected %d", name,
              label, n, cJSON_GetArraySize(array));
    size_t i = 0;
    const cJSON *item;
    cJSON_ArrayForEach(item, array)
    {
        if (i >= n)
            break;
        if (got[i] != (float)item->valuedouble) {
            CHECK_MSG(0, "%s %s[%zu]: %.9g, expected %.9g", name, label, i, (double)got[i],
                      item->valuedouble);
            return;
        }
        i++;
    }
}

/* Copies the top-left (rows, cols) of a stories260K weight into a malloc'd array. */
static float *load_weight(const cp_safetensors *st, const char *name, int rows, int cols)
{
    const cp_st_tensor *t = cp_safetensors_find(st, name);
    CHECK_MSG(t && t->dtype == CP_DTYPE_F32 && t->ndim == 2, "%s: missing or not 2-D F32", name);
    if (!t || t->dtype != CP_DTYPE_F32 || t->ndim != 2)
        return NULL;
    float *w = malloc((size_t)rows * cols * sizeof *w);
    for (int r = 0; r < rows; r++)
        memcpy(w + (size_t)r * cols, (const char *)t->data + (size_t)r * t->shape[1] * 4,
               (size_t)cols * sizeof *w);
    return w;
}

/* Runs check(q, entry, name) on each fixture matrix quantized with or without double quantization. */
static void for_each_fixture_matrix(int double_quant,
                                    void (*check)(const cp_nf4_matrix *, const cJSON *,
                                                  const char *, const float *))
{
    cJSON *root = test_read_json(FIXTURE);
    cp_safetensors *st = NULL;
    cp_error err = {0};
    if (cp_safetensors_open(test_shared("models/stories260K/model.safetensors"), &st, &err) !=
        CP_OK) {
        CHECK_MSG(0, "%s", err.msg);
        cJSON_Delete(root);
        return;
    }
    const cJSON *matrices = cJSON_GetObjectItemCaseSensitive(root, "matrices");
    CHECK(cJSON_GetArraySize(matrices) == 10);
    const cJSON *entry;
    cJSON_ArrayForEach(entry, matrices)
    {
        const char *name = cJSON_GetObjectItemCaseSensitive(entry, "name")->valuestring;
        int rows = cJSON_GetObjectItemCaseSensitive(entry, "rows")->valueint;
        int cols = cJSON_GetObjectItemCaseSensitive(entry, "cols")->valueint;
        float *w = load_weight(st, name, rows, cols);
        cp_nf4_matrix q;
        if (w && quantize_ok(&q, w, rows, cols, double_quant)) {
            check(&q, entry, name, w);
            cp_nf4_free(&q);
        }
        free(w);
    }
    cp_safetensors_close(st);
    cJSON_Delete(root);
}

static void check_plain(const cp_nf4_matrix *q, const cJSON *entry, const char *name,
                        const float *w)
{
    (void)w;
    size_t n = (size_t)q->rows * q->cols;
    check_bytes("codes", name, q->codes, (n + 1) / 2,
                cJSON_GetObjectItemCaseSensitive(entry, "codes")->valuestring);
    check_floats("absmax", name, q->absmax, q->n_blocks,
                 cJSON_GetObjectItemCaseSensitive(entry, "absmax"));
}

TEST(nf4_real_weights_match_reference) { for_each_fixture_matrix(0, check_plain); }

static void check_double_quant(const cp_nf4_matrix *q, const cJSON *entry, const char *name,
                               const float *w)
{
    const cJSON *dq = cJSON_GetObjectItemCaseSensitive(entry, "double_quant");
    size_t n = (size_t)q->rows * q->cols;
    check_bytes("codes", name, q->codes, (n + 1) / 2,
                cJSON_GetObjectItemCaseSensitive(entry, "codes")->valuestring);
    check_bytes("scale codes", name, q->scale_codes, q->n_blocks,
                cJSON_GetObjectItemCaseSensitive(dq, "scale_codes")->valuestring);
    check_floats("scale absmax", name, q->scale_absmax,
                 (q->n_blocks + CP_NF4_SCALE_BLOCK - 1) / CP_NF4_SCALE_BLOCK,
                 cJSON_GetObjectItemCaseSensitive(dq, "scale_absmax"));
    CHECK(q->scale_mean == (float)cJSON_GetObjectItemCaseSensitive(dq, "scale_mean")->valuedouble);

    /* The errors are sums in double, in another order than numpy's. */
    CHECK_CLOSE(q->scale_rms_error,
                cJSON_GetObjectItemCaseSensitive(dq, "scale_rms_error")->valuedouble, 1e-9);
    CHECK_CLOSE(q->scale_max_rel_error,
                cJSON_GetObjectItemCaseSensitive(dq, "scale_max_rel_error")->valuedouble, 1e-9);
    float *back = dequantized(q);
    double weight_rms = rms_diff(back, w, n);
    CHECK_CLOSE(weight_rms, cJSON_GetObjectItemCaseSensitive(dq, "weight_rms_error")->valuedouble,
                1e-6);
    printf("    %-40s double quant: scale rms error %.3g, max rel %.3g, weight rms error %.6g\n",
           name, q->scale_rms_error, q->scale_max_rel_error, weight_rms);
    free(back);
}

TEST(nf4_double_quant_matches_reference) { for_each_fixture_matrix(1, check_double_quant); }

/* ---- round trips and partial blocks ---- */

/* Checks |w - dequantize(quantize(w))| <= absmax * NF4_MAX_HALF_GAP for every
 * element, and that the last block's absmax covers only its own elements. */
static void check_round_trip(const float *w, int rows, int cols, const char *label)
{
    cp_nf4_matrix q;
    if (!quantize_ok(&q, w, rows, cols, 0))
        return;
    size_t n = (size_t)rows * cols;
    CHECK_EQ_INT(q.n_blocks, (n + 63) / 64);
    float *back = dequantized(&q);
    size_t worst = 0;
    double worst_ratio = 0.0;
    for (size_t i = 0; i < n; i++) {
        double ratio = fabs((double)w[i] - back[i]) / q.absmax[i / 64];
        if (ratio > worst_ratio)
            worst_ratio = ratio, worst = i;
    }
    CHECK_MSG(worst_ratio <= NF4_MAX_HALF_GAP * (1 + 1e-6),
              "%s (%d, %d): element %zu: |%.9g - %.9g| is %.6g of its absmax, above %.6g", label,
              rows, cols, worst, (double)w[worst], (double)back[worst], worst_ratio,
              (double)NF4_MAX_HALF_GAP);

    float last_max = 0.0f;
    for (size_t i = (q.n_blocks - 1) * 64; i < n; i++)
        last_max = fmaxf(last_max, fabsf(w[i]));
    CHECK_MSG(q.absmax[q.n_blocks - 1] == last_max, "%s (%d, %d): last absmax %g, expected %g",
              label, rows, cols, (double)q.absmax[q.n_blocks - 1], (double)last_max);
    if (n % 2)
        CHECK_MSG((q.codes[n / 2] & 15) == 0, "%s (%d, %d): odd count, last low nibble %d", label,
                  rows, cols, q.codes[n / 2] & 15);

    /* Ranges that start in a low nibble or straddle blocks match the whole. */
    for (size_t start = 0; start < n; start += 29) {
        size_t count = n - start < 100 ? n - start : 100;
        float part[100];
        cp_nf4_dequantize_range(&q, start, count, part);
        CHECK_MSG(memcmp(part, back + start, count * sizeof *part) == 0,
                  "%s (%d, %d): range at %zu differs", label, rows, cols, start);
    }
    cp_nf4_free(&q);
    free(back);
}

TEST(nf4_round_trip_error_bound)
{
    static const int shapes[][2] = {{1, 1}, {3, 5}, {1, 127}, {7, 65}, {2, 33},
                                    {64, 64}, {300, 77}, {13, 1000}};
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int rows = shapes[s][0], cols = shapes[s][1];
        size_t n = (size_t)rows * cols;
        float *normal = normal_array(n, 100 + s, 0.02f);
        float *uniform = uniform_array(n, 200 + s, -3.0f, 1.0f);
        check_round_trip(normal, rows, cols, "normal");
        check_round_trip(uniform, rows, cols, "uniform");
        free(normal), free(uniform);
    }
}

/* Values that are an NF4 value times a power-of-two absmax come back exactly. */
TEST(nf4_round_trip_exact_values)
{
    float w[7 * 37];
    for (int i = 0; i < 7 * 37; i++)
        w[i] = cp_nf4_values[(i * 5) % 16] * ((i / 64) % 2 ? 0.25f : 8.0f);
    for (int b = 0; b < 4; b++)
        w[b * 64 + 3] = (b % 2 ? 0.25f : 8.0f); /* every full block holds its absmax */
    cp_nf4_matrix q;
    if (!quantize_ok(&q, w, 7, 37, 0))
        return;
    /* The last, partial block's absmax is not a power of two. */
    float *back = dequantized(&q);
    int i = 0;
    while (i < 256 && back[i] == w[i])
        i++;
    CHECK_MSG(i == 256, "element %d: %g != %g", i, (double)back[i], (double)w[i]);
    cp_nf4_free(&q);
    free(back);
}

/* A block of zeros stores absmax 0 and the NF4 zero. A single block under
 * double quantization decodes its scale exactly, because its centered scale is 0. */
TEST(nf4_zero_block_and_single_block)
{
    float w[2 * 70] = {0};
    for (int i = 64; i < 140; i++)
        w[i] = 0.01f * (float)(i - 100);
    cp_nf4_matrix q;
    if (!quantize_ok(&q, w, 2, 70, 0))
        return;
    CHECK(q.absmax[0] == 0.0f);
    for (int i = 0; i < 32; i++)
        CHECK_EQ_INT(q.codes[i], 0x77);
    float *back = dequantized(&q);
    for (int i = 0; i < 64; i++)
        CHECK(back[i] == 0.0f);
    cp_nf4_free(&q), free(back);

    float one[40];
    for (int i = 0; i < 40; i++)
        one[i] = 0.1f * (float)(i - 17);
    if (!quantize_ok(&q, one, 5, 8, 1))
        return;
    CHECK_EQ_INT(q.n_blocks, 1);
    CHECK(cp_nf4_block_scale(&q, 0) == one[39]);
    CHECK(q.scale_rms_error == 0.0);
    cp_nf4_free(&q);
}

/* ---- storage ---- */

TEST(nf4_bytes_within_budget)
{
    static const int shapes[][2] = {{768, 768}, {768, 3072}, {3072, 768}};
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
        int rows = shapes[s][0], cols = shapes[s][1];
        size_t n = (size_t)rows * cols;
        float *w = normal_array(n, 300 + s, 0.02f);
        for (int dq = 0; dq < 2; dq++) {
            cp_nf4_matrix q;
            if (!quantize_ok(&q, w, rows, cols, dq))
                continue;
            size_t blocks = n / 64;
            size_t expected = dq ? n / 2 + blocks + (blocks + 255) / 256 * 4 + 4
                                 : n / 2 + blocks * 4;
            double ratio = (double)cp_nf4_bytes(&q) / (double)(n * sizeof(float));
            CHECK_EQ_INT(cp_nf4_bytes(&q), expected);
            CHECK_MSG(ratio <= 0.15, "(%d, %d) double quant %d: %.4f of the fp32 bytes", rows,
                      cols, dq, ratio);
            printf("    (%d, %d) %s: %zu bytes, %.4f of fp32\n", rows, cols,
                   dq ? "double quant" : "fp32 scales", cp_nf4_bytes(&q), ratio);
            cp_nf4_free(&q);
        }
        free(w);
    }
}

/* ---- double quantization error ---- */

/* Every decoded scale lies within half a map step of the scale it replaces,
 * and the weight error grows by at most 2% over float32 scales. */
static void check_double_quant_error(const float *w, int rows, int cols, const char *label)
{
    cp_nf4_matrix plain, dq;
    if (!quantize_ok(&plain, w, rows, cols, 0))
        return;
    if (!quantize_ok(&dq, w, rows, cols, 1)) {
        cp_nf4_free(&plain);
        return;
    }
    for (size_t b = 0; b < dq.n_blocks; b++) {
        double diff = fabs((double)cp_nf4_block_scale(&dq, b) - plain.absmax[b]);
        double bound = DYNAMIC_MAX_HALF_GAP * dq.scale_absmax[b / CP_NF4_SCALE_BLOCK] +
                       1e-6 * plain.absmax[b];
        if (diff > bound) {
            CHECK_MSG(0, "%s block %zu: scale error %.3g above %.3g", label, b, diff, bound);
            break;
        }
    }
    size_t n = (size_t)rows * cols;
    float *back_plain = dequantized(&plain), *back_dq = dequantized(&dq);
    double rms_plain = rms_diff(back_plain, w, n), rms_dq = rms_diff(back_dq, w, n);
    CHECK_MSG(rms_dq <= 1.02 * rms_plain, "%s: weight rms error %.6g with double quant, %.6g without",
              label, rms_dq, rms_plain);
    printf("    %s (%d, %d): scale rms error %.3g, max rel %.3g; weight rms error %.6g "
           "(%.6g with fp32 scales)\n",
           label, rows, cols, dq.scale_rms_error, dq.scale_max_rel_error, rms_dq, rms_plain);
    cp_nf4_free(&plain), cp_nf4_free(&dq);
    free(back_plain), free(back_dq);
}

TEST(nf4_double_quant_error_bounded)
{
    float *w = normal_array((size_t)768 * 3072, 400, 0.02f);
    check_double_quant_error(w, 768, 3072, "normal");
    free(w);

    cp_safetensors *st = NULL;
    cp_error err = {0};
    if (cp_safetensors_open(test_shared("models/stories260K/model.safetensors"), &st, &err) !=
        CP_OK) {
        CHECK_MSG(0, "%s", err.msg);
        return;
    }
    static const char *names[] = {"model.layers.2.mlp.up_proj.weight",
                                  "model.layers.3.self_attn.o_proj.weight"};
    for (int i = 0; i < 2; i++) {
        const cp_st_tensor *t = cp_safetensors_find(st, names[i]);
        CHECK_MSG(t && t->ndim == 2, "%s: missing or not 2-D", names[i]);
        if (!t || t->ndim != 2)
            continue;
        int rows = (int)t->shape[0], cols = (int)t->shape[1];
        float *real = load_weight(st, names[i], rows, cols);
        if (real)
            check_double_quant_error(real, rows, cols, names[i]);
        free(real);
    }
    cp_safetensors_close(st);
}

/* ---- fused products ---- */

/* (N, rows, cols, bias, double quant): single-threaded and threaded, column
 * counts past one 512-column tile, row counts past one 64-row tile, and
 * element counts that are odd or not a multiple of 64. */
static const int product_cases[][5] = {
    {1, 1, 1, 1, 0},      {5, 7, 3, 0, 0},     {3, 37, 65, 1, 1},  {70, 130, 200, 0, 0},
    {128, 64, 1100, 1, 0}, {17, 600, 77, 0, 1}, {1, 333, 555, 1, 1}, {64, 129, 513, 0, 0},
};

TEST(nf4_forward_matches_sgemm)
{
    for (size_t s = 0; s < sizeof product_cases / sizeof *product_cases; s++) {
        int N = product_cases[s][0], rows = product_cases[s][1], cols = product_cases[s][2];
        int has_bias = product_cases[s][3], dq = product_cases[s][4];
        float *w = normal_array((size_t)rows * cols, 500 + s, 0.05f);
        float *x = uniform_array((size_t)N * cols, 600 + s, -1, 1);
        float *bias = has_bias ? uniform_array((size_t)rows, 700 + s, -1, 1) : NULL;
        cp_nf4_matrix q;
        if (!quantize_ok(&q, w, rows, cols, dq))
            continue;
        float *deq = dequantized(&q);
        size_t n_out = (size_t)N * rows;
        float *out = malloc(n_out * sizeof *out), *want = malloc(n_out * sizeof *want);
        float *ref = malloc(n_out * sizeof *ref);

        cp_error err = {0};
        CHECK_EQ_INT(cp_nf4_matmul_forward(out, x, &q, bias, N, &err), CP_OK);
        cp_matmul_forward(want, x, deq, bias, N, cols, rows);
        cp_nf4_matmul_forward_ref(ref, x, &q, bias, N);
        CHECK_MSG(relative_diff(out, want, n_out) <= FUSED_TOL,
                  "(%d, %d, %d): fused vs sgemm %.3g", N, rows, cols,
                  relative_diff(out, want, n_out));
        CHECK_MSG(relative_diff(out, ref, n_out) <= FUSED_TOL, "(%d, %d, %d): fused vs ref %.3g",
                  N, rows, cols, relative_diff(out, ref, n_out));
        cp_nf4_free(&q);
        free(w), free(x), free(bias), free(deq), free(out), free(want), free(ref);
    }
}

TEST(nf4_backward_matches_sgemm)
{
    for (size_t s = 0; s < sizeof product_cases / sizeof *product_cases; s++) {
        int N = product_cases[s][0], rows = product_cases[s][1], cols = product_cases[s][2];
        int dq = product_cases[s][4];
        float *w = normal_array((size_t)rows * cols, 800 + s, 0.05f);
        float *dout = uniform_array((size_t)N * rows, 900 + s, -1, 1);
        cp_nf4_matrix q;
        if (!quantize_ok(&q, w, rows, cols, dq))
            continue;
        float *deq = dequantized(&q);

        /* Nonzero starting gradients, so that every kernel must accumulate. */
        size_t n_in = (size_t)N * cols;
        float *dinp = uniform_array(n_in, 1000 + s, -1, 1);
        float *want = copy_array(dinp, n_in), *ref = copy_array(dinp, n_in);
        cp_error err = {0};
        CHECK_EQ_INT(cp_nf4_matmul_backward(dinp, dout, &q, N, &err), CP_OK);
        cp_matmul_backward(want, NULL, NULL, dout, NULL, deq, N, cols, rows);
        cp_nf4_matmul_backward_ref(ref, dout, &q, N);
        CHECK_MSG(relative_diff(dinp, want, n_in) <= FUSED_TOL,
                  "(%d, %d, %d): fused vs sgemm %.3g", N, rows, cols,
                  relative_diff(dinp, want, n_in));
        CHECK_MSG(relative_diff(dinp, ref, n_in) <= FUSED_TOL, "(%d, %d, %d): fused vs ref %.3g",
                  N, rows, cols, relative_diff(dinp, ref, n_in));
        cp_nf4_free(&q);
        free(w), free(dout), free(deq), free(dinp), free(want), free(ref);
    }
}

/* L = Σ r ⊙ forward(x), whose gradient in x is the backward with dout = r,
 * against central differences. The forward is linear in x, so only float32
 * rounding separates the two: 1e-3 as for the other ops (tests/test_grad_ops.c). */
TEST(nf4_backward_finite_differences)
{
    static const int shapes[][3] = {{3, 37, 65}, {70, 40, 30}};
    const float eps = 1e-2f;
    for (size_t s = 0; s < 2; s++) {
        int N = shapes[s][0], rows = shapes[s][1], cols = shapes[s][2];
        float *w = normal_array((size_t)rows * cols, 1100 + s, 0.1f);
        float *x = uniform_array((size_t)N * cols, 1200 + s, -1, 1);
        float *r = uniform_array((size_t)N * rows, 1300 + s, -1, 1);
        cp_nf4_matrix q;
        if (!quantize_ok(&q, w, rows, cols, 1))
            continue;
        size_t n_in = (size_t)N * cols, n_out = (size_t)N * rows;
        float *dx = calloc(n_in, sizeof *dx), *out = malloc(n_out * sizeof *out);
        cp_error err = {0};
        CHECK_EQ_INT(cp_nf4_matmul_backward(dx, r, &q, N, &err), CP_OK);

        double max_err = 0.0, max_grad = 0.0;
        for (size_t i = 0; i < n_in; i += 7) {
            float saved = x[i], up = saved + eps, down = saved - eps;
            double loss[2];
            for (int side = 0; side < 2; side++) {
                x[i] = side ? down : up;
                cp_nf4_matmul_forward(out, x, &q, NULL, N, &err);
                loss[side] = 0.0;
                for (size_t o = 0; o < n_out; o++)
                    loss[side] += (double)r[o] * out[o];
            }
            x[i] = saved;
            double numeric = (loss[0] - loss[1]) / ((double)up - (double)down);
            max_err = fmax(max_err, fabs(dx[i] - numeric));
            max_grad = fmax(max_grad, fabs(numeric));
        }
        CHECK_MSG(max_err <= 1e-3 * max_grad, "(%d, %d, %d): dx error %.3g of max %.3g", N,
                  rows, cols, max_err / max_grad, max_grad);
        cp_nf4_free(&q);
        free(w), free(x), free(r), free(dx), free(out);
    }
}

/* ---- invalid input ---- */

TEST(nf4_quantize_rejects_invalid_input)
{
    float w[3 * 4] = {0.5f, -1.0f, 0.25f, 0.0f, 1.0f, 2.0f, 3.0f, 4.0f};
    w[1 * 4 + 2] = NAN;
    cp_nf4_matrix q;
    cp_error err = {0};
    CHECK_EQ_INT(cp_nf4_quantize(&q, w, 3, 4, 0, &err), CP_ERR_INPUT);
    CHECK_MSG(strstr(err.msg, "row 1, column 2"), "message: %s", err.msg);
    cp_nf4_free(&q);

    w[1 * 4 + 2] = INFINITY;
    CHECK_EQ_INT(cp_nf4_quantize(&q, w, 3, 4, 1, &err), CP_ERR_INPUT);
    cp_nf4_free(&q);

    CHECK_EQ_INT(cp_nf4_quantize(&q, w, 0, 4, 0, &err), CP_ERR_INPUT);
    CHECK_MSG(strstr(err.msg, "invalid weight shape (0, 4)"), "message: %s", err.msg);
    cp_nf4_free(&q);
}
