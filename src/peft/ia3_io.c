/*
 * IA3 adapters in PEFT's layout: adapter_config.json with peft_type "IA3",
 * target_modules and feedforward_modules, and adapter_model.safetensors
 * with one ia3_l tensor per adapted projection, (out, 1) or (1, in) for a
 * feed-forward module.
 *
 * Loading accepts what PEFT writes: null target_modules or
 * feedforward_modules mean the architecture's defaults, and module names
 * may carry their parent ("mlp.c_proj"). Regex strings and exclude_modules
 * are rejected by name. modules_to_save copies are left to
 * peft/modules_to_save.c.
 */
#include <cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/file.h"
#include "io/json_file.h"
#include "io/safetensors.h"
#include "peft/ia3.h"
#include "peft/modules_to_save.h"

void cp_ia3_tensor_name(const cp_model_config *cfg, char *buf, size_t size, int layer, cp_proj p)
{
    const char *layers = cfg->conv1d ? "transformer.h" : "model.layers";
    snprintf(buf, size, "base_model.model.%s.%d.%s.ia3_l", layers, layer, cp_proj_path(cfg, p));
}

/* The name written to target_modules: PEFT's short name, but GPT-2's two
 * c_proj modules by their path, so that feedforward_modules ("mlp.c_proj")
 * stays a subset of target_modules as PEFT requires. */
static const char *module_key(const cp_model_config *cfg, cp_proj p)
{
    if (cfg->conv1d && (p == CP_PROJ_O || p == CP_PROJ_DOWN))
        return cp_proj_path(cfg, p);
    return cp_proj_name(cfg, p);
}

static cJSON *module_list(const cp_model_config *cfg, unsigned mask)
{
    cJSON *list = cJSON_CreateArray();
    for (int p = 0; list && p < CP_PROJ_COUNT; p++)
        if (mask & (1u << p))
            cJSON_AddItemToArray(list, cJSON_CreateString(module_key(cfg, (cp_proj)p)));
    return list;
}

static cJSON *build_config(const cp_ia3 *ia3, const char *base_model)
{
    cJSON *root = cJSON_CreateObject();
    if (!root)
        return NULL;
    cJSON_AddNullToObject(root, "auto_mapping");
    cJSON_AddStringToObject(root, "base_model_name_or_path", base_model);
    cJSON_AddNullToObject(root, "exclude_modules");
    /* PEFT sets fan_in_fan_out for GPT-2, whose Conv1D weights are (in, out). */
    cJSON_AddBoolToObject(root, "fan_in_fan_out", ia3->cfg.conv1d);
    cJSON_AddItemToObject(root, "feedforward_modules", module_list(&ia3->cfg, ia3->feedforward));
    cJSON_AddBoolToObject(root, "inference_mode", 1);
    cJSON_AddBoolToObject(root, "init_ia3_weights", 1);
    cJSON_AddNullToObject(root, "modules_to_save");
    cJSON_AddStringToObject(root, "peft_type", "IA3");
    cJSON_AddNullToObject(root, "revision");
    cJSON_AddItemToObject(root, "target_modules", module_list(&ia3->cfg, ia3->targets));
    cJSON_AddStringToObject(root, "task_type", "CAUSAL_LM");
    return root;
}

static cp_status write_config(const cp_ia3 *ia3, const char *path, const char *base_model,
                              cp_error *err)
{
    cJSON *config = build_config(ia3, base_model);
    cp_status st = cp_json_write_atomic(path, config, err);
    cJSON_Delete(config);
    return st;
}

cp_status cp_ia3_save(const cp_ia3 *ia3, const char *dir, const char *base_model, cp_error *err)
{
    size_t cap = (size_t)ia3->n_layers * CP_PROJ_COUNT, n = 0;
    cp_st_tensor *tensors = calloc(cap, sizeof *tensors);
    char (*names)[160] = calloc(cap, sizeof *names);
    char *weights_path = cp_path_join(dir, "adapter_model.safetensors");
    char *config_path = cp_path_join(dir, "adapter_config.json");
    cp_status st = CP_OK;
    if (!tensors || !names || !weights_path || !config_path)
        st = cp_error_nomem(err, "the adapter file", cap * sizeof *names);

    for (int l = 0; st == CP_OK && l < ia3->n_layers; l++) {
        for (int p = 0; p < CP_PROJ_COUNT; p++) {
            int len;
            const float *v = cp_ia3_vector(ia3, l, (cp_proj)p, &len);
            if (!v)
                continue;
            int ff = (ia3->feedforward >> p) & 1;
            cp_ia3_tensor_name(&ia3->cfg, names[n], sizeof names[n], l, (cp_proj)p);
            tensors[n] = (cp_st_tensor){
                .name = names[n], .dtype = CP_DTYPE_F32, .ndim = 2,
                .shape = {ff ? 1 : len, ff ? len : 1},
                .data = v, .nbytes = (size_t)len * sizeof(float),
            };
            n++;
        }
    }
    const cp_st_metadata meta[] = {{"format", "pt"}};
    if (st == CP_OK)
        st = cp_safetensors_write(weights_path, tensors, n, meta, 1, err);
    if (st == CP_OK)
        st = write_config(ia3, config_path, base_model, err);
    free(weights_path);
    free(config_path);
    free(names);
    free(tensors);
    return st;
}

