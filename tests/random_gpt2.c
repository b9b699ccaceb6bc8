/* Random-weight GPT-2 checkpoints: see random_gpt2.h. */
#include "random_gpt2.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "core/file.h"
#include "core/rng.h"
#include "io/safetensors.h"
#include "test.h"

#define VOCAB 50257
#define PER_LAYER 12

typedef struct tensor_list {
    cp_st_tensor *t;
    char (*names)[64];
    size_t n;
} tensor_list;

/* Adds a tensor of shape (rows, cols), or (rows) when cols is 0, filled with
 * value, or with uniform noise in [-0.02, 0.02] when value is NAN. */
static void add(tensor_list *l, cp_rng *rng, const char *name, int64_t rows, int64_t cols,
                float value)
{
    size_t n = (size_t)rows * (cols ? cols : 1);
    float *data = malloc(n * sizeof *data);
    if (!data)
        abort();
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

static void add_layer(tensor_list *l, cp_rng *rng, int i, int64_t C)
{
    const struct {
        const char *suffix;
        int64_t rows, cols;
        float value;
    } parts[PER_LAYER] = {
        {"ln_1.weight", C, 0, 1}, {"ln_1.bias", C, 0, 0},
        {"attn.c_attn.weight", C, 3 * C, NAN}, {"attn.c_attn.bias", 3 * C, 0, 0},
        {"attn.c_proj.weight", C, C, NAN}, {"attn.c_proj.bias", C, 0, 0},
        {"ln_2.weight", C, 0, 1}, {"ln_2.bias", C, 0, 0},
        {"mlp.c_fc.weight", C, 4 * C, NAN}, {"mlp.c_fc.bias", 4 * C, 0, 0},
        {"mlp.c_proj.weight", 4 * C, C, NAN}, {"mlp.c_proj.bias", C, 0, 0},
    };
    for (size_t p = 0; p < PER_LAYER; p++) {
        char name[64];
        snprintf(name, sizeof name, "h.%d.%s", i, parts[p].suffix);
        add(l, rng, name, parts[p].rows, parts[p].cols, parts[p].value);
    }
}

const char *test_write_random_gpt2(int hidden, int layers, int heads, int positions,
                                   uint64_t seed, char **weights_path)
{
    const char *dir = test_tmpdir();
    char config[512];
    int len = snprintf(config, sizeof config,
                       "{\"model_type\": \"gpt2\", \"n_embd\": %d, \"n_layer\": %d, "
                       "\"n_head\": %d, \"n_positions\": %d, \"vocab_size\": %d, "
                       "\"n_inner\": null, \"activation_function\": \"gelu_new\", "
                       "\"layer_norm_epsilon\": 1e-05}",
                       hidden, layers, heads, positions, VOCAB);
    free(test_write_file(dir, "config.json", config, (size_t)len));
    char *cmd = NULL;
    if (asprintf(&cmd, "cp '%s' '%s' '%s'", test_shared("tokenizers/gpt2/vocab.json"),
                 test_shared("tokenizers/gpt2/merges.txt"), dir) < 0 ||
        system(cmd) != 0)
        abort();
    free(cmd);

    size_t cap = 4 + (size_t)PER_LAYER * layers;
    tensor_list l = {calloc(cap, sizeof *l.t), calloc(cap, sizeof *l.names), 0};
    if (!l.t || !l.names)
        abort();
    cp_rng rng;
    cp_rng_seed(&rng, seed);
    add(&l, &rng, "wte.weight", VOCAB, hidden, NAN);
    add(&l, &rng, "wpe.weight", positions, hidden, NAN);
    for (int i = 0; i < layers; i++)
        add_layer(&l, &rng, i, hidden);
    add(&l, &rng, "ln_f.weight", hidden, 0, 1);
    add(&l, &rng, "ln_f.bias", hidden, 0, 0);
    char *path = cp_path_join(dir, "model.safetensors");
    cp_error err = {0};
    CHECK_MSG(cp_safetensors_write(path, l.t, l.n, NULL, 0, &err) == CP_OK, "%s", err.msg);
    for (size_t i = 0; i < l.n; i++)
        free((void *)l.t[i].data);
    free(l.t);
    free(l.names);
    if (weights_path)
        *weights_path = path;
    else
        free(path);
    return dir;
}
