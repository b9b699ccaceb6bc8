/*
 * Tests for the GGUF reader: llama.cpp's vocab-only files from the shared
 * folder, crafted files holding every metadata type and every supported
 * tensor type with hand-built Q8_0/Q4_0 blocks, one crafted file per defect
 * the reader must reject with CP_ERR_INPUT, and a truncation and byte-flip
 * sweep over a small valid file (run it under SANITIZE=1 to catch reads
 * past the map).
 */
#include "test.h"

#include <stdint.h>
#include <stdlib.h>

#include "core/dtype.h"
#include "core/file.h"
#include "io/gguf.h"

/* ---- a byte buffer and GGUF writer helpers ---- */

typedef struct buf {
    uint8_t *data;
    size_t len, cap;
} buf;

static void put_bytes(buf *b, const void *p, size_t n)
{
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n)
            cap *= 2;
        uint8_t *grown = realloc(b->data, cap);
        if (!grown)
            abort();
        b->data = grown;
        b->cap = cap;
    }
    if (n)
        memcpy(b->data + b->len, p, n);
    b->len += n;
}

static void put_le(buf *b, uint64_t v, int n)
{
    uint8_t bytes[8];
    for (int i = 0; i < n; i++)
        bytes[i] = (uint8_t)(v >> (8 * i));
    put_bytes(b, bytes, (size_t)n);
}

static void put_u8(buf *b, uint8_t v) { put_le(b, v, 1); }
static void put_u16(buf *b, uint16_t v) { put_le(b, v, 2); }
static void put_u32(buf *b, uint32_t v) { put_le(b, v, 4); }
static void put_u64(buf *b, uint64_t v) { put_le(b, v, 8); }

static void put_f32(buf *b, float f)
{
    uint32_t bits;
    memcpy(&bits, &f, 4);
    put_u32(b, bits);
}

static void put_str(buf *b, const char *s)
{
    put_u64(b, strlen(s));
    put_bytes(b, s, strlen(s));
}

static void put_header(buf *b, uint32_t version, uint64_t n_tensors, uint64_t n_kvs)
{
    put_bytes(b, "GGUF", 4);
    put_u32(b, version);
    put_u64(b, n_tensors);
    put_u64(b, n_kvs);
}

static void put_kv_str(buf *b, const char *key, const char *value)
{
    put_str(b, key);
    put_u32(b, CP_GGUF_TYPE_STRING);
    put_str(b, value);
}

static void put_kv_u32(buf *b, const char *key, uint32_t value)
{
    put_str(b, key);
    put_u32(b, CP_GGUF_TYPE_UINT32);
    put_u32(b, value);
}

static void put_tensor_info(buf *b, const char *name, uint32_t n_dims, const uint64_t *dims,
                            uint32_t type, uint64_t offset)
{
    put_str(b, name);
    put_u32(b, n_dims);
    for (uint32_t d = 0; d < n_dims; d++)
        put_u64(b, dims[d]);
    put_u32(b, type);
    put_u64(b, offset);
}

static void put_pad(buf *b, size_t align)
{
    while (b->len % align)
        put_u8(b, 0);
}

/* Writes b to a new file and opens it. Returns the status; *g is NULL
 * unless it is CP_OK. */
static cp_status open_buf(const buf *b, cp_gguf **g, cp_error *err)
{
    const void *bytes = b->data ? (const void *)b->data : ""; /* the empty file */
    char *path = test_write_file(test_tmpdir(), "t.gguf", bytes, b->len);
    cp_status s = cp_gguf_open(path, g, err);
    free(path);
    return s;
}

/* Checks that b is rejected with CP_ERR_INPUT and a message holding each
 * of the given fragments (NULL-terminated). */
static void check_rejected(const buf *b, const char *const *fragments, int line)
{
    cp_gguf *g = NULL;
    cp_error err = {0};
    cp_status s = open_buf(b, &g, &err);
    CHECK_MSG(s == CP_ERR_INPUT, "line %d: status %d, expected CP_ERR_INPUT", line, (int)s);
    CHECK_MSG(g == NULL, "line %d: a handle was returned for a rejected file", line);
    CHECK_MSG(strstr(err.msg, "t.gguf: at byte ") != NULL,
              "line %d: message lacks the file and offset: %s", line, err.msg);
    for (int i = 0; fragments[i]; i++)
        CHECK_MSG(strstr(err.msg, fragments[i]) != NULL, "line %d: message lacks \"%s\": %s",
                  line, fragments[i], err.msg);
    cp_gguf_close(g);
}

#define CHECK_REJECTED(b, ...)                                                 \
    do {                                                                       \
        const char *const frags_[] = {__VA_ARGS__, NULL};                      \
        check_rejected((b), frags_, __LINE__);                                 \
    } while (0)

static int str_eq(cp_gguf_str s, const char *c)
{
    return s.len == strlen(c) && memcmp(s.data, c, s.len) == 0;
}

/* ---- the sample file: every metadata type, every tensor type ---- */

#define SAMPLE_KVS 17
#define SAMPLE_TENSORS 5

/* Q8_0: two blocks. Block 0 has scale 0.5 and codes 8j - 128, block 1 has
 * scale 2 and codes j - 16. */
static void put_q8_0_blocks(buf *b)
{
    put_u16(b, 0x3800); /* f16 0.5 */
    for (int j = 0; j < 32; j++)
        put_u8(b, (uint8_t)(int8_t)(8 * j - 128));
    put_u16(b, 0x4000); /* f16 2.0 */
    for (int j = 0; j < 32; j++)
        put_u8(b, (uint8_t)(int8_t)(j - 16));
}

static float q8_0_expected(int i)
{
    return i < 32 ? (float)(8 * i - 128) * 0.5f : (float)(i - 32 - 16) * 2.0f;
}

