/*
 * GGUF writer: keeps each metadata value already encoded as its file bytes,
 * and the tensors as descriptions with borrowed data, then writes header,
 * metadata, tensor descriptions, padding and the aligned data section in
 * one pass through an atomic file.
 *
 * Header and metadata numbers are encoded little-endian byte by byte, so
 * they are right on any host. Tensor data is copied as given, so callers on
 * a big-endian host would have to swap it first.
 */
#include "io/gguf_write.h"

#include <stdlib.h>
#include <string.h>

#include "core/file.h"

#define GGUF_VERSION 3

/* A growable byte buffer. A failed append leaves failed set, so a series of
 * appends needs one check at the end. */
typedef struct byte_buf {
    uint8_t *data;
    size_t len, cap;
    bool failed;
} byte_buf;

typedef struct writer_kv {
    char *key;
    cp_gguf_type type;
    byte_buf value; /* the value's bytes as they follow the type in the file */
} writer_kv;

typedef struct writer_tensor {
    char *name;
    cp_ggml_type type;
    int n_dims;
    uint64_t dims[CP_GGUF_MAX_DIMS];
    size_t n_bytes;
    const void *data; /* borrowed until cp_gguf_writer_write */
} writer_tensor;

struct cp_gguf_writer {
    writer_kv *kvs;
    size_t n_kvs, cap_kvs;
    writer_tensor *tensors;
    size_t n_tensors, cap_tensors;
};

/* ---- byte buffers ---- */

static void buf_append(byte_buf *b, const void *data, size_t n)
{
    if (b->failed || n == 0)
        return;
    if (n > b->cap - b->len) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap - b->len < n && cap <= SIZE_MAX / 2)
            cap *= 2;
        uint8_t *grown = cap - b->len >= n ? realloc(b->data, cap) : NULL;
        if (!grown) {
            b->failed = true;
            return;
        }
        b->data = grown;
        b->cap = cap;
    }
    memcpy(b->data + b->len, data, n);
    b->len += n;
}

static void buf_u32(byte_buf *b, uint32_t v)
{
    uint8_t bytes[4];
    for (int i = 0; i < 4; i++)
        bytes[i] = (uint8_t)(v >> (8 * i));
    buf_append(b, bytes, 4);
}

static void buf_u64(byte_buf *b, uint64_t v)
{
    uint8_t bytes[8];
    for (int i = 0; i < 8; i++)
        bytes[i] = (uint8_t)(v >> (8 * i));
    buf_append(b, bytes, 8);
}

static void buf_str(byte_buf *b, const char *s, size_t len)
{
    buf_u64(b, len);
    buf_append(b, s, len);
}

static void buf_zeros(byte_buf *b, size_t n)
{
    static const uint8_t zeros[64];
    while (n > 0 && !b->failed) {
        size_t k = n < sizeof zeros ? n : sizeof zeros;
        buf_append(b, zeros, k);
        n -= k;
    }
}

static void buf_free(byte_buf *b)
{
    free(b->data);
    *b = (byte_buf){0};
}

/* ---- the writer ---- */

cp_status cp_gguf_writer_init(cp_gguf_writer **out, cp_error *err)
{
    *out = calloc(1, sizeof **out);
    return *out ? CP_OK : cp_error_nomem(err, "a GGUF writer", sizeof **out);
}

void cp_gguf_writer_free(cp_gguf_writer *w)
{
    if (!w)
        return;
    for (size_t i = 0; i < w->n_kvs; i++) {
        free(w->kvs[i].key);
        buf_free(&w->kvs[i].value);
    }
    for (size_t i = 0; i < w->n_tensors; i++)
        free(w->tensors[i].name);
    free(w->kvs);
    free(w->tensors);
    free(w);
}

/* Grows an array of elem-byte entries so that one more fits. */
static bool reserve_one(void **items, size_t n, size_t *cap, size_t elem)
{
    if (n < *cap)
        return true;
    size_t new_cap = *cap ? *cap * 2 : 16;
    void *grown = realloc(*items, new_cap * elem);
    if (!grown)
        return false;
    *items = grown;
    *cap = new_cap;
    return true;
}

/* Stores value (whose ownership passes to the writer, also on error) under
 * key, replacing an earlier value of the key in place. */
