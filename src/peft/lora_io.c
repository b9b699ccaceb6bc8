/* LoRA adapters in PEFT's adapter_config.json + adapter_model.safetensors. */
#include "peft/lora_io.h"

#include <cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/file.h"
#include "io/json_file.h"
#include "io/safetensors.h"
#include "peft/modules_to_save.h"
#include "tasks/seq_cls.h"

void cp_lora_tensor_name(const cp_model_config *cfg, char *buf, size_t size, int layer,
                         cp_proj p, char which)
{
    const char *layers = cfg->conv1d ? "transformer.h" : "model.layers";
    if (which == 'M')
        snprintf(buf, size, "base_model.model.%s.%d.%s.lora_magnitude_vector", layers, layer,
                 cp_proj_path(cfg, p));
    else
        snprintf(buf, size, "base_model.model.%s.%d.%s.lora_%c.weight", layers, layer,
                 cp_proj_path(cfg, p), which);
}

/* The double nearest the float's shortest decimal form, so that 0.05f is
 * written as 0.05 and not 0.05000000074505806. */
static double shortest(float f)
{
    char buf[32];
    snprintf(buf, sizeof buf, "%.9g", f);
    for (int digits = 1; digits <= 9; digits++) {
        snprintf(buf, sizeof buf, "%.*g", digits, f);
        if (strtof(buf, NULL) == f)
            break;
    }
    return strtod(buf, NULL);
}

/* The config keys PEFT has written for a long time, so that old and new
 * PEFT versions both load the file. */
static cJSON *build_config(const cp_lora *lora, const char *base_model)
{
    const cp_lora_params *p = &lora->params;
    cJSON *root = cJSON_CreateObject(), *targets = cJSON_CreateArray();
    if (!root || !targets) {
        cJSON_Delete(root);
        cJSON_Delete(targets);
        return NULL;
    }
    /* GPT-2's two c_proj modules share one name, listed once. */
    for (int i = 0; i < CP_PROJ_COUNT; i++) {
        if (!(p->targets & (1u << i)))
            continue;
        const char *name = cp_proj_name(&lora->cfg, (cp_proj)i);
        int listed = 0;
        for (int j = 0; j < i; j++)
            if (p->targets & (1u << j))
                listed |= strcmp(cp_proj_name(&lora->cfg, (cp_proj)j), name) == 0;
        if (!listed)
            cJSON_AddItemToArray(targets, cJSON_CreateString(name));
    }

    cJSON_AddStringToObject(root, "base_model_name_or_path", base_model);
    cJSON_AddStringToObject(root, "bias", "none");
    /* PEFT sets fan_in_fan_out for GPT-2, whose Conv1D weights are (in, out). */
    cJSON_AddBoolToObject(root, "fan_in_fan_out", lora->cfg.conv1d);
    cJSON_AddBoolToObject(root, "inference_mode", 1);
    cJSON_AddBoolToObject(root, "init_lora_weights", 1);
    cJSON_AddNullToObject(root, "layers_pattern");
    cJSON_AddNullToObject(root, "layers_to_transform");
    cJSON_AddNumberToObject(root, "lora_alpha", shortest(p->alpha));
    cJSON_AddNumberToObject(root, "lora_dropout", shortest(p->dropout));
    cJSON_AddNullToObject(root, "modules_to_save");
    cJSON_AddStringToObject(root, "peft_type", "LORA");
    cJSON_AddNumberToObject(root, "r", p->r);
    cJSON_AddNullToObject(root, "revision");
    cJSON_AddItemToObject(root, "target_modules", targets);
    cJSON_AddStringToObject(root, "task_type", "CAUSAL_LM");
    cJSON_AddBoolToObject(root, "use_dora", p->use_dora);
    cJSON_AddBoolToObject(root, "use_rslora", p->use_rslora);
    return root;
}

