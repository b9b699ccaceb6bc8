/*
 * GGUF reader: parses the header, metadata and tensor descriptions of a
 * read-only map and validates them against the file size.
 *
 * Layout (little-endian): "GGUF", u32 version, u64 tensor count, u64 key
 * count, the key/value pairs, the tensor descriptions, padding up to the
 * alignment, then the data section. Strings are a u64 length and the bytes.
 * The reader rejects with CP_ERR_INPUT: versions other than 2 and 3,
 * truncation, lengths or counts past the file, and bools other than 0 and 1.
 * It also rejects duplicate keys or tensor names, unknown value or tensor
 * types, more than 4 dimensions and overflowing sizes. Tensor data must be
 * aligned, inside the data section and free of overlaps.
 */
#include "io/gguf.h"

#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "core/dtype.h"
#include "core/file.h"

#define GGUF_MAGIC "GGUF"

/* Nested arrays deeper than this are rejected, which bounds the recursion. */
#define MAX_ARRAY_DEPTH 8

#define HINT_CORRUPT "the file is truncated or corrupt, re-download it or re-export it with llama.cpp's convert_hf_to_gguf.py"

struct cp_gguf_kv {
    const uint8_t *base;  /* the start of the map */
    cp_gguf_str key;
    cp_gguf_type type;
    uint64_t value_pos;   /* file offset of the value (of the first element for arrays) */
    cp_gguf_type elem_type;  /* arrays only */
    uint64_t n_elems;        /* arrays only */
    uint64_t *elem_pos;      /* string arrays: file offset of each element */
};

struct cp_gguf {
    char *path;
    cp_mapped_file map;
    uint32_t version;
    uint32_t alignment;
    uint64_t data_start;
    cp_gguf_kv *kvs;          /* file order */
    size_t n_kvs;
    cp_gguf_kv **kv_sorted;   /* by key, for lookup */
    cp_gguf_tensor *tensors;  /* file order */
    size_t n_tensors;
    cp_gguf_tensor **tensor_sorted;  /* by name, for lookup */
};

/* A cursor over the map. Every read checks the bytes left first. */
typedef struct reader {
    const uint8_t *data;
    uint64_t size;
    uint64_t pos;
    const char *path;
    cp_error *err;
} reader;

/* ---- errors and primitive reads ---- */

