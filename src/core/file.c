/* Whole-file reads, read-only memory maps and atomic writes. */
#include "core/file.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

cp_status cp_file_map(const char *path, cp_mapped_file *out, cp_error *err)
{
    memset(out, 0, sizeof *out);
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return cp_error_set(err, CP_ERR_INPUT, "%s: cannot open: %s", path, strerror(errno));

    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return cp_error_set(err, CP_ERR_INPUT, "%s: not a regular file", path);
    }
    if (st.st_size == 0) {
        close(fd);
        return CP_OK;
    }

    void *p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    int saved = errno;
    close(fd);
    if (p == MAP_FAILED)
        return cp_error_set(err, CP_ERR_IO, "%s: mmap failed: %s", path, strerror(saved));
    out->data = p;
    out->size = (size_t)st.st_size;
    out->is_mmap = 1;
    return CP_OK;
}

void cp_mapped_file_free(cp_mapped_file *f)
{
    if (f->is_mmap && f->data)
        munmap((void *)f->data, f->size);
    else
        free((void *)f->data);
    memset(f, 0, sizeof *f);
}

cp_status cp_file_read(const char *path, char **out, size_t *len, cp_error *err)
{
    *out = NULL;
    if (cp_file_is_dir(path))
        return cp_error_set(err, CP_ERR_INPUT, "%s: is a folder; expected a file", path);
    FILE *fp = fopen(path, "rb");
    if (!fp)
        return cp_error_set(err, CP_ERR_INPUT, "%s: cannot open: %s", path, strerror(errno));

    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    while (buf) {
        n += fread(buf + n, 1, cap - n - 1, fp);
        if (n < cap - 1)
            break;
        cap *= 2;
        char *grown = realloc(buf, cap);
        if (!grown) {
            free(buf);
            buf = NULL;
        } else {
            buf = grown;
        }
    }
    int failed = ferror(fp);
    fclose(fp);
    if (!buf)
        return cp_error_nomem(err, path, cap);
    if (failed) {
        free(buf);
        return cp_error_set(err, CP_ERR_IO, "%s: read failed", path);
    }
    buf[n] = '\0';
    *out = buf;
    if (len)
        *len = n;
    return CP_OK;
}

int cp_file_exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

int cp_file_is_dir(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

int cp_file_is_gguf(const char *path)
{
    char magic[4];
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return 0;
    struct stat st;
    int ok = fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && read(fd, magic, 4) == 4 &&
             memcmp(magic, "GGUF", 4) == 0;
    close(fd);
    return ok;
}

void cp_file_release_pages(const void *data, size_t nbytes)
{
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t begin = (uintptr_t)data & ~(page - 1);
    uintptr_t end = ((uintptr_t)data + nbytes + page - 1) & ~(page - 1);
    madvise((void *)begin, end - begin, MADV_DONTNEED);
}

char *cp_path_join(const char *dir, const char *name)
{
    size_t a = strlen(dir), b = strlen(name);
    int slash = a > 0 && dir[a - 1] != '/';
    char *s = malloc(a + slash + b + 1);
    if (!s)
        return NULL;
    memcpy(s, dir, a);
    if (slash)
        s[a] = '/';
    memcpy(s + a + slash, name, b + 1);
    return s;
}

cp_status cp_atomic_open(cp_atomic_file *f, const char *path, cp_error *err)
{
    memset(f, 0, sizeof *f);
    f->fd = -1;
    size_t n = strlen(path);
    f->path = malloc(n + 1);
    f->tmp_path = malloc(n + 32);
    if (!f->path || !f->tmp_path) {
        cp_atomic_abort(f);
        return cp_error_nomem(err, path, n);
    }
    memcpy(f->path, path, n + 1);
    snprintf(f->tmp_path, n + 32, "%s.tmp.%ld", path, (long)getpid());

    f->fd = open(f->tmp_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (f->fd < 0) {
        cp_status st = cp_error_set(err, CP_ERR_INPUT, "%s: cannot create: %s",
                                    f->tmp_path, strerror(errno));
        free(f->path);
        free(f->tmp_path);
        memset(f, 0, sizeof *f);
        f->fd = -1;
        return st;
    }
    return CP_OK;
}

cp_status cp_atomic_write(cp_atomic_file *f, const void *data, size_t n, cp_error *err)
{
    const uint8_t *p = data;
    while (n > 0) {
        ssize_t w = write(f->fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return cp_error_set(err, CP_ERR_IO, "%s: write failed: %s", f->tmp_path,
                                strerror(errno));
        }
        p += w;
        n -= (size_t)w;
    }
    return CP_OK;
}

cp_status cp_atomic_commit(cp_atomic_file *f, cp_error *err)
{
    cp_status st = CP_OK;
    if (fsync(f->fd) != 0)
        st = cp_error_set(err, CP_ERR_IO, "%s: fsync failed: %s", f->tmp_path, strerror(errno));
    if (close(f->fd) != 0 && st == CP_OK)
        st = cp_error_set(err, CP_ERR_IO, "%s: close failed: %s", f->tmp_path, strerror(errno));
    f->fd = -1;
    if (st == CP_OK && rename(f->tmp_path, f->path) != 0)
        st = cp_error_set(err, CP_ERR_IO, "%s: rename to %s failed: %s", f->tmp_path, f->path,
                          strerror(errno));
    if (st != CP_OK)
        unlink(f->tmp_path);
    free(f->path);
    free(f->tmp_path);
    f->path = f->tmp_path = NULL;
    return st;
}

void cp_atomic_abort(cp_atomic_file *f)
{
    if (f->fd >= 0)
        close(f->fd);
    if (f->tmp_path)
        unlink(f->tmp_path);
    free(f->path);
    free(f->tmp_path);
    f->path = f->tmp_path = NULL;
    f->fd = -1;
}

cp_status cp_file_write_atomic(const char *path, const void *data, size_t n, cp_error *err)
{
    cp_atomic_file f;
    cp_status st = cp_atomic_open(&f, path, err);
    if (st != CP_OK)
        return st;
    st = cp_atomic_write(&f, data, n, err);
    if (st != CP_OK) {
        cp_atomic_abort(&f);
        return st;
    }
    return cp_atomic_commit(&f, err);
}
