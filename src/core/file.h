/*
 * Whole-file reads, read-only memory maps and atomic writes.
 *
 * Writes never leave a half-written file behind: data goes to a temporary
 * file beside the target, is flushed with fsync, and is renamed over the
 * target only when complete.
 */
#ifndef CP_FILE_H
#define CP_FILE_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"

/* A read-only view of a whole file. Release with cp_mapped_file_free. */
typedef struct cp_mapped_file {
    const uint8_t *data;
    size_t size;
    int is_mmap; /* 1: data is an mmap, 0: data is malloc'd (empty files) */
} cp_mapped_file;

/* Maps path read-only; an empty file yields data == NULL and size 0. */
cp_status cp_file_map(const char *path, cp_mapped_file *out, cp_error *err);
void cp_mapped_file_free(cp_mapped_file *f);

/* Reads a whole file into a NUL-terminated malloc'd buffer. The caller frees
 * *out. *len (if not NULL) receives the byte count without the NUL. */
cp_status cp_file_read(const char *path, char **out, size_t *len, cp_error *err);

/* Returns 1 if path exists (any type), 0 otherwise. */
int cp_file_exists(const char *path);

/* Returns 1 if path is a directory. */
int cp_file_is_dir(const char *path);

/* Returns 1 if path is a regular file that starts with the GGUF magic. */
int cp_file_is_gguf(const char *path);

/* Drops the resident pages of a read-only, file-backed map over data
 * (nbytes), once a copy of that data is kept, so that the file's pages and
 * the copy are not both resident. A later read faults the pages in again. */
void cp_file_release_pages(const void *data, size_t nbytes);

/* Joins dir and name with one '/' into a malloc'd string, or NULL. */
char *cp_path_join(const char *dir, const char *name);

/* An atomic writer: cp_atomic_open, any number of cp_atomic_write calls,
 * then cp_atomic_commit (fsync + rename) or cp_atomic_abort (unlink). */
typedef struct cp_atomic_file {
    int fd;
    char *path;     /* final path */
    char *tmp_path; /* temporary path in the same directory */
} cp_atomic_file;

cp_status cp_atomic_open(cp_atomic_file *f, const char *path, cp_error *err);
cp_status cp_atomic_write(cp_atomic_file *f, const void *data, size_t n, cp_error *err);
cp_status cp_atomic_commit(cp_atomic_file *f, cp_error *err);
void cp_atomic_abort(cp_atomic_file *f);

/* Writes a whole buffer to path atomically. */
cp_status cp_file_write_atomic(const char *path, const void *data, size_t n, cp_error *err);

#endif