/* Q4_0: two blocks. Byte j stores code j (low nibble, element j) and code
 * 15 - j (high nibble, element j + 16). Scales are 0.25 and -1. */
static void put_q4_0_blocks(buf *b)
{
    uint16_t scales[2] = {0x3400, 0xbc00}; /* f16 0.25, -1.0 */
    for (int k = 0; k < 2; k++) {
        put_u16(b, scales[k]);
        for (int j = 0; j < 16; j++)
            put_u8(b, (uint8_t)(j | ((15 - j) << 4)));
    }
}

static float q4_0_expected(int i)
{
    float scale = i < 32 ? 0.25f : -1.0f;
    int j = i % 32;
    int code = j < 16 ? j : 15 - (j - 16);
    return (float)(code - 8) * scale;
}

/* Writes the metadata of the sample file (SAMPLE_KVS pairs). */
static void put_sample_kvs(buf *b)
{
    put_kv_str(b, "general.architecture", "llama");
    put_kv_u32(b, "general.alignment", 32);
    put_str(b, "t.u8"), put_u32(b, CP_GGUF_TYPE_UINT8), put_u8(b, 200);
    put_str(b, "t.i8"), put_u32(b, CP_GGUF_TYPE_INT8), put_u8(b, (uint8_t)-5);
    put_str(b, "t.u16"), put_u32(b, CP_GGUF_TYPE_UINT16), put_u16(b, 60000);
    put_str(b, "t.i16"), put_u32(b, CP_GGUF_TYPE_INT16), put_u16(b, (uint16_t)-300);
    put_kv_u32(b, "t.u32", 4000000000u);
    put_str(b, "t.i32"), put_u32(b, CP_GGUF_TYPE_INT32), put_u32(b, (uint32_t)-70000);
    put_str(b, "t.f32"), put_u32(b, CP_GGUF_TYPE_FLOAT32), put_f32(b, 1e-5f);
    put_str(b, "t.bool"), put_u32(b, CP_GGUF_TYPE_BOOL), put_u8(b, 1);
    put_str(b, "t.u64"), put_u32(b, CP_GGUF_TYPE_UINT64), put_u64(b, 1ull << 40);
    put_str(b, "t.i64"), put_u32(b, CP_GGUF_TYPE_INT64), put_u64(b, (uint64_t)-(1ll << 40));
    put_str(b, "t.f64"), put_u32(b, CP_GGUF_TYPE_FLOAT64);
    double d = 0.125;
    uint64_t bits;
    memcpy(&bits, &d, 8);
    put_u64(b, bits);

    put_str(b, "t.tokens"), put_u32(b, CP_GGUF_TYPE_ARRAY);
    put_u32(b, CP_GGUF_TYPE_STRING), put_u64(b, 3);
    put_str(b, "<unk>"), put_str(b, ""), put_str(b, "\xe2\x96\x81the");

    put_str(b, "t.scores"), put_u32(b, CP_GGUF_TYPE_ARRAY);
    put_u32(b, CP_GGUF_TYPE_FLOAT32), put_u64(b, 3);
    put_f32(b, 0.0f), put_f32(b, -1.5f), put_f32(b, -1000.25f);

    put_str(b, "t.i16s"), put_u32(b, CP_GGUF_TYPE_ARRAY);
    put_u32(b, CP_GGUF_TYPE_INT16), put_u64(b, 2);
    put_u16(b, (uint16_t)-2), put_u16(b, 7);

    /* An array of two string arrays: ["a", "bc"] and []. */
    put_str(b, "t.nested"), put_u32(b, CP_GGUF_TYPE_ARRAY);
    put_u32(b, CP_GGUF_TYPE_ARRAY), put_u64(b, 2);
    put_u32(b, CP_GGUF_TYPE_STRING), put_u64(b, 2), put_str(b, "a"), put_str(b, "bc");
    put_u32(b, CP_GGUF_TYPE_STRING), put_u64(b, 0);
}

/* Writes the sample file: SAMPLE_KVS pairs, then an F32 (4, 2), F16 (3),
 * BF16 (2), Q8_0 (64) and Q4_0 (32, 2) tensor, each at a 32-byte offset. */
static void build_sample(buf *b)
{
    put_header(b, 3, SAMPLE_TENSORS, SAMPLE_KVS);
    put_sample_kvs(b);

    const uint64_t f32_dims[] = {4, 2}, f16_dims[] = {3}, bf16_dims[] = {2};
    const uint64_t q8_dims[] = {64}, q4_dims[] = {32, 2};
    put_tensor_info(b, "w.f32", 2, f32_dims, CP_GGML_TYPE_F32, 0);
    put_tensor_info(b, "w.f16", 1, f16_dims, CP_GGML_TYPE_F16, 32);
    put_tensor_info(b, "w.bf16", 1, bf16_dims, CP_GGML_TYPE_BF16, 64);
    put_tensor_info(b, "w.q8_0", 1, q8_dims, CP_GGML_TYPE_Q8_0, 96);
    put_tensor_info(b, "w.q4_0", 2, q4_dims, CP_GGML_TYPE_Q4_0, 96 + 68 + 28);
    put_pad(b, 32);

    size_t data_start = b->len;
    for (int i = 0; i < 8; i++)
        put_f32(b, 1.5f * (float)i);
    put_pad(b, 32);
    put_u16(b, 0x3c00), put_u16(b, 0xc000), put_u16(b, 0x3800); /* 1, -2, 0.5 */
    put_pad(b, 32);
    put_u16(b, 0x3f80), put_u16(b, 0xc040); /* bf16 1, -3 */
    put_pad(b, 32);
    CHECK_EQ_INT(b->len - data_start, 96);
    put_q8_0_blocks(b);
    put_pad(b, 32);
    CHECK_EQ_INT(b->len - data_start, 96 + 68 + 28);
    put_q4_0_blocks(b);
}

