/*
 * Error reporting for library code.
 *
 * Library functions never print or exit. A function that can fail takes a
 * `cp_error *` as its last argument, fills it with a code and a one-line
 * message, and returns the code. The message names the file, the position
 * (byte offset, line or tensor), what was expected and what to do; only the
 * command-line front end prints it and picks the exit status.
 */
#ifndef CP_ERROR_H
#define CP_ERROR_H

#include <stdio.h>
#include <stdlib.h>

#include "cpeft.h"

/* Fills err (which may be NULL) and returns code. */
cp_status cp_error_set(cp_error *err, cp_status code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Prepends "prefix: " to the message already in err; returns err->code. */
cp_status cp_error_prefix(cp_error *err, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Fills err with CP_ERR_NOMEM naming what could not be allocated. */
cp_status cp_error_nomem(cp_error *err, const char *what, size_t bytes);

/* Checks an invariant (a programming error, not bad input), always on. */
#define CP_ASSERT(cond)                                                        \
    do {                                                                       \
        if (!(cond)) {                                                         \
            fprintf(stderr, "cpeft: internal error at %s:%d: %s\n", __FILE__,  \
                    __LINE__, #cond);                                          \
            abort();                                                           \
        }                                                                      \
    } while (0)

#endif
