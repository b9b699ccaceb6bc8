/*
 * llama2.c checkpoints: conversion of stories260K against the Hugging Face
 * copy of the same model, rejection of malformed files, and
 * tools/fetch-stories260K.sh against a small HTTP server that this file runs
 * on 127.0.0.1. No test reaches any other host. The script tests need curl
 * and must run from the repository root, as `make test` does.
 */
#include <arpa/inet.h>
#include <cJSON.h>
#include <dirent.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "core/file.h"
#include "io/hf_config.h"
#include "io/llama2c.h"
#include "io/safetensors.h"
#include "test.h"

#define FETCH_SCRIPT "tools/fetch-stories260K.sh"
#define HUB_DIR "karpathy/tinyllamas/resolve/main/stories260K"

/* Returns test_shared(relative). The paths stay in a static table, so that
 * they remain reachable and LeakSanitizer does not report them. */
static const char *shared(const char *relative)
{
    static struct {
        const char *relative;
        char *path;
    } cache[16];
    for (size_t i = 0; i < sizeof cache / sizeof *cache; i++) {
        if (!cache[i].path)
            cache[i].relative = relative, cache[i].path = test_shared(relative);
        if (strcmp(cache[i].relative, relative) == 0)
            return cache[i].path;
    }
    abort(); /* more than 16 distinct paths: enlarge the table */
}

static const char *shared_bin(void) { return shared("models/stories260K/llama2c/stories260K.bin"); }
static const char *shared_tokenizer(void) { return shared("models/stories260K/tokenizer.model"); }
static const char *shared_model(void) { return shared("models/stories260K"); }

/* Returns a fresh temporary folder. test_tmpdir's buffer is reused by the
 * next call, test_run_cli's included, so this copies it into one of 16
 * static slots, enough for any test below. */
static const char *tmpdir_new(void)
{
    static char dirs[16][320];
    static int next;
    char *dir = dirs[next++ % 16];
    snprintf(dir, sizeof dirs[0], "%s", test_tmpdir());
    return dir;
}

static char *path_join(const char *a, const char *b)
{
    char *p = NULL;
    if (asprintf(&p, "%s/%s", a, b) < 0)
        abort();
    return p;
}

/* Reads a whole file, failing the test when it cannot. */
static char *read_or_fail(const char *path, size_t *len)
{
    char *data = NULL;
    cp_error err = {0};
    if (cp_file_read(path, &data, len, &err) != CP_OK) {
        cp_test_fail(__FILE__, __LINE__, "%s", err.msg);
        abort();
    }
    return data;
}

/* Counts the entries of dir other than "." and "..", or -1 if it cannot be opened. */
static int count_entries(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d)
        return -1;
    int n = 0;
    for (struct dirent *e; (e = readdir(d));)
        n += strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0;
    closedir(d);
    return n;
}

/* Returns the greedy continuation that `cpeft generate` prints for model. */
static char *greedy_text(const char *model)
{
    char args[1024], *out = NULL, *err = NULL;
    snprintf(args, sizeof args,
             "generate --model '%s' --prompt 'Once upon a time' --max-new-tokens 80 "
             "--temperature 0",
             model);
    int rc = test_run_cli(args, NULL, &out, &err);
    CHECK_MSG(rc == 0, "cpeft %s: exit status %d: %s", args, rc, err);
    free(err);
    return out;
}

/* Checks that every tensor of got equals the one of the same name in want, bit for bit. */
static void check_same_tensors(const char *got_path, const char *want_path)
{
    cp_safetensors *got = NULL, *want = NULL;
    cp_error err = {0};
    CHECK_MSG(cp_safetensors_open(got_path, &got, &err) == CP_OK, "%s", err.msg);
    CHECK_MSG(cp_safetensors_open(want_path, &want, &err) == CP_OK, "%s", err.msg);
    if (!got || !want)
        goto done;
    CHECK_EQ_INT(cp_safetensors_count(got), cp_safetensors_count(want));
    for (size_t i = 0; i < cp_safetensors_count(want); i++) {
        const cp_st_tensor *w = cp_safetensors_at(want, i);
        const cp_st_tensor *g = cp_safetensors_find(got, w->name);
        CHECK_MSG(g != NULL, "converted model lacks %s", w->name);
        if (!g)
            continue;
        CHECK_MSG(g->dtype == w->dtype && g->ndim == w->ndim &&
                      memcmp(g->shape, w->shape, sizeof g->shape) == 0,
                  "%s: dtype or shape differs", w->name);
        CHECK_MSG(g->nbytes == w->nbytes && memcmp(g->data, w->data, w->nbytes) == 0,
                  "%s: values differ", w->name);
    }
done:
    cp_safetensors_close(got);
    cp_safetensors_close(want);
}