/* ---- sample round trip ---- */

TEST(gguf_sample_metadata)
{
    buf b = {0};
    build_sample(&b);
    cp_gguf *g = NULL;
    cp_error err = {0};
    CHECK_MSG(open_buf(&b, &g, &err) == CP_OK, "%s", err.msg);
    free(b.data);
    if (!g)
        return;
    CHECK_EQ_INT(cp_gguf_version(g), 3);
    CHECK_EQ_INT(cp_gguf_alignment(g), 32);
    CHECK_EQ_INT(cp_gguf_kv_count(g), SAMPLE_KVS);
    CHECK(str_eq(cp_gguf_kv_key(cp_gguf_kv_at(g, 0)), "general.architecture"));

    cp_gguf_str s = {0};
    CHECK(cp_gguf_get_str(g, "general.architecture", &s, &err) == CP_OK);
    CHECK(str_eq(s, "llama"));
    uint32_t u32;
    CHECK(cp_gguf_get_u32(g, "t.u32", &u32, &err) == CP_OK);
    CHECK_EQ_INT(u32, 4000000000u);
    int32_t i32;
    CHECK(cp_gguf_get_i32(g, "t.i32", &i32, &err) == CP_OK);
    CHECK_EQ_INT(i32, -70000);
    float f32;
    CHECK(cp_gguf_get_f32(g, "t.f32", &f32, &err) == CP_OK);
    CHECK(f32 == 1e-5f);
    int flag = 0;
    CHECK(cp_gguf_get_bool(g, "t.bool", &flag, &err) == CP_OK);
    CHECK_EQ_INT(flag, 1);

    const char *scalar_keys[] = {"t.u8", "t.i8", "t.u16", "t.i16", "t.u64", "t.i64", "t.f64"};
    const cp_gguf_type scalar_types[] = {CP_GGUF_TYPE_UINT8, CP_GGUF_TYPE_INT8,
                                         CP_GGUF_TYPE_UINT16, CP_GGUF_TYPE_INT16,
                                         CP_GGUF_TYPE_UINT64, CP_GGUF_TYPE_INT64,
                                         CP_GGUF_TYPE_FLOAT64};
    for (int i = 0; i < 7; i++) {
        const cp_gguf_kv *kv = cp_gguf_find_kv(g, scalar_keys[i]);
        CHECK_MSG(kv && cp_gguf_kv_type(kv) == scalar_types[i], "key %s", scalar_keys[i]);
    }
    CHECK(cp_gguf_find_kv(g, "t.missing") == NULL);
    CHECK(cp_gguf_find_kv(g, "t.u") == NULL);
    cp_gguf_close(g);
}

TEST(gguf_sample_arrays)
{
    buf b = {0};
    build_sample(&b);
    cp_gguf *g = NULL;
    cp_error err = {0};
    CHECK_MSG(open_buf(&b, &g, &err) == CP_OK, "%s", err.msg);
    free(b.data);
    if (!g)
        return;

    const cp_gguf_kv *kv = NULL;
    uint64_t n = 0;
    CHECK(cp_gguf_get_array(g, "t.tokens", CP_GGUF_TYPE_STRING, &kv, &n, &err) == CP_OK);
    CHECK_EQ_INT(n, 3);
    CHECK(str_eq(cp_gguf_array_str(kv, 0), "<unk>"));
    CHECK(str_eq(cp_gguf_array_str(kv, 1), ""));
    CHECK(str_eq(cp_gguf_array_str(kv, 2), "\xe2\x96\x81the"));

    CHECK(cp_gguf_get_array(g, "t.scores", CP_GGUF_TYPE_FLOAT32, &kv, &n, &err) == CP_OK);
    CHECK_EQ_INT(n, 3);
    CHECK(cp_gguf_array_number(kv, 1) == -1.5);
    CHECK(cp_gguf_array_number(kv, 2) == -1000.25);

    CHECK(cp_gguf_get_array(g, "t.i16s", CP_GGUF_TYPE_INT16, &kv, &n, &err) == CP_OK);
    CHECK(cp_gguf_array_number(kv, 0) == -2.0);
    CHECK(cp_gguf_array_number(kv, 1) == 7.0);

    cp_gguf_type elem_type;
    kv = cp_gguf_find_kv(g, "t.nested");
    CHECK(kv != NULL);
    if (kv) {
        cp_gguf_array_info(kv, &elem_type, &n);
        CHECK_EQ_INT(elem_type, CP_GGUF_TYPE_ARRAY);
        CHECK_EQ_INT(n, 2);
    }

    /* Type mismatches and missing keys name the key and both types. */
    CHECK(cp_gguf_get_array(g, "t.scores", CP_GGUF_TYPE_STRING, &kv, &n, &err) == CP_ERR_INPUT);
    CHECK(strstr(err.msg, "'t.scores' is an array of float32, expected an array of string") != NULL);
    uint32_t u32;
    CHECK(cp_gguf_get_u32(g, "general.architecture", &u32, &err) == CP_ERR_INPUT);
    CHECK(strstr(err.msg, "has type string, expected uint32") != NULL);
    CHECK(cp_gguf_get_u32(g, "t.absent", &u32, &err) == CP_ERR_INPUT);
    CHECK(strstr(err.msg, "'t.absent' not found") != NULL);
    cp_gguf_close(g);
}

