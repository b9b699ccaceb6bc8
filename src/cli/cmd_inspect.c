/* cpeft inspect: what a model folder, a run folder or a safetensors file contains. */
#include <cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/args.h"
#include "cli/commands.h"
#include "core/error.h"
#include "core/file.h"
#include "io/gguf.h"
#include "io/hf_config.h"
#include "io/safetensors.h"
#include "peft/method.h"

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

/* Sums the elements of every tensor in a safetensors file or folder. */
static size_t count_params(const cp_safetensors *st)
{
    size_t total = 0;
    for (size_t i = 0; i < cp_safetensors_count(st); i++)
        total += cp_st_tensor_numel(cp_safetensors_at(st, i));
    return total;
}

/* Prints the last step and evaluation recorded in a run's metrics.jsonl. */
static void print_metrics_summary(const char *dir)
{
    char *path = cp_path_join(dir, "metrics.jsonl"), *text = NULL;
    cp_error err = {0};
    if (!path || cp_file_read(path, &text, NULL, &err) != CP_OK) {
        free(path);
        return;
    }
    int last_step = -1;
    double last_eval = -1;
    for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n")) {
        cJSON *o = cJSON_Parse(line);
        const cJSON *step = cJSON_GetObjectItem(o, "step");
        const cJSON *eval = cJSON_GetObjectItem(o, "eval_loss");
        if (cJSON_IsNumber(step) && step->valueint > last_step)
            last_step = step->valueint;
        if (cJSON_IsNumber(eval))
            last_eval = eval->valuedouble;
        cJSON_Delete(o);
    }
    if (last_step >= 0)
        printf("  steps trained       %d\n", last_step);
    if (last_eval >= 0)
        printf("  last eval_loss      %.4f\n", last_eval);
    free(text);
    free(path);
}

/* Prints the informative settings of adapter_config.json: numbers, true
 * flags, non-empty strings, lists and objects. The method and the base
 * model have their own lines. */
static void print_settings(const cJSON *cfg)
{
    static const char *const own_line[] = {"peft_type", "cpeft_method",
                                           "base_model_name_or_path"};
    const cJSON *item;
    cJSON_ArrayForEach(item, cfg)
    {
        int skip = 0;
        for (size_t i = 0; i < sizeof own_line / sizeof *own_line; i++)
            skip |= strcmp(item->string, own_line[i]) == 0;
        int empty = cJSON_IsNull(item) || cJSON_IsFalse(item) ||
                    (cJSON_IsString(item) && !item->valuestring[0]) ||
                    ((cJSON_IsArray(item) || cJSON_IsObject(item)) && !item->child);
        if (skip || empty)
            continue;
        char *value = cJSON_PrintUnformatted(item);
        printf("  %-19s %s\n", item->string, value ? value : "?");
        free(value);
    }
}

/* Returns cpeft's name of the method that wrote a run, with PEFT's type
 * when there is one: "lora (PEFT LORA)". */
static const char *method_name(const cJSON *peft_type, const cJSON *cpeft_method)
{
    static char buf[128];
    if (cJSON_IsString(cpeft_method))
        return cpeft_method->valuestring;
    if (!cJSON_IsString(peft_type))
        return "unknown";
    const char *name = "not a cpeft method";
    for (int i = 0; i < cp_method_count(); i++) {
        const cp_method_ops *ops = cp_method_at(i);
        if (ops->peft_type && strcmp(ops->peft_type, peft_type->valuestring) == 0) {
            name = ops->name;
            break;
        }
    }
    snprintf(buf, sizeof buf, "%s (PEFT %s)", name, peft_type->valuestring);
    return buf;
}

/* Returns the element count of the base model at path (a folder or a
 * .safetensors or .gguf file), or 0 when it cannot be read. */
static size_t base_param_count(const char *path)
{
    cp_error err = {0};
    size_t total = 0;
    if (cp_file_is_gguf(path)) {
        cp_gguf *g = NULL;
        if (cp_gguf_open(path, &g, &err) != CP_OK)
            return 0;
        for (size_t i = 0; i < cp_gguf_tensor_count(g); i++)
            total += cp_gguf_tensor_at(g, i)->n_elements;
        cp_gguf_close(g);
        return total;
    }
    cp_safetensors *st = NULL;
    if (cp_safetensors_open(path, &st, &err) != CP_OK)
        return 0;
    total = count_params(st);
    cp_safetensors_close(st);
    return total;
}

