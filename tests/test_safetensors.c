/*
 * Tests for the safetensors reader and writer: the shared stories260K model,
 * write/read round trips, exact writer bytes, sharded folders, and one
 * crafted file per defect the reader must reject with CP_ERR_INPUT.
 */
#include "test.h"

#include <dirent.h>
#include <stdint.h>
#include <stdlib.h>

#include "core/file.h"
#include "io/safetensors.h"

/* ---- helpers ---- */

static const char *base_name(const char *path)
{
    const char *slash = strrchr(path, '/');
    return slash ? slash + 1 : path;
}

/* Writes an 8-byte little-endian length, then header, then data_len bytes
 * counting up from 0, to dir/name. Returns the malloc'd path. */
static char *craft_with_length(const char *dir, const char *name, uint64_t header_len,
                               const char *header, size_t n, size_t data_len)
{
    size_t total = 8 + n + data_len;
    uint8_t *buf = calloc(total, 1);
    for (int i = 0; i < 8; i++)
        buf[i] = (uint8_t)(header_len >> (8 * i));
    memcpy(buf + 8, header, n);
    for (size_t i = 0; i < data_len; i++)
        buf[8 + n + i] = (uint8_t)i;
    char *path = test_write_file(dir, name, buf, total);
    free(buf);
    return path;
}

static char *craft(const char *dir, const char *name, const char *header, size_t data_len)
{
    return craft_with_length(dir, name, strlen(header), header, strlen(header), data_len);
}

/* Opens path and checks the result is CP_ERR_INPUT, no handle, and a
 * message naming the file and containing fragment. */
static void expect_reject(const char *path, const char *file_name, const char *fragment)
{
    cp_safetensors *st = (cp_safetensors *)1;
    cp_error err = {0};
    cp_status s = cp_safetensors_open(path, &st, &err);
    CHECK_MSG(s == CP_ERR_INPUT, "%s: status %d, expected CP_ERR_INPUT (message: %s)",
              file_name, (int)s, err.msg);
    CHECK(st == NULL);
    CHECK_MSG(strstr(err.msg, file_name) != NULL, "message lacks the file name %s: %s",
              file_name, err.msg);
    CHECK_MSG(strstr(err.msg, fragment) != NULL, "%s: message lacks \"%s\": %s", file_name,
              fragment, err.msg);
    if (s == CP_OK)
        cp_safetensors_close(st);
}

static int dir_entry_count(const char *dir)
{
    DIR *d = opendir(dir);
    int n = 0;
    for (struct dirent *e; d && (e = readdir(d));)
        n += e->d_name[0] != '.';
    if (d)
        closedir(d);
    return n;
}

static uint8_t *slurp(const char *path, size_t *n)
{
    char *buf = NULL;
    cp_error err = {0};
    CHECK_EQ_INT(cp_file_read(path, &buf, n, &err), CP_OK);
    return (uint8_t *)buf;
}

static float read_f32(const cp_st_tensor *t, size_t i)
{
    float v;
    memcpy(&v, (const uint8_t *)t->data + 4 * i, 4);
    return v;
}

/* ---- the shared stories260K model ---- */

TEST(st_stories260k_tensors)
{
    char *path = test_shared("models/stories260K/model.safetensors");
    cp_safetensors *st = NULL;
    cp_error err = {0};
    CHECK_MSG(cp_safetensors_open(path, &st, &err) == CP_OK, "%s", err.msg);
    if (!st)
        return;

    /* 5 layers of 9 tensors, embed_tokens and norm. The output head is tied
     * to embed_tokens, so there is no lm_head.weight. */
    CHECK_EQ_INT(cp_safetensors_count(st), 47);
    CHECK_EQ_STR(cp_safetensors_metadata(st, "format"), "pt");
    CHECK(cp_safetensors_metadata(st, "missing") == NULL);
    CHECK(cp_safetensors_find(st, "lm_head.weight") == NULL);

    const cp_st_tensor *emb = cp_safetensors_find(st, "model.embed_tokens.weight");
    CHECK(emb != NULL);
    if (emb) {
        CHECK(emb == cp_safetensors_at(st, 0)); /* lowest data offset */
        CHECK_EQ_INT(emb->dtype, CP_DTYPE_F32);
        CHECK_EQ_INT(emb->ndim, 2);
        CHECK_EQ_INT(emb->shape[0], 512);
        CHECK_EQ_INT(emb->shape[1], 64);
        CHECK_EQ_INT(emb->nbytes, 512 * 64 * 4);
        CHECK_EQ_INT(cp_st_tensor_numel(emb), 512 * 64);
        CHECK_EQ_INT(emb->offset, 8 + 4856); /* header length 4856 */
        CHECK_EQ_STR(emb->file, path);
        CHECK(cp_st_tensor_is_aligned(emb));
        /* Expected values from tools/check_safetensors.py FILE --values
         * model.embed_tokens.weight 0 1 2 32767, and cross-checked with
         * struct.unpack('<f') on the raw bytes in /usr/bin/python3. */
        CHECK(read_f32(emb, 0) == -0.294748783f);
        CHECK(read_f32(emb, 1) == 0.561895609f);
        CHECK(read_f32(emb, 2) == 0.175422534f);
        CHECK(read_f32(emb, 32767) == -0.424032599f);
    }

    const cp_st_tensor *q = cp_safetensors_find(st, "model.layers.0.self_attn.q_proj.weight");
    CHECK(q != NULL);
    if (q) {
        CHECK_EQ_INT(q->dtype, CP_DTYPE_F32);
        CHECK_EQ_INT(q->shape[0], 64);
        CHECK_EQ_INT(q->shape[1], 64);
        CHECK_EQ_INT(q->offset, 8 + 4856 + 288256);
        /* Same source as above: --values ...q_proj.weight 0 4095. */
        CHECK(read_f32(q, 0) == 0.0443927869f);
        CHECK(read_f32(q, 4095) == 0.0348095521f);
    }

    /* 4 KV heads of 8 dims: the model uses grouped-query attention. */
    const cp_st_tensor *k = cp_safetensors_find(st, "model.layers.4.self_attn.k_proj.weight");
    CHECK(k != NULL);
    if (k) {
        CHECK_EQ_INT(k->shape[0], 32);
        CHECK_EQ_INT(k->shape[1], 64);
    }

    const cp_st_tensor *norm = cp_safetensors_find(st, "model.norm.weight");
    CHECK(norm != NULL);
    if (norm) {
        CHECK(norm == cp_safetensors_at(st, 46)); /* highest data offset */
        CHECK_EQ_INT(norm->ndim, 1);
        CHECK(read_f32(norm, 0) == 2.45830894f);
        CHECK(read_f32(norm, 63) == 1.7077769f);
    }

    /* Order by offset, each tensor right after the previous one. */
    for (size_t i = 1; i < cp_safetensors_count(st); i++) {
        const cp_st_tensor *a = cp_safetensors_at(st, i - 1), *b = cp_safetensors_at(st, i);
        CHECK_EQ_INT(b->offset, a->offset + a->nbytes);
        CHECK(cp_safetensors_find(st, b->name) == b);
    }
    cp_safetensors_close(st);
    free(path);
}