TEST(gguf_sample_tensors)
{
    buf b = {0};
    build_sample(&b);
    cp_gguf *g = NULL;
    cp_error err = {0};
    CHECK_MSG(open_buf(&b, &g, &err) == CP_OK, "%s", err.msg);
    free(b.data);
    if (!g)
        return;
    CHECK_EQ_INT(cp_gguf_tensor_count(g), SAMPLE_TENSORS);
    CHECK(str_eq(cp_gguf_tensor_at(g, 3)->name, "w.q8_0"));
    CHECK(cp_gguf_find_tensor(g, "w.q") == NULL);

    float out[64];
    const cp_gguf_tensor *t = cp_gguf_find_tensor(g, "w.f32");
    CHECK(t != NULL);
    if (t) {
        CHECK_EQ_INT(t->n_dims, 2);
        CHECK_EQ_INT(t->dims[0], 4);
        CHECK_EQ_INT(t->dims[1], 2);
        CHECK_EQ_INT(t->dims[2], 1);
        CHECK_EQ_INT(t->n_elements, 8);
        CHECK_EQ_INT(t->n_bytes, 32);
        CHECK_EQ_INT(t->type, CP_GGML_TYPE_F32);
        cp_gguf_dequantize(t, out);
        for (int i = 0; i < 8; i++)
            CHECK(out[i] == 1.5f * (float)i);
    }

    t = cp_gguf_find_tensor(g, "w.f16");
    CHECK(t != NULL);
    if (t) {
        CHECK_EQ_INT(t->n_bytes, 6);
        cp_gguf_dequantize(t, out);
        CHECK(out[0] == 1.0f);
        CHECK(out[1] == -2.0f);
        CHECK(out[2] == 0.5f);
    }
    t = cp_gguf_find_tensor(g, "w.bf16");
    CHECK(t != NULL);
    if (t) {
        CHECK_EQ_INT(t->n_bytes, 4);
        cp_gguf_dequantize(t, out);
        CHECK(out[0] == 1.0f);
        CHECK(out[1] == -3.0f);
    }

    t = cp_gguf_find_tensor(g, "w.q8_0");
    CHECK(t != NULL);
    if (t) {
        CHECK_EQ_INT(t->n_bytes, 68);
        CHECK_EQ_INT(t->offset, 96);
        cp_gguf_dequantize(t, out);
        for (int i = 0; i < 64; i++)
            CHECK_MSG(out[i] == q8_0_expected(i), "q8_0[%d] = %g, expected %g", i, out[i],
                      q8_0_expected(i));
    }
    t = cp_gguf_find_tensor(g, "w.q4_0");
    CHECK(t != NULL);
    if (t) {
        CHECK_EQ_INT(t->n_bytes, 36);
        CHECK_EQ_INT(t->n_elements, 64);
        cp_gguf_dequantize(t, out);
        for (int i = 0; i < 64; i++)
            CHECK_MSG(out[i] == q4_0_expected(i), "q4_0[%d] = %g, expected %g", i, out[i],
                      q4_0_expected(i));
    }
    cp_gguf_close(g);
}

TEST(gguf_row_bytes)
{
    uint64_t bytes = 0;
    CHECK(cp_ggml_row_bytes(CP_GGML_TYPE_Q4_0, 64, &bytes));
    CHECK_EQ_INT(bytes, 36);
    CHECK(cp_ggml_row_bytes(CP_GGML_TYPE_Q8_0, 4096, &bytes));
    CHECK_EQ_INT(bytes, 128 * 34);
    CHECK(cp_ggml_row_bytes(CP_GGML_TYPE_BF16, 3, &bytes));
    CHECK_EQ_INT(bytes, 6);
    CHECK(!cp_ggml_row_bytes(CP_GGML_TYPE_Q8_0, 33, &bytes));
    CHECK(!cp_ggml_row_bytes(CP_GGML_TYPE_F32, UINT64_MAX / 2, &bytes));
    CHECK_EQ_STR(cp_ggml_type_name(12), "Q4_K");
    CHECK_EQ_STR(cp_ggml_type_name(30), "BF16");
    CHECK_EQ_STR(cp_ggml_type_name(1000), "unknown");
}

TEST(gguf_version2_default_alignment)
{
    /* Version 2, no general.alignment: tensors sit at multiples of 32. */
    buf b = {0};
    put_header(&b, 2, 1, 1);
    put_kv_str(&b, "general.architecture", "gpt2");
    const uint64_t dims[] = {2};
    put_tensor_info(&b, "x", 1, dims, CP_GGML_TYPE_F32, 0);
    put_pad(&b, 32);
    put_f32(&b, 3.0f), put_f32(&b, -4.0f);
    cp_gguf *g = NULL;
    cp_error err = {0};
    CHECK_MSG(open_buf(&b, &g, &err) == CP_OK, "%s", err.msg);
    free(b.data);
    if (!g)
        return;
    CHECK_EQ_INT(cp_gguf_version(g), 2);
    CHECK_EQ_INT(cp_gguf_alignment(g), CP_GGUF_DEFAULT_ALIGNMENT);
    float out[2];
    cp_gguf_dequantize(cp_gguf_tensor_at(g, 0), out);
    CHECK(out[0] == 3.0f);
    CHECK(out[1] == -4.0f);
    cp_gguf_close(g);
}