cp_status cp_lora_save(const cp_lora *lora, const char *dir, const char *base_model,
                       cp_error *err)
{
    /* Tensors: every slot's A, B (and DoRA magnitude, 1-D) in float32, named
     * as PEFT names them. */
    size_t n = 0, cap = (size_t)lora->n_layers * CP_PROJ_COUNT * 3;
    cp_st_tensor *tensors = calloc(cap ? cap : 1, sizeof *tensors);
    char (*names)[128] = calloc(cap ? cap : 1, sizeof *names);
    cp_status st = CP_OK;
    if (!tensors || !names)
        st = cp_error_nomem(err, "the adapter file", cap * 128);
    for (int l = 0; st == CP_OK && l < lora->n_layers; l++) {
        for (int p = 0; p < CP_PROJ_COUNT; p++) {
            const cp_lora_slot *s = cp_lora_slot_at(lora, l, (cp_proj)p);
            if (!s->A)
                continue;
            for (int which = 0; which < 2; which++, n++) {
                cp_lora_tensor_name(&lora->cfg, names[n], sizeof names[n], l, (cp_proj)p,
                                    "AB"[which]);
                cp_st_tensor *t = &tensors[n];
                t->name = names[n];
                t->dtype = CP_DTYPE_F32;
                t->ndim = 2;
                t->shape[0] = which ? s->out : lora->params.r;
                t->shape[1] = which ? lora->params.r : s->in;
                t->data = which ? s->B : s->A;
                t->nbytes = (size_t)t->shape[0] * t->shape[1] * sizeof(float);
            }
            if (!s->magnitude)
                continue;
            cp_lora_tensor_name(&lora->cfg, names[n], sizeof names[n], l, (cp_proj)p, 'M');
            tensors[n] = (cp_st_tensor){.name = names[n], .dtype = CP_DTYPE_F32, .ndim = 1,
                                        .shape = {s->out}, .data = s->magnitude,
                                        .nbytes = (size_t)s->out * sizeof(float)};
            n++;
        }
    }

    char *weights_path = cp_path_join(dir, "adapter_model.safetensors");
    char *config_path = cp_path_join(dir, "adapter_config.json");
    if (st == CP_OK && (!weights_path || !config_path))
        st = cp_error_nomem(err, "a path", 0);
    const cp_st_metadata meta[] = {{"format", "pt"}};
    if (st == CP_OK)
        st = cp_safetensors_write(weights_path, tensors, n, meta, 1, err);

    cJSON *config = st == CP_OK ? build_config(lora, base_model) : NULL;
    if (st == CP_OK)
        st = cp_json_write_atomic(config_path, config, err);
    cJSON_Delete(config);
    free(weights_path);
    free(config_path);
    free(names);
    free(tensors);
    return st;
}

/* Rejects a config key whose value changes the math in a way cpeft does not
 * implement. "Empty" means null, false, "none", {} or []. */
static cp_status reject_if_set(const cJSON *root, const char *key, const char *path,
                               cp_error *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, key);
    int empty = !v || cJSON_IsNull(v) || cJSON_IsFalse(v) ||
                (cJSON_IsString(v) && strcmp(v->valuestring, "none") == 0) ||
                ((cJSON_IsObject(v) || cJSON_IsArray(v)) && cJSON_GetArraySize(v) == 0);
    if (empty)
        return CP_OK;
    return cp_error_set(err, CP_ERR_INPUT, "%s: \"%s\" is set, which cpeft does not support yet",
                        path, key);
}

static cp_status parse_targets(const cp_model_config *cfg, const cJSON *item, unsigned *mask,
                               const char *path, cp_error *err)
{
    cp_status st;
    if (!item || cJSON_IsNull(item)) {
        /* PEFT's default for the architecture (its LoRA target module
         * mapping): c_attn for GPT-2, q_proj and v_proj for the others. */
        *mask = cfg->fused_qkv ? 1u << CP_PROJ_QKV : (1u << CP_PROJ_Q) | (1u << CP_PROJ_V);
        return CP_OK;
    }
    if (cJSON_IsString(item)) {
        st = cp_proj_parse_list(cfg, item->valuestring, mask, err);
        return st ? cp_error_prefix(err, "%s: target_modules", path) : CP_OK;
    }
    if (!cJSON_IsArray(item) || cJSON_GetArraySize(item) == 0)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: target_modules must be a non-empty list of module names", path);
    *mask = 0;
    const cJSON *el;
    cJSON_ArrayForEach(el, item)
    {
        unsigned one = 0;
        if (!cJSON_IsString(el))
            return cp_error_set(err, CP_ERR_INPUT, "%s: target_modules must list strings", path);
        if ((st = cp_proj_parse_list(cfg, el->valuestring, &one, err)))
            return cp_error_prefix(err, "%s: target_modules", path);
        *mask |= one;
    }
    return CP_OK;
}

