/*
 * Writes GGUF version 3 files, which cp_gguf_open (io/gguf.h) reads back.
 *
 * A writer collects metadata key/value pairs and tensor descriptions in
 * memory, then cp_gguf_writer_write lays out the file and replaces the
 * target atomically. Metadata values are copied when set. Tensor data is
 * borrowed: the pointer must stay valid until the write. Value types are
 * string, uint32, int32, float32, bool and arrays of strings, float32 or
 * int32. Tensor types are those the reader accepts (F32, F16, BF16, Q8_0,
 * Q4_0). Tensor data is aligned to general.alignment when the caller sets
 * it (a uint32 power of two), else to 32 bytes.
 */
#ifndef CP_GGUF_WRITE_H
#define CP_GGUF_WRITE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/error.h"
#include "io/gguf.h"

typedef struct cp_gguf_writer cp_gguf_writer;

/* Creates an empty writer. Release it with cp_gguf_writer_free. */
cp_status cp_gguf_writer_init(cp_gguf_writer **out, cp_error *err);
void cp_gguf_writer_free(cp_gguf_writer *w);

/* Sets a metadata value. Setting a key again replaces its value and keeps
 * its place in the file. Keys are non-empty NUL-terminated strings. */
cp_status cp_gguf_writer_set_str(cp_gguf_writer *w, const char *key, const char *value,
                                 cp_error *err);
cp_status cp_gguf_writer_set_u32(cp_gguf_writer *w, const char *key, uint32_t value,
                                 cp_error *err);
cp_status cp_gguf_writer_set_i32(cp_gguf_writer *w, const char *key, int32_t value,
                                 cp_error *err);
cp_status cp_gguf_writer_set_f32(cp_gguf_writer *w, const char *key, float value,
                                 cp_error *err);
cp_status cp_gguf_writer_set_bool(cp_gguf_writer *w, const char *key, bool value,
                                  cp_error *err);

/* Sets an array of n strings. lens gives each string's byte count, so
 * strings may hold NUL bytes; lens NULL means every value is NUL-terminated. */
cp_status cp_gguf_writer_set_str_array(cp_gguf_writer *w, const char *key,
                                       const char *const *values, const size_t *lens, size_t n,
                                       cp_error *err);
cp_status cp_gguf_writer_set_f32_array(cp_gguf_writer *w, const char *key, const float *values,
                                       size_t n, cp_error *err);
cp_status cp_gguf_writer_set_i32_array(cp_gguf_writer *w, const char *key,
                                       const int32_t *values, size_t n, cp_error *err);

/* Adds a tensor. dims[0] is the innermost dimension, as in cp_gguf_tensor,
 * and must be a whole number of the type's blocks. data contains the
 * tensor's bytes in ggml's layout (cp_ggml_row_bytes per row) and is read only by
 * cp_gguf_writer_write. A repeated name or an unsupported type is
 * CP_ERR_INPUT. Tensors are written in the order they are added. */
cp_status cp_gguf_writer_add_tensor(cp_gguf_writer *w, const char *name, cp_ggml_type type,
                                    int n_dims, const uint64_t *dims, const void *data,
                                    cp_error *err);

/* Writes everything to path through a temporary file that is renamed over
 * path when complete, so a failed write leaves path as it was. The writer
 * stays usable and may write again. */
cp_status cp_gguf_writer_write(const cp_gguf_writer *w, const char *path, cp_error *err);

#endif