/* Checks that two JSON files contain equal values. */
static void check_same_json(const char *got_path, const char *want_path)
{
    char *got_text = read_or_fail(got_path, NULL), *want_text = read_or_fail(want_path, NULL);
    cJSON *got = cJSON_Parse(got_text), *want = cJSON_Parse(want_text);
    CHECK_MSG(got && want && cJSON_Compare(got, want, 1), "%s differs from %s:\n%s", got_path,
              want_path, got_text);
    cJSON_Delete(got);
    cJSON_Delete(want);
    free(got_text);
    free(want_text);
}

TEST(llama2c_convert_matches_shared)
{
    const char *dir = tmpdir_new();
    char *parent = path_join(dir, "models"), *out = path_join(dir, "models/stories260K");
    cp_error err = {0};
    CHECK_MSG(cp_llama2c_convert(shared_bin(), shared_tokenizer(), out, &err) == CP_OK, "%s",
              err.msg);

    char *got = path_join(out, "model.safetensors");
    check_same_tensors(got, shared("models/stories260K/model.safetensors"));
    free(got);

    cp_model_config got_cfg, want_cfg;
    got = path_join(out, "config.json");
    CHECK_MSG(cp_config_load(got, &got_cfg, &err) == CP_OK, "%s", err.msg);
    CHECK_MSG(cp_config_load(shared("models/stories260K/config.json"), &want_cfg, &err) ==
                  CP_OK,
              "%s", err.msg);
    CHECK_EQ_STR(got_cfg.model_type, want_cfg.model_type);
    CHECK_EQ_INT(got_cfg.hidden_size, want_cfg.hidden_size);
    CHECK_EQ_INT(got_cfg.intermediate_size, want_cfg.intermediate_size);
    CHECK_EQ_INT(got_cfg.n_layers, want_cfg.n_layers);
    CHECK_EQ_INT(got_cfg.n_heads, want_cfg.n_heads);
    CHECK_EQ_INT(got_cfg.n_kv_heads, want_cfg.n_kv_heads);
    CHECK_EQ_INT(got_cfg.head_dim, want_cfg.head_dim);
    CHECK_EQ_INT(got_cfg.vocab_size, want_cfg.vocab_size);
    CHECK_EQ_INT(got_cfg.max_position_embeddings, want_cfg.max_position_embeddings);
    CHECK(got_cfg.rms_norm_eps == want_cfg.rms_norm_eps);
    CHECK(got_cfg.rope_theta == want_cfg.rope_theta);
    CHECK_EQ_INT(got_cfg.tie_word_embeddings, want_cfg.tie_word_embeddings);
    CHECK_EQ_INT(got_cfg.bos_id, want_cfg.bos_id);
    CHECK_EQ_INT(got_cfg.n_eos_ids, want_cfg.n_eos_ids);
    CHECK_EQ_INT(got_cfg.eos_ids[0], want_cfg.eos_ids[0]);
    check_same_json(got, shared("models/stories260K/config.json"));
    free(got);

    got = path_join(out, "tokenizer_config.json");
    check_same_json(got, shared("models/stories260K/tokenizer_config.json"));
    free(got);

    size_t got_len = 0, want_len = 0;
    got = path_join(out, "tokenizer.model");
    char *got_tok = read_or_fail(got, &got_len);
    char *want_tok = read_or_fail(shared_tokenizer(), &want_len);
    CHECK_EQ_INT(got_len, want_len);
    CHECK(got_len == want_len && memcmp(got_tok, want_tok, want_len) == 0);
    free(got), free(got_tok), free(want_tok);

    /* Exactly the four files, and no staging folder beside the output. */
    CHECK_EQ_INT(count_entries(out), 4);
    CHECK_EQ_INT(count_entries(parent), 1);
    free(out), free(parent);
}