static cp_status put_kv(cp_gguf_writer *w, const char *key, cp_gguf_type type, byte_buf value,
                        cp_error *err)
{
    if (value.failed) {
        size_t requested = value.cap * 2;
        buf_free(&value);
        return cp_error_nomem(err, "a GGUF metadata value", requested);
    }
    if (!key || key[0] == '\0') {
        buf_free(&value);
        return cp_error_set(err, CP_ERR_INPUT,
                            "GGUF writer: a metadata key is empty; give every key a name such "
                            "as general.name");
    }
    for (size_t i = 0; i < w->n_kvs; i++) {
        if (strcmp(w->kvs[i].key, key) == 0) {
            buf_free(&w->kvs[i].value);
            w->kvs[i].type = type;
            w->kvs[i].value = value;
            return CP_OK;
        }
    }
    char *copy = strdup(key);
    if (!copy || !reserve_one((void **)&w->kvs, w->n_kvs, &w->cap_kvs, sizeof *w->kvs)) {
        free(copy);
        buf_free(&value);
        return cp_error_nomem(err, "a GGUF metadata key", strlen(key) + sizeof *w->kvs);
    }
    w->kvs[w->n_kvs++] = (writer_kv){.key = copy, .type = type, .value = value};
    return CP_OK;
}

cp_status cp_gguf_writer_set_str(cp_gguf_writer *w, const char *key, const char *value,
                                 cp_error *err)
{
    byte_buf b = {0};
    buf_str(&b, value, strlen(value));
    return put_kv(w, key, CP_GGUF_TYPE_STRING, b, err);
}

/* Stores a 4-byte scalar given as its bit pattern. */
static cp_status put_scalar32(cp_gguf_writer *w, const char *key, cp_gguf_type type,
                              uint32_t bits, cp_error *err)
{
    byte_buf b = {0};
    buf_u32(&b, bits);
    return put_kv(w, key, type, b, err);
}

cp_status cp_gguf_writer_set_u32(cp_gguf_writer *w, const char *key, uint32_t value,
                                 cp_error *err)
{
    return put_scalar32(w, key, CP_GGUF_TYPE_UINT32, value, err);
}

cp_status cp_gguf_writer_set_i32(cp_gguf_writer *w, const char *key, int32_t value,
                                 cp_error *err)
{
    return put_scalar32(w, key, CP_GGUF_TYPE_INT32, (uint32_t)value, err);
}

cp_status cp_gguf_writer_set_f32(cp_gguf_writer *w, const char *key, float value,
                                 cp_error *err)
{
    uint32_t bits;
    memcpy(&bits, &value, 4);
    return put_scalar32(w, key, CP_GGUF_TYPE_FLOAT32, bits, err);
}

cp_status cp_gguf_writer_set_bool(cp_gguf_writer *w, const char *key, bool value,
                                  cp_error *err)
{
    byte_buf b = {0};
    uint8_t byte = value ? 1 : 0;
    buf_append(&b, &byte, 1);
    return put_kv(w, key, CP_GGUF_TYPE_BOOL, b, err);
}

cp_status cp_gguf_writer_set_str_array(cp_gguf_writer *w, const char *key,
                                       const char *const *values, const size_t *lens, size_t n,
                                       cp_error *err)
{
    byte_buf b = {0};
    buf_u32(&b, CP_GGUF_TYPE_STRING);
    buf_u64(&b, n);
    for (size_t i = 0; i < n; i++)
        buf_str(&b, values[i], lens ? lens[i] : strlen(values[i]));
    return put_kv(w, key, CP_GGUF_TYPE_ARRAY, b, err);
}

/* Stores an array of n 4-byte elements, given as bit patterns. */
static cp_status put_array32(cp_gguf_writer *w, const char *key, cp_gguf_type elem_type,
                             const void *values, size_t n, cp_error *err)
{
    byte_buf b = {0};
    buf_u32(&b, elem_type);
    buf_u64(&b, n);
    for (size_t i = 0; i < n; i++) {
        uint32_t bits;
        memcpy(&bits, (const uint8_t *)values + 4 * i, 4);
        buf_u32(&b, bits);
    }
    return put_kv(w, key, CP_GGUF_TYPE_ARRAY, b, err);
}

cp_status cp_gguf_writer_set_f32_array(cp_gguf_writer *w, const char *key, const float *values,
                                       size_t n, cp_error *err)
{
    return put_array32(w, key, CP_GGUF_TYPE_FLOAT32, values, n, err);
}

cp_status cp_gguf_writer_set_i32_array(cp_gguf_writer *w, const char *key,
                                       const int32_t *values, size_t n, cp_error *err)
{
    return put_array32(w, key, CP_GGUF_TYPE_INT32, values, n, err);
}