/* Accepts modules_to_save as a list of module names. A SEQ_CLS adapter's
 * classification head (PEFT adds "score" or "classifier" itself) is read by
 * src/tasks/seq_cls_io.c, and other adapters may not list one. The copies of
 * other modules are read by peft/modules_to_save.c, which checks them
 * against the model. */
static cp_status check_modules_to_save(const cJSON *root, int seq_cls, const char *path,
                                       cp_error *err)
{
    const cJSON *modules = cJSON_GetObjectItemCaseSensitive(root, "modules_to_save");
    if (!cJSON_IsArray(modules))
        return reject_if_set(root, "modules_to_save", path, err);
    const cJSON *el;
    cJSON_ArrayForEach(el, modules)
    {
        if (!cJSON_IsString(el))
            return cp_error_set(err, CP_ERR_INPUT,
                                "%s: modules_to_save must list module names (strings); fix "
                                "adapter_config.json",
                                path);
        /* A classification head belongs to SEQ_CLS adapters only. */
        if (!seq_cls && cp_seq_cls_is_head_module(el->valuestring))
            return reject_if_set(root, "modules_to_save", path, err);
    }
    return CP_OK;
}

/* Fills p from adapter_config.json's text, and *seq_cls with 1 for
 * task_type SEQ_CLS. */
static cp_status parse_config(const cp_model_config *cfg, const char *text, const char *path,
                              cp_lora_params *p, int *seq_cls, cp_error *err)
{
    cJSON *root = cJSON_Parse(text);
    if (!cJSON_IsObject(root)) {
        const char *where = root ? text : cJSON_GetErrorPtr();
        cJSON_Delete(root);
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: byte %ld: invalid JSON; expected a PEFT adapter_config.json", path,
                            where ? (long)(where - text) : 0L);
    }
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(root, "peft_type");
    const cJSON *r = cJSON_GetObjectItemCaseSensitive(root, "r");
    const cJSON *alpha = cJSON_GetObjectItemCaseSensitive(root, "lora_alpha");
    const cJSON *dropout = cJSON_GetObjectItemCaseSensitive(root, "lora_dropout");
    const cJSON *task = cJSON_GetObjectItemCaseSensitive(root, "task_type");
    cp_status st = CP_OK;

    if (!cJSON_IsString(type) || strcmp(type->valuestring, "LORA") != 0)
        st = cp_error_set(err, CP_ERR_INPUT, "%s: peft_type must be \"LORA\", found %s", path,
                          cJSON_IsString(type) ? type->valuestring : "none");
    else if (!cJSON_IsNumber(r) || r->valuedouble != floor(r->valuedouble) || r->valueint <= 0)
        st = cp_error_set(err, CP_ERR_INPUT, "%s: missing or invalid \"r\" (a positive integer)",
                          path);
    else if (!cJSON_IsNumber(alpha) || !(alpha->valuedouble > 0))
        st = cp_error_set(err, CP_ERR_INPUT, "%s: missing or invalid \"lora_alpha\"", path);
    else if (task && !cJSON_IsNull(task) &&
             (!cJSON_IsString(task) || (strcmp(task->valuestring, "CAUSAL_LM") != 0 &&
                                        strcmp(task->valuestring, "SEQ_CLS") != 0)))
        st = cp_error_set(err, CP_ERR_INPUT,
                          "%s: task_type %s is not supported; cpeft applies CAUSAL_LM and "
                          "SEQ_CLS adapters",
                          path, cJSON_IsString(task) ? task->valuestring : "(not a string)");
    *seq_cls = cJSON_IsString(task) && strcmp(task->valuestring, "SEQ_CLS") == 0;
    static const char *const unsupported[] = {"layers_to_transform", "rank_pattern",
                                              "alpha_pattern", "layer_replication", "lora_bias"};
    for (size_t i = 0; st == CP_OK && i < sizeof unsupported / sizeof *unsupported; i++)
        st = reject_if_set(root, unsupported[i], path, err);
    if (st == CP_OK)
        st = check_modules_to_save(root, *seq_cls, path, err);
    if (st == CP_OK)
        st = reject_if_set(root, "bias", path, err);
    const cJSON *fan = cJSON_GetObjectItemCaseSensitive(root, "fan_in_fan_out");
    if (st == CP_OK && cJSON_IsTrue(fan) != cfg->conv1d)
        st = cp_error_set(err, CP_ERR_INPUT,
                          "%s: fan_in_fan_out is %s but the base model (%s) stores its weights "
                          "%s; the adapter was made for another architecture",
                          path, cJSON_IsTrue(fan) ? "true" : "false", cfg->model_type,
                          cfg->conv1d ? "(in, out)" : "(out, in)");
    if (st == CP_OK)
        st = parse_targets(cfg, cJSON_GetObjectItemCaseSensitive(root, "target_modules"),
                           &p->targets, path, err);
    if (st == CP_OK) {
        p->r = r->valueint;
        p->alpha = (float)alpha->valuedouble;
        p->dropout = cJSON_IsNumber(dropout) ? (float)dropout->valuedouble : 0.0f;
        p->use_rslora = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(root, "use_rslora"));
        p->use_dora = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(root, "use_dora"));
    }
    cJSON_Delete(root);
    return st;
}