TEST(gguf_custom_alignment)
{
    /* general.alignment 64: the data section and offsets use 64, not 32. */
    buf b = {0};
    put_header(&b, 3, 2, 1);
    put_kv_u32(&b, "general.alignment", 64);
    const uint64_t dims[] = {1};
    put_tensor_info(&b, "a", 1, dims, CP_GGML_TYPE_F32, 0);
    put_tensor_info(&b, "b", 1, dims, CP_GGML_TYPE_F32, 64);
    put_pad(&b, 64);
    put_f32(&b, 5.0f);
    put_pad(&b, 64);
    put_f32(&b, 6.0f);
    cp_gguf *g = NULL;
    cp_error err = {0};
    CHECK_MSG(open_buf(&b, &g, &err) == CP_OK, "%s", err.msg);
    if (g) {
        CHECK_EQ_INT(cp_gguf_alignment(g), 64);
        float out = 0;
        cp_gguf_dequantize(cp_gguf_find_tensor(g, "b"), &out);
        CHECK(out == 6.0f);
        cp_gguf_close(g);
    }

    /* Offset 32 is aligned for the default but not for 64. */
    b.len = 0;
    put_header(&b, 3, 1, 1);
    put_kv_u32(&b, "general.alignment", 64);
    put_tensor_info(&b, "a", 1, dims, CP_GGML_TYPE_F32, 32);
    put_pad(&b, 64);
    for (int i = 0; i < 64; i++)
        put_u8(&b, 0);
    CHECK_REJECTED(&b, "tensor 'a' has data offset 32, expected a multiple of the alignment 64");
    free(b.data);
}

/* ---- llama.cpp's vocab-only files ---- */

/* Returns 1 if all n bytes are valid UTF-8 (no check for overlong forms). */
static int all_utf8(const uint8_t *s, size_t n)
{
    for (size_t i = 0; i < n;) {
        size_t len = s[i] < 0x80 ? 1 : (s[i] & 0xe0) == 0xc0 ? 2 : (s[i] & 0xf0) == 0xe0 ? 3
                   : (s[i] & 0xf8) == 0xf0 ? 4 : 0;
        if (len == 0 || n - i < len)
            return 0;
        for (size_t k = 1; k < len; k++)
            if ((s[i + k] & 0xc0) != 0x80)
                return 0;
        i += len;
    }
    return 1;
}

/* Returns 1 if the file went through a UTF-8 decoder that replaced every
 * invalid byte with U+FFFD (EF BF BD). A real GGUF file with float or large
 * integer values is never valid UTF-8 as a whole, so such a copy is damaged
 * beyond repair: the replaced bytes are lost. */
static int utf8_damaged(const char *path)
{
    cp_mapped_file map;
    cp_error err = {0};
    if (cp_file_map(path, &map, &err) != CP_OK)
        return 0;
    int damaged = map.size > 0 && all_utf8(map.data, map.size) &&
                  memmem(map.data, map.size, "\xef\xbf\xbd", 3) != NULL;
    cp_mapped_file_free(&map);
    return damaged;
}

/* Opens a shared vocab file. A damaged copy must be rejected with a
 * message naming the file and an offset. Then *g is NULL, so the caller
 * skips the value checks. */
static void open_vocab(const char *name, cp_gguf **g)
{
    char *path = test_shared(name);
    cp_error err = {0};
    cp_status s = cp_gguf_open(path, g, &err);
    if (!utf8_damaged(path)) {
        CHECK_MSG(s == CP_OK, "%s", err.msg);
        return;
    }
    fprintf(stderr, "    NOTE: %s is damaged (non-UTF-8 bytes replaced by U+FFFD); "
            "checking that it is rejected, value checks skipped\n", path);
    CHECK_EQ_INT(s, CP_ERR_INPUT);
    CHECK(*g == NULL);
    CHECK_MSG(strstr(err.msg, path) != NULL && strstr(err.msg, ": at byte ") != NULL,
              "message lacks the file and offset: %s", err.msg);
}

/* NOTE: the shared copies of both files are damaged, so the value checks
 * below are skipped there. The GPT-2 checks pass on a copy whose 9 replaced
 * bytes were restored by hand, and the Llama checks have never run. */
TEST(gguf_vocab_gpt2)
{
    cp_gguf *g = NULL;
    open_vocab("tokenizers/gguf-vocab/ggml-vocab-gpt-2.gguf", &g);
    if (!g)
        return;
    cp_error err = {0};
    cp_gguf_str s = {0};
    CHECK(cp_gguf_get_str(g, "general.architecture", &s, &err) == CP_OK);
    CHECK(str_eq(s, "gpt2"));
    CHECK(cp_gguf_get_str(g, "tokenizer.ggml.model", &s, &err) == CP_OK);
    CHECK(str_eq(s, "gpt2"));
    CHECK_EQ_INT(cp_gguf_tensor_count(g), 0);

    const cp_gguf_kv *kv = NULL;
    uint64_t n = 0;
    CHECK(cp_gguf_get_array(g, "tokenizer.ggml.tokens", CP_GGUF_TYPE_STRING, &kv, &n, &err) == CP_OK);
    CHECK_EQ_INT(n, 50257);
    if (n == 50257) {
        CHECK(str_eq(cp_gguf_array_str(kv, 0), "!"));
        CHECK(str_eq(cp_gguf_array_str(kv, 50256), "<|endoftext|>"));
    }
    /* The first line of GPT-2's merges.txt after the version line. */
    n = 0;
    CHECK(cp_gguf_get_array(g, "tokenizer.ggml.merges", CP_GGUF_TYPE_STRING, &kv, &n, &err) == CP_OK);
    CHECK_EQ_INT(n, 50000);
    if (n > 0)
        CHECK(str_eq(cp_gguf_array_str(kv, 0), "\xc4\xa0 t"));
    cp_gguf_close(g);
}