/* ---- tensors ---- */

static bool type_writable(cp_ggml_type type)
{
    return type == CP_GGML_TYPE_F32 || type == CP_GGML_TYPE_F16 || type == CP_GGML_TYPE_BF16 ||
           type == CP_GGML_TYPE_Q8_0 || type == CP_GGML_TYPE_Q4_0;
}

/* Checks the shape and type of a new tensor and sets its byte size. */
static cp_status check_tensor(const char *name, cp_ggml_type type, int n_dims,
                              const uint64_t *dims, size_t *n_bytes, cp_error *err)
{
    if (!type_writable(type))
        return cp_error_set(err, CP_ERR_INPUT,
                            "GGUF writer: tensor '%s' has ggml type %s (id %u), expected F32, "
                            "F16, BF16, Q8_0 or Q4_0; convert the data to one of these first",
                            name, cp_ggml_type_name((uint32_t)type), (unsigned)type);
    if (n_dims < 1 || n_dims > CP_GGUF_MAX_DIMS)
        return cp_error_set(err, CP_ERR_INPUT,
                            "GGUF writer: tensor '%s' has %d dimensions, expected 1 to %d", name,
                            n_dims, CP_GGUF_MAX_DIMS);
    uint64_t rows = 1, row_bytes;
    for (int d = 1; d < n_dims; d++) {
        if (dims[d] != 0 && rows > UINT64_MAX / dims[d])
            return cp_error_set(err, CP_ERR_INPUT,
                                "GGUF writer: tensor '%s': the element count overflows 64 bits",
                                name);
        rows *= dims[d];
    }
    if (!cp_ggml_row_bytes(type, dims[0], &row_bytes))
        return cp_error_set(err, CP_ERR_INPUT,
                            "GGUF writer: tensor '%s' of type %s has %llu elements per row "
                            "(dims[0]), expected a multiple of the type's block size; pad or "
                            "reshape the rows",
                            name, cp_ggml_type_name((uint32_t)type),
                            (unsigned long long)dims[0]);
    if (rows != 0 && row_bytes > SIZE_MAX / rows)
        return cp_error_set(err, CP_ERR_INPUT,
                            "GGUF writer: tensor '%s': the byte size overflows", name);
    *n_bytes = (size_t)(row_bytes * rows);
    return CP_OK;
}

cp_status cp_gguf_writer_add_tensor(cp_gguf_writer *w, const char *name, cp_ggml_type type,
                                    int n_dims, const uint64_t *dims, const void *data,
                                    cp_error *err)
{
    if (!name || name[0] == '\0')
        return cp_error_set(err, CP_ERR_INPUT,
                            "GGUF writer: a tensor name is empty; give every tensor a name");
    for (size_t i = 0; i < w->n_tensors; i++)
        if (strcmp(w->tensors[i].name, name) == 0)
            return cp_error_set(err, CP_ERR_INPUT,
                                "GGUF writer: tensor '%s' was added twice (tensor %zu has the "
                                "name); give each tensor its own name",
                                name, i);
    size_t n_bytes = 0;
    cp_status st = check_tensor(name, type, n_dims, dims, &n_bytes, err);
    if (st)
        return st;

    char *copy = strdup(name);
    if (!copy ||
        !reserve_one((void **)&w->tensors, w->n_tensors, &w->cap_tensors, sizeof *w->tensors)) {
        free(copy);
        return cp_error_nomem(err, "a GGUF tensor description", strlen(name) + sizeof *w->tensors);
    }
    writer_tensor *t = &w->tensors[w->n_tensors++];
    *t = (writer_tensor){.name = copy, .type = type, .n_dims = n_dims, .n_bytes = n_bytes,
                         .data = data};
    for (int d = 0; d < n_dims; d++)
        t->dims[d] = dims[d];
    return CP_OK;
}

/* ---- writing ---- */

/* Returns the name of a value type this writer produces. */
static const char *value_type_name(cp_gguf_type type)
{
    switch (type) {
    case CP_GGUF_TYPE_UINT32: return "uint32";
    case CP_GGUF_TYPE_INT32: return "int32";
    case CP_GGUF_TYPE_FLOAT32: return "float32";
    case CP_GGUF_TYPE_BOOL: return "bool";
    case CP_GGUF_TYPE_STRING: return "string";
    case CP_GGUF_TYPE_ARRAY: return "array";
    default: return "unknown";
    }
}

