/* Error messages carried from library code to the command-line front end. */
#include "core/error.h"

#include <stdarg.h>
#include <string.h>

cp_status cp_error_set(cp_error *err, cp_status code, const char *fmt, ...)
{
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
        err->code = code;
    }
    return code;
}

cp_status cp_error_prefix(cp_error *err, const char *fmt, ...)
{
    if (!err)
        return CP_ERR_INTERNAL;
    char prefix[CP_ERROR_MSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);

    /* Builds "prefix: message" in place, cutting the old message if needed. */
    size_t n = strlen(prefix);
    if (n > CP_ERROR_MSG_MAX - 3)
        n = CP_ERROR_MSG_MAX - 3;
    size_t keep = strlen(err->msg);
    if (keep > CP_ERROR_MSG_MAX - 3 - n)
        keep = CP_ERROR_MSG_MAX - 3 - n;
    memmove(err->msg + n + 2, err->msg, keep);
    err->msg[n + 2 + keep] = '\0';
    memcpy(err->msg, prefix, n);
    memcpy(err->msg + n, ": ", 2);
    return err->code;
}

cp_status cp_error_nomem(cp_error *err, const char *what, size_t bytes)
{
    return cp_error_set(err, CP_ERR_NOMEM,
                        "out of memory allocating %zu bytes for %s", bytes, what);
}