TEST(llama2c_rope_row_order)
{
    /* Row 2i + t of a head in llama2.c's wq is row t * head_dim / 2 + i in q_proj. */
    cp_llama2c ck;
    cp_safetensors *st = NULL;
    cp_error err = {0};
    CHECK_MSG(cp_llama2c_open(shared_bin(), &ck, &err) == CP_OK, "%s", err.msg);
    CHECK_MSG(cp_safetensors_open(shared_model(), &st, &err) == CP_OK, "%s", err.msg);
    if (!st)
        return;
    int C = ck.config.dim, head_dim = C / ck.config.n_heads, half = head_dim / 2;
    CHECK_EQ_INT(ck.config.n_layers, 5);
    CHECK_EQ_INT(ck.config.n_kv_heads, 4);
    CHECK_EQ_INT(ck.config.shared_classifier, 1);
    CHECK(ck.wcls == ck.token_embedding);

    const cp_st_tensor *q = cp_safetensors_find(st, "model.layers.3.self_attn.q_proj.weight");
    const cp_st_tensor *k = cp_safetensors_find(st, "model.layers.3.self_attn.k_proj.weight");
    CHECK(q != NULL);
    CHECK(k != NULL);
    if (q && k) {
        const float *wq = ck.wq + (size_t)3 * C * C;
        const float *wk = ck.wk + (size_t)3 * ck.config.n_kv_heads * head_dim * C;
        int h = 2, i = 1, t = 1; /* any head, pair and member */
        size_t from = (size_t)(h * head_dim + 2 * i + t) * C;
        size_t to = (size_t)(h * head_dim + t * half + i) * C;
        CHECK(memcmp((const float *)q->data + to, wq + from, C * sizeof(float)) == 0);
        CHECK(memcmp((const float *)k->data + to, wk + from, C * sizeof(float)) == 0);
    }
    cp_safetensors_close(st);
    cp_llama2c_close(&ck);
}

TEST(llama2c_cli_generates_same_text)
{
    const char *dir = tmpdir_new();
    char *out = path_join(dir, "converted");
    char args[2048], *stdout_text = NULL, *stderr_text = NULL;
    snprintf(args, sizeof args, "convert-llama2c --checkpoint '%s' --tokenizer '%s' --out '%s'",
             shared_bin(), shared_tokenizer(), out);
    int rc = test_run_cli(args, NULL, &stdout_text, &stderr_text);
    CHECK_MSG(rc == 0, "cpeft %s: exit status %d: %s", args, rc, stderr_text);
    CHECK_MSG(strstr(stdout_text, out) != NULL, "stdout: %s", stdout_text);

    char *got = greedy_text(out), *want = greedy_text(shared_model());
    CHECK_MSG(strlen(want) > 100, "generated too little: %s", want);
    CHECK_EQ_STR(got, want);
    free(got), free(want), free(stdout_text), free(stderr_text), free(out);
}

TEST(llama2c_unshared_classifier)
{
    /* The shared file with vocab_size negated and a separate wcls appended. */
    size_t len = 0;
    char *orig = read_or_fail(shared_bin(), &len);
    size_t cls_floats = 512 * 64;
    char *data = malloc(len + cls_floats * sizeof(float));
    CHECK(data != NULL);
    memcpy(data, orig, len);
    int32_t vocab = -512;
    memcpy(data + 20, &vocab, sizeof vocab);
    float *wcls = (float *)(data + len);
    for (size_t i = 0; i < cls_floats; i++)
        wcls[i] = (float)((int)(i % 97) - 48) / 64.0f;
    const char *dir = tmpdir_new();
    char *bin = test_write_file(dir, "unshared.bin", data, len + cls_floats * sizeof(float));

    char *out = path_join(dir, "out");
    cp_error err = {0};
    CHECK_MSG(cp_llama2c_convert(bin, shared_tokenizer(), out, &err) == CP_OK, "%s", err.msg);
    cp_safetensors *st = NULL;
    CHECK_MSG(cp_safetensors_open(out, &st, &err) == CP_OK, "%s", err.msg);
    if (st) {
        const cp_st_tensor *head = cp_safetensors_find(st, "lm_head.weight");
        CHECK(head != NULL);
        CHECK(head && head->nbytes == cls_floats * sizeof(float));
        CHECK(head && memcmp(head->data, wcls, cls_floats * sizeof(float)) == 0);
        CHECK_EQ_INT(cp_safetensors_count(st), 48);
    }
    cp_safetensors_close(st);

    cp_model_config cfg;
    char *config = path_join(out, "config.json");
    CHECK_MSG(cp_config_load(config, &cfg, &err) == CP_OK, "%s", err.msg);
    CHECK_EQ_INT(cfg.tie_word_embeddings, 0);
    CHECK_EQ_INT(cfg.vocab_size, 512);
    free(greedy_text(out)); /* the untied model loads and runs */
    free(config), free(out), free(bin), free(data), free(orig);
}