/* Writes a shape as "[8, 64]" or "[64]". */
static void format_shape(char *buf, size_t size, int ndim, const int64_t *shape)
{
    size_t used = (size_t)snprintf(buf, size, "[");
    for (int i = 0; i < ndim && used < size; i++)
        used += (size_t)snprintf(buf + used, size - used, "%s%lld", i ? ", " : "",
                                 (long long)shape[i]);
    if (used < size)
        snprintf(buf + used, size - used, "]");
}

/* Copies one stored tensor of shape (rows, cols), or (rows) when cols is 0,
 * into dst after checking its shape. */
static cp_status load_tensor(const cp_safetensors *st_file, const char *name, int64_t rows,
                             int64_t cols, float *dst, const char *path, cp_error *err)
{
    const cp_st_tensor *t = cp_safetensors_find(st_file, name);
    if (!t)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: missing tensor \"%s\" that adapter_config.json implies", path,
                            name);
    int ndim = cols ? 2 : 1;
    int64_t want[2] = {rows, cols};
    if (t->ndim != ndim || t->shape[0] != rows || (cols && t->shape[1] != cols)) {
        char found[96], expected[64];
        format_shape(found, sizeof found, t->ndim, t->shape);
        format_shape(expected, sizeof expected, ndim, want);
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: tensor \"%s\" has shape %s, expected %s for this base model and "
                            "r; the adapter was made for another model",
                            path, name, found, expected);
    }
    size_t n = (size_t)rows * (cols ? cols : 1), esize = cp_dtype_size(t->dtype);
    for (size_t i = 0; i < n; i++) {
        uint32_t raw = 0;
        memcpy(&raw, (const uint8_t *)t->data + i * esize, esize);
        cp_dtype_to_f32(t->dtype, &raw, dst + i, 1);
    }
    return CP_OK;
}

/* Writes the stored name of a slot's DoRA magnitude into name. PEFT writes
 * "...lora_magnitude_vector", and "...lora_magnitude_vector.weight", the
 * name inside PEFT's modules, is accepted too. Rejects a file with both. */
static cp_status find_magnitude_name(const cp_lora *lora, const cp_safetensors *file,
                                     int layer, cp_proj p, char *name, size_t size,
                                     const char *path, cp_error *err)
{
    cp_lora_tensor_name(&lora->cfg, name, size, layer, p, 'M');
    int plain = cp_safetensors_find(file, name) != NULL;
    size_t len = strlen(name);
    snprintf(name + len, size - len, ".weight");
    int suffixed = cp_safetensors_find(file, name) != NULL;
    if (plain && suffixed)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: the DoRA magnitude \"%s\" is stored twice, with and without "
                            "\".weight\"; keep one of the two tensors",
                            path, name);
    if (!suffixed)
        name[len] = '\0';
    return CP_OK;
}

/* Returns 1 if found names the A, B or magnitude of a slot this adapter has. */
static int is_slot_tensor(const cp_lora *lora, const char *found)
{
    char name[176];
    for (int l = 0; l < lora->n_layers; l++) {
        for (int p = 0; p < CP_PROJ_COUNT; p++) {
            const cp_lora_slot *s = cp_lora_slot_at(lora, l, (cp_proj)p);
            if (!s->A)
                continue;
            for (int w = 0; w < (s->magnitude ? 3 : 2); w++) {
                cp_lora_tensor_name(&lora->cfg, name, sizeof name, l, (cp_proj)p, "ABM"[w]);
                size_t len = strlen(name);
                if (strncmp(name, found, len) == 0 &&
                    (found[len] == '\0' || (w == 2 && strcmp(found + len, ".weight") == 0)))
                    return 1;
            }
        }
    }
    return 0;
}