TEST(st_open_model_folder)
{
    char *dir = test_shared("models/stories260K");
    cp_safetensors *st = NULL;
    cp_error err = {0};
    CHECK_MSG(cp_safetensors_open(dir, &st, &err) == CP_OK, "%s", err.msg);
    if (st) {
        CHECK_EQ_INT(cp_safetensors_count(st), 47);
        CHECK(strstr(cp_safetensors_at(st, 0)->file, "model.safetensors") != NULL);
        cp_safetensors_close(st);
    }
    free(dir);
}

TEST(st_open_missing_file)
{
    const char *dir = test_tmpdir();
    char *path = cp_path_join(dir, "absent.safetensors");
    expect_reject(path, "absent.safetensors", "cannot open");
    expect_reject(dir, base_name(dir), "contains neither model.safetensors");
    free(path);
}

/* ---- writer: round trips and exact bytes ---- */

/* A fixed set of tensors with every dtype, odd sizes, a scalar and an
 * empty tensor. */
typedef struct sample {
    float w[6];
    uint16_t h[3], g[5];
    float s;
    cp_st_tensor t[5];
    cp_st_metadata m[2];
} sample;

static void sample_init(sample *x)
{
    memset(x, 0, sizeof *x);
    for (int i = 0; i < 6; i++)
        x->w[i] = 0.5f * (float)i - 1.0f;
    for (int i = 0; i < 3; i++)
        x->h[i] = cp_f32_to_f16(1.5f * (float)i);
    for (int i = 0; i < 5; i++)
        x->g[i] = cp_f32_to_bf16(-2.0f + (float)i);
    x->s = 3.25f;
    x->t[0] = (cp_st_tensor){.name = "w", .dtype = CP_DTYPE_F32, .ndim = 2, .shape = {2, 3},
                             .data = x->w, .nbytes = sizeof x->w};
    x->t[1] = (cp_st_tensor){.name = "h", .dtype = CP_DTYPE_F16, .ndim = 1, .shape = {3},
                             .data = x->h, .nbytes = sizeof x->h};
    x->t[2] = (cp_st_tensor){.name = "g.bf16", .dtype = CP_DTYPE_BF16, .ndim = 1,
                             .shape = {5}, .data = x->g, .nbytes = sizeof x->g};
    x->t[3] = (cp_st_tensor){.name = "s", .dtype = CP_DTYPE_F32, .ndim = 0, .data = &x->s,
                             .nbytes = 4};
    x->t[4] = (cp_st_tensor){.name = "empty", .dtype = CP_DTYPE_F32, .ndim = 2,
                             .shape = {0, 4}, .data = NULL, .nbytes = 0};
    x->m[0] = (cp_st_metadata){"format", "pt"};
    x->m[1] = (cp_st_metadata){"note", "a \"quoted\" \\ value\nwith a newline, tab\t, \xc3\xa9"};
}

TEST(st_write_read_round_trip)
{
    sample x;
    sample_init(&x);
    const char *dir = test_tmpdir();
    char *path = cp_path_join(dir, "round.safetensors");
    cp_error err = {0};
    CHECK_MSG(cp_safetensors_write(path, x.t, 5, x.m, 2, &err) == CP_OK, "%s", err.msg);

    cp_safetensors *st = NULL;
    CHECK_MSG(cp_safetensors_open(path, &st, &err) == CP_OK, "%s", err.msg);
    if (!st)
        return;
    CHECK_EQ_INT(cp_safetensors_count(st), 5);
    for (int i = 0; i < 5; i++) {
        const cp_st_tensor *t = cp_safetensors_find(st, x.t[i].name);
        CHECK_MSG(t != NULL, "tensor %s not found", x.t[i].name);
        if (!t)
            continue;
        CHECK_EQ_INT(t->dtype, x.t[i].dtype);
        CHECK_EQ_INT(t->ndim, x.t[i].ndim);
        for (int d = 0; d < CP_ST_MAX_DIMS; d++)
            CHECK_EQ_INT(t->shape[d], x.t[i].shape[d]);
        CHECK_EQ_INT(t->nbytes, x.t[i].nbytes);
        CHECK(t->nbytes == 0 || memcmp(t->data, x.t[i].data, t->nbytes) == 0);
        CHECK_MSG(cp_st_tensor_is_aligned(t), "tensor %s at offset %llu is misaligned",
                  t->name, (unsigned long long)t->offset);
    }
    CHECK_EQ_INT(cp_st_tensor_numel(cp_safetensors_find(st, "s")), 1);
    CHECK_EQ_INT(cp_st_tensor_numel(cp_safetensors_find(st, "empty")), 0);
    CHECK_EQ_STR(cp_safetensors_metadata(st, "format"), "pt");
    CHECK_EQ_STR(cp_safetensors_metadata(st, "note"), x.m[1].value);

    /* F32 tensors come first, then the 2-byte ones, each group by name. */
    static const char *const order[] = {"empty", "s", "w", "g.bf16", "h"};
    for (int i = 0; i < 5; i++)
        CHECK_EQ_STR(cp_safetensors_at(st, (size_t)i)->name, order[i]);

    /* The data section starts at an 8-byte-aligned file offset. */
    const cp_st_tensor *first = cp_safetensors_at(st, 0);
    CHECK_EQ_INT(first->offset % 8, 0);
    cp_safetensors_close(st);
    free(path);
}