/* Runs `cpeft convert-llama2c` on bin and checks for exit status 2, one
 * stderr line naming bin and containing needle, and no output folder. */
static void check_rejected(const char *bin, const char *tokenizer, const char *needle)
{
    const char *dir = tmpdir_new();
    char *out = path_join(dir, "out");
    char args[2048], *err = NULL;
    snprintf(args, sizeof args, "convert-llama2c --checkpoint '%s' --tokenizer '%s' --out '%s'",
             bin, tokenizer, out);
    int rc = test_run_cli(args, NULL, NULL, &err);
    CHECK_MSG(rc == 2, "%s: exit status %d, expected 2 (stderr: %s)", needle, rc, err);
    CHECK_MSG(test_count_lines(err) == 1, "%s: expected one stderr line, got: %s", needle, err);
    CHECK_MSG(strstr(err, bin) != NULL, "%s: stderr does not name %s: %s", needle, bin, err);
    CHECK_MSG(strstr(err, needle) != NULL, "stderr lacks \"%s\": %s", needle, err);
    CHECK_MSG(!cp_file_exists(out), "%s: %s was created", needle, out);
    CHECK_EQ_INT(count_entries(dir), 0);
    free(err), free(out);
}

TEST(llama2c_rejects_bad_header)
{
    static const struct {
        int32_t header[7]; /* dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab, seq_len */
        const char *needle;
    } cases[] = {
        {{0, 172, 5, 8, 4, 512, 512}, "byte 0: dim is 0"},
        {{-64, 172, 5, 8, 4, 512, 512}, "byte 0: dim is -64"},
        {{64, -172, 5, 8, 4, 512, 512}, "byte 4: hidden_dim is -172"},
        {{64, 172, 0, 8, 4, 512, 512}, "byte 8: n_layers is 0"},
        {{64, 172, 5, 0, 4, 512, 512}, "byte 12: n_heads is 0"},
        {{64, 172, 5, 8, -4, 512, 512}, "byte 16: n_kv_heads is -4"},
        {{64, 172, 5, 8, 4, 0, 512}, "byte 20: vocab_size is 0"},
        {{64, 172, 5, 8, 4, INT32_MIN, 512}, "byte 20: vocab_size is -2147483648"},
        {{64, 172, 5, 8, 4, 512, 0}, "byte 24: seq_len is 0"},
        {{64, 172, 5, 7, 4, 512, 512}, "n_heads 7 does not divide dim 64"},
        {{64, 172, 5, 64, 4, 512, 512}, "head_dim = dim / n_heads = 64 / 64 is odd"},
        {{64, 172, 5, 8, 3, 512, 512}, "n_kv_heads 3 does not divide n_heads 8"},
        {{64, 172, 5, 8, 16, 512, 512}, "n_kv_heads 16 does not divide n_heads 8"},
        {{1 << 20, 172, 5, 8, 4, 512, 512}, "ends inside array token_embedding"},
        {{64, 172, INT32_MAX, 8, 4, 512, 512}, "ends inside array rms_att"},
        {{1 << 30, INT32_MAX, INT32_MAX, 8, 4, 512, 512}, "make array wq larger than 2^64"},
        {{64, 172, 5, 8, 4, -512, 512}, "ends inside array wcls"},
        {{64, 172, 5, 8, 4, 512, 1024}, "ends inside array freq_cis_imag"},
        {{64, 172, 5, 8, 4, 512, 256}, "8192 bytes follow the last array"},
        {{0x616b3432, 1, 5, 8, 4, 512, 512}, "magic \"ak42\" marks llama2.c export version 1"},
    };
    size_t len = 0;
    char *data = read_or_fail(shared_bin(), &len);
    const char *dir = tmpdir_new();
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char name[32];
        snprintf(name, sizeof name, "case%zu.bin", i);
        memcpy(data, cases[i].header, sizeof cases[i].header);
        char *bin = test_write_file(dir, name, data, len);
        check_rejected(bin, shared_tokenizer(), cases[i].needle);
        free(bin);
    }
    free(data);
}