/* ---- Loading ---- */

/* Matches one module name as PEFT does (the whole in-layer path, or its
 * last components after a dot) against the architecture's projections. */
static unsigned match_module(const cp_model_config *cfg, const char *name)
{
    unsigned mask = 0;
    size_t n = strlen(name);
    for (int p = 0; p < CP_PROJ_COUNT; p++) {
        if (!cp_proj_exists(cfg, (cp_proj)p))
            continue;
        const char *path = cp_proj_path(cfg, (cp_proj)p);
        size_t len = strlen(path);
        if (strcmp(path, name) == 0 ||
            (len > n && path[len - n - 1] == '.' && strcmp(path + len - n, name) == 0))
            mask |= 1u << p;
    }
    return mask;
}

/* Fills *mask from target_modules or feedforward_modules: null keeps
 * fallback, a list names modules, a string is a comma list or all-linear. */
static cp_status parse_modules(const cp_model_config *cfg, const cJSON *root, const char *key,
                               unsigned fallback, unsigned *mask, const char *path, cp_error *err)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(root, key);
    *mask = fallback;
    if (!item || cJSON_IsNull(item))
        return CP_OK;
    if (cJSON_IsString(item)) {
        cp_status st = cp_proj_parse_list(cfg, item->valuestring, mask, err);
        return st ? cp_error_prefix(err, "%s: %s (cpeft reads a string as module names, not as "
                                         "a regular expression)",
                                    path, key)
                  : CP_OK;
    }
    if (!cJSON_IsArray(item))
        return cp_error_set(err, CP_ERR_INPUT, "%s: %s must be null or a list of module names",
                            path, key);
    *mask = 0;
    const cJSON *el;
    cJSON_ArrayForEach(el, item)
    {
        unsigned matched = cJSON_IsString(el) ? match_module(cfg, el->valuestring) : 0;
        if (!matched)
            return cp_error_set(err, CP_ERR_INPUT,
                                "%s: %s lists %s, which is not a projection of model_type %s; "
                                "the adapter was made for another architecture",
                                path, key, cJSON_IsString(el) ? el->valuestring : "a non-string",
                                cfg->model_type);
        *mask |= matched;
    }
    return CP_OK;
}

/* Rejects a key whose value would change what the adapter computes. */
static cp_status reject_if_set(const cJSON *root, const char *key, const char *path,
                               cp_error *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!v || cJSON_IsNull(v) || ((cJSON_IsArray(v) || cJSON_IsObject(v)) && !cJSON_GetArraySize(v)))
        return CP_OK;
    return cp_error_set(err, CP_ERR_INPUT, "%s: \"%s\" is set, which cpeft does not support for IA3",
                        path, key);
}

static cp_status parse_config(const cp_model_config *cfg, const char *text, const char *path,
                              unsigned *targets, unsigned *feedforward, cp_error *err)
{
    cJSON *root = cJSON_Parse(text);
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return cp_error_set(err, CP_ERR_INPUT, "%s: invalid JSON; expected a PEFT adapter_config.json",
                            path);
    }
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(root, "peft_type");
    const cJSON *task = cJSON_GetObjectItemCaseSensitive(root, "task_type");
    cp_status st = CP_OK;
    if (!cJSON_IsString(type) || strcmp(type->valuestring, "IA3") != 0)
        st = cp_error_set(err, CP_ERR_INPUT, "%s: peft_type must be \"IA3\", found %s", path,
                          cJSON_IsString(type) ? type->valuestring : "none");
    else if (task && !cJSON_IsNull(task) &&
             (!cJSON_IsString(task) || strcmp(task->valuestring, "CAUSAL_LM") != 0))
        st = cp_error_set(err, CP_ERR_INPUT,
                          "%s: task_type %s is not supported; cpeft applies CAUSAL_LM IA3 adapters",
                          path, cJSON_IsString(task) ? task->valuestring : "(not a string)");
    if (st == CP_OK)
        st = reject_if_set(root, "exclude_modules", path, err);
    if (st == CP_OK)
        st = cp_modules_to_save_check_config(root, path, err);
    /* fan_in_fan_out is not checked: PEFT corrects it to the module type with a warning. */
    if (st == CP_OK)
        st = parse_modules(cfg, root, "target_modules", cp_ia3_default_targets(cfg), targets, path,
                           err);
    if (st == CP_OK)
        st = parse_modules(cfg, root, "feedforward_modules",
                           cp_ia3_default_feedforward(cfg) & *targets, feedforward, path, err);
    if (st == CP_OK && *feedforward & ~*targets)
        st = cp_error_set(err, CP_ERR_INPUT,
                          "%s: feedforward_modules must be a subset of target_modules", path);
    cJSON_Delete(root);
    return st;
}

