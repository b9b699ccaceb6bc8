/* cpeft inspect: a model folder's config, tensors and parameter count. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/args.h"
#include "cli/commands.h"
#include "core/error.h"
#include "core/file.h"
#include "io/hf_config.h"
#include "io/safetensors.h"

static const char *rope_scaling_name(cp_rope_scaling s)
{
    switch (s) {
    case CP_ROPE_SCALING_LINEAR:
        return "linear";
    case CP_ROPE_SCALING_LLAMA3:
        return "llama3";
    case CP_ROPE_SCALING_NONE:
        break;
    }
    return "none";
}

static void print_config(const cp_model_config *c)
{
    printf("config:\n");
    printf("  model_type          %s\n", c->model_type);
    printf("  layers              %d\n", c->n_layers);
    printf("  hidden_size         %d\n", c->hidden_size);
    printf("  intermediate_size   %d\n", c->intermediate_size);
    printf("  attention heads     %d (key/value heads %d, head_dim %d)\n", c->n_heads,
           c->n_kv_heads, c->head_dim);
    printf("  vocab_size          %d\n", c->vocab_size);
    printf("  context length      %d\n", c->max_position_embeddings);
    printf("  rope                theta %g, scaling %s", c->rope_theta,
           rope_scaling_name(c->rope_scaling));
    if (c->rope_scaling != CP_ROPE_SCALING_NONE)
        printf(" (factor %g)", c->rope_factor);
    printf("\n  rms_norm_eps        %g\n", c->rms_norm_eps);
    printf("  tied embeddings     %s\n", c->tie_word_embeddings ? "yes" : "no");
    if (c->sliding_window > 0)
        printf("  sliding_window      %d\n", c->sliding_window);
}

static void print_tensors(const cp_safetensors *st)
{
    size_t n = cp_safetensors_count(st), params = 0, bytes = 0;
    printf("tensors: %zu\n", n);
    for (size_t i = 0; i < n; i++) {
        const cp_st_tensor *t = cp_safetensors_at(st, i);
        char shape[128];
        int len = snprintf(shape, sizeof shape, "[");
        for (int d = 0; d < t->ndim && len < (int)sizeof shape; d++)
            len += snprintf(shape + len, sizeof shape - (size_t)len, d ? ", %lld" : "%lld",
                            (long long)t->shape[d]);
        if (len < (int)sizeof shape)
            snprintf(shape + len, sizeof shape - (size_t)len, "]");
        printf("  %-56s %-5s %s\n", t->name, cp_dtype_name(t->dtype), shape);
        params += cp_st_tensor_numel(t);
        bytes += t->nbytes;
    }
    printf("parameters: %zu (%.2f M, %zu bytes stored)\n", params, params / 1e6, bytes);
}

static int run(const char *path)
{
    cp_error err = {0};
    cp_model_config cfg;
    cp_safetensors *st = NULL;
    cp_status status = CP_OK;

    if (cp_file_is_dir(path)) {
        char *config_path = cp_path_join(path, "config.json");
        if (!config_path)
            return cli_report(&(cp_error){CP_ERR_NOMEM, "out of memory"});
        if (cp_file_exists(config_path)) {
            status = cp_config_load(config_path, &cfg, &err);
            if (status == CP_OK) {
                printf("model: %s\n", path);
                print_config(&cfg);
            }
        }
        free(config_path);
    }
    if (status == CP_OK)
        status = cp_safetensors_open(path, &st, &err);
    if (status == CP_OK)
        print_tensors(st);
    cp_safetensors_close(st);
    return status == CP_OK ? 0 : cli_report(&err);
}

int cmd_inspect(int argc, char **argv)
{
    const char *path[1] = {NULL};
    int n_pos = 0;
    const cli_command cmd = {
        .name = "inspect",
        .usage = "PATH",
        .about = "Shows what PATH holds: for a Hugging Face model folder, its config;\n"
                 "for a folder or a .safetensors file, every tensor's name, dtype and\n"
                 "shape, and the parameter count.",
        .positional = path,
        .max_positional = 1,
    };
    int rc = cli_parse(&cmd, argc, argv, &n_pos);
    if (rc != CLI_PARSED)
        return rc == CLI_HELP_SHOWN ? 0 : 2;
    if (n_pos != 1)
        return cli_usage_error(&cmd, "expected one PATH");
    return run(path[0]);
}