TEST(llama2c_rejects_bad_size)
{
    /* wq starts after the header, the embedding (512 x 64) and rms_att (5 x 64). */
    const size_t wq_offset = 28 + 4 * (512 * 64 + 5 * 64);
    size_t len = 0;
    char *data = read_or_fail(shared_bin(), &len);
    const struct {
        size_t size;
        const char *needle;
    } cases[] = {
        {0, "byte 0: the file ends inside the 28-byte llama2.c header"},
        {10, "byte 10: the file ends inside the 28-byte llama2.c header"},
        {28, "byte 28: the file ends inside array token_embedding"},
        {wq_offset + 1000, "ends inside array wq"},
        {len - 4, "ends inside array freq_cis_imag"},
    };
    const char *dir = tmpdir_new();
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char name[32];
        snprintf(name, sizeof name, "cut%zu.bin", i);
        char *bin = test_write_file(dir, name, data, cases[i].size);
        check_rejected(bin, shared_tokenizer(), cases[i].needle);
        free(bin);
    }

    char *longer = malloc(len + 6);
    CHECK(longer != NULL);
    memcpy(longer, data, len);
    memset(longer + len, 0, 6);
    char *bin = test_write_file(dir, "longer.bin", longer, len + 6);
    check_rejected(bin, shared_tokenizer(), "6 bytes follow the last array");
    free(bin), free(longer);

    check_rejected("/nonexistent/stories260K.bin", shared_tokenizer(), "cannot open");
    free(data);
}

TEST(llama2c_rejects_bad_tokenizer_and_out)
{
    const char *llama2_tok = shared("tokenizers/llama2/tokenizer.model");
    const char *dir = tmpdir_new();
    char *out = path_join(dir, "out");
    char args[2048], *err = NULL;

    /* A tokenizer whose vocabulary does not match the checkpoint's. */
    snprintf(args, sizeof args, "convert-llama2c --checkpoint '%s' --tokenizer '%s' --out '%s'",
             shared_bin(), llama2_tok, out);
    CHECK_EQ_INT(test_run_cli(args, NULL, NULL, &err), 2);
    CHECK_MSG(strstr(err, "32000 pieces"), "stderr: %s", err);
    CHECK_MSG(strstr(err, "vocab_size 512"), "stderr: %s", err);
    CHECK_EQ_INT(test_count_lines(err), 1);
    CHECK(!cp_file_exists(out));
    free(err);

    /* A folder that is not empty is left as it was. */
    CHECK_EQ_INT(mkdir(out, 0755), 0);
    free(test_write_file(out, "keep.txt", "x", 1));
    snprintf(args, sizeof args, "convert-llama2c --checkpoint '%s' --tokenizer '%s' --out '%s/'",
             shared_bin(), shared_tokenizer(), out);
    CHECK_EQ_INT(test_run_cli(args, NULL, NULL, &err), 2);
    CHECK_MSG(strstr(err, "not empty"), "stderr: %s", err);
    CHECK_EQ_INT(count_entries(out), 1);
    CHECK_EQ_INT(count_entries(dir), 1);
    free(err);

    /* An empty folder is filled. */
    char *empty = path_join(dir, "empty");
    CHECK_EQ_INT(mkdir(empty, 0755), 0);
    snprintf(args, sizeof args, "convert-llama2c --checkpoint '%s' --tokenizer '%s' --out '%s'",
             shared_bin(), shared_tokenizer(), empty);
    CHECK_EQ_INT(test_run_cli(args, NULL, NULL, &err), 0);
    CHECK_EQ_INT(count_entries(empty), 4);
    free(err), free(empty), free(out);

    /* A missing tokenizer file. */
    snprintf(args, sizeof args,
             "convert-llama2c --checkpoint '%s' --tokenizer /nonexistent/tok512.model "
             "--out '%s/missing'",
             shared_bin(), dir);
    CHECK_EQ_INT(test_run_cli(args, NULL, NULL, &err), 2);
    CHECK_MSG(strstr(err, "/nonexistent/tok512.model: cannot open"), "stderr: %s", err);
    CHECK_EQ_INT(count_entries(dir), 2);
    free(err);
}