/* Copies one stored vector into dst after checking its shape. */
static cp_status load_vector(const cp_safetensors *file, const char *name, int64_t rows,
                             int64_t cols, float *dst, const char *path, cp_error *err)
{
    const cp_st_tensor *t = cp_safetensors_find(file, name);
    if (!t)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: missing tensor \"%s\" that adapter_config.json implies", path, name);
    if (t->ndim != 2 || t->shape[0] != rows || t->shape[1] != cols)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: tensor \"%s\" has shape [%lld, %lld], expected [%lld, %lld]; the "
                            "adapter was made for another model or feedforward_modules",
                            path, name, (long long)t->shape[0],
                            (long long)(t->ndim > 1 ? t->shape[1] : 0), (long long)rows,
                            (long long)cols);
    size_t n = (size_t)(rows * cols), esize = cp_dtype_size(t->dtype);
    for (size_t i = 0; i < n; i++) {
        uint32_t raw = 0;
        memcpy(&raw, (const uint8_t *)t->data + i * esize, esize);
        cp_dtype_to_f32(t->dtype, &raw, dst + i, 1);
    }
    return CP_OK;
}

static cp_status load_vectors(cp_ia3 *ia3, const cp_safetensors *file, const char *path,
                              cp_error *err)
{
    char name[160];
    /* modules_to_save copies are read by cp_modules_to_save_load. */
    size_t claimed = cp_modules_to_save_count(file);
    cp_status st = CP_OK;
    for (int l = 0; st == CP_OK && l < ia3->n_layers; l++) {
        for (int p = 0; st == CP_OK && p < CP_PROJ_COUNT; p++) {
            int len;
            float *v = cp_ia3_vector(ia3, l, (cp_proj)p, &len);
            if (!v)
                continue;
            int ff = (ia3->feedforward >> p) & 1;
            cp_ia3_tensor_name(&ia3->cfg, name, sizeof name, l, (cp_proj)p);
            st = load_vector(file, name, ff ? 1 : len, ff ? len : 1, v, path, err);
            claimed++;
        }
    }
    if (st == CP_OK && claimed != cp_safetensors_count(file))
        st = cp_error_set(err, CP_ERR_INPUT,
                          "%s: holds %zu tensors but adapter_config.json's target_modules imply "
                          "%zu; the config and the weights disagree",
                          path, cp_safetensors_count(file), claimed);
    return st;
}

cp_status cp_ia3_load(cp_ia3 *ia3, const char *dir, const cp_model_config *cfg, cp_error *err)
{
    memset(ia3, 0, sizeof *ia3);
    char *config_path = cp_path_join(dir, "adapter_config.json");
    char *weights_path = cp_path_join(dir, "adapter_model.safetensors");
    char *text = NULL;
    unsigned targets = 0, feedforward = 0;
    cp_safetensors *file = NULL;
    cp_status st = config_path && weights_path ? CP_OK : cp_error_nomem(err, "a path", 0);
    if (st == CP_OK)
        st = cp_file_read(config_path, &text, NULL, err);
    if (st == CP_OK)
        st = parse_config(cfg, text, config_path, &targets, &feedforward, err);
    if (st == CP_OK)
        st = cp_ia3_init(ia3, cfg, targets, feedforward, err);
    if (st == CP_OK && (st = cp_safetensors_open(weights_path, &file, err)) == CP_OK)
        st = load_vectors(ia3, file, weights_path, err);
    if (st != CP_OK)
        cp_ia3_free(ia3);
    cp_safetensors_close(file);
    free(text);
    free(config_path);
    free(weights_path);
    return st;
}
