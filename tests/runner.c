/*
 * Runs every registered test in a child process, so that a crash or a
 * sanitizer report fails one test rather than the whole run, and prints
 * "N passed, N failed". Arguments select tests by substring, and an
 * argument written "-substring" excludes the tests it matches.
 */
#include "test.h"

#include <cJSON.h>

#include <errno.h>
#include <ftw.h>
#include <stdarg.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_TESTS 1024

static struct {
    const char *name;
    cp_test_fn fn;
} tests[MAX_TESTS];
static int n_tests;

int cp_test_failures;
static char tmp_root[256];
static int tmp_count;

void cp_test_register(const char *name, cp_test_fn fn)
{
    if (n_tests == MAX_TESTS) {
        fprintf(stderr, "too many tests: raise MAX_TESTS in tests/runner.c\n");
        abort();
    }
    tests[n_tests].name = name;
    tests[n_tests].fn = fn;
    n_tests++;
}

void cp_test_fail(const char *file, int line, const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "    %s:%d: ", file, line);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    cp_test_failures++;
}

/* Paths handed to tests stay reachable from this table until the test
 * process exits, so LeakSanitizer does not report them. */
static char *kept_paths[1024];
static int n_kept_paths;

static char *keep_path(char *path)
{
    if (n_kept_paths < 1024)
        kept_paths[n_kept_paths++] = path;
    return path;
}

char *test_shared(const char *relative)
{
    const char *root = getenv("CPEFT_SHARED");
    if (!root)
        root = "../shared";
    char *path = NULL;
    if (asprintf(&path, "%s/%s", root, relative) < 0)
        abort();
    return keep_path(path);
}

const char *test_tmpdir(void)
{
    char *path = NULL;
    if (asprintf(&path, "%s/t%d", tmp_root, tmp_count++) < 0)
        abort();
    if (mkdir(path, 0755) != 0) {
        fprintf(stderr, "cannot create %s: %s\n", path, strerror(errno));
        abort();
    }
    return keep_path(path);
}

char *test_write_file(const char *dir, const char *name, const void *data, size_t n)
{
    char *path = NULL;
    if (asprintf(&path, "%s/%s", dir, name) < 0)
        abort();
    FILE *fp = fopen(path, "wb");
    if (!fp || fwrite(data, 1, n, fp) != n || fclose(fp) != 0) {
        fprintf(stderr, "cannot write %s\n", path);
        abort();
    }
    return path;
}

/* Reads a whole file into a NUL-terminated string, or returns NULL. */
static char *read_all_or_null(const char *path)
{
    FILE *fp = fopen(path, "rb");
    if (!fp)
        return NULL;
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    size_t got;
    while ((got = fread(buf + n, 1, cap - n - 1, fp)) > 0) {
        n += got;
        if (cap - n - 1 == 0)
            buf = realloc(buf, cap *= 2);
    }
    buf[n] = '\0';
    fclose(fp);
    return buf;
}

static char *read_all(const char *path)
{
    char *text = read_all_or_null(path);
    return text ? text : strdup("");
}

int test_run_cli(const char *args, const char *stdin_text, char **out, char **err)
{
    const char *bin = getenv("CPEFT_BIN");
    if (!bin)
        bin = "./cpeft";
    char dir[320];
    snprintf(dir, sizeof dir, "%s", test_tmpdir());

    char in_path[400], out_path[400], err_path[400];
    snprintf(in_path, sizeof in_path, "%s/stdin", dir);
    snprintf(out_path, sizeof out_path, "%s/stdout", dir);
    snprintf(err_path, sizeof err_path, "%s/stderr", dir);
    free(test_write_file(dir, "stdin", stdin_text ? stdin_text : "",
                         stdin_text ? strlen(stdin_text) : 0));

    char *cmd = NULL;
    if (asprintf(&cmd, "%s %s <'%s' >'%s' 2>'%s'", bin, args, in_path, out_path, err_path) < 0)
        abort();
    int status = system(cmd);
    free(cmd);
    if (out)
        *out = read_all(out_path);
    if (err)
        *err = read_all(err_path);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

cJSON *test_read_json(const char *path)
{
    char *text = read_all_or_null(path);
    if (!text) {
        cp_test_fail(__FILE__, __LINE__, "%s: cannot read", path);
        return NULL;
    }
    cJSON *root = cJSON_Parse(text);
    free(text);
    if (!root)
        cp_test_fail(__FILE__, __LINE__, "%s: invalid JSON", path);
    return root;
}

void test_check_ids(const char *what, const int32_t *got, size_t n_got, const int32_t *want,
                    size_t n_want)
{
    size_t i = 0;
    while (i < n_got && i < n_want && got[i] == want[i])
        i++;
    CHECK_MSG(i == n_got && i == n_want,
              "%s: ids differ at index %zu (got %zu ids, expected %zu; got %d, expected %d)",
              what, i, n_got, n_want, i < n_got ? got[i] : -1, i < n_want ? want[i] : -1);
}

int32_t *test_parse_id_line(const char *line, size_t len, size_t *n)
{
    int32_t *ids = malloc((len / 2 + 1) * sizeof *ids);
    if (!ids)
        abort();
    *n = 0;
    const char *p = line, *end = line + len;
    while (p < end) {
        while (p < end && (*p == ' ' || *p == '\r'))
            p++;
        if (p == end)
            break;
        char *next;
        ids[(*n)++] = (int32_t)strtol(p, &next, 10);
        CHECK_MSG(next > p, "bad id in line \"%.*s\"", (int)len, line);
        if (next == p)
            break;
        p = next;
    }
    return ids;
}

double test_seconds_since(const struct timespec *start)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)(now.tv_sec - start->tv_sec) + (double)(now.tv_nsec - start->tv_nsec) * 1e-9;
}