/* Fills every slot from the file and rejects tensors no slot claims. The
 * classification head of a SEQ_CLS adapter is left to cp_seq_cls_load. */
static cp_status load_tensors(cp_lora *lora, const cp_safetensors *file, int seq_cls,
                              const char *path, cp_error *err)
{
    char name[176];
    size_t claimed = 0;
    for (size_t i = 0; seq_cls && i < cp_safetensors_count(file); i++)
        claimed += cp_seq_cls_is_head_tensor(cp_safetensors_at(file, i)->name);
    /* modules_to_save copies are read by cp_modules_to_save_load. */
    for (size_t i = 0; i < cp_safetensors_count(file); i++)
        claimed += cp_modules_to_save_is_tensor(cp_safetensors_at(file, i)->name);
    cp_status st = CP_OK;
    for (int l = 0; st == CP_OK && l < lora->n_layers; l++) {
        for (int p = 0; st == CP_OK && p < CP_PROJ_COUNT; p++) {
            cp_lora_slot *s = cp_lora_slot_at(lora, l, (cp_proj)p);
            if (!s->A)
                continue;
            cp_lora_tensor_name(&lora->cfg, name, sizeof name, l, (cp_proj)p, 'A');
            st = load_tensor(file, name, lora->params.r, s->in, s->A, path, err);
            cp_lora_tensor_name(&lora->cfg, name, sizeof name, l, (cp_proj)p, 'B');
            if (st == CP_OK)
                st = load_tensor(file, name, s->out, lora->params.r, s->B, path, err);
            claimed += 2;
            if (st != CP_OK || !s->magnitude)
                continue;
            st = find_magnitude_name(lora, file, l, (cp_proj)p, name, sizeof name, path, err);
            if (st == CP_OK)
                st = load_tensor(file, name, s->out, 0, s->magnitude, path, err);
            claimed++;
        }
    }
    if (st == CP_OK && claimed != cp_safetensors_count(file)) {
        /* Name the first tensor that belongs to no slot. */
        for (size_t i = 0; i < cp_safetensors_count(file); i++) {
            const char *found = cp_safetensors_at(file, i)->name;
            if (!(seq_cls && cp_seq_cls_is_head_tensor(found)) && !is_slot_tensor(lora, found) &&
                !cp_modules_to_save_is_tensor(found))
                return cp_error_set(err, CP_ERR_INPUT,
                                    "%s: unexpected tensor \"%s\"; the adapter does not match "
                                    "this base model or its adapter_config.json",
                                    path, found);
        }
        /* Every name is known, so some tensor was counted for two roles. */
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: %zu tensors found for %zu expected; a tensor matches two roles "
                            "(adapter, head or modules_to_save copy), so rename or drop it",
                            path, cp_safetensors_count(file), claimed);
    }
    return st;
}

cp_status cp_lora_load(cp_lora *lora, const char *dir, const cp_model_config *cfg,
                       cp_error *err)
{
    memset(lora, 0, sizeof *lora);
    char *config_path = cp_path_join(dir, "adapter_config.json");
    char *weights_path = cp_path_join(dir, "adapter_model.safetensors");
    char *text = NULL;
    cp_safetensors *file = NULL;
    cp_lora_params p = cp_lora_default_params();
    int seq_cls = 0;
    cp_status st = config_path && weights_path ? CP_OK : cp_error_nomem(err, "a path", 0);

    if (st == CP_OK)
        st = cp_file_read(config_path, &text, NULL, err);
    if (st == CP_OK)
        st = parse_config(cfg, text, config_path, &p, &seq_cls, err);
    if (st == CP_OK) {
        p.dropout = 0.0f; /* dropout only matters for training */
        st = cp_lora_init(lora, cfg, &p, err);
    }
    if (st == CP_OK)
        st = cp_safetensors_open(weights_path, &file, err);
    if (st == CP_OK)
        st = load_tensors(lora, file, seq_cls, weights_path, err);
    if (st != CP_OK)
        cp_lora_free(lora);

    cp_safetensors_close(file);
    free(text);
    free(config_path);
    free(weights_path);
    return st;
}