/* Fills the error as "PATH: at byte POS: MESSAGE" and returns CP_ERR_INPUT. */
static cp_status fail_at(const reader *r, uint64_t pos, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static cp_status fail_at(const reader *r, uint64_t pos, const char *fmt, ...)
{
    char msg[CP_ERROR_MSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return cp_error_set(r->err, CP_ERR_INPUT, "%s: at byte %llu: %s", r->path,
                        (unsigned long long)pos, msg);
}

/* Checks that n bytes of `what` remain at the cursor. */
static cp_status need(reader *r, uint64_t n, const char *what)
{
    if (r->size - r->pos >= n)
        return CP_OK;
    return fail_at(r, r->pos, "expected %llu bytes of %s, found %llu before the end of the file; %s",
                   (unsigned long long)n, what, (unsigned long long)(r->size - r->pos),
                   HINT_CORRUPT);
}

static uint64_t load_le(const uint8_t *p, int n)
{
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static cp_status read_u32(reader *r, uint32_t *out, const char *what)
{
    cp_status s = need(r, 4, what);
    if (s != CP_OK)
        return s;
    *out = (uint32_t)load_le(r->data + r->pos, 4);
    r->pos += 4;
    return CP_OK;
}

static cp_status read_u64(reader *r, uint64_t *out, const char *what)
{
    cp_status s = need(r, 8, what);
    if (s != CP_OK)
        return s;
    *out = load_le(r->data + r->pos, 8);
    r->pos += 8;
    return CP_OK;
}

/* Reads a length-prefixed string; out points into the map. */
static cp_status read_str(reader *r, cp_gguf_str *out, const char *what)
{
    uint64_t start = r->pos, len;
    cp_status s = read_u64(r, &len, what);
    if (s != CP_OK)
        return s;
    if (len > r->size - r->pos)
        return fail_at(r, start, "%s has length %llu, but only %llu bytes remain in the file; %s",
                       what, (unsigned long long)len, (unsigned long long)(r->size - r->pos),
                       HINT_CORRUPT);
    out->data = (const char *)r->data + r->pos;
    out->len = len;
    r->pos += len;
    return CP_OK;
}

static int mul_u64(uint64_t a, uint64_t b, uint64_t *out)
{
    if (a != 0 && b > UINT64_MAX / a)
        return 0;
    *out = a * b;
    return 1;
}

static int str_cmp(cp_gguf_str a, cp_gguf_str b)
{
    uint64_t n = a.len < b.len ? a.len : b.len;
    int c = n ? memcmp(a.data, b.data, (size_t)n) : 0;
    if (c != 0)
        return c;
    return a.len < b.len ? -1 : a.len > b.len;
}

/* Shortens long strings in messages. */
static int print_len(cp_gguf_str s) { return s.len > 200 ? 200 : (int)s.len; }

/* ---- metadata values ---- */

static const char *value_type_name(uint32_t t)
{
    static const char *names[] = {"uint8", "int8",  "uint16", "int16",  "uint32",
                                  "int32", "float32", "bool", "string", "array",
                                  "uint64", "int64", "float64"};
    return t < sizeof names / sizeof names[0] ? names[t] : "unknown";
}

/* Bytes of one fixed-size value, or 0 for strings, arrays and unknown ids. */
static uint64_t value_size(uint32_t t)
{
    switch (t) {
    case CP_GGUF_TYPE_UINT8: case CP_GGUF_TYPE_INT8: case CP_GGUF_TYPE_BOOL:
        return 1;
    case CP_GGUF_TYPE_UINT16: case CP_GGUF_TYPE_INT16:
        return 2;
    case CP_GGUF_TYPE_UINT32: case CP_GGUF_TYPE_INT32: case CP_GGUF_TYPE_FLOAT32:
        return 4;
    case CP_GGUF_TYPE_UINT64: case CP_GGUF_TYPE_INT64: case CP_GGUF_TYPE_FLOAT64:
        return 8;
    default:
        return 0;
    }
}

static cp_status check_value_type(reader *r, uint64_t pos, uint32_t t)
{
    if (t <= CP_GGUF_TYPE_FLOAT64)
        return CP_OK;
    return fail_at(r, pos, "expected a value type id from 0 to 12, found %u; %s", t, HINT_CORRUPT);
}

/* Reads count fixed-size values of type t, checking bools are 0 or 1. */
static cp_status skip_fixed(reader *r, uint32_t t, uint64_t count)
{
    uint64_t size = value_size(t), start = r->pos;
    if (count > (r->size - r->pos) / size)
        return fail_at(r, start, "expected %llu %s values, but only %llu bytes remain in the file; %s",
                       (unsigned long long)count, value_type_name(t),
                       (unsigned long long)(r->size - r->pos), HINT_CORRUPT);
    if (t == CP_GGUF_TYPE_BOOL) {
        for (uint64_t i = 0; i < count; i++)
            if (r->data[start + i] > 1)
                return fail_at(r, start + i, "expected a bool (0 or 1), found %u; %s",
                               r->data[start + i], HINT_CORRUPT);
    }
    r->pos += count * size;
    return CP_OK;
}

static cp_status skip_value(reader *r, uint32_t t, int depth);

/* Reads an array's element type and count, then its elements. For string
 * arrays, positions (when not NULL) receives the offset of each element. */
static cp_status skip_array(reader *r, int depth, uint32_t *elem_type, uint64_t *count,
                            uint64_t **positions)
{
    uint64_t type_pos = r->pos;
    cp_status s = read_u32(r, elem_type, "array element type");
    if (s == CP_OK)
        s = check_value_type(r, type_pos, *elem_type);
    uint64_t count_pos = r->pos;
    if (s == CP_OK)
        s = read_u64(r, count, "array length");
    if (s != CP_OK)
        return s;
    if (value_size(*elem_type) != 0)
        return skip_fixed(r, *elem_type, *count);

    /* Strings take at least 8 bytes each and nested arrays 12, so a count
     * that passes this check also bounds the position table below. */
    uint64_t min_size = *elem_type == CP_GGUF_TYPE_STRING ? 8 : 12;
    if (*count > (r->size - r->pos) / min_size)
        return fail_at(r, count_pos, "array of %llu %s values needs at least %llu bytes each, but only %llu bytes remain; %s",
                       (unsigned long long)*count, value_type_name(*elem_type),
                       (unsigned long long)min_size, (unsigned long long)(r->size - r->pos),
                       HINT_CORRUPT);
    if (depth >= MAX_ARRAY_DEPTH)
        return fail_at(r, type_pos, "arrays nested deeper than %d levels; %s", MAX_ARRAY_DEPTH,
                       HINT_CORRUPT);

    uint64_t *pos_table = NULL;
    if (positions && *elem_type == CP_GGUF_TYPE_STRING && *count > 0) {
        pos_table = malloc((size_t)*count * sizeof *pos_table);
        if (!pos_table)
            return cp_error_nomem(r->err, "GGUF string array offsets", (size_t)*count * sizeof *pos_table);
    }
    for (uint64_t i = 0; i < *count && s == CP_OK; i++) {
        if (pos_table)
            pos_table[i] = r->pos;
        s = skip_value(r, *elem_type, depth + 1);
    }
    if (s != CP_OK) {
        free(pos_table);
        return s;
    }
    if (positions)
        *positions = pos_table;
    return CP_OK;
}

/* Reads one value of type t (already checked to be a known id). */
static cp_status skip_value(reader *r, uint32_t t, int depth)
{
    if (t == CP_GGUF_TYPE_STRING) {
        cp_gguf_str ignored;
        return read_str(r, &ignored, "string value");
    }
    if (t == CP_GGUF_TYPE_ARRAY) {
        uint32_t elem_type;
        uint64_t count;
        return skip_array(r, depth, &elem_type, &count, NULL);
    }
    return skip_fixed(r, t, 1);
}

/* Reads one key/value pair into kv. */
static cp_status read_kv(reader *r, cp_gguf_kv *kv)
{
    uint32_t type;
    cp_status s = read_str(r, &kv->key, "metadata key");
    uint64_t type_pos = r->pos;
    if (s == CP_OK)
        s = read_u32(r, &type, "metadata value type");
    if (s == CP_OK)
        s = check_value_type(r, type_pos, type);
    if (s != CP_OK)
        return s;

    kv->base = r->data;
    kv->type = (cp_gguf_type)type;
    if (type != CP_GGUF_TYPE_ARRAY) {
        kv->value_pos = r->pos;
        return skip_value(r, type, 0);
    }
    /* The elements follow a u32 element type and a u64 count. */
    uint32_t elem_type;
    kv->value_pos = r->pos + 12;
    s = skip_array(r, 1, &elem_type, &kv->n_elems, &kv->elem_pos);
    kv->elem_type = (cp_gguf_type)elem_type;
    return s;
}

/* ---- tensor types ---- */

const char *cp_ggml_type_name(uint32_t type)
{
    static const char *names[] = {
        "F32",     "F16",    "Q4_0",    "Q4_1",  "Q4_2",  "Q4_3",   "Q5_0",   "Q5_1",
        "Q8_0",    "Q8_1",   "Q2_K",    "Q3_K",  "Q4_K",  "Q5_K",   "Q6_K",   "Q8_K",
        "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S",  "IQ4_XS",
        "I8",      "I16",    "I32",     "I64",   "F64",   "IQ1_M",  "BF16",   "Q4_0_4_4",
        "Q4_0_4_8", "Q4_0_8_8", "TQ1_0", "TQ2_0", "IQ4_NL_4_4", "IQ4_NL_4_8", "IQ4_NL_8_8",
        "MXFP4"};
    return type < sizeof names / sizeof names[0] ? names[type] : "unknown";
}

static int type_supported(uint32_t type)
{
    return type == CP_GGML_TYPE_F32 || type == CP_GGML_TYPE_F16 || type == CP_GGML_TYPE_BF16 ||
           type == CP_GGML_TYPE_Q8_0 || type == CP_GGML_TYPE_Q4_0;
}

/* Elements per block and bytes per block. */
static void type_block(cp_ggml_type type, uint64_t *block_elems, uint64_t *block_bytes)
{
    switch (type) {
    case CP_GGML_TYPE_F32:
        *block_elems = 1, *block_bytes = 4;
        return;
    case CP_GGML_TYPE_F16:
    case CP_GGML_TYPE_BF16:
        *block_elems = 1, *block_bytes = 2;
        return;
    case CP_GGML_TYPE_Q8_0:
        *block_elems = 32, *block_bytes = 2 + 32;
        return;
    case CP_GGML_TYPE_Q4_0:
        *block_elems = 32, *block_bytes = 2 + 16;
        return;
    }
    CP_ASSERT(!"unsupported ggml type");
}

int cp_ggml_row_bytes(cp_ggml_type type, uint64_t n, uint64_t *bytes)
{
    uint64_t block_elems, block_bytes;
    type_block(type, &block_elems, &block_bytes);
    if (n % block_elems != 0)
        return 0;
    return mul_u64(n / block_elems, block_bytes, bytes);
}

/* ---- tensor descriptions ---- */

/* Reads the dims of t and computes its element count and byte size. */
static cp_status read_dims(reader *r, cp_gguf_tensor *t)
{
    uint64_t pos = r->pos;
    uint32_t n_dims;
    cp_status s = read_u32(r, &n_dims, "tensor dimension count");
    if (s != CP_OK)
        return s;
    if (n_dims < 1 || n_dims > CP_GGUF_MAX_DIMS)
        return fail_at(r, pos, "tensor '%.*s' has %u dimensions, expected 1 to %d; %s",
                       print_len(t->name), t->name.data, n_dims, CP_GGUF_MAX_DIMS, HINT_CORRUPT);
    t->n_dims = (int)n_dims;

    uint64_t n_elements = 1;
    for (int d = 0; d < CP_GGUF_MAX_DIMS; d++) {
        t->dims[d] = 1;
        if (d >= t->n_dims)
            continue;
        pos = r->pos;
        s = read_u64(r, &t->dims[d], "tensor dimension");
        if (s != CP_OK)
            return s;
        if (t->dims[d] > INT64_MAX || !mul_u64(n_elements, t->dims[d], &n_elements))
            return fail_at(r, pos, "tensor '%.*s': dimension %d is %llu, and the element count overflows 64 bits; %s",
                           print_len(t->name), t->name.data, d, (unsigned long long)t->dims[d],
                           HINT_CORRUPT);
    }
    t->n_elements = n_elements;
    return CP_OK;
}

/* Checks the type of t and sets its byte size. type_pos is for messages. */
static cp_status check_tensor_type(reader *r, cp_gguf_tensor *t, uint32_t type, uint64_t type_pos)
{
    if (!type_supported(type))
        return fail_at(r, type_pos, "tensor '%.*s' has ggml type %s (id %u), expected F32, F16, BF16, Q8_0 or Q4_0; convert the model to one of these types with llama.cpp's llama-quantize",
                       print_len(t->name), t->name.data, cp_ggml_type_name(type), type);
    t->type = (cp_ggml_type)type;

    uint64_t block_elems, block_bytes, row_bytes, total;
    type_block(t->type, &block_elems, &block_bytes);
    if (!cp_ggml_row_bytes(t->type, t->dims[0], &row_bytes))
        return fail_at(r, type_pos, "tensor '%.*s' of type %s has %llu elements per row, expected a multiple of the block size %llu; %s",
                       print_len(t->name), t->name.data, cp_ggml_type_name(type),
                       (unsigned long long)t->dims[0], (unsigned long long)block_elems, HINT_CORRUPT);
    if (t->dims[0] == 0)
        total = 0;
    else if (!mul_u64(row_bytes, t->n_elements / t->dims[0], &total) || total > SIZE_MAX)
        return fail_at(r, type_pos, "tensor '%.*s': the byte size overflows; %s",
                       print_len(t->name), t->name.data, HINT_CORRUPT);
    t->n_bytes = (size_t)total;
    return CP_OK;
}

static cp_status read_tensor_info(reader *r, cp_gguf_tensor *t)
{
    cp_status s = read_str(r, &t->name, "tensor name");
    if (s == CP_OK)
        s = read_dims(r, t);
    uint64_t type_pos = r->pos;
    uint32_t type;
    if (s == CP_OK)
        s = read_u32(r, &type, "tensor type");
    if (s == CP_OK)
        s = read_u64(r, &t->offset, "tensor data offset");
    if (s == CP_OK)
        s = check_tensor_type(r, t, type, type_pos);
    return s;
}

/* ---- sorting and duplicate checks ---- */

static int compare_kv(const void *a, const void *b)
{
    const cp_gguf_kv *x = *(const cp_gguf_kv *const *)a, *y = *(const cp_gguf_kv *const *)b;
    return str_cmp(x->key, y->key);
}

static int compare_tensor_name(const void *a, const void *b)
{
    const cp_gguf_tensor *x = *(const cp_gguf_tensor *const *)a;
    const cp_gguf_tensor *y = *(const cp_gguf_tensor *const *)b;
    return str_cmp(x->name, y->name);
}

static int compare_tensor_offset(const void *a, const void *b)
{
    const cp_gguf_tensor *x = *(const cp_gguf_tensor *const *)a;
    const cp_gguf_tensor *y = *(const cp_gguf_tensor *const *)b;
    if (x->offset != y->offset)
        return x->offset < y->offset ? -1 : 1;
    return x->n_bytes < y->n_bytes ? -1 : x->n_bytes > y->n_bytes;
}

/* File offset of the length prefix of a string that lies in the map. */
static uint64_t str_pos(const reader *r, cp_gguf_str s)
{
    return (uint64_t)((const uint8_t *)s.data - r->data) - 8;
}

/* Sorts the keys for lookup and rejects a key that occurs twice. */
static cp_status index_kvs(reader *r, cp_gguf *g)
{
    if (g->n_kvs == 0)
        return CP_OK;
    g->kv_sorted = malloc(g->n_kvs * sizeof *g->kv_sorted);
    if (!g->kv_sorted)
        return cp_error_nomem(r->err, "GGUF key index", g->n_kvs * sizeof *g->kv_sorted);
    for (size_t i = 0; i < g->n_kvs; i++)
        g->kv_sorted[i] = &g->kvs[i];
    qsort(g->kv_sorted, g->n_kvs, sizeof *g->kv_sorted, compare_kv);
    for (size_t i = 1; i < g->n_kvs; i++) {
        const cp_gguf_kv *a = g->kv_sorted[i - 1], *b = g->kv_sorted[i];
        if (str_cmp(a->key, b->key) != 0)
            continue;
        if (a > b) {
            const cp_gguf_kv *tmp = a;
            a = b, b = tmp;
        }
        return fail_at(r, str_pos(r, b->key), "duplicate metadata key '%.*s', first defined at byte %llu; expected each key once; %s",
                       print_len(b->key), b->key.data, (unsigned long long)str_pos(r, a->key),
                       HINT_CORRUPT);
    }
    return CP_OK;
}

/* Sorts the tensors for lookup and rejects a name that occurs twice. */
static cp_status index_tensors(reader *r, cp_gguf *g)
{
    if (g->n_tensors == 0)
        return CP_OK;
    g->tensor_sorted = malloc(g->n_tensors * sizeof *g->tensor_sorted);
    if (!g->tensor_sorted)
        return cp_error_nomem(r->err, "GGUF tensor index", g->n_tensors * sizeof *g->tensor_sorted);
    for (size_t i = 0; i < g->n_tensors; i++)
        g->tensor_sorted[i] = &g->tensors[i];
    qsort(g->tensor_sorted, g->n_tensors, sizeof *g->tensor_sorted, compare_tensor_name);
    for (size_t i = 1; i < g->n_tensors; i++) {
        const cp_gguf_tensor *a = g->tensor_sorted[i - 1], *b = g->tensor_sorted[i];
        if (str_cmp(a->name, b->name) != 0)
            continue;
        if (a > b) {
            const cp_gguf_tensor *tmp = a;
            a = b, b = tmp;
        }
        return fail_at(r, str_pos(r, b->name), "duplicate tensor name '%.*s', first defined at byte %llu; expected each name once; %s",
                       print_len(b->name), b->name.data, (unsigned long long)str_pos(r, a->name),
                       HINT_CORRUPT);
    }
    return CP_OK;
}

/* ---- header, metadata, tensor data ---- */

static cp_status read_header(reader *r, cp_gguf *g, uint64_t *n_tensors, uint64_t *n_kvs)
{
    cp_status s = need(r, 4, "magic \"GGUF\"");
    if (s != CP_OK)
        return s;
    if (memcmp(r->data, GGUF_MAGIC, 4) != 0)
        return fail_at(r, 0, "expected the magic \"GGUF\", found bytes %02x %02x %02x %02x; the file is not a GGUF file, pass a .gguf file",
                       r->data[0], r->data[1], r->data[2], r->data[3]);
    r->pos = 4;

    s = read_u32(r, &g->version, "version");
    if (s != CP_OK)
        return s;
    if (g->version == 1)
        return fail_at(r, 4, "GGUF version 1 is not supported, expected version 2 or 3; convert the model again with a current llama.cpp");
    if (g->version != 2 && g->version != 3)
        return fail_at(r, 4, "expected GGUF version 2 or 3, found %u%s", g->version,
                       (g->version & 0xffff) == 0 ? " (a big-endian file?); cpeft reads little-endian GGUF files only, convert it again without --bigendian"
                                                  : "; check that the file is a GGUF file and convert it again with llama.cpp");

    uint64_t count_pos = r->pos;
    s = read_u64(r, n_tensors, "tensor count");
    if (s == CP_OK)
        s = read_u64(r, n_kvs, "metadata key/value count");
    if (s != CP_OK)
        return s;

    /* A tensor description takes at least 32 bytes and a key/value pair at
     * least 13, which bounds both counts before anything is allocated. */
    uint64_t left = r->size - r->pos;
    if (*n_tensors > left / 32)
        return fail_at(r, count_pos, "tensor count %llu needs at least %llu bytes, but only %llu remain; %s",
                       (unsigned long long)*n_tensors, (unsigned long long)*n_tensors * 32,
                       (unsigned long long)left, HINT_CORRUPT);
    if (*n_kvs > left / 13)
        return fail_at(r, count_pos + 8, "metadata key/value count %llu needs at least %llu bytes, but only %llu remain; %s",
                       (unsigned long long)*n_kvs, (unsigned long long)*n_kvs * 13,
                       (unsigned long long)left, HINT_CORRUPT);
    return CP_OK;
}

/* Sets g->alignment from general.alignment, 32 when absent. */
static cp_status read_alignment(reader *r, cp_gguf *g)
{
    g->alignment = CP_GGUF_DEFAULT_ALIGNMENT;
    const cp_gguf_kv *kv = cp_gguf_find_kv(g, "general.alignment");
    if (!kv)
        return CP_OK;
    uint64_t pos = str_pos(r, kv->key);
    if (kv->type != CP_GGUF_TYPE_UINT32)
        return fail_at(r, pos, "general.alignment has type %s, expected uint32; %s",
                       value_type_name(kv->type), HINT_CORRUPT);
    uint32_t a = (uint32_t)load_le(r->data + kv->value_pos, 4);
    if (a == 0 || (a & (a - 1)) != 0)
        return fail_at(r, pos, "general.alignment is %u, expected a power of two; %s", a, HINT_CORRUPT);
    g->alignment = a;
    return CP_OK;
}

static cp_status read_kvs(reader *r, cp_gguf *g, uint64_t n_kvs)
{
    if (n_kvs > 0) {
        g->kvs = calloc((size_t)n_kvs, sizeof *g->kvs);
        if (!g->kvs)
            return cp_error_nomem(r->err, "GGUF metadata", (size_t)n_kvs * sizeof *g->kvs);
    }
    for (uint64_t i = 0; i < n_kvs; i++) {
        cp_status s = read_kv(r, &g->kvs[i]);
        g->n_kvs = (size_t)i + 1; /* so that close frees a string array's offsets */
        if (s != CP_OK)
            return s;
    }
    cp_status s = index_kvs(r, g);
    if (s == CP_OK)
        s = read_alignment(r, g);
    return s;
}

/* Checks each tensor's offset against the alignment and the data section,
 * and rejects overlaps. info_pos contains the file offset of each description. */
static cp_status place_tensors(reader *r, cp_gguf *g, const uint64_t *info_pos)
{
    uint64_t data_size = r->size - g->data_start;
    for (size_t i = 0; i < g->n_tensors; i++) {
        cp_gguf_tensor *t = &g->tensors[i];
        if (t->offset % g->alignment != 0)
            return fail_at(r, info_pos[i], "tensor '%.*s' has data offset %llu, expected a multiple of the alignment %u; %s",
                           print_len(t->name), t->name.data, (unsigned long long)t->offset,
                           g->alignment, HINT_CORRUPT);
        if (t->offset > data_size || t->n_bytes > data_size - t->offset)
            return fail_at(r, info_pos[i], "tensor '%.*s' spans bytes %llu to %llu of the data section, which holds %llu bytes; %s",
                           print_len(t->name), t->name.data, (unsigned long long)t->offset,
                           (unsigned long long)t->offset + t->n_bytes, (unsigned long long)data_size,
                           HINT_CORRUPT);
        t->data = r->data + g->data_start + t->offset;
    }

    cp_gguf_tensor **order = malloc(g->n_tensors * sizeof *order);
    if (!order)
        return cp_error_nomem(r->err, "GGUF tensor order", g->n_tensors * sizeof *order);
    for (size_t i = 0; i < g->n_tensors; i++)
        order[i] = &g->tensors[i];
    qsort(order, g->n_tensors, sizeof *order, compare_tensor_offset);
    cp_status s = CP_OK;
    for (size_t i = 1; i < g->n_tensors && s == CP_OK; i++) {
        const cp_gguf_tensor *a = order[i - 1], *b = order[i];
        if (b->offset - a->offset < a->n_bytes)
            s = fail_at(r, info_pos[b - g->tensors], "tensor '%.*s' (data bytes %llu to %llu) overlaps tensor '%.*s' (bytes %llu to %llu); %s",
                        print_len(b->name), b->name.data, (unsigned long long)b->offset,
                        (unsigned long long)(b->offset + b->n_bytes), print_len(a->name), a->name.data,
                        (unsigned long long)a->offset, (unsigned long long)(a->offset + a->n_bytes),
                        HINT_CORRUPT);
    }
    free(order);
    return s;
}

static cp_status read_tensors(reader *r, cp_gguf *g, uint64_t n_tensors)
{
    if (n_tensors == 0) {
        g->data_start = r->pos;
        return CP_OK;
    }
    g->tensors = calloc((size_t)n_tensors, sizeof *g->tensors);
    uint64_t *info_pos = malloc((size_t)n_tensors * sizeof *info_pos);
    if (!g->tensors || !info_pos) {
        free(info_pos);
        return cp_error_nomem(r->err, "GGUF tensors", (size_t)n_tensors * sizeof *g->tensors);
    }
    cp_status s = CP_OK;
    for (uint64_t i = 0; i < n_tensors && s == CP_OK; i++) {
        info_pos[i] = r->pos;
        s = read_tensor_info(r, &g->tensors[i]);
    }
    if (s == CP_OK) {
        g->n_tensors = (size_t)n_tensors;
        s = index_tensors(r, g);
    }

    /* The data section starts at the first aligned offset after the
     * descriptions. pos <= size and alignment < 2^32, so this cannot wrap. */
    uint64_t start = (r->pos + g->alignment - 1) / g->alignment * g->alignment;
    if (s == CP_OK && start > r->size)
        s = fail_at(r, r->pos, "expected the data section at byte %llu, but the file ends at byte %llu; %s",
                    (unsigned long long)start, (unsigned long long)r->size, HINT_CORRUPT);
    if (s == CP_OK) {
        g->data_start = start;
        s = place_tensors(r, g, info_pos);
    }
    free(info_pos);
    return s;
}

/* ---- open and close ---- */

cp_status cp_gguf_open(const char *path, cp_gguf **out, cp_error *err)
{
    *out = NULL;
    cp_gguf *g = calloc(1, sizeof *g);
    if (!g)
        return cp_error_nomem(err, "GGUF file", sizeof *g);
    g->path = strdup(path);
    if (!g->path) {
        free(g);
        return cp_error_nomem(err, "GGUF path", strlen(path) + 1);
    }
    cp_status s = cp_file_map(path, &g->map, err);
    if (s != CP_OK) {
        cp_gguf_close(g);
        return s;
    }

    reader r = {g->map.data, g->map.size, 0, g->path, err};
    uint64_t n_tensors = 0, n_kvs = 0;
    s = read_header(&r, g, &n_tensors, &n_kvs);
    if (s == CP_OK)
        s = read_kvs(&r, g, n_kvs);
    if (s == CP_OK)
        s = read_tensors(&r, g, n_tensors);
    if (s != CP_OK) {
        cp_gguf_close(g);
        return s;
    }
    *out = g;
    return CP_OK;
}

void cp_gguf_close(cp_gguf *g)
{
    if (!g)
        return;
    for (size_t i = 0; i < g->n_kvs; i++)
        free(g->kvs[i].elem_pos);
    free(g->kvs);
    free(g->kv_sorted);
    free(g->tensors);
    free(g->tensor_sorted);
    cp_mapped_file_free(&g->map);
    free(g->path);
    free(g);
}

uint32_t cp_gguf_version(const cp_gguf *g) { return g->version; }
uint32_t cp_gguf_alignment(const cp_gguf *g) { return g->alignment; }

/* ---- metadata lookup ---- */

size_t cp_gguf_kv_count(const cp_gguf *g) { return g->n_kvs; }

const cp_gguf_kv *cp_gguf_kv_at(const cp_gguf *g, size_t i)
{
    CP_ASSERT(i < g->n_kvs);
    return &g->kvs[i];
}

cp_gguf_str cp_gguf_kv_key(const cp_gguf_kv *kv) { return kv->key; }
cp_gguf_type cp_gguf_kv_type(const cp_gguf_kv *kv) { return kv->type; }

const cp_gguf_kv *cp_gguf_find_kv(const cp_gguf *g, const char *key)
{
    cp_gguf_str target = {key, strlen(key)};
    size_t lo = 0, hi = g->n_kvs;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = str_cmp(g->kv_sorted[mid]->key, target);
        if (c == 0)
            return g->kv_sorted[mid];
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

/* Finds key and checks its type; on success *kv is set. */
static cp_status find_typed(const cp_gguf *g, const char *key, cp_gguf_type type,
                            const cp_gguf_kv **kv, cp_error *err)
{
    *kv = cp_gguf_find_kv(g, key);
    if (!*kv)
        return cp_error_set(err, CP_ERR_INPUT, "%s: metadata key '%s' not found; the file lacks it, convert the model again with a current llama.cpp",
                            g->path, key);
    if ((*kv)->type != type)
        return cp_error_set(err, CP_ERR_INPUT, "%s: at byte %llu: metadata key '%s' has type %s, expected %s; the file does not follow the GGUF conventions for this key",
                            g->path, (unsigned long long)((*kv)->value_pos), key,
                            value_type_name((*kv)->type), value_type_name(type));
    return CP_OK;
}

cp_status cp_gguf_get_str(const cp_gguf *g, const char *key, cp_gguf_str *out, cp_error *err)
{
    const cp_gguf_kv *kv;
    cp_status s = find_typed(g, key, CP_GGUF_TYPE_STRING, &kv, err);
    if (s != CP_OK)
        return s;
    out->len = load_le(kv->base + kv->value_pos, 8);
    out->data = (const char *)kv->base + kv->value_pos + 8;
    return CP_OK;
}

cp_status cp_gguf_get_u32(const cp_gguf *g, const char *key, uint32_t *out, cp_error *err)
{
    const cp_gguf_kv *kv;
    cp_status s = find_typed(g, key, CP_GGUF_TYPE_UINT32, &kv, err);
    if (s == CP_OK)
        *out = (uint32_t)load_le(kv->base + kv->value_pos, 4);
    return s;
}

cp_status cp_gguf_get_i32(const cp_gguf *g, const char *key, int32_t *out, cp_error *err)
{
    const cp_gguf_kv *kv;
    cp_status s = find_typed(g, key, CP_GGUF_TYPE_INT32, &kv, err);
    if (s == CP_OK) {
        uint32_t bits = (uint32_t)load_le(kv->base + kv->value_pos, 4);
        memcpy(out, &bits, 4);
    }
    return s;
}

cp_status cp_gguf_get_f32(const cp_gguf *g, const char *key, float *out, cp_error *err)
{
    const cp_gguf_kv *kv;
    cp_status s = find_typed(g, key, CP_GGUF_TYPE_FLOAT32, &kv, err);
    if (s == CP_OK) {
        uint32_t bits = (uint32_t)load_le(kv->base + kv->value_pos, 4);
        memcpy(out, &bits, 4);
    }
    return s;
}

cp_status cp_gguf_get_bool(const cp_gguf *g, const char *key, int *out, cp_error *err)
{
    const cp_gguf_kv *kv;
    cp_status s = find_typed(g, key, CP_GGUF_TYPE_BOOL, &kv, err);
    if (s == CP_OK)
        *out = kv->base[kv->value_pos];
    return s;
}

cp_status cp_gguf_get_array(const cp_gguf *g, const char *key, cp_gguf_type elem_type,
                            const cp_gguf_kv **kv, uint64_t *n, cp_error *err)
{
    cp_status s = find_typed(g, key, CP_GGUF_TYPE_ARRAY, kv, err);
    if (s != CP_OK)
        return s;
    if ((*kv)->elem_type != elem_type)
        return cp_error_set(err, CP_ERR_INPUT, "%s: at byte %llu: metadata key '%s' is an array of %s, expected an array of %s; the file does not follow the GGUF conventions for this key",
                            g->path, (unsigned long long)(*kv)->value_pos, key,
                            value_type_name((*kv)->elem_type), value_type_name(elem_type));
    *n = (*kv)->n_elems;
    return CP_OK;
}

void cp_gguf_array_info(const cp_gguf_kv *kv, cp_gguf_type *elem_type, uint64_t *n)
{
    CP_ASSERT(kv->type == CP_GGUF_TYPE_ARRAY);
    *elem_type = kv->elem_type;
    *n = kv->n_elems;
}

cp_gguf_str cp_gguf_array_str(const cp_gguf_kv *kv, uint64_t i)
{
    CP_ASSERT(kv->type == CP_GGUF_TYPE_ARRAY && kv->elem_type == CP_GGUF_TYPE_STRING);
    CP_ASSERT(i < kv->n_elems);
    const uint8_t *p = kv->base + kv->elem_pos[i];
    cp_gguf_str s = {(const char *)p + 8, load_le(p, 8)};
    return s;
}

/* Reads one fixed-size value of type t at p as a double. */
static double load_number(const uint8_t *p, cp_gguf_type t)
{
    uint64_t bits = load_le(p, (int)value_size(t));
    switch (t) {
    case CP_GGUF_TYPE_UINT8: case CP_GGUF_TYPE_UINT16: case CP_GGUF_TYPE_UINT32:
    case CP_GGUF_TYPE_UINT64: case CP_GGUF_TYPE_BOOL:
        return (double)bits;
    case CP_GGUF_TYPE_INT8:
        return (double)(int8_t)(uint8_t)bits;
    case CP_GGUF_TYPE_INT16:
        return (double)(int16_t)(uint16_t)bits;
    case CP_GGUF_TYPE_INT32:
        return (double)(int32_t)(uint32_t)bits;
    case CP_GGUF_TYPE_INT64: {
        int64_t v;
        memcpy(&v, &bits, 8);
        return (double)v;
    }
    case CP_GGUF_TYPE_FLOAT32: {
        uint32_t b32 = (uint32_t)bits;
        float f;
        memcpy(&f, &b32, 4);
        return f;
    }
    case CP_GGUF_TYPE_FLOAT64: {
        double d;
        memcpy(&d, &bits, 8);
        return d;
    }
    default:
        CP_ASSERT(!"not a numeric GGUF type");
        return 0;
    }
}

double cp_gguf_array_number(const cp_gguf_kv *kv, uint64_t i)
{
    CP_ASSERT(kv->type == CP_GGUF_TYPE_ARRAY && value_size(kv->elem_type) != 0);
    CP_ASSERT(i < kv->n_elems);
    return load_number(kv->base + kv->value_pos + i * value_size(kv->elem_type), kv->elem_type);
}

/* ---- tensor lookup and dequantization ---- */

size_t cp_gguf_tensor_count(const cp_gguf *g) { return g->n_tensors; }

const cp_gguf_tensor *cp_gguf_tensor_at(const cp_gguf *g, size_t i)
{
    CP_ASSERT(i < g->n_tensors);
    return &g->tensors[i];
}

const cp_gguf_tensor *cp_gguf_find_tensor(const cp_gguf *g, const char *name)
{
    cp_gguf_str target = {name, strlen(name)};
    size_t lo = 0, hi = g->n_tensors;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = str_cmp(g->tensor_sorted[mid]->name, target);
        if (c == 0)
            return g->tensor_sorted[mid];
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

/* Q8_0 block (34 bytes): f16 scale d, then 32 int8 codes q; value = q * d. */
static void dequantize_q8_0(const uint8_t *src, float *dst, size_t n)
{
    for (size_t b = 0; b < n / 32; b++, src += 34, dst += 32) {
        float d = cp_f16_to_f32((uint16_t)load_le(src, 2));
        for (int j = 0; j < 32; j++)
            dst[j] = (float)(int8_t)src[2 + j] * d;
    }
}

/* Q4_0 block (18 bytes): f16 scale d, then 16 bytes of codes. Byte j stores
 * element j in its low nibble and element j + 16 in its high nibble, and
 * value = (code - 8) * d. */
static void dequantize_q4_0(const uint8_t *src, float *dst, size_t n)
{
    for (size_t b = 0; b < n / 32; b++, src += 18, dst += 32) {
        float d = cp_f16_to_f32((uint16_t)load_le(src, 2));
        for (int j = 0; j < 16; j++) {
            uint8_t codes = src[2 + j];
            dst[j] = (float)((int)(codes & 0x0f) - 8) * d;
            dst[j + 16] = (float)((int)(codes >> 4) - 8) * d;
        }
    }
}

void cp_ggml_dequantize_row(cp_ggml_type type, const void *src, float *dst, size_t n)
{
    const uint8_t *p = src;
    switch (type) {
    case CP_GGML_TYPE_F32:
        memcpy(dst, p, n * sizeof *dst);
        return;
    case CP_GGML_TYPE_F16:
        for (size_t i = 0; i < n; i++)
            dst[i] = cp_f16_to_f32((uint16_t)load_le(p + 2 * i, 2));
        return;
    case CP_GGML_TYPE_BF16:
        for (size_t i = 0; i < n; i++)
            dst[i] = cp_bf16_to_f32((uint16_t)load_le(p + 2 * i, 2));
        return;
    case CP_GGML_TYPE_Q8_0:
        CP_ASSERT(n % 32 == 0);
        dequantize_q8_0(p, dst, n);
        return;
    case CP_GGML_TYPE_Q4_0:
        CP_ASSERT(n % 32 == 0);
        dequantize_q4_0(p, dst, n);
        return;
    }
    CP_ASSERT(!"unsupported ggml type");
}

void cp_gguf_dequantize(const cp_gguf_tensor *t, float *out)
{
    if (t->n_elements == 0)
        return;
    uint64_t row_bytes;
    int size_ok = cp_ggml_row_bytes(t->type, t->dims[0], &row_bytes);
    CP_ASSERT(size_ok); /* checked by cp_gguf_open */
    uint64_t n_rows = t->n_elements / t->dims[0];
    const uint8_t *src = t->data;

    #pragma omp parallel for schedule(static) if (t->n_elements > (1u << 16))
    for (uint64_t r = 0; r < n_rows; r++)
        cp_ggml_dequantize_row(t->type, src + r * row_bytes, out + r * t->dims[0], (size_t)t->dims[0]);
}