TEST(gguf_vocab_llama_spm)
{
    cp_gguf *g = NULL;
    open_vocab("tokenizers/gguf-vocab/ggml-vocab-llama-spm.gguf", &g);
    if (!g)
        return;
    cp_error err = {0};
    cp_gguf_str s = {0};
    CHECK(cp_gguf_get_str(g, "general.architecture", &s, &err) == CP_OK);
    CHECK(str_eq(s, "llama"));
    CHECK(cp_gguf_get_str(g, "tokenizer.ggml.model", &s, &err) == CP_OK);
    CHECK(str_eq(s, "llama"));

    const cp_gguf_kv *kv = NULL;
    uint64_t n = 0;
    CHECK(cp_gguf_get_array(g, "tokenizer.ggml.tokens", CP_GGUF_TYPE_STRING, &kv, &n, &err) == CP_OK);
    CHECK_EQ_INT(n, 32000);
    if (n == 32000) {
        CHECK(str_eq(cp_gguf_array_str(kv, 0), "<unk>"));
        CHECK(str_eq(cp_gguf_array_str(kv, 1), "<s>"));
        CHECK(str_eq(cp_gguf_array_str(kv, 2), "</s>"));
        CHECK(str_eq(cp_gguf_array_str(kv, 3), "<0x00>"));
        CHECK(str_eq(cp_gguf_array_str(kv, 29871), "\xe2\x96\x81"));
    }
    CHECK(cp_gguf_get_array(g, "tokenizer.ggml.scores", CP_GGUF_TYPE_FLOAT32, &kv, &n, &err) == CP_OK);
    CHECK_EQ_INT(n, 32000);
    cp_gguf_close(g);
}

/* ---- crafted defects ---- */

/* Starts a file with n_tensors descriptions to follow and one key. */
static void start_tensor_file(buf *b, uint64_t n_tensors)
{
    put_header(b, 3, n_tensors, 1);
    put_kv_str(b, "general.architecture", "llama");
}

/* Pads to the data section and appends data_len zero bytes. */
static void finish_tensor_file(buf *b, size_t data_len)
{
    put_pad(b, 32);
    for (size_t i = 0; i < data_len; i++)
        put_u8(b, 0);
}

TEST(gguf_rejects_bad_header)
{
    buf b = {0};
    CHECK_REJECTED(&b, "expected 4 bytes of magic", "found 0");

    put_bytes(&b, "GGML", 4), put_u32(&b, 3), put_u64(&b, 0), put_u64(&b, 0);
    CHECK_REJECTED(&b, "at byte 0:", "expected the magic \"GGUF\", found bytes 47 47 4d 4c");

    b.len = 0;
    put_header(&b, 1, 0, 0);
    CHECK_REJECTED(&b, "at byte 4:", "version 1 is not supported", "convert the model again");
    b.len = 0;
    put_header(&b, 4, 0, 0);
    CHECK_REJECTED(&b, "expected GGUF version 2 or 3, found 4");
    b.len = 0;
    put_header(&b, 3u << 24, 0, 0);
    CHECK_REJECTED(&b, "big-endian");

    b.len = 0;
    put_header(&b, 3, 0, 0);
    b.len = 10; /* inside the tensor count */
    CHECK_REJECTED(&b, "at byte 8:", "expected 8 bytes of tensor count, found 2");

    b.len = 0;
    put_header(&b, 3, 1ull << 40, 0);
    CHECK_REJECTED(&b, "at byte 8:", "tensor count 1099511627776");
    b.len = 0;
    put_header(&b, 3, 0, UINT64_MAX);
    CHECK_REJECTED(&b, "at byte 16:", "metadata key/value count 18446744073709551615");
    free(b.data);
}

TEST(gguf_rejects_bad_strings_and_values)
{
    /* A key length past the end of the file. */
    buf b = {0};
    put_header(&b, 3, 0, 1);
    put_u64(&b, 1ull << 62);
    put_bytes(&b, "general.architecture", 20);
    CHECK_REJECTED(&b, "at byte 24:", "metadata key has length 4611686018427387904", "20 bytes remain");

    /* A string value length of UINT64_MAX: pos + len must not wrap. */
    b.len = 0;
    put_header(&b, 3, 0, 1);
    put_str(&b, "k"), put_u32(&b, CP_GGUF_TYPE_STRING), put_u64(&b, UINT64_MAX);
    CHECK_REJECTED(&b, "at byte 37:", "string value has length 18446744073709551615");

    /* Truncated inside a u32 value, and before a value type. */
    b.len = 0;
    put_header(&b, 3, 0, 1);
    put_kv_u32(&b, "k", 7);
    b.len -= 2;
    CHECK_REJECTED(&b, "expected 1 uint32 values", "only 2 bytes remain");
    b.len = 0;
    put_header(&b, 3, 0, 1);
    put_str(&b, "kkkk"), put_u16(&b, CP_GGUF_TYPE_UINT32);
    CHECK_REJECTED(&b, "at byte 36:", "expected 4 bytes of metadata value type, found 2");

    /* An unknown value type, and a bool that is neither 0 nor 1. */
    b.len = 0;
    put_header(&b, 3, 0, 1);
    put_str(&b, "k"), put_u32(&b, 13), put_u8(&b, 0);
    CHECK_REJECTED(&b, "at byte 33:", "expected a value type id from 0 to 12, found 13");
    b.len = 0;
    put_header(&b, 3, 0, 1);
    put_str(&b, "k"), put_u32(&b, CP_GGUF_TYPE_BOOL), put_u8(&b, 2);
    CHECK_REJECTED(&b, "at byte 37:", "expected a bool (0 or 1), found 2");

    /* A duplicate key names both positions. */
    b.len = 0;
    put_header(&b, 3, 0, 3);
    put_kv_u32(&b, "a", 1), put_kv_u32(&b, "b", 2), put_kv_u32(&b, "a", 3);
    CHECK_REJECTED(&b, "at byte 58:", "duplicate metadata key 'a', first defined at byte 24");

    /* general.alignment of the wrong type or not a power of two. */
    b.len = 0;
    put_header(&b, 3, 0, 1);
    put_str(&b, "general.alignment"), put_u32(&b, CP_GGUF_TYPE_UINT64), put_u64(&b, 32);
    CHECK_REJECTED(&b, "general.alignment has type uint64, expected uint32");
    b.len = 0;
    put_header(&b, 3, 0, 1);
    put_kv_u32(&b, "general.alignment", 48);
    CHECK_REJECTED(&b, "general.alignment is 48, expected a power of two");
    b.len = 0;
    put_header(&b, 3, 0, 1);
    put_kv_u32(&b, "general.alignment", 0);
    CHECK_REJECTED(&b, "general.alignment is 0");
    free(b.data);
}

