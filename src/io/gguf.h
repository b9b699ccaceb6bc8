/*
 * Reads GGUF files, the format of llama.cpp and ggml: a header, typed
 * metadata key/value pairs, tensor descriptions, then aligned tensor data.
 *
 * The reader maps the file read-only and hands out pointers into the map,
 * with no copies. Every count, length, offset and size is checked against
 * the file before use. It reads versions 2 and 3 (little-endian only) and
 * tensors of type F32, F16, BF16, Q8_0 and Q4_0. It does not check that
 * strings are valid UTF-8. io/gguf_write.h writes files that it reads.
 */
#ifndef CP_GGUF_H
#define CP_GGUF_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"

#define CP_GGUF_MAX_DIMS 4
#define CP_GGUF_DEFAULT_ALIGNMENT 32

/* Metadata value types, numbered as in the file. */
typedef enum cp_gguf_type {
    CP_GGUF_TYPE_UINT8 = 0,
    CP_GGUF_TYPE_INT8 = 1,
    CP_GGUF_TYPE_UINT16 = 2,
    CP_GGUF_TYPE_INT16 = 3,
    CP_GGUF_TYPE_UINT32 = 4,
    CP_GGUF_TYPE_INT32 = 5,
    CP_GGUF_TYPE_FLOAT32 = 6,
    CP_GGUF_TYPE_BOOL = 7,
    CP_GGUF_TYPE_STRING = 8,
    CP_GGUF_TYPE_ARRAY = 9,
    CP_GGUF_TYPE_UINT64 = 10,
    CP_GGUF_TYPE_INT64 = 11,
    CP_GGUF_TYPE_FLOAT64 = 12,
} cp_gguf_type;

/* The ggml tensor types this reader accepts, numbered as in ggml. */
typedef enum cp_ggml_type {
    CP_GGML_TYPE_F32 = 0,
    CP_GGML_TYPE_F16 = 1,
    CP_GGML_TYPE_Q4_0 = 2,  /* blocks of 32: f16 scale, 16 bytes of 4-bit codes */
    CP_GGML_TYPE_Q8_0 = 8,  /* blocks of 32: f16 scale, 32 int8 codes */
    CP_GGML_TYPE_BF16 = 30,
} cp_ggml_type;

/* A string inside the map. It is not NUL-terminated: print it with
 * "%.*s", (int)s.len, s.data. */
typedef struct cp_gguf_str {
    const char *data;
    uint64_t len;
} cp_gguf_str;

/* One tensor. dims[0] is the innermost (contiguous) dimension, as in ggml,
 * so a row-major matrix of R rows and C columns has dims {C, R}. */
typedef struct cp_gguf_tensor {
    cp_gguf_str name;
    cp_ggml_type type;
    int n_dims;                       /* 1 to CP_GGUF_MAX_DIMS */
    uint64_t dims[CP_GGUF_MAX_DIMS];  /* entries past n_dims are 1 */
    uint64_t n_elements;              /* product of dims */
    uint64_t offset;                  /* from the start of the data section */
    size_t n_bytes;
    const void *data;                 /* n_bytes inside the map; may be misaligned */
} cp_gguf_tensor;

/* An open GGUF file. It owns the map, so every pointer it returns (tensors,
 * strings, data) stays valid until cp_gguf_close. */
typedef struct cp_gguf cp_gguf;

/* One metadata key/value pair, owned by its cp_gguf. */
typedef struct cp_gguf_kv cp_gguf_kv;

/* Opens and validates path. On success *out owns the map; release it with
 * cp_gguf_close. Any defect in the file returns CP_ERR_INPUT with a message
 * naming the file, the byte offset, expected vs found and what to do, and
 * leaves *out NULL. */
cp_status cp_gguf_open(const char *path, cp_gguf **out, cp_error *err);
void cp_gguf_close(cp_gguf *g);

uint32_t cp_gguf_version(const cp_gguf *g);
uint32_t cp_gguf_alignment(const cp_gguf *g);

/* ---- metadata ---- */

size_t cp_gguf_kv_count(const cp_gguf *g);
const cp_gguf_kv *cp_gguf_kv_at(const cp_gguf *g, size_t i); /* file order */
const cp_gguf_kv *cp_gguf_find_kv(const cp_gguf *g, const char *key); /* NULL if absent */
cp_gguf_str cp_gguf_kv_key(const cp_gguf_kv *kv);
cp_gguf_type cp_gguf_kv_type(const cp_gguf_kv *kv);

/* Typed getters. A missing key or a value of another type returns
 * CP_ERR_INPUT with a message naming the file, the key and both types. */
cp_status cp_gguf_get_str(const cp_gguf *g, const char *key, cp_gguf_str *out, cp_error *err);
cp_status cp_gguf_get_u32(const cp_gguf *g, const char *key, uint32_t *out, cp_error *err);
cp_status cp_gguf_get_i32(const cp_gguf *g, const char *key, int32_t *out, cp_error *err);
cp_status cp_gguf_get_f32(const cp_gguf *g, const char *key, float *out, cp_error *err);
cp_status cp_gguf_get_bool(const cp_gguf *g, const char *key, int *out, cp_error *err);

/* Finds the array under key and checks that its elements have elem_type.
 * Sets *kv (for the element accessors) and *n (the element count). */
cp_status cp_gguf_get_array(const cp_gguf *g, const char *key, cp_gguf_type elem_type,
                            const cp_gguf_kv **kv, uint64_t *n, cp_error *err);

/* Sets the element type and count of an array value. Asserts kv is an array. */
void cp_gguf_array_info(const cp_gguf_kv *kv, cp_gguf_type *elem_type, uint64_t *n);

/* Element i of a string array. Asserts the type and i < n. */
cp_gguf_str cp_gguf_array_str(const cp_gguf_kv *kv, uint64_t i);

/* Element i of an array of numbers or bools, widened to double. Asserts the
 * type and i < n. NOTE: 64-bit integers above 2^53 lose precision. */
double cp_gguf_array_number(const cp_gguf_kv *kv, uint64_t i);

/* ---- tensors ---- */

size_t cp_gguf_tensor_count(const cp_gguf *g);
const cp_gguf_tensor *cp_gguf_tensor_at(const cp_gguf *g, size_t i); /* file order */
const cp_gguf_tensor *cp_gguf_find_tensor(const cp_gguf *g, const char *name);

/* Returns the ggml name of a type id ("Q4_K"), or "unknown" for ids that
 * ggml does not define. Covers ids this reader rejects too. */
const char *cp_ggml_type_name(uint32_t type);

/* Sets *bytes to the storage size of n elements of a supported type.
 * Returns 0 if n is not a whole number of blocks or the size overflows. */
int cp_ggml_row_bytes(cp_ggml_type type, uint64_t n, uint64_t *bytes);

/* Widens n elements of a supported type at src into dst (float32). n must
 * be a whole number of blocks; src may be misaligned. */
void cp_ggml_dequantize_row(cp_ggml_type type, const void *src, float *dst, size_t n);

/* Widens the whole tensor into out, which has room for t->n_elements floats. */
void cp_gguf_dequantize(const cp_gguf_tensor *t, float *out);

#endif