TEST(st_write_exact_bytes)
{
    /* Built from the format description: a u64 header length, compact JSON,
     * spaces up to a multiple of 8, then the data. */
    float v[6] = {0, 1, 2, 3, 4, 5};
    cp_st_tensor t = {.name = "attn.0", .dtype = CP_DTYPE_F32, .ndim = 3, .shape = {1, 2, 3},
                      .data = v, .nbytes = sizeof v};
    const char *header = "{\"attn.0\":{\"dtype\":\"F32\",\"shape\":[1,2,3],"
                         "\"data_offsets\":[0,24]}}";
    const char *dir = test_tmpdir();
    char *path = cp_path_join(dir, "exact.safetensors");
    cp_error err = {0};
    CHECK_MSG(cp_safetensors_write(path, &t, 1, NULL, 0, &err) == CP_OK, "%s", err.msg);
    size_t n = 0;
    uint8_t *got = slurp(path, &n);
    CHECK_EQ_INT(strlen(header), 64); /* a multiple of 8: no padding */
    CHECK_EQ_INT(n, 8 + 64 + 24);
    if (got && n == 96) {
        CHECK_EQ_INT(got[0], 64);
        for (int i = 1; i < 8; i++)
            CHECK_EQ_INT(got[i], 0);
        CHECK(memcmp(got + 8, header, 64) == 0);
        CHECK(memcmp(got + 72, v, 24) == 0);
    }
    free(got);

    /* One dimension more, one name character less: 65 bytes, padded to 72. */
    t.name = "attn0";
    t.ndim = 4;
    t.shape[0] = t.shape[1] = 1, t.shape[2] = 2, t.shape[3] = 3;
    const char *padded = "{\"attn0\":{\"dtype\":\"F32\",\"shape\":[1,1,2,3],"
                         "\"data_offsets\":[0,24]}}       ";
    CHECK_MSG(cp_safetensors_write(path, &t, 1, NULL, 0, &err) == CP_OK, "%s", err.msg);
    got = slurp(path, &n);
    CHECK_EQ_INT(strlen(padded), 72);
    CHECK_EQ_INT(n, 8 + 72 + 24);
    if (got && n == 104) {
        CHECK_EQ_INT(got[0], 72);
        CHECK(memcmp(got + 8, padded, 72) == 0);
        CHECK(memcmp(got + 80, v, 24) == 0);
    }
    free(got);

    /* No tensors and no metadata: "{}" and six spaces. */
    CHECK_MSG(cp_safetensors_write(path, NULL, 0, NULL, 0, &err) == CP_OK, "%s", err.msg);
    got = slurp(path, &n);
    CHECK_EQ_INT(n, 16);
    if (got && n == 16)
        CHECK(memcmp(got, "\x08\0\0\0\0\0\0\0{}      ", 16) == 0);
    free(got);

    /* Metadata comes first, keys sorted. */
    cp_st_metadata m[2] = {{"z", "1"}, {"a", "2"}};
    CHECK_MSG(cp_safetensors_write(path, NULL, 0, m, 2, &err) == CP_OK, "%s", err.msg);
    got = slurp(path, &n);
    const char *meta = "{\"__metadata__\":{\"a\":\"2\",\"z\":\"1\"}}";
    CHECK_EQ_INT(n, 8 + 40);
    if (got && n == 8 + 40)
        CHECK(memcmp(got + 8, meta, strlen(meta)) == 0);
    free(got);

    /* Quote, backslash, newline and tab get short escapes, and other control
     * characters get \u00XX. UTF-8 passes through. */
    cp_st_metadata e = {"k", "q\"b\\n\nt\tc\x01\xc3\xa9"};
    CHECK_MSG(cp_safetensors_write(path, NULL, 0, &e, 1, &err) == CP_OK, "%s", err.msg);
    got = slurp(path, &n);
    const char *escaped = "{\"__metadata__\":{\"k\":\"q\\\"b\\\\n\\nt\\tc\\u0001\xc3\xa9\"}}";
    CHECK_EQ_INT(strlen(escaped), 46);
    CHECK_EQ_INT(n, 8 + 48);
    if (got && n == 8 + 48) {
        CHECK(memcmp(got + 8, escaped, 46) == 0);
        CHECK(memcmp(got + 8 + 46, "  ", 2) == 0);
    }
    free(got);
    free(path);
}

TEST(st_write_deterministic)
{
    sample x;
    sample_init(&x);
    const char *dir = test_tmpdir();
    char *p1 = cp_path_join(dir, "one.safetensors");
    char *p2 = cp_path_join(dir, "two.safetensors");
    char *p3 = cp_path_join(dir, "three.safetensors");
    cp_error err = {0};
    CHECK_EQ_INT(cp_safetensors_write(p1, x.t, 5, x.m, 2, &err), CP_OK);
    CHECK_EQ_INT(cp_safetensors_write(p2, x.t, 5, x.m, 2, &err), CP_OK);

    /* The same tensors and metadata given in another order. */
    cp_st_tensor rev[5];
    cp_st_metadata mrev[2] = {x.m[1], x.m[0]};
    for (int i = 0; i < 5; i++)
        rev[i] = x.t[4 - i];
    CHECK_EQ_INT(cp_safetensors_write(p3, rev, 5, mrev, 2, &err), CP_OK);

    size_t n1 = 0, n2 = 0, n3 = 0;
    uint8_t *b1 = slurp(p1, &n1), *b2 = slurp(p2, &n2), *b3 = slurp(p3, &n3);
    CHECK(n1 > 8);
    CHECK_EQ_INT(n2, n1);
    CHECK_EQ_INT(n3, n1);
    if (b1 && b2 && b3 && n1 > 8 && n2 == n1 && n3 == n1) {
        CHECK(memcmp(b1, b2, n1) == 0);
        CHECK(memcmp(b1, b3, n1) == 0);
        uint64_t header_len = 0;
        for (int i = 7; i >= 0; i--)
            header_len = (header_len << 8) | b1[i];
        CHECK_EQ_INT((8 + header_len) % 8, 0);
    }
    free(b1), free(b2), free(b3);
    free(p1), free(p2), free(p3);
}

