/*
 * Memory: a GPT-2-124M-shaped float32 checkpoint (random weights, about
 * 500 MB) generates with a peak resident set below 1.3x its file size,
 * because the frozen weights are used in place from the read-only map.
 */
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include "core/file.h"
#include "core/rng.h"
#include "io/safetensors.h"
#include "test.h"

#define C 768
#define LAYERS 12
#define VOCAB 50257
#define POSITIONS 1024

typedef struct tensor_list {
    cp_st_tensor t[4 + 12 * LAYERS];
    char names[4 + 12 * LAYERS][64];
    size_t n;
} tensor_list;

/* Adds a tensor of shape (rows, cols), or (rows) when cols is 0, filled with
 * value, or with uniform noise in [-0.02, 0.02] when value is NAN. */
static void add(tensor_list *l, cp_rng *rng, const char *name, int64_t rows, int64_t cols,
                float value)
{
    size_t n = (size_t)rows * (cols ? cols : 1);
    float *data = malloc(n * sizeof *data);
    for (size_t i = 0; i < n; i++)
        data[i] = isnan(value) ? 0.04f * cp_rng_uniform(rng) - 0.02f : value;
    cp_st_tensor *t = &l->t[l->n];
    snprintf(l->names[l->n], sizeof l->names[l->n], "%s", name);
    t->name = l->names[l->n];
    t->dtype = CP_DTYPE_F32;
    t->ndim = cols ? 2 : 1;
    t->shape[0] = rows;
    t->shape[1] = cols;
    t->data = data;
    t->nbytes = n * sizeof *data;
    l->n++;
}

static void add_layer(tensor_list *l, cp_rng *rng, int i)
{
    static const struct {
        const char *suffix;
        int64_t rows, cols;
        float value;
    } parts[] = {
        {"ln_1.weight", C, 0, 1}, {"ln_1.bias", C, 0, 0},
        {"attn.c_attn.weight", C, 3 * C, NAN}, {"attn.c_attn.bias", 3 * C, 0, 0},
        {"attn.c_proj.weight", C, C, NAN}, {"attn.c_proj.bias", C, 0, 0},
        {"ln_2.weight", C, 0, 1}, {"ln_2.bias", C, 0, 0},
        {"mlp.c_fc.weight", C, 4 * C, NAN}, {"mlp.c_fc.bias", 4 * C, 0, 0},
        {"mlp.c_proj.weight", 4 * C, C, NAN}, {"mlp.c_proj.bias", C, 0, 0},
    };
    for (size_t p = 0; p < sizeof parts / sizeof *parts; p++) {
        char name[64];
        snprintf(name, sizeof name, "h.%d.%s", i, parts[p].suffix);
        add(l, rng, name, parts[p].rows, parts[p].cols, parts[p].value);
    }
}

TEST(gpt2_124m_generates_within_rss_budget)
{
    const char *dir = test_tmpdir();
    static const char config[] =
        "{\"model_type\": \"gpt2\", \"n_embd\": 768, \"n_layer\": 12, \"n_head\": 12, "
        "\"n_positions\": 1024, \"vocab_size\": 50257, \"n_inner\": null, "
        "\"activation_function\": \"gelu_new\", \"layer_norm_epsilon\": 1e-05}";
    free(test_write_file(dir, "config.json", config, sizeof config - 1));
    char *cmd = NULL;
    if (asprintf(&cmd, "cp '%s' '%s' '%s'", test_shared("tokenizers/gpt2/vocab.json"),
                 test_shared("tokenizers/gpt2/merges.txt"), dir) < 0 ||
        system(cmd) != 0)
        abort();
    free(cmd);

    /* The original gpt2 checkpoint's names: no "transformer." prefix. */
    tensor_list *l = calloc(1, sizeof *l);
    cp_rng rng;
    cp_rng_seed(&rng, 124);
    add(l, &rng, "wte.weight", VOCAB, C, NAN);
    add(l, &rng, "wpe.weight", POSITIONS, C, NAN);
    for (int i = 0; i < LAYERS; i++)
        add_layer(l, &rng, i);
    add(l, &rng, "ln_f.weight", C, 0, 1);
    add(l, &rng, "ln_f.bias", C, 0, 0);
    char *path = cp_path_join(dir, "model.safetensors");
    cp_error err = {0};
    CHECK_MSG(cp_safetensors_write(path, l->t, l->n, NULL, 0, &err) == CP_OK, "%s", err.msg);
    for (size_t i = 0; i < l->n; i++)
        free((void *)l->t[i].data);
    free(l);

    struct stat st;
    CHECK(stat(path, &st) == 0);
    char args[600], *out = NULL, *err_text = NULL;
    snprintf(args, sizeof args, "generate --model '%s' --prompt 'Hello, world' --max-new-tokens 8 --temperature 0",
             dir);
    CHECK_EQ_INT(test_run_cli(args, NULL, &out, &err_text), 0);
    CHECK_MSG(strncmp(out, "Hello, world", 12) == 0, "%s %s", out, err_text);

    /* ru_maxrss is in KiB: the largest child so far, which is cpeft. */
    struct rusage usage;
    getrusage(RUSAGE_CHILDREN, &usage);
    double peak = (double)usage.ru_maxrss * 1024, size = (double)st.st_size;
    CHECK_MSG(peak < 1.3 * size, "peak RSS %.0f MB for a %.0f MB checkpoint (%.2fx, limit 1.3x)",
              peak / 1e6, size / 1e6, peak / size);
    fprintf(stderr, "    peak RSS %.0f MB for a %.0f MB checkpoint (%.2fx)\n", peak / 1e6,
            size / 1e6, peak / size);
    free(out), free(err_text), free(path);
}