/* A run folder: the method and its settings, the trainable parameters as a
 * share of the base model's, and what metrics.jsonl recorded. */
static cp_status inspect_run(const char *dir, const char *config_path, cp_error *err)
{
    char *text = NULL;
    cp_status st = cp_file_read(config_path, &text, NULL, err);
    if (st != CP_OK)
        return st;
    cJSON *cfg = cJSON_Parse(text);
    free(text);
    if (!cJSON_IsObject(cfg)) {
        cJSON_Delete(cfg);
        return cp_error_set(err, CP_ERR_INPUT, "%s: invalid JSON; expected a PEFT adapter config",
                            config_path);
    }
    const cJSON *type = cJSON_GetObjectItem(cfg, "peft_type");
    const cJSON *own = cJSON_GetObjectItem(cfg, "cpeft_method");
    const cJSON *base = cJSON_GetObjectItem(cfg, "base_model_name_or_path");
    if (!cJSON_IsString(base))
        base = cJSON_GetObjectItem(cfg, "model_name"); /* AdapterHub's key */
    printf("adapter: %s\n", dir);
    printf("  method              %s\n", method_name(type, own));
    print_settings(cfg);
    printf("  base model          %s\n", cJSON_IsString(base) ? base->valuestring : "unknown");

    /* PEFT's file name, or AdapterHub's for bottleneck adapters. */
    char *weights_path = cp_path_join(dir, "adapter_model.safetensors");
    if (weights_path && !cp_file_exists(weights_path)) {
        free(weights_path);
        weights_path = cp_path_join(dir, "adapter.safetensors");
    }
    cp_safetensors *adapter = NULL;
    st = weights_path ? cp_safetensors_open(weights_path, &adapter, err)
                      : cp_error_nomem(err, "a path", 0);
    if (st == CP_OK) {
        size_t trainable = count_params(adapter);
        size_t base_params = cJSON_IsString(base) ? base_param_count(base->valuestring) : 0;
        printf("  trainable params    %zu", trainable);
        if (base_params)
            printf(" (%.3f%% of the base's %zu)", 100.0 * trainable / base_params, base_params);
        printf("\n");
        print_metrics_summary(dir);
        print_tensors(adapter);
    }
    cp_safetensors_close(adapter);
    free(weights_path);
    cJSON_Delete(cfg);
    return st;
}

static const char *gguf_type_name(cp_gguf_type t)
{
    static const char *const names[] = {"uint8", "int8",   "uint16", "int16",  "uint32",
                                        "int32", "float32", "bool",   "string", "array",
                                        "uint64", "int64",  "float64"};
    return (unsigned)t < sizeof names / sizeof *names ? names[t] : "unknown";
}

/* One metadata value: scalars and strings in full (long strings cut), arrays
 * as their element type, length and first elements. */
static void print_gguf_value(const cp_gguf *g, const cp_gguf_kv *kv, const char *key)
{
    cp_error err = {0};
    cp_gguf_str str;
    uint32_t u32;
    int32_t i32;
    float f32;
    int b;
    cp_gguf_type type = cp_gguf_kv_type(kv);
    if (type == CP_GGUF_TYPE_STRING && cp_gguf_get_str(g, key, &str, &err) == CP_OK)
        printf("\"%.*s%s\"", (int)(str.len > 60 ? 60 : str.len), str.data, str.len > 60 ? "..." : "");
    else if (type == CP_GGUF_TYPE_UINT32 && cp_gguf_get_u32(g, key, &u32, &err) == CP_OK)
        printf("%u", u32);
    else if (type == CP_GGUF_TYPE_INT32 && cp_gguf_get_i32(g, key, &i32, &err) == CP_OK)
        printf("%d", i32);
    else if (type == CP_GGUF_TYPE_FLOAT32 && cp_gguf_get_f32(g, key, &f32, &err) == CP_OK)
        printf("%g", f32);
    else if (type == CP_GGUF_TYPE_BOOL && cp_gguf_get_bool(g, key, &b, &err) == CP_OK)
        printf("%s", b ? "true" : "false");
    else if (type == CP_GGUF_TYPE_ARRAY) {
        cp_gguf_type elem;
        uint64_t n;
        cp_gguf_array_info(kv, &elem, &n);
        printf("[%s x %llu]", gguf_type_name(elem), (unsigned long long)n);
        for (uint64_t i = 0; i < n && i < 3 && elem != CP_GGUF_TYPE_ARRAY; i++) {
            if (elem == CP_GGUF_TYPE_STRING) {
                cp_gguf_str e = cp_gguf_array_str(kv, i);
                printf(" \"%.*s\"", (int)(e.len > 20 ? 20 : e.len), e.data);
            } else {
                printf(" %g", cp_gguf_array_number(kv, i));
            }
        }
        if (n > 3 && elem != CP_GGUF_TYPE_ARRAY)
            printf(" ...");
    } else {
        printf("(%s)", gguf_type_name(type));
    }
}