/* ---- writer: rejected input leaves no file ---- */

static void expect_write_reject(const cp_st_tensor *t, size_t n, const cp_st_metadata *m,
                                size_t n_meta, const char *fragment)
{
    const char *dir = test_tmpdir();
    char *path = cp_path_join(dir, "out.safetensors");
    cp_error err = {0};
    cp_status s = cp_safetensors_write(path, t, n, m, n_meta, &err);
    CHECK_MSG(s == CP_ERR_INPUT, "status %d, expected CP_ERR_INPUT (%s)", (int)s, err.msg);
    CHECK_MSG(strstr(err.msg, "out.safetensors") != NULL, "no file name in: %s", err.msg);
    CHECK_MSG(strstr(err.msg, fragment) != NULL, "message lacks \"%s\": %s", fragment,
              err.msg);
    CHECK_MSG(dir_entry_count(dir) == 0, "a file was left behind in %s", dir);
    free(path);
}

TEST(st_write_rejects_bad_input)
{
    float v[6] = {0};
    uint16_t h[6] = {0};
    cp_st_tensor a = {.name = "a", .dtype = CP_DTYPE_F32, .ndim = 1, .shape = {6}, .data = v,
                      .nbytes = sizeof v};
    cp_st_tensor b = {.name = "a", .dtype = CP_DTYPE_F16, .ndim = 1, .shape = {6}, .data = h,
                      .nbytes = sizeof h};

    cp_st_tensor two[2] = {a, a};
    expect_write_reject(two, 2, NULL, 0, "tensor name 'a' appears twice");
    two[1] = b; /* same name, different dtype: not neighbours in writer order */
    expect_write_reject(two, 2, NULL, 0, "tensor name 'a' appears twice");

    cp_st_tensor t = a;
    t.nbytes = 20;
    expect_write_reject(&t, 1, NULL, 0, "needs 24 bytes, but nbytes is 20");
    t = a, t.dtype = CP_DTYPE_BF16;
    expect_write_reject(&t, 1, NULL, 0, "needs 12 bytes");
    t = a, t.shape[0] = -6;
    expect_write_reject(&t, 1, NULL, 0, "shape[0] is -6");
    t = a, t.ndim = 9;
    expect_write_reject(&t, 1, NULL, 0, "ndim is 9");
    t = a, t.ndim = 3, t.shape[0] = t.shape[1] = t.shape[2] = INT64_MAX / 2;
    expect_write_reject(&t, 1, NULL, 0, "overflows");
    t = a, t.dtype = CP_DTYPE_COUNT;
    expect_write_reject(&t, 1, NULL, 0, "is not F32, F16 or BF16");
    t = a, t.name = "__metadata__";
    expect_write_reject(&t, 1, NULL, 0, "reserved");
    t = a, t.name = NULL;
    expect_write_reject(&t, 1, NULL, 0, "name is NULL");
    t = a, t.name = "bad\xff";
    expect_write_reject(&t, 1, NULL, 0, "not valid UTF-8");
    t = a, t.data = NULL;
    expect_write_reject(&t, 1, NULL, 0, "data is NULL");

    cp_st_metadata m[2] = {{"k", "1"}, {"k", "2"}};
    expect_write_reject(&a, 1, m, 2, "metadata key 'k' appears twice");
    m[1].key = NULL;
    expect_write_reject(&a, 1, m, 2, "metadata entry 1");
}

TEST(st_write_unwritable_path)
{
    float v = 1;
    cp_st_tensor t = {.name = "a", .dtype = CP_DTYPE_F32, .ndim = 0, .data = &v, .nbytes = 4};
    const char *dir = test_tmpdir();
    char *path = cp_path_join(dir, "missing-folder/out.safetensors");
    cp_error err = {0};
    CHECK(cp_safetensors_write(path, &t, 1, NULL, 0, &err) != CP_OK);
    CHECK(strstr(err.msg, "out.safetensors") != NULL);
    CHECK_EQ_INT(dir_entry_count(dir), 0);
    free(path);
}

/* ---- reader: accepted corner cases ---- */

TEST(st_read_misaligned_data)
{
    /* A 54-byte header puts the data at byte 62, 2 bytes off a float. */
    const char *dir = test_tmpdir();
    const char *header = "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}";
    CHECK_EQ_INT(strlen(header), 54);
    float v[2] = {1.5f, -7.25f};
    uint8_t buf[8 + 54 + 8];
    for (int i = 0; i < 8; i++)
        buf[i] = i == 0 ? 54 : 0;
    memcpy(buf + 8, header, 54);
    memcpy(buf + 62, v, 8);
    char *path = test_write_file(dir, "misaligned.safetensors", buf, sizeof buf);

    cp_safetensors *st = NULL;
    cp_error err = {0};
    CHECK_MSG(cp_safetensors_open(path, &st, &err) == CP_OK, "%s", err.msg);
    if (st) {
        const cp_st_tensor *t = cp_safetensors_find(st, "a");
        CHECK(t != NULL);
        if (t) {
            CHECK_EQ_INT(t->offset, 62);
            CHECK(!cp_st_tensor_is_aligned(t));
            CHECK(read_f32(t, 0) == 1.5f);
            CHECK(read_f32(t, 1) == -7.25f);
        }
        cp_safetensors_close(st);
    }
    free(path);
}