TEST(gguf_rejects_bad_arrays)
{
    /* An array count far past the file, for fixed-size and string elements. */
    buf b = {0};
    put_header(&b, 3, 0, 1);
    put_str(&b, "k"), put_u32(&b, CP_GGUF_TYPE_ARRAY);
    put_u32(&b, CP_GGUF_TYPE_FLOAT32), put_u64(&b, 1ull << 62);
    CHECK_REJECTED(&b, "expected 4611686018427387904 float32 values", "only 0 bytes remain");
    b.len = 0;
    put_header(&b, 3, 0, 1);
    put_str(&b, "k"), put_u32(&b, CP_GGUF_TYPE_ARRAY);
    put_u32(&b, CP_GGUF_TYPE_STRING), put_u64(&b, UINT64_MAX);
    put_str(&b, "x");
    CHECK_REJECTED(&b, "at byte 41:", "array of 18446744073709551615 string values needs at least 8 bytes each");

    /* A string element running past the end. */
    b.len = 0;
    put_header(&b, 3, 0, 1);
    put_str(&b, "k"), put_u32(&b, CP_GGUF_TYPE_ARRAY);
    put_u32(&b, CP_GGUF_TYPE_STRING), put_u64(&b, 2);
    put_str(&b, "ok"), put_u64(&b, 100), put_bytes(&b, "short", 5);
    CHECK_REJECTED(&b, "at byte 59:", "string value has length 100, but only 5 bytes remain");

    /* An unknown element type, and arrays nested 9 deep. */
    b.len = 0;
    put_header(&b, 3, 0, 1);
    put_str(&b, "k"), put_u32(&b, CP_GGUF_TYPE_ARRAY), put_u32(&b, 77), put_u64(&b, 0);
    CHECK_REJECTED(&b, "at byte 37:", "found 77");
    b.len = 0;
    put_header(&b, 3, 0, 1);
    put_str(&b, "k"), put_u32(&b, CP_GGUF_TYPE_ARRAY);
    for (int depth = 0; depth < 9; depth++)
        put_u32(&b, CP_GGUF_TYPE_ARRAY), put_u64(&b, 1);
    put_u32(&b, CP_GGUF_TYPE_UINT8), put_u64(&b, 0);
    CHECK_REJECTED(&b, "arrays nested deeper than 8 levels");
    free(b.data);
}

TEST(gguf_rejects_bad_tensor_infos)
{
    const uint64_t dims5[] = {1, 1, 1, 1, 1};
    buf b = {0};
    start_tensor_file(&b, 1);
    put_tensor_info(&b, "x", 5, dims5, CP_GGML_TYPE_F32, 0);
    finish_tensor_file(&b, 32);
    CHECK_REJECTED(&b, "tensor 'x' has 5 dimensions, expected 1 to 4");

    /* Each dimension fits in 63 bits, but the product does not. */
    const uint64_t big[] = {1ull << 32, 1ull << 32};
    b.len = 0;
    start_tensor_file(&b, 1);
    put_tensor_info(&b, "big", 2, big, CP_GGML_TYPE_F32, 0);
    finish_tensor_file(&b, 32);
    CHECK_REJECTED(&b, "tensor 'big': dimension 1 is 4294967296", "overflows 64 bits");

    /* The element count fits, but the byte count does not. */
    const uint64_t wide[] = {1ull << 62};
    b.len = 0;
    start_tensor_file(&b, 1);
    put_tensor_info(&b, "wide", 1, wide, CP_GGML_TYPE_F32, 0);
    finish_tensor_file(&b, 32);
    CHECK_REJECTED(&b, "tensor 'wide' of type F32", "expected a multiple of the block size");

    const uint64_t dims32[] = {32};
    b.len = 0;
    start_tensor_file(&b, 1);
    put_tensor_info(&b, "blk.0.attn_q.weight", 1, dims32, 12, 0);
    finish_tensor_file(&b, 32);
    CHECK_REJECTED(&b, "tensor 'blk.0.attn_q.weight' has ggml type Q4_K (id 12)",
                   "expected F32, F16, BF16, Q8_0 or Q4_0", "llama-quantize");
    b.len = 0;
    start_tensor_file(&b, 1);
    put_tensor_info(&b, "y", 1, dims32, 4000, 0);
    finish_tensor_file(&b, 32);
    CHECK_REJECTED(&b, "tensor 'y' has ggml type unknown (id 4000)");

    const uint64_t dims33[] = {33};
    b.len = 0;
    start_tensor_file(&b, 1);
    put_tensor_info(&b, "q", 1, dims33, CP_GGML_TYPE_Q8_0, 0);
    finish_tensor_file(&b, 64);
    CHECK_REJECTED(&b, "tensor 'q' of type Q8_0 has 33 elements per row, expected a multiple of the block size 32");

    b.len = 0;
    start_tensor_file(&b, 2);
    put_tensor_info(&b, "z", 1, dims32, CP_GGML_TYPE_F32, 0);
    put_tensor_info(&b, "z", 1, dims32, CP_GGML_TYPE_F32, 128);
    finish_tensor_file(&b, 256);
    CHECK_REJECTED(&b, "duplicate tensor name 'z', first defined at byte");

    /* Truncated inside a description. */
    b.len = 0;
    start_tensor_file(&b, 1);
    put_tensor_info(&b, "x", 1, dims32, CP_GGML_TYPE_F32, 0);
    b.len -= 4;
    CHECK_REJECTED(&b, "expected 8 bytes of tensor data offset, found 4");
    free(b.data);
}