TEST(llama2c_failed_write_leaves_nothing)
{
    /* A file size limit of 200 blocks (100 or 200 KB, by shell) lets the
     * small files through and makes the write of model.safetensors fail. The
     * staging folder must disappear with them. */
    const char *bin_env = getenv("CPEFT_BIN");
    const char *dir = tmpdir_new();
    char *out = path_join(dir, "out"), *log = path_join(dir, "stderr"), *cmd = NULL;
    if (asprintf(&cmd,
                 "trap '' XFSZ; ulimit -f 200; exec %s convert-llama2c --checkpoint '%s' "
                 "--tokenizer '%s' --out '%s' 2>'%s'",
                 bin_env ? bin_env : "./cpeft", shared_bin(), shared_tokenizer(), out, log) < 0)
        abort();
    int status = system(cmd);
    char *err = read_or_fail(log, NULL);
    int rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    CHECK_MSG(rc == 1, "exit status %d, stderr: %s", rc, err);
    CHECK_MSG(strstr(err, "model.safetensors"), "stderr: %s", err);
    CHECK_MSG(strstr(err, "write failed"), "stderr: %s", err);
    CHECK(!cp_file_exists(out));
    CHECK_EQ_INT(count_entries(dir), 1); /* the stderr log alone */
    free(err), free(cmd), free(log), free(out);
}

/* ---- tools/fetch-stories260K.sh against a loopback HTTP server ---- */

static void send_all(int fd, const void *data, size_t n)
{
    const char *p = data;
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w <= 0)
            return;
        p += w;
        n -= (size_t)w;
    }
}

/* Serves one HTTP GET request with the file at root + path, or 404. */
static void serve_request(int fd, const char *root)
{
    char req[4096], path[1024], head[256];
    size_t n = 0;
    while (n < sizeof req - 1) {
        ssize_t r = recv(fd, req + n, sizeof req - 1 - n, 0);
        if (r <= 0)
            return;
        n += (size_t)r;
        req[n] = '\0';
        if (strstr(req, "\r\n\r\n"))
            break;
    }
    char *body = NULL;
    size_t len = 0;
    cp_error err = {0};
    if (sscanf(req, "GET %1000s HTTP/", path) == 1 && !strstr(path, "..")) {
        char *file = path_join(root, path);
        if (cp_file_read(file, &body, &len, &err) != CP_OK)
            body = NULL;
        free(file);
    }
    if (body)
        snprintf(head, sizeof head,
                 "HTTP/1.0 200 OK\r\nContent-Length: %zu\r\nConnection: close\r\n\r\n", len);
    else
        snprintf(head, sizeof head,
                 "HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    send_all(fd, head, strlen(head));
    if (body)
        send_all(fd, body, len);
    free(body);
}

/* Opens a TCP socket on 127.0.0.1 at a port that the kernel picks, and
 * listens on it if do_listen is set. */
static int loopback_socket(int do_listen, int *port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = 0};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t addr_len = sizeof addr;
    if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof addr) != 0 ||
        (do_listen && listen(fd, 16) != 0) ||
        getsockname(fd, (struct sockaddr *)&addr, &addr_len) != 0) {
        perror("loopback socket");
        abort();
    }
    *port = ntohs(addr.sin_port);
    return fd;
}

/* Starts a child process serving root on 127.0.0.1. The socket listens
 * before the fork, so clients can connect at once. Stop it with server_stop. */
static pid_t server_start(const char *root, int *port)
{
    int fd = loopback_socket(1, port);
    pid_t pid = fork();
    if (pid < 0)
        abort();
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL); /* dies with the test, even on a crash */
        for (;;) {
            int client = accept(fd, NULL, NULL);
            if (client < 0)
                continue;
            serve_request(client, root);
            close(client);
        }
    }
    close(fd);
    return pid;
}

static void server_stop(pid_t pid)
{
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
}

/* Lays out a hub folder whose paths match the resolve URLs of the two files,
 * and flips one byte of the checkpoint if corrupt. Returns the folder. */
static const char *hub_make(int corrupt)
{
    const char *root = tmpdir_new();
    char *dir = path_join(root, HUB_DIR);
    char *mkdir_cmd = NULL;
    if (asprintf(&mkdir_cmd, "mkdir -p '%s'", dir) < 0 || system(mkdir_cmd) != 0)
        abort();
    size_t len = 0, tok_len = 0;
    char *bin = read_or_fail(shared_bin(), &len);
    char *tok = read_or_fail(shared_tokenizer(), &tok_len);
    if (corrupt)
        bin[len / 2] ^= 1;
    free(test_write_file(dir, "stories260K.bin", bin, len));
    free(test_write_file(dir, "tok512.model", tok, tok_len));
    free(bin), free(tok), free(dir), free(mkdir_cmd);
    return root;
}