TEST(st_read_corner_cases)
{
    const char *dir = test_tmpdir();
    static const struct {
        const char *file, *header;
        size_t data_len, count;
    } cases[] = {
        {"empty-object.safetensors", "{}", 0, 0},
        {"metadata-only.safetensors", "{\"__metadata__\":{\"k\":\"v\"}}", 0, 0},
        {"space-padding.safetensors",
         "{\"a\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[0,4]}}       ", 4, 1},
        {"newline-padding.safetensors",
         "{\"a\":{\"dtype\":\"F16\",\"shape\":[2],\"data_offsets\":[0,4]}}\n", 4, 1},
        {"scalar-and-empty.safetensors",
         "{\"s\":{\"dtype\":\"BF16\",\"shape\":[],\"data_offsets\":[0,2]},"
         "\"e\":{\"dtype\":\"F32\",\"shape\":[3,0],\"data_offsets\":[2,2]}}",
         2, 2},
        {"header-order-differs.safetensors",
         "{\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]},"
         "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}",
         8, 2},
        {"metadata-last.safetensors",
         "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
         "\"__metadata__\":{}}",
         4, 1},
        {"escaped-name.safetensors",
         "{\"a\\\"b\\u00e9\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, 1},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char *path = craft(dir, cases[i].file, cases[i].header, cases[i].data_len);
        cp_safetensors *st = NULL;
        cp_error err = {0};
        CHECK_MSG(cp_safetensors_open(path, &st, &err) == CP_OK, "%s: %s", cases[i].file,
                  err.msg);
        if (st) {
            CHECK_EQ_INT(cp_safetensors_count(st), cases[i].count);
            cp_safetensors_close(st);
        }
        free(path);
    }

    /* The tensor listed second in the header comes first in the data. */
    char *path = cp_path_join(dir, "header-order-differs.safetensors");
    cp_safetensors *st = NULL;
    cp_error err = {0};
    if (cp_safetensors_open(path, &st, &err) == CP_OK) {
        CHECK_EQ_STR(cp_safetensors_at(st, 0)->name, "a");
        CHECK_EQ_STR(cp_safetensors_at(st, 1)->name, "b");
        cp_safetensors_close(st);
    }
    free(path);
    path = cp_path_join(dir, "escaped-name.safetensors");
    if (cp_safetensors_open(path, &st, &err) == CP_OK) {
        CHECK(cp_safetensors_find(st, "a\"b\xc3\xa9") != NULL);
        cp_safetensors_close(st);
    }
    free(path);
}

/* ---- reader: every defect gives CP_ERR_INPUT naming the file ---- */

TEST(st_reject_bad_length_prefix)
{
    const char *dir = test_tmpdir();
    char *p;

    p = test_write_file(dir, "five-bytes.safetensors", "\x02\0\0\0\0", 5);
    expect_reject(p, "five-bytes.safetensors", "shorter than the 8-byte header length");
    free(p);
    p = test_write_file(dir, "empty.safetensors", "", 0);
    expect_reject(p, "empty.safetensors", "file is 0 bytes");
    free(p);
    p = craft_with_length(dir, "zero-length.safetensors", 0, "{}", 2, 0);
    expect_reject(p, "zero-length.safetensors", "header length is 0");
    free(p);
    p = craft_with_length(dir, "past-end.safetensors", 100, "{}", 2, 8);
    expect_reject(p, "past-end.safetensors", "header length 100 runs past the end of the file");
    free(p);
    p = craft_with_length(dir, "absurd.safetensors", 200000000, "{}", 2, 0);
    expect_reject(p, "absurd.safetensors", "above the format's limit of 100000000");
    free(p);
    p = craft_with_length(dir, "u64-max.safetensors", UINT64_MAX, "{}", 2, 0);
    expect_reject(p, "u64-max.safetensors", "header length 18446744073709551615 is above");
    free(p);
}

#define ENTRY(dtype, shape, offsets)                                                       \
    "{\"dtype\":\"" dtype "\",\"shape\":" shape ",\"data_offsets\":" offsets "}"

TEST(st_reject_bad_header)
{
    static const struct {
        const char *file, *header;
        size_t data_len;
        const char *expect;
    } cases[] = {
        /* the header text */
        {"not-json.safetensors", "{\"a\":", 0, "header is not valid JSON"},
        {"top-array.safetensors", "[1,2]", 0, "expected '{'"},
        {"leading-space.safetensors", " {}", 0, "expected '{'"},
        {"trailing-garbage.safetensors", "{}x", 0, "unexpected byte 0x78 after the header"},
        {"trailing-nul.safetensors", "{} \0", 0, "control character 0x00"},
        {"control-char.safetensors", "{\x01}", 0, "control character 0x01"},
        {"bad-utf8.safetensors", "{\"a\xff" "b\":1}", 0, "not valid UTF-8 (byte 0xff)"},
        {"overlong-utf8.safetensors", "{\"a\xc0\xaf\":1}", 0, "not valid UTF-8 (byte 0xc0)"},
        {"surrogate-utf8.safetensors", "{\"a\xed\xa0\x80\":1}", 0, "not valid UTF-8"},
        {"raw-tab-in-name.safetensors", "{\"a\tb\":" ENTRY("F32", "[1]", "[0,4]") "}", 4,
         "raw control character 0x09 inside a JSON string"},
        {"nul-escape.safetensors", "{\"a\\u0000b\":" ENTRY("F32", "[1]", "[0,4]") "}", 4,
         "\\u0000"},

        /* entries and their fields */
        {"entry-number.safetensors", "{\"a\":5}", 0,
         "tensor 'a': entry is 5, expected an object"},
        {"missing-dtype.safetensors", "{\"a\":{\"shape\":[2],\"data_offsets\":[0,8]}}", 8,
         "tensor 'a': missing 'dtype'"},
        {"missing-shape.safetensors", "{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,8]}}", 8,
         "tensor 'a': missing 'shape'"},
        {"missing-offsets.safetensors", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2]}}", 8,
         "tensor 'a': missing 'data_offsets'"},
        {"unknown-key.safetensors",
         "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8],\"x\":1}}", 8,
         "unexpected key 'x'"},
        {"repeated-key.safetensors",
         "{\"a\":{\"dtype\":\"F32\",\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8,
         "key 'dtype' appears twice"},
        {"dtype-number.safetensors", "{\"a\":{\"dtype\":4,\"shape\":[2],\"data_offsets\":[0,8]}}",
         8, "dtype is 4, expected a string"},
        {"dtype-i64.safetensors", "{\"a\":" ENTRY("I64", "[1]", "[0,8]") "}", 8,
         "unsupported dtype I64 for tensor 'a'"},
        {"dtype-f64.safetensors", "{\"a\":" ENTRY("F64", "[1]", "[0,8]") "}", 8,
         "unsupported dtype F64 for tensor 'a'"},
        {"dtype-u8.safetensors", "{\"a\":" ENTRY("U8", "[8]", "[0,8]") "}", 8,
         "unsupported dtype U8 for tensor 'a'"},
        {"dtype-bogus.safetensors", "{\"a\":" ENTRY("F33", "[2]", "[0,8]") "}", 8,
         "invalid dtype \"F33\""},
        {"dtype-lowercase.safetensors", "{\"a\":" ENTRY("f32", "[2]", "[0,8]") "}", 8,
         "invalid dtype \"f32\""},
        {"shape-number.safetensors", "{\"a\":" ENTRY("F32", "2", "[0,8]") "}", 8,
         "shape is 2, expected an array"},
        {"shape-negative.safetensors", "{\"a\":" ENTRY("F32", "[-2]", "[0,8]") "}", 8,
         "shape[0] is -2 (negative)"},
        {"shape-fraction.safetensors", "{\"a\":" ENTRY("F32", "[2.5]", "[0,8]") "}", 8,
         "shape[0] is 2.5 (not an integer)"},
        {"shape-string.safetensors", "{\"a\":" ENTRY("F32", "[\"2\"]", "[0,8]") "}", 8,
         "shape[0] is a string"},
        {"shape-huge.safetensors", "{\"a\":" ENTRY("F32", "[1e300]", "[0,8]") "}", 8,
         "above 2^53"},
        {"shape-float-syntax.safetensors", "{\"a\":" ENTRY("F32", "[2.0]", "[0,8]") "}", 8,
         "entry 'a': number 2.0 is not written as a plain non-negative integer"},
        {"shape-exponent.safetensors", "{\"a\":" ENTRY("F32", "[2e0]", "[0,8]") "}", 8,
         "number 2e0 is not written as a plain"},
        {"shape-minus-zero.safetensors", "{\"a\":" ENTRY("F32", "[-0]", "[0,0]") "}", 0,
         "number -0 is not written as a plain"},
        {"shape-leading-zero.safetensors", "{\"a\":" ENTRY("F32", "[02]", "[0,8]") "}", 8,
         "number 02 is not written as a plain"},
        {"shape-9-dims.safetensors",
         "{\"a\":" ENTRY("F32", "[1,1,1,1,1,1,1,1,2]", "[0,8]") "}", 8,
         "shape has 9 dimensions, cpeft supports at most 8"},
        {"offsets-number.safetensors", "{\"a\":" ENTRY("F32", "[2]", "8") "}", 8,
         "data_offsets is 8, expected an array"},
        {"offsets-three.safetensors", "{\"a\":" ENTRY("F32", "[2]", "[0,4,8]") "}", 8,
         "data_offsets has 3 values"},
        {"offsets-negative.safetensors", "{\"a\":" ENTRY("F32", "[2]", "[-8,0]") "}", 8,
         "data_offsets[0] is -8 (negative)"},
        {"offsets-fraction.safetensors", "{\"a\":" ENTRY("F32", "[2]", "[0,8.5]") "}", 8,
         "data_offsets[1] is 8.5 (not an integer)"},
        {"offsets-reversed.safetensors", "{\"a\":" ENTRY("F32", "[0]", "[8,0]") "}", 8,
         "data_offsets [8, 0) begin after they end"},

        /* sizes and ranges */
        {"size-mismatch.safetensors", "{\"a\":" ENTRY("F32", "[3]", "[0,8]") "}", 8,
         "shape [3] with dtype F32 needs 12 bytes, but data_offsets [0, 8) hold 8"},
        {"size-overflow.safetensors",
         "{\"a\":" ENTRY("F32", "[4294967296,4294967296,4294967296]", "[0,8]") "}", 8,
         "overflows a 64-bit byte count"},
        {"size-overflow-by-dtype.safetensors",
         "{\"a\":" ENTRY("F32", "[2147483648,2147483648]", "[0,8]") "}", 8,
         "overflows a 64-bit byte count"},
        {"past-data-end.safetensors", "{\"a\":" ENTRY("F32", "[4]", "[0,16]") "}", 8,
         "tensor 'a': data_offsets [0, 16) end past the data section (8 bytes)"},
        {"overlap.safetensors",
         "{\"a\":" ENTRY("F32", "[2]", "[0,8]") ",\"b\":" ENTRY("F32", "[2]", "[4,12]") "}", 12,
         "tensor 'b': data_offsets [4, 12) overlap tensor 'a'"},
        {"same-range.safetensors",
         "{\"a\":" ENTRY("F32", "[2]", "[0,8]") ",\"b\":" ENTRY("F32", "[2]", "[0,8]") "}", 8,
         "overlap tensor 'a'"},
        {"gap.safetensors",
         "{\"a\":" ENTRY("F32", "[2]", "[0,8]") ",\"b\":" ENTRY("F32", "[2]", "[12,20]") "}",
         20, "bytes [8, 12) of the data section belong to no tensor"},
        {"gap-at-start.safetensors", "{\"a\":" ENTRY("F32", "[2]", "[4,12]") "}", 12,
         "bytes [0, 4) of the data section belong to no tensor"},
        {"trailing-bytes.safetensors", "{\"a\":" ENTRY("F32", "[2]", "[0,8]") "}", 12,
         "the data section has 12 bytes but the tensors cover only the first 8"},
        {"no-tensors-but-data.safetensors", "{}", 4,
         "the data section has 4 bytes but the tensors cover only the first 0"},
        {"duplicate-name.safetensors",
         "{\"a\":" ENTRY("F32", "[2]", "[0,8]") ",\"a\":" ENTRY("F32", "[2]", "[8,16]") "}", 16,
         "tensor name 'a' appears twice"},

        /* __metadata__ */
        {"metadata-string.safetensors", "{\"__metadata__\":\"x\"}", 0,
         "'__metadata__' is a string, expected an object"},
        {"metadata-number-value.safetensors", "{\"__metadata__\":{\"k\":1}}", 0,
         "'__metadata__' value for key 'k' is 1, expected a string"},
        {"metadata-nested.safetensors", "{\"__metadata__\":{\"k\":{}}}", 0,
         "value for key 'k' is an object"},
        {"metadata-duplicate-key.safetensors", "{\"__metadata__\":{\"k\":\"1\",\"k\":\"2\"}}",
         0, "'__metadata__' key 'k' appears twice"},
        {"metadata-twice.safetensors", "{\"__metadata__\":{},\"__metadata__\":{}}", 0,
         "key '__metadata__' appears twice"},
    };

    const char *dir = test_tmpdir();
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        /* The trailing-nul case carries a NUL that strlen would drop. */
        size_t n = strlen(cases[i].header) + (strcmp(cases[i].file, "trailing-nul.safetensors") == 0);
        char *path = craft_with_length(dir, cases[i].file, n, cases[i].header, n,
                                       cases[i].data_len);
        expect_reject(path, cases[i].file, cases[i].expect);
        free(path);
    }
}