int test_count_lines(const char *s)
{
    int n = 0;
    for (; *s; s++)
        if (*s == '\n' || s[1] == '\0')
            n++;
    return n;
}

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st, (void)flag, (void)ftw;
    return remove(path);
}

/* A test runs when its name contains one of the plain arguments (or there
 * are none) and none of the arguments written "-substring". */
static int selected(const char *name, int argc, char **argv)
{
    int includes = 0, included = 0;
    for (int i = 1; i < argc; i++) {
        if (argv[i][0] == '-') {
            if (strstr(name, argv[i] + 1))
                return 0;
        } else {
            includes++;
            included |= strstr(name, argv[i]) != NULL;
        }
    }
    return includes == 0 || included;
}

int main(int argc, char **argv)
{
    const char *tmp = getenv("TMPDIR");
    snprintf(tmp_root, sizeof tmp_root, "%s/cpeft-test-XXXXXX", tmp ? tmp : "/tmp");
    if (!mkdtemp(tmp_root)) {
        fprintf(stderr, "cannot create a temporary directory: %s\n", strerror(errno));
        return 1;
    }

    int passed = 0, failed = 0;
    for (int i = 0; i < n_tests; i++) {
        if (!selected(tests[i].name, argc, argv))
            continue;
        fflush(stdout);
        pid_t pid = fork();
        if (pid == 0) {
            tmp_count = 1000 * (i + 1);
            tests[i].fn();
            exit(cp_test_failures ? 1 : 0);
        }
        int status = 0;
        waitpid(pid, &status, 0);
        int ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
        if (ok) {
            passed++;
            printf("ok   %s\n", tests[i].name);
        } else {
            failed++;
            if (WIFSIGNALED(status))
                printf("FAIL %s (signal %d)\n", tests[i].name, WTERMSIG(status));
            else
                printf("FAIL %s\n", tests[i].name);
        }
    }

    nftw(tmp_root, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}

double test_logits_loss(const float *logits, const int32_t *targets, int N, int V)
{
    double total = 0;
    for (int n = 0; n < N; n++) {
        const float *row = logits + (size_t)n * V;
        double max = row[0], sum = 0;
        for (int v = 1; v < V; v++)
            max = row[v] > max ? row[v] : max;
        for (int v = 0; v < V; v++)
            sum += exp(row[v] - max);
        total += log(sum) + max - row[targets[n]];
    }
    return total / N;
}

void test_write_shakespeare_split(const char *dir)
{
    char *cmd = NULL;
    const char *text = test_shared("data/tinyshakespeare/input.txt");
    if (asprintf(&cmd, "head -c 100000 '%s' > '%s/train.txt' && head -c 110000 '%s' | "
                       "tail -c 10000 > '%s/eval.txt'",
                 text, dir, text, dir) < 0 || system(cmd) != 0)
        abort();
    free(cmd);
}

double test_cli_eval_loss(const char *adapter, const char *data, int seq_len)
{
    char *args = NULL, *out = NULL, *err = NULL;
    if (asprintf(&args, "eval --model '%s' %s%s%s --data '%s' --seq-len %d",
                 test_shared("models/stories260K"), adapter ? "--adapter '" : "",
                 adapter ? adapter : "", adapter ? "'" : "", data, seq_len) < 0)
        abort();
    int rc = test_run_cli(args, NULL, &out, &err);
    CHECK_MSG(rc == 0, "cpeft %s: exit %d: %s", args, rc, err);
    const char *at = out ? strstr(out, "\"loss\": ") : NULL;
    CHECK_MSG(at != NULL, "cpeft %s: %s %s", args, out, err);
    double loss = at ? strtod(at + 8, NULL) : NAN;
    free(args), free(out), free(err);
    return loss;
}