/* Runs the fetch script with CPEFT_HUB_URL at 127.0.0.1:port. Returns its
 * exit status, and its stderr in *err. */
static int run_fetch(int port, const char *out, char **err)
{
    CHECK_MSG(cp_file_exists(FETCH_SCRIPT), "%s not found; run the tests from the repository "
                                            "root",
              FETCH_SCRIPT);
    const char *bin = getenv("CPEFT_BIN");
    const char *logs = tmpdir_new();
    char *cmd = NULL;
    if (asprintf(&cmd,
                 "CPEFT_HUB_URL='http://127.0.0.1:%d' CPEFT_BIN='%s' sh %s '%s' "
                 ">'%s/stdout' 2>'%s/stderr' </dev/null",
                 port, bin ? bin : "./cpeft", FETCH_SCRIPT, out, logs, logs) < 0)
        abort();
    int status = system(cmd);
    char *log = path_join(logs, "stderr");
    *err = read_or_fail(log, NULL);
    free(log), free(cmd);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

TEST(llama2c_fetch_installs_model)
{
    int port = 0;
    pid_t server = server_start(hub_make(0), &port);
    const char *dir = tmpdir_new();
    char *parent = path_join(dir, "models"), *out = path_join(dir, "models/stories260K");
    char *err = NULL;
    int rc = run_fetch(port, out, &err);
    server_stop(server);
    CHECK_MSG(rc == 0, "exit status %d, stderr: %s", rc, err);
    free(err);

    /* The four converted files plus llama2c/, and nothing else beside it. */
    CHECK_EQ_INT(count_entries(out), 5);
    CHECK_EQ_INT(count_entries(parent), 1);
    check_same_tensors(out, shared_model());
    char *got = greedy_text(out), *want = greedy_text(shared_model());
    CHECK_EQ_STR(got, want);
    free(got), free(want);

    /* A second run finds config.json and does nothing, even with no server. */
    int dead_port = 0;
    int dead = loopback_socket(0, &dead_port);
    rc = run_fetch(dead_port, out, &err);
    close(dead);
    CHECK_MSG(rc == 0, "exit status %d, stderr: %s", rc, err);
    CHECK_MSG(err[0] == '\0', "stderr: %s", err);
    free(err), free(out), free(parent);
}

TEST(llama2c_fetch_rejects_corrupt_download)
{
    int port = 0;
    pid_t server = server_start(hub_make(1), &port);
    const char *dir = tmpdir_new();
    char *out = path_join(dir, "stories260K"), *err = NULL;
    int rc = run_fetch(port, out, &err);
    server_stop(server);
    CHECK_MSG(rc == 1, "exit status %d, stderr: %s", rc, err);
    CHECK_MSG(strstr(err, "sha256"), "stderr: %s", err);
    CHECK_MSG(strstr(err, "expected b0a507e7"), "stderr: %s", err);
    CHECK_EQ_INT(count_entries(dir), 0);
    free(err), free(out);
}

TEST(llama2c_fetch_offline_message)
{
    /* A bound socket that never listens: connections are refused. */
    int port = 0;
    int fd = loopback_socket(0, &port);
    const char *dir = tmpdir_new();
    char *out = path_join(dir, "stories260K"), *err = NULL, url[128];
    int rc = run_fetch(port, out, &err);
    close(fd);
    snprintf(url, sizeof url, "http://127.0.0.1:%d/" HUB_DIR "/stories260K.bin", port);
    CHECK_MSG(rc == 2, "exit status %d, stderr: %s", rc, err);
    CHECK_MSG(strstr(err, url), "stderr lacks %s: %s", url, err);
    CHECK_MSG(strstr(err, HUB_DIR "/tok512.model"), "stderr: %s", err);
    CHECK_MSG(strstr(err, "--out "), "stderr lacks where to place the model: %s", err);
    CHECK_MSG(strstr(err, out), "stderr lacks %s: %s", out, err);
    CHECK_MSG(strstr(err, "make demo SHARED="), "stderr: %s", err);
    CHECK_EQ_INT(count_entries(dir), 0);
    free(err);

    /* A server that returns 404 is handled the same way. */
    pid_t server = server_start(tmpdir_new(), &port);
    rc = run_fetch(port, out, &err);
    server_stop(server);
    CHECK_MSG(rc == 2, "exit status %d, stderr: %s", rc, err);
    CHECK_EQ_INT(count_entries(dir), 0);
    free(err), free(out);
}
