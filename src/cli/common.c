/* Helpers shared by the subcommands: tokenizer loading, stdin, id lists. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/commands.h"
#include "core/error.h"
#include "core/file.h"
#include "io/tokenizer_config.h"
#include "tokenizer/tokenizer.h"

cp_status cli_load_tokenizer(const char *path, cp_tokenizer **tok, int *add_bos, cp_error *err)
{
    return cp_tokenizer_load_with_bos(path, tok, add_bos, err);
}

cp_status cli_read_stream(FILE *fp, const char *name, char **out, size_t *len, cp_error *err)
{
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    if (!buf)
        return cp_error_nomem(err, name, cap);
    size_t got;
    while ((got = fread(buf + n, 1, cap - n - 1, fp)) > 0) {
        n += got;
        if (n + 1 == cap) {
            char *grown = realloc(buf, cap * 2);
            if (!grown) {
                free(buf);
                return cp_error_nomem(err, name, cap * 2);
            }
            buf = grown;
            cap *= 2;
        }
    }
    if (ferror(fp)) {
        free(buf);
        return cp_error_set(err, CP_ERR_IO, "%s: read failed", name);
    }
    buf[n] = '\0';
    *out = buf;
    *len = n;
    return CP_OK;
}

void cli_print_ids(FILE *fp, const int32_t *ids, size_t n, const char *sep)
{
    for (size_t i = 0; i < n; i++)
        fprintf(fp, i ? "%s%d" : "%.0s%d", sep, ids[i]);
    fputc('\n', fp);
}

double cli_peak_rss_mb(void)
{
    FILE *fp = fopen("/proc/self/status", "r");
    if (!fp)
        return -1;
    char line[256];
    double kb = -1;
    while (fgets(line, sizeof line, fp))
        if (sscanf(line, "VmHWM: %lf kB", &kb) == 1)
            break;
    fclose(fp);
    return kb < 0 ? -1 : kb / 1024.0;
}