/* Opens every truncation of a valid file, which must be rejected, and the
 * file with each header byte replaced by a few values, which must be
 * rejected or, for edits inside strings, accepted. Nothing may crash, and
 * under AddressSanitizer nothing may read out of bounds. */
TEST(st_reject_damaged_copies)
{
    sample x;
    sample_init(&x);
    const char *dir = test_tmpdir();
    char *path = cp_path_join(dir, "good.safetensors");
    cp_error err = {0};
    CHECK_EQ_INT(cp_safetensors_write(path, x.t, 5, x.m, 2, &err), CP_OK);
    size_t n = 0;
    uint8_t *good = slurp(path, &n);
    if (!good)
        return;
    uint64_t header_len = good[0] | (uint64_t)good[1] << 8;

    int accepted = 0;
    for (size_t len = 0; len < n; len++) {
        char *p = test_write_file(dir, "cut.safetensors", good, len);
        cp_safetensors *st = NULL;
        cp_status s = cp_safetensors_open(p, &st, &err);
        CHECK_MSG(s == CP_ERR_INPUT, "cut to %zu of %zu bytes: status %d", len, n, (int)s);
        cp_safetensors_close(st);
        free(p);
    }

    static const uint8_t values[] = {'0', '9', '"', '}', ']', ',', ' ', 0xff, 0x00, 'e'};
    uint8_t *copy = malloc(n);
    for (size_t at = 0; at < 8 + header_len; at++) {
        for (size_t v = 0; v < sizeof values; v++) {
            memcpy(copy, good, n);
            if (copy[at] == values[v])
                continue;
            copy[at] = values[v];
            char *p = test_write_file(dir, "flip.safetensors", copy, n);
            cp_safetensors *st = NULL;
            cp_status s = cp_safetensors_open(p, &st, &err);
            CHECK_MSG(s == CP_OK || s == CP_ERR_INPUT, "byte %zu set to 0x%02x: status %d",
                      at, values[v], (int)s);
            accepted += s == CP_OK;
            cp_safetensors_close(st);
            free(p);
        }
    }
    /* Edits inside names and metadata strings are still valid files. */
    CHECK(accepted > 0);
    free(copy);
    free(good);
    free(path);
}