/* A GGUF file: version, metadata and tensors. Loading models from GGUF is
 * not implemented yet, so this shows what a file contains. */
static int inspect_gguf(const char *path)
{
    cp_error err = {0};
    cp_gguf *g = NULL;
    if (cp_gguf_open(path, &g, &err) != CP_OK)
        return cli_report(&err);
    printf("gguf: %s (version %u, alignment %u)\n", path, cp_gguf_version(g),
           cp_gguf_alignment(g));
    printf("metadata: %zu\n", cp_gguf_kv_count(g));
    for (size_t i = 0; i < cp_gguf_kv_count(g); i++) {
        const cp_gguf_kv *kv = cp_gguf_kv_at(g, i);
        cp_gguf_str key = cp_gguf_kv_key(kv);
        char name[256];
        snprintf(name, sizeof name, "%.*s", (int)(key.len < 255 ? key.len : 255), key.data);
        printf("  %-44s ", name);
        print_gguf_value(g, kv, name);
        printf("\n");
    }
    uint64_t params = 0;
    printf("tensors: %zu\n", cp_gguf_tensor_count(g));
    for (size_t i = 0; i < cp_gguf_tensor_count(g); i++) {
        const cp_gguf_tensor *t = cp_gguf_tensor_at(g, i);
        printf("  %-40.*s %-5s [", (int)t->name.len, t->name.data, cp_ggml_type_name(t->type));
        for (int d = 0; d < t->n_dims; d++)
            printf(d ? ", %llu" : "%llu", (unsigned long long)t->dims[d]);
        printf("]\n");
        params += t->n_elements;
    }
    printf("parameters: %llu\n", (unsigned long long)params);
    cp_gguf_close(g);
    return 0;
}

static int run(const char *path)
{
    size_t len = strlen(path);
    if ((len > 5 && strcmp(path + len - 5, ".gguf") == 0) || cp_file_is_gguf(path))
        return inspect_gguf(path);

    cp_error err = {0};
    if (cp_file_exists(path) && !cp_file_is_dir(path) &&
        !(len > 12 && strcmp(path + len - 12, ".safetensors") == 0)) {
        cp_error_set(&err, CP_ERR_INPUT,
                     "%s: not a model folder, run folder, .safetensors or .gguf file; pass one "
                     "of those",
                     path);
        return cli_report(&err);
    }
    cp_model_config cfg;
    cp_safetensors *st = NULL;
    cp_status status = CP_OK;

    if (cp_file_is_dir(path)) {
        char *adapter_config = cp_path_join(path, "adapter_config.json");
        int is_run = adapter_config && cp_file_exists(adapter_config);
        if (is_run)
            status = inspect_run(path, adapter_config, &err);
        free(adapter_config);
        if (is_run)
            return status == CP_OK ? 0 : cli_report(&err);
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
        .about = "Shows what PATH contains: for a Hugging Face model folder, its config;\n"
                 "for a run folder, the adapter's method and settings and its trainable\n"
                 "parameters as a share of the base model; for a folder or a .safetensors\n"
                 "file, every tensor's name, dtype and shape, and the parameter count; for a\n"
                 ".gguf file, its metadata and tensors (dims innermost first, as ggml lists them).",
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