TEST(gguf_rejects_bad_tensor_placement)
{
    const uint64_t dims8[] = {8}, dims16[] = {16};
    buf b = {0};
    start_tensor_file(&b, 1);
    put_tensor_info(&b, "x", 1, dims8, CP_GGML_TYPE_F32, 4);
    finish_tensor_file(&b, 64);
    CHECK_REJECTED(&b, "tensor 'x' has data offset 4, expected a multiple of the alignment 32");

    b.len = 0;
    start_tensor_file(&b, 1);
    put_tensor_info(&b, "x", 1, dims8, CP_GGML_TYPE_F32, 32);
    finish_tensor_file(&b, 48);
    CHECK_REJECTED(&b, "tensor 'x' spans bytes 32 to 64 of the data section, which holds 48 bytes");

    /* An offset so large that offset + size wraps around. */
    b.len = 0;
    start_tensor_file(&b, 1);
    put_tensor_info(&b, "x", 1, dims8, CP_GGML_TYPE_F32, UINT64_MAX - 31);
    finish_tensor_file(&b, 64);
    CHECK_REJECTED(&b, "tensor 'x' spans bytes 18446744073709551584");

    b.len = 0;
    start_tensor_file(&b, 2);
    put_tensor_info(&b, "a", 1, dims16, CP_GGML_TYPE_F32, 0);
    put_tensor_info(&b, "b", 1, dims8, CP_GGML_TYPE_F32, 32);
    finish_tensor_file(&b, 64);
    CHECK_REJECTED(&b, "tensor 'b' (data bytes 32 to 64) overlaps tensor 'a' (bytes 0 to 64)");

    /* The file ends before the aligned start of the data section. */
    b.len = 0;
    start_tensor_file(&b, 1);
    put_tensor_info(&b, "x", 1, dims8, CP_GGML_TYPE_F32, 0);
    CHECK_REJECTED(&b, "expected the data section at byte 128, but the file ends at byte");
    free(b.data);
}

/* Every prefix of the sample file must be rejected, and byte flips must
 * never crash or read outside the map. Accepted variants are dequantized
 * so that their tensor pointers are exercised too. */
TEST(gguf_truncation_and_flip_sweep)
{
    buf b = {0};
    build_sample(&b);
    const char *dir = test_tmpdir();
    char *path = NULL;
    int accepted = 0;
    static float out[4096];

    for (size_t len = 0; len < b.len; len++) {
        free(path);
        path = test_write_file(dir, "cut.gguf", b.data, len);
        cp_gguf *g = NULL;
        cp_error err = {0};
        cp_status s = cp_gguf_open(path, &g, &err);
        CHECK_MSG(s == CP_ERR_INPUT, "prefix of %zu bytes: status %d", len, (int)s);
        CHECK_MSG(strstr(err.msg, "cut.gguf: at byte ") != NULL, "prefix %zu: %s", len, err.msg);
        cp_gguf_close(g);
    }

    const uint8_t patterns[] = {0xff, 0x01, 0x80};
    for (size_t pos = 0; pos < b.len; pos++) {
        for (int k = 0; k < 3; k++) {
            b.data[pos] ^= patterns[k];
            free(path);
            path = test_write_file(dir, "flip.gguf", b.data, b.len);
            b.data[pos] ^= patterns[k];
            cp_gguf *g = NULL;
            cp_error err = {0};
            cp_status s = cp_gguf_open(path, &g, &err);
            CHECK_MSG(s == CP_OK || s == CP_ERR_INPUT, "flip at %zu: status %d", pos, (int)s);
            if (s != CP_OK)
                continue;
            accepted++;
            for (size_t i = 0; i < cp_gguf_tensor_count(g); i++) {
                const cp_gguf_tensor *t = cp_gguf_tensor_at(g, i);
                if (t->n_elements <= 4096)
                    cp_gguf_dequantize(t, out);
            }
            cp_gguf_close(g);
        }
    }
    /* Flips inside tensor data and most metadata values leave a valid file. */
    CHECK(accepted > 0);
    free(path);
    free(b.data);
}

TEST(gguf_inspect_cli)
{
    buf b = {0};
    build_sample(&b);
    const char *dir = test_tmpdir();
    char *path = test_write_file(dir, "sample.gguf", b.data, b.len);
    free(b.data);

    char args[600], *out = NULL, *err = NULL;
    snprintf(args, sizeof args, "inspect '%s'", path);
    CHECK_EQ_INT(test_run_cli(args, NULL, &out, &err), 0);
    CHECK_MSG(strstr(out, "(version 3, alignment 32)") != NULL, "%s", out);
    CHECK_MSG(strstr(out, "general.architecture") && strstr(out, "\"llama\""), "%s", out);
    CHECK_MSG(strstr(out, "t.u32") && strstr(out, "4000000000"), "%s", out);
    CHECK_MSG(strstr(out, "w.q4_0") && strstr(out, "Q4_0") && strstr(out, "[32, 2]"), "%s", out);
    CHECK_MSG(strstr(out, "tensors: 5") != NULL, "%s", out);
    free(out), free(err);

    /* A truncated copy: one line naming the file, exit status 2. */
    char *cut = test_write_file(dir, "cut.gguf", "GGUF\3\0\0\0\1", 9);
    snprintf(args, sizeof args, "inspect '%s'", cut);
    CHECK_EQ_INT(test_run_cli(args, NULL, &out, &err), 2);
    CHECK_EQ_INT(test_count_lines(err), 1);
    CHECK_MSG(strstr(err, "cut.gguf") != NULL, "%s", err);
    free(out), free(err), free(cut), free(path);
}