/* ---- sharded folders ---- */

#define SHARD1 "model-00001-of-00002.safetensors"
#define SHARD2 "model-00002-of-00002.safetensors"

/* Writes two shards into dir: "a" (F32 [2, 3]) and "b" (BF16 [4]) in the
 * first, "c" (F16 [3]) and metadata in the second. */
static void shards_write(const char *dir)
{
    static float a[6] = {1, 2, 3, 4, 5, 6};
    static uint16_t b[4] = {0x3f80, 0x4000, 0x4040, 0x4080}; /* 1, 2, 3, 4 in BF16 */
    static uint16_t c[3] = {0x3c00, 0x4000, 0x4200};         /* 1, 2, 3 in F16 */
    cp_st_tensor t1[2] = {
        {.name = "a", .dtype = CP_DTYPE_F32, .ndim = 2, .shape = {2, 3}, .data = a,
         .nbytes = sizeof a},
        {.name = "b", .dtype = CP_DTYPE_BF16, .ndim = 1, .shape = {4}, .data = b,
         .nbytes = sizeof b},
    };
    cp_st_tensor t2 = {.name = "c", .dtype = CP_DTYPE_F16, .ndim = 1, .shape = {3}, .data = c,
                       .nbytes = sizeof c};
    cp_st_metadata m = {"format", "pt"};
    cp_error err = {0};
    char *p1 = cp_path_join(dir, SHARD1), *p2 = cp_path_join(dir, SHARD2);
    CHECK_MSG(cp_safetensors_write(p1, t1, 2, NULL, 0, &err) == CP_OK, "%s", err.msg);
    CHECK_MSG(cp_safetensors_write(p2, &t2, 1, &m, 1, &err) == CP_OK, "%s", err.msg);
    free(p1);
    free(p2);
}

static void index_write(const char *dir, const char *json)
{
    free(test_write_file(dir, "model.safetensors.index.json", json, strlen(json)));
}

