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

/* Writes a GPT-2-124M-shaped random checkpoint with GPT-2's tokenizer into
 * a new folder and returns the folder; *path gets the checkpoint's path. */
static const char *write_gpt2_124m(char **path)
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
    *path = cp_path_join(dir, "model.safetensors");
    cp_error err = {0};
    CHECK_MSG(cp_safetensors_write(*path, l->t, l->n, NULL, 0, &err) == CP_OK, "%s", err.msg);
    for (size_t i = 0; i < l->n; i++)
        free((void *)l->t[i].data);
    free(l);
    return dir;
}

/* The peak RSS of the largest child process waited for so far, in bytes. */
static double children_peak_rss(void)
{
    struct rusage usage;
    getrusage(RUSAGE_CHILDREN, &usage);
    return (double)usage.ru_maxrss * 1024; /* ru_maxrss is in KiB */
}

TEST(gpt2_124m_generates_within_rss_budget)
{
    char *path = NULL;
    const char *dir = write_gpt2_124m(&path);
    struct stat st;
    CHECK(stat(path, &st) == 0);
    char args[600], *out = NULL, *err_text = NULL;
    snprintf(args, sizeof args, "generate --model '%s' --prompt 'Hello, world' --max-new-tokens 8 --temperature 0",
             dir);
    CHECK_EQ_INT(test_run_cli(args, NULL, &out, &err_text), 0);
    CHECK_MSG(strncmp(out, "Hello, world", 12) == 0, "%s %s", out, err_text);

    double peak = children_peak_rss(), size = (double)st.st_size;
    CHECK_MSG(peak < 1.3 * size, "peak RSS %.0f MB for a %.0f MB checkpoint (%.2fx, limit 1.3x)",
              peak / 1e6, size / 1e6, peak / size);
    fprintf(stderr, "    peak RSS %.0f MB for a %.0f MB checkpoint (%.2fx)\n", peak / 1e6,
            size / 1e6, peak / size);
    free(out), free(err_text), free(path);
}

/* QLoRA's point: training at B=1, T=128 with the projections in NF4 peaks at
 * no more than half of float32 LoRA's resident memory, as cpeft train reports
 * it (VmHWM: the children's ru_maxrss would include this process's heap,
 * which a child holds between fork and exec). */
TEST(qlora_124m_training_rss_below_half_of_lora)
{
    char *path = NULL;
    const char *dir = write_gpt2_124m(&path);
    char *text = NULL;
    size_t len = 0;
    cp_error err = {0};
    CHECK(cp_file_read(test_shared("data/tinyshakespeare/input.txt"), &text, &len, &err) == CP_OK);
    char *data = test_write_file(dir, "train.txt", text, len > 40000 ? 40000 : len);
    free(text);

    double peak[2];
    const char *methods[2] = {"qlora", "lora"};
    for (int i = 0; i < 2; i++) {
        char args[1200], *out = NULL, *err_text = NULL;
        snprintf(args, sizeof args,
                 "train --model '%s' --data '%s' --out '%s/run-%s' --method %s --steps 2 "
                 "--batch-size 1 --seq-len 128 --quiet",
                 dir, data, dir, methods[i], methods[i]);
        CHECK_EQ_INT(test_run_cli(args, NULL, &out, &err_text), 0);
        const char *line = out ? strstr(out, "peak memory: ") : NULL;
        CHECK_MSG(line && sscanf(line, "peak memory: %lf", &peak[i]) == 1, "%s: %s %s",
                  methods[i], out, err_text);
        peak[i] *= 1 << 20;
        free(out), free(err_text);
    }
    fprintf(stderr, "    peak RSS: QLoRA %.0f MB, LoRA %.0f MB (%.2fx)\n", peak[0] / 1e6,
            peak[1] / 1e6, peak[0] / peak[1]);
    CHECK_MSG(peak[0] <= 0.5 * peak[1], "QLoRA peak RSS %.0f MB is %.2fx of LoRA's %.0f MB",
              peak[0] / 1e6, peak[0] / peak[1], peak[1] / 1e6);
    free(data), free(path);
}
