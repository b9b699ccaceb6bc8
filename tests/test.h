/*
 * A small test harness: TEST(name) registers a function, CHECK* macros
 * record failures with file:line, and tests/runner.c runs every test in its
 * own process and prints "N passed, N failed".
 *
 * Tests read shared models and data from $CPEFT_SHARED (make passes
 * SHARED) and run the command-line tool from $CPEFT_BIN.
 */
#ifndef CP_TEST_H
#define CP_TEST_H

#include <math.h>
#include <stdint.h>
#include <time.h>
#include <stdio.h>
#include <string.h>

typedef void (*cp_test_fn)(void);

void cp_test_register(const char *name, cp_test_fn fn);

#define TEST(name)                                                             \
    static void name(void);                                                    \
    __attribute__((constructor)) static void name##_register(void)             \
    {                                                                          \
        cp_test_register(#name, name);                                         \
    }                                                                          \
    static void name(void)

extern int cp_test_failures;

void cp_test_fail(const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#define CHECK(cond)                                                            \
    do {                                                                       \
        if (!(cond))                                                           \
            cp_test_fail(__FILE__, __LINE__, "check failed: %s", #cond);       \
    } while (0)

#define CHECK_MSG(cond, ...)                                                   \
    do {                                                                       \
        if (!(cond))                                                           \
            cp_test_fail(__FILE__, __LINE__, __VA_ARGS__);                     \
    } while (0)

#define CHECK_EQ_INT(a, b)                                                     \
    do {                                                                       \
        long long a_ = (long long)(a), b_ = (long long)(b);                    \
        if (a_ != b_)                                                          \
            cp_test_fail(__FILE__, __LINE__, "%s == %s: %lld != %lld", #a, #b, \
                         a_, b_);                                              \
    } while (0)

#define CHECK_EQ_STR(a, b)                                                     \
    do {                                                                       \
        const char *a_ = (a), *b_ = (b);                                       \
        if (!a_ || !b_ || strcmp(a_, b_) != 0)                                 \
            cp_test_fail(__FILE__, __LINE__, "%s == %s: \"%s\" != \"%s\"", #a, \
                         #b, a_ ? a_ : "(null)", b_ ? b_ : "(null)");          \
    } while (0)

/* |a - b| <= tol * max(1, |b|): relative for large values, absolute near 0. */
#define CHECK_CLOSE(a, b, tol)                                                 \
    do {                                                                       \
        double a_ = (double)(a), b_ = (double)(b);                             \
        double s_ = fabs(b_) > 1.0 ? fabs(b_) : 1.0;                           \
        if (!(fabs(a_ - b_) <= (tol) * s_))                                    \
            cp_test_fail(__FILE__, __LINE__, "%s ~ %s: %.9g vs %.9g (tol %g)", \
                         #a, #b, a_, b_, (double)(tol));                       \
    } while (0)

/* Returns a path under the shared folder ($CPEFT_SHARED). The string lives
 * until the test process exits; do not free it. */
char *test_shared(const char *relative);

/* Returns a new empty folder under $TMPDIR on every call. The runner
 * removes it after the run; do not free the string. */
const char *test_tmpdir(void);

/* Writes data to dir/name and returns the malloc'd path. */
char *test_write_file(const char *dir, const char *name, const void *data, size_t n);

/* Runs "$CPEFT_BIN args" through /bin/sh with stdin from stdin_text (may be
 * NULL: empty). Captures stdout and stderr into malloc'd strings (either out
 * pointer may be NULL) and returns the exit status (-1 if it did not exit). */
int test_run_cli(const char *args, const char *stdin_text, char **out, char **err);

/* Reads and parses a JSON file; records a test failure naming the file and
 * returns NULL when it cannot be read or parsed. The caller frees the result
 * with cJSON_Delete. */
struct cJSON *test_read_json(const char *path);

/* Compares ids with expected ids and records a failure naming what and the
 * first index where they differ. */
void test_check_ids(const char *what, const int32_t *got, size_t n_got, const int32_t *want,
                    size_t n_want);

/* Parses one line of space-separated ids (a llama.cpp .out file's format)
 * into a malloc'd array; *n receives the count. */
int32_t *test_parse_id_line(const char *line, size_t len, size_t *n);

/* Returns the seconds since start on the monotonic clock. */
double test_seconds_since(const struct timespec *start);

/* Counts the lines in s (a final line without '\n' counts). */
int test_count_lines(const char *s);

/* Splits the first 110,000 bytes of tinyshakespeare into train.txt
 * (100,000) and eval.txt (10,000) in dir. */
void test_write_shakespeare_split(const char *dir);

/* Runs `cpeft eval` of stories260K, with the run folder adapter unless
 * NULL, on data in windows of seq_len, and returns its loss (NAN and a
 * failure when the command fails). */
double test_cli_eval_loss(const char *adapter, const char *data, int seq_len);

/* Mean cross-entropy, in double, of logits (N, V) against targets (N). */
double test_logits_loss(const float *logits, const int32_t *targets, int N, int V);

#endif