#define GOOD_INDEX                                                                         \
    "{\"metadata\":{\"total_size\":38},\"weight_map\":{\"a\":\"" SHARD1 "\",\"b\":\"" SHARD1 \
    "\",\"c\":\"" SHARD2 "\"}}"

TEST(st_sharded_folder)
{
    const char *dir = test_tmpdir();
    shards_write(dir);
    index_write(dir, GOOD_INDEX);

    cp_safetensors *st = NULL;
    cp_error err = {0};
    CHECK_MSG(cp_safetensors_open(dir, &st, &err) == CP_OK, "%s", err.msg);
    if (!st)
        return;
    CHECK_EQ_INT(cp_safetensors_count(st), 3);
    const cp_st_tensor *a = cp_safetensors_find(st, "a");
    const cp_st_tensor *b = cp_safetensors_find(st, "b");
    const cp_st_tensor *c = cp_safetensors_find(st, "c");
    CHECK(a != NULL);
    CHECK(b != NULL);
    CHECK(c != NULL);
    if (a && b && c) {
        CHECK(strstr(a->file, SHARD1) != NULL);
        CHECK(strstr(b->file, SHARD1) != NULL);
        CHECK(strstr(c->file, SHARD2) != NULL);
        CHECK(read_f32(a, 5) == 6.0f);
        CHECK_EQ_INT(b->dtype, CP_DTYPE_BF16);
        CHECK_EQ_INT(c->dtype, CP_DTYPE_F16);
        CHECK_EQ_INT(c->shape[0], 3);
        uint16_t c2;
        memcpy(&c2, (const uint8_t *)c->data + 4, 2);
        CHECK(cp_f16_to_f32(c2) == 3.0f);
    }
    /* Shard 1 comes first, in data order, then shard 2. */
    CHECK_EQ_STR(cp_safetensors_at(st, 0)->name, "a");
    CHECK_EQ_STR(cp_safetensors_at(st, 1)->name, "b");
    CHECK_EQ_STR(cp_safetensors_at(st, 2)->name, "c");
    CHECK_EQ_STR(cp_safetensors_metadata(st, "format"), "pt");
    cp_safetensors_close(st);

    /* The index file itself opens the same model. */
    char *index = cp_path_join(dir, "model.safetensors.index.json");
    CHECK_MSG(cp_safetensors_open(index, &st, &err) == CP_OK, "%s", err.msg);
    if (st) {
        CHECK_EQ_INT(cp_safetensors_count(st), 3);
        cp_safetensors_close(st);
    }
    free(index);
}

/* Writes the shards and index into a fresh folder and expects rejection
 * with a message naming file_name and containing fragment. */
static void expect_shard_reject(const char *index_json, const char *file_name,
                                const char *fragment)
{
    const char *dir = test_tmpdir();
    shards_write(dir);
    index_write(dir, index_json);
    expect_reject(dir, file_name, fragment);
}

#define IDX "model.safetensors.index.json"

TEST(st_sharded_rejects)
{
    expect_shard_reject("{\"weight_map\":{\"a\":\"" SHARD1 "\",\"b\":\"" SHARD1
                        "\",\"c\":\"" SHARD2 "\",\"d\":\"model-00003.safetensors\"}}",
                        IDX, "lists shard model-00003.safetensors, but");
    expect_shard_reject("{\"weight_map\":{\"a\":\"" SHARD1 "\",\"b\":\"" SHARD1
                        "\",\"c\":\"" SHARD2 "\",\"d\":\"" SHARD2 "\"}}",
                        IDX, "lists tensor 'd' in shard");
    expect_shard_reject("{\"weight_map\":{\"a\":\"" SHARD1 "\",\"c\":\"" SHARD2 "\"}}", SHARD1,
                        "tensor 'b' is not listed in");
    expect_shard_reject("{\"weight_map\":{\"a\":\"" SHARD2 "\",\"b\":\"" SHARD1
                        "\",\"c\":\"" SHARD2 "\"}}",
                        SHARD1, "contains tensor 'a', but");
    expect_shard_reject("{\"weight_map\":{\"a\":\"../" SHARD1 "\"}}", IDX,
                        "contains a '..' component");
    expect_shard_reject("{\"weight_map\":{\"a\":\"sub/../../x.safetensors\"}}", IDX,
                        "contains a '..' component");
    expect_shard_reject("{\"weight_map\":{\"a\":\"/etc/passwd\"}}", IDX,
                        "is an absolute path");
    expect_shard_reject("{\"weight_map\":{\"a\":\"\"}}", IDX, "is empty");
    expect_shard_reject("{\"weight_map\":{\"a\":3}}", IDX, "is 3, expected a file name string");
    expect_shard_reject("{\"weight_map\":{}}", IDX, "\"weight_map\" is empty");
    expect_shard_reject("{\"weight_map\":[]}", IDX, "\"weight_map\" is an array");
    expect_shard_reject("{\"metadata\":{}}", IDX, "missing \"weight_map\"");
    expect_shard_reject("{\"weight_map\":{\"a\":\"" SHARD1 "\"", IDX, "not valid JSON");
    expect_shard_reject("[]", IDX, "top level is not a JSON object");
    expect_shard_reject("{\"weight_map\":{\"a\xff\":\"" SHARD1 "\"}}", IDX,
                        "byte offset 17: not valid UTF-8");
    expect_shard_reject("{\"weight_map\":{\"a\":\"" SHARD1 "\",\"a\":\"" SHARD1 "\"}}", IDX,
                        "tensor 'a' appears twice in weight_map");
    expect_shard_reject("{\"weight_map\":{},\"weight_map\":{}}", IDX,
                        "key 'weight_map' appears twice");
}

TEST(st_sharded_corrupt_shard)
{
    const char *dir = test_tmpdir();
    shards_write(dir);
    index_write(dir, GOOD_INDEX);
    /* Cut the second shard short: its header now runs past the end. */
    free(test_write_file(dir, SHARD2, "\x40\0\0\0\0\0\0\0{\"c\"", 12));
    expect_reject(dir, SHARD2, "runs past the end of the file");
}