/* Sets *alignment from general.alignment, or the default when it is unset. */
static cp_status find_alignment(const cp_gguf_writer *w, uint32_t *alignment, cp_error *err)
{
    *alignment = CP_GGUF_DEFAULT_ALIGNMENT;
    for (size_t i = 0; i < w->n_kvs; i++) {
        const writer_kv *kv = &w->kvs[i];
        if (strcmp(kv->key, "general.alignment") != 0)
            continue;
        if (kv->type != CP_GGUF_TYPE_UINT32)
            return cp_error_set(err, CP_ERR_INPUT,
                                "GGUF writer: general.alignment has type %s, expected uint32; "
                                "set it with cp_gguf_writer_set_u32",
                                value_type_name(kv->type));
        uint32_t a = 0;
        for (int k = 0; k < 4; k++)
            a |= (uint32_t)kv->value.data[k] << (8 * k);
        if (a == 0 || (a & (a - 1)) != 0)
            return cp_error_set(err, CP_ERR_INPUT,
                                "GGUF writer: general.alignment is %u, expected a power of two "
                                "such as 32",
                                a);
        *alignment = a;
    }
    return CP_OK;
}

static uint64_t align_up(uint64_t n, uint32_t alignment)
{
    return (n + alignment - 1) / alignment * alignment;
}

/* Encodes everything before the data section, padded to the alignment. */
static void encode_header(const cp_gguf_writer *w, uint32_t alignment, byte_buf *b)
{
    buf_append(b, "GGUF", 4);
    buf_u32(b, GGUF_VERSION);
    buf_u64(b, w->n_tensors);
    buf_u64(b, w->n_kvs);
    for (size_t i = 0; i < w->n_kvs; i++) {
        const writer_kv *kv = &w->kvs[i];
        buf_str(b, kv->key, strlen(kv->key));
        buf_u32(b, (uint32_t)kv->type);
        buf_append(b, kv->value.data, kv->value.len);
    }

    uint64_t offset = 0;
    for (size_t i = 0; i < w->n_tensors; i++) {
        const writer_tensor *t = &w->tensors[i];
        buf_str(b, t->name, strlen(t->name));
        buf_u32(b, (uint32_t)t->n_dims);
        for (int d = 0; d < t->n_dims; d++)
            buf_u64(b, t->dims[d]);
        buf_u32(b, (uint32_t)t->type);
        buf_u64(b, offset);
        offset += align_up(t->n_bytes, alignment);
    }
    buf_zeros(b, (size_t)(align_up(b->len, alignment) - b->len));
}

/* Writes each tensor's bytes followed by zeros up to the alignment. */
static cp_status write_data(const cp_gguf_writer *w, uint32_t alignment, cp_atomic_file *f,
                            cp_error *err)
{
    byte_buf pad = {0};
    buf_zeros(&pad, alignment);
    if (pad.failed)
        return cp_error_nomem(err, "GGUF padding", alignment);
    cp_status st = CP_OK;
    for (size_t i = 0; i < w->n_tensors && !st; i++) {
        const writer_tensor *t = &w->tensors[i];
        st = cp_atomic_write(f, t->data, t->n_bytes, err);
        size_t padding = (size_t)(align_up(t->n_bytes, alignment) - t->n_bytes);
        if (!st && padding)
            st = cp_atomic_write(f, pad.data, padding, err);
    }
    buf_free(&pad);
    return st;
}

cp_status cp_gguf_writer_write(const cp_gguf_writer *w, const char *path, cp_error *err)
{
    uint32_t alignment;
    cp_status st = find_alignment(w, &alignment, err);
    if (st)
        return cp_error_prefix(err, "%s", path);

    byte_buf header = {0};
    encode_header(w, alignment, &header);
    if (header.failed) {
        size_t requested = header.cap * 2;
        buf_free(&header);
        return cp_error_nomem(err, "the GGUF header", requested);
    }

    cp_atomic_file f;
    st = cp_atomic_open(&f, path, err);
    if (!st)
        st = cp_atomic_write(&f, header.data, header.len, err);
    if (!st)
        st = write_data(w, alignment, &f, err);
    buf_free(&header);
    if (st) {
        if (f.tmp_path) /* cp_atomic_open cleans up after itself on failure */
            cp_atomic_abort(&f);
        return st;
    }
    return cp_atomic_commit(&f, err);
}
