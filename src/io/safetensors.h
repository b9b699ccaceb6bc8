/*
 * Reads and writes safetensors files: an 8-byte little-endian header length
 * N, N bytes of JSON naming each tensor's dtype, shape and byte range, then
 * the tensor data, little-endian and row-major.
 *
 * The reader maps files read-only and hands out pointers into the map, with
 * no copies. It checks every number in the header before using it, and it
 * accepts only F32, F16 and BF16 tensors of at most 8 dimensions. The writer
 * writes one file atomically and does not split a model into shards.
 */
#ifndef CP_SAFETENSORS_H
#define CP_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "core/dtype.h"
#include "core/error.h"

#define CP_ST_MAX_DIMS 8

/* The largest header the format allows, in bytes (the reference
 * implementation, huggingface/safetensors, uses the same limit). */
#define CP_ST_MAX_HEADER 100000000ull

/* One tensor. The reader fills every field. The writer reads name, dtype,
 * ndim, shape, data and nbytes, and ignores file and offset. */
typedef struct cp_st_tensor {
    const char *name;
    cp_dtype dtype;
    int ndim;                      /* 0 (a scalar) to CP_ST_MAX_DIMS */
    int64_t shape[CP_ST_MAX_DIMS]; /* outermost first; entries past ndim are 0 */
    const void *data;              /* nbytes bytes; may be misaligned for dtype */
    size_t nbytes;
    const char *file;              /* path of the file holding the data */
    uint64_t offset;               /* byte offset of data within that file */
} cp_st_tensor;

/* One entry of the header's __metadata__ map. */
typedef struct cp_st_metadata {
    const char *key;
    const char *value;
} cp_st_metadata;

/* An open set of safetensors files. It owns the maps, so every pointer it
 * returns (tensor structs, names, data, file paths, metadata strings) stays
 * valid until cp_safetensors_close. */
typedef struct cp_safetensors cp_safetensors;

/* Opens path, which is one of:
 *   - a .safetensors file;
 *   - a folder holding model.safetensors (preferred when both exist);
 *   - a folder holding model.safetensors.index.json, or that index itself,
 *     whose weight_map names the shard file of every tensor.
 * On success *out owns everything; release it with cp_safetensors_close.
 * Returns CP_ERR_INPUT, with a message naming the file and the defect, for
 * any file that breaks the format; *out is then NULL. */
cp_status cp_safetensors_open(const char *path, cp_safetensors **out, cp_error *err);
void cp_safetensors_close(cp_safetensors *st);

/* Returns the number of tensors, across all shards of a sharded model. */
size_t cp_safetensors_count(const cp_safetensors *st);

/* Returns the i-th tensor (i < count). Tensors are ordered by shard file
 * name, then by data offset within the file, and neither the order nor the
 * pointers change while st is open. */
const cp_st_tensor *cp_safetensors_at(const cp_safetensors *st, size_t i);

/* Finds the tensor called name by binary search. Returns NULL if absent. */
const cp_st_tensor *cp_safetensors_find(const cp_safetensors *st, const char *name);

/* Returns the __metadata__ string stored under key, or NULL. For a sharded
 * model the shards are searched in file name order, first match wins. */
const char *cp_safetensors_metadata(const cp_safetensors *st, const char *key);

/* Returns the number of elements: the product of the shape, 1 for a scalar. */
size_t cp_st_tensor_numel(const cp_st_tensor *t);

/* Returns 1 if t->data is aligned to the element size, so it can be read
 * in place as float or uint16_t, or 0 when the caller must memcpy it. */
int cp_st_tensor_is_aligned(const cp_st_tensor *t);

/* Writes n tensors and n_metadata metadata entries to path, atomically (on
 * failure no file is left behind). As in the reference writer, tensors are
 * laid out by decreasing element size, then by name, so that every tensor
 * starts at a multiple of its element size. Metadata keys are sorted, and
 * the header is padded with spaces so the data starts at an 8-byte-aligned
 * offset. The same input therefore gives the same bytes, whatever the order
 * of the arrays. Returns CP_ERR_INPUT for duplicate names or keys, the
 * reserved name "__metadata__", or a shape that does not match nbytes. */
cp_status cp_safetensors_write(const char *path, const cp_st_tensor *tensors, size_t n,
                               const cp_st_metadata *metadata, size_t n_metadata,
                               cp_error *err);

#endif
