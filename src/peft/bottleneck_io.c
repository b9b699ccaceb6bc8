/*
 * Bottleneck adapters in AdapterHub's layout (the `adapters` library's
 * AdapterLoader): adapter_config.json with the full bottleneck
 * configuration under "config", and adapter.safetensors with tensors named
 * {model.layers|transformer.h}.{i}.{attention|output}_adapters.adapters.
 * {name}.{adapter_down.0|adapter_up}.{weight|bias}. cpeft writes the
 * weights as safetensors only, and reads no pickled pytorch_adapter.bin.
 *
 * adapter_config.json also records "cpeft_method": "adapter", which
 * cp_method_load reads, since PEFT defines no bottleneck adapters.
 * Loading rejects every setting cpeft does not compute (layer norms inside
 * the adapter, gating, PHM layers, scaling other than 1, parallel adapters,
 * original_ln_before) by name.
 *
 * modules_to_save copies (--modules-to-save) go into adapter.safetensors
 * under PEFT's names, base_model.model.<module>.weight, and the config's
 * "modules_to_save" lists them; peft/modules_to_save.c writes and reads
 * both. The `adapters` library's loader skips tensors that name no module
 * of its model and only logs them (WeightsLoaderHelper in loading.py), so it
 * loads the adapter without the copies.
 */
#include <cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/file.h"
#include "io/json_file.h"
#include "io/safetensors.h"
#include "peft/bottleneck.h"
#include "peft/modules_to_save.h"

#define ADAPTER_NAME "default"
#define WEIGHTS_FILE "adapter.safetensors"

static const char *const site_modules[CP_BN_SITE_COUNT] = {"attention_adapters",
                                                           "output_adapters"};
static const char *const tensor_kinds[4] = {"adapter_down.0.weight", "adapter_down.0.bias",
                                            "adapter_up.weight", "adapter_up.bias"};

static void tensor_name(const cp_model_config *cfg, char *buf, size_t size, int layer,
                        cp_bn_site s, const char *adapter, const char *which)
{
    snprintf(buf, size, "%s.%d.%s.adapters.%s.%s", cfg->conv1d ? "transformer.h" : "model.layers",
             layer, site_modules[s], adapter, which);
}

void cp_bottleneck_tensor_name(const cp_model_config *cfg, char *buf, size_t size, int layer,
                               cp_bn_site s, const char *which)
{
    tensor_name(cfg, buf, size, layer, s, ADAPTER_NAME, which);
}

/* The four tensors of a slot in tensor_kinds order, with their shapes. */
static void slot_tensors(const cp_bottleneck *bn, const cp_bn_slot *slot, float *data[4],
                         int64_t shapes[4][2])
{
    int64_t C = bn->cfg.hidden_size, R = bn->R;
    data[0] = slot->down, shapes[0][0] = R, shapes[0][1] = C;
    data[1] = slot->down_bias, shapes[1][0] = R, shapes[1][1] = 0;
    data[2] = slot->up, shapes[2][0] = C, shapes[2][1] = R;
    data[3] = slot->up_bias, shapes[3][0] = C, shapes[3][1] = 0;
}

static const char *model_class(const cp_model_config *cfg)
{
    if (strcmp(cfg->model_type, "gpt2") == 0)
        return "GPT2LMHeadModel";
    if (strcmp(cfg->model_type, "mistral") == 0)
        return "MistralForCausalLM";
    if (strcmp(cfg->model_type, "qwen2") == 0)
        return "Qwen2ForCausalLM";
    return "LlamaForCausalLM";
}

/* AdapterHub's BnConfig fields with the values cpeft computes. */
static cJSON *build_bn_config(const cp_bottleneck *bn)
{
    cJSON *c = cJSON_CreateObject();
    if (!c)
        return NULL;
    cJSON_AddBoolToObject(c, "adapter_residual_before_ln", 0);
    cJSON_AddStringToObject(c, "architecture", "bottleneck");
    cJSON_AddBoolToObject(c, "cross_adapter", 0);
    cJSON_AddNumberToObject(c, "dropout", 0.0);
    cJSON_AddStringToObject(c, "init_weights", "mam_adapter");
    cJSON_AddNullToObject(c, "inv_adapter");
    cJSON_AddNullToObject(c, "inv_adapter_reduction_factor");
    cJSON_AddBoolToObject(c, "is_parallel", 0);
    cJSON_AddItemToObject(c, "leave_out", cJSON_CreateArray());
    cJSON_AddBoolToObject(c, "ln_after", 0);
    cJSON_AddBoolToObject(c, "ln_before", 0);
    cJSON_AddBoolToObject(c, "mh_adapter", bn->sites[CP_BN_SITE_ATTENTION]);
    cJSON_AddStringToObject(c, "non_linearity", cp_bottleneck_activation_name(bn->act));
    cJSON_AddBoolToObject(c, "original_ln_after", 1);
    cJSON_AddBoolToObject(c, "original_ln_before", 0);
    cJSON_AddBoolToObject(c, "output_adapter", bn->sites[CP_BN_SITE_OUTPUT]);
    cJSON_AddBoolToObject(c, "phm_layer", 0);
    cJSON_AddNumberToObject(c, "reduction_factor", bn->reduction_factor);
    cJSON_AddBoolToObject(c, "residual_before_ln", 1);
    cJSON_AddNumberToObject(c, "scaling", 1.0);
    cJSON_AddNumberToObject(c, "stochastic_depth", 0.0);
    cJSON_AddBoolToObject(c, "use_gating", 0);
    return c;
}

static cJSON *build_config(const cp_bottleneck *bn, const char *base_model)
{
    cJSON *root = cJSON_CreateObject();
    if (!root)
        return NULL;
    cJSON_AddItemToObject(root, "config", build_bn_config(bn));
    cJSON_AddStringToObject(root, "cpeft_adapter_config",
                            bn->sites[CP_BN_SITE_ATTENTION] ? "houlsby" : "pfeiffer");
    cJSON_AddStringToObject(root, "cpeft_method", "adapter");
    cJSON_AddNumberToObject(root, "hidden_size", bn->cfg.hidden_size);
    cJSON_AddStringToObject(root, "model_class", model_class(&bn->cfg));
    cJSON_AddStringToObject(root, "model_name", base_model);
    cJSON_AddStringToObject(root, "model_type", bn->cfg.model_type);
    cJSON_AddStringToObject(root, "name", ADAPTER_NAME);
    /* NOTE: the format version cpeft follows, not a claim that the library
     * wrote the file. Without "version", the library reads "gelu" as the
     * tanh approximation (its pre-version naming). */
    cJSON_AddStringToObject(root, "version", "adapters.1.1.0");
    return root;
}

static cp_status write_config(const cp_bottleneck *bn, const char *path, const char *base_model,
                              cp_error *err)
{
    cJSON *config = build_config(bn, base_model);
    cp_status st = cp_json_write_atomic(path, config, err);
    cJSON_Delete(config);
    return st;
}

cp_status cp_bottleneck_save(const cp_bottleneck *bn, const char *dir, const char *base_model,
                             cp_error *err)
{
    size_t cap = (size_t)bn->n_layers * CP_BN_SITE_COUNT * 4, n = 0;
    cp_st_tensor *tensors = calloc(cap, sizeof *tensors);
    char (*names)[192] = calloc(cap, sizeof *names);
    char *weights_path = cp_path_join(dir, WEIGHTS_FILE);
    char *config_path = cp_path_join(dir, "adapter_config.json");
    cp_status st = CP_OK;
    if (!tensors || !names || !weights_path || !config_path)
        st = cp_error_nomem(err, "the adapter file", cap * sizeof *names);

    for (int l = 0; st == CP_OK && l < bn->n_layers; l++) {
        for (int s = 0; s < CP_BN_SITE_COUNT; s++) {
            const cp_bn_slot *slot = cp_bottleneck_slot(bn, l, (cp_bn_site)s);
            if (!slot->down)
                continue;
            float *data[4];
            int64_t shapes[4][2];
            slot_tensors(bn, slot, data, shapes);
            for (int k = 0; k < 4; k++, n++) {
                cp_bottleneck_tensor_name(&bn->cfg, names[n], sizeof names[n], l, (cp_bn_site)s,
                                          tensor_kinds[k]);
                int ndim = shapes[k][1] ? 2 : 1;
                tensors[n] = (cp_st_tensor){
                    .name = names[n], .dtype = CP_DTYPE_F32, .ndim = ndim,
                    .shape = {shapes[k][0], shapes[k][1]},
                    .data = data[k],
                    .nbytes = (size_t)(shapes[k][0] * (ndim == 2 ? shapes[k][1] : 1)) * sizeof(float),
                };
            }
        }
    }
    const cp_st_metadata meta[] = {{"format", "pt"}};
    if (st == CP_OK)
        st = cp_safetensors_write(weights_path, tensors, n, meta, 1, err);
    if (st == CP_OK)
        st = write_config(bn, config_path, base_model, err);
    free(weights_path);
    free(config_path);
    free(names);
    free(tensors);
    return st;
}

/* ---- Loading ---- */

/* The settings read back from adapter_config.json. */
typedef struct bn_settings {
    int sites[CP_BN_SITE_COUNT];
    int reduction_factor;
    cp_bn_activation act;
    char name[64];
} bn_settings;

/* Rejects a BnConfig key whose value differs from the one cpeft computes. */
static cp_status require_bool(const cJSON *c, const char *key, int expected, const char *path,
                              cp_error *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(c, key);
    if (!v || cJSON_IsNull(v) || (cJSON_IsBool(v) && cJSON_IsTrue(v) == expected))
        return CP_OK;
    return cp_error_set(err, CP_ERR_INPUT, "%s: config.%s must be %s for cpeft's bottleneck adapters",
                        path, key, expected ? "true" : "false");
}

static cp_status check_unsupported(const cJSON *c, const char *path, cp_error *err)
{
    static const char *const must_be_false[] = {"ln_before", "ln_after",   "use_gating",
                                                "phm_layer", "is_parallel", "original_ln_before",
                                                "cross_adapter"};
    cp_status st = CP_OK;
    for (size_t i = 0; st == CP_OK && i < sizeof must_be_false / sizeof *must_be_false; i++)
        st = require_bool(c, must_be_false[i], 0, path, err);
    if (st == CP_OK)
        st = require_bool(c, "original_ln_after", 1, path, err);
    const cJSON *scaling = cJSON_GetObjectItemCaseSensitive(c, "scaling");
    if (st == CP_OK && scaling && !(cJSON_IsNumber(scaling) && scaling->valuedouble == 1.0))
        st = cp_error_set(err, CP_ERR_INPUT, "%s: config.scaling must be 1.0 for cpeft", path);
    const cJSON *leave_out = cJSON_GetObjectItemCaseSensitive(c, "leave_out");
    if (st == CP_OK && leave_out && !cJSON_IsNull(leave_out) && cJSON_GetArraySize(leave_out) > 0)
        st = cp_error_set(err, CP_ERR_INPUT, "%s: config.leave_out is set; cpeft adapts every layer",
                          path);
    const cJSON *inv = cJSON_GetObjectItemCaseSensitive(c, "inv_adapter");
    if (st == CP_OK && inv && !cJSON_IsNull(inv))
        st = cp_error_set(err, CP_ERR_INPUT, "%s: config.inv_adapter is set, which cpeft does not "
                                             "support",
                          path);
    return st;
}

static cp_status parse_bn_config(const cJSON *c, const cp_model_config *cfg, bn_settings *out,
                                 const char *path, cp_error *err)
{
    const cJSON *mh = cJSON_GetObjectItemCaseSensitive(c, "mh_adapter");
    const cJSON *output = cJSON_GetObjectItemCaseSensitive(c, "output_adapter");
    const cJSON *rf = cJSON_GetObjectItemCaseSensitive(c, "reduction_factor");
    const cJSON *act = cJSON_GetObjectItemCaseSensitive(c, "non_linearity");
    out->sites[CP_BN_SITE_ATTENTION] = cJSON_IsTrue(mh);
    out->sites[CP_BN_SITE_OUTPUT] = cJSON_IsTrue(output);
    if (!out->sites[0] && !out->sites[1])
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: config has neither mh_adapter nor output_adapter set", path);
    if (!cJSON_IsNumber(rf) || rf->valuedouble != floor(rf->valuedouble) || rf->valuedouble < 1 ||
        rf->valuedouble > cfg->hidden_size)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: config.reduction_factor must be a whole number between 1 and the "
                            "hidden size %d",
                            path, cfg->hidden_size);
    out->reduction_factor = rf->valueint;
    const char *name = cJSON_IsString(act) ? act->valuestring : "";
    if (strcmp(name, "silu") == 0)
        name = "swish"; /* transformers maps both names to SiLU */
    if (cp_bottleneck_parse_activation(name, &out->act, err) != CP_OK)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: config.non_linearity \"%s\" is not supported; cpeft computes relu, "
                            "swish and gelu",
                            path, name);
    return check_unsupported(c, path, err);
}

static cp_status parse_config(const char *text, const cp_model_config *cfg, bn_settings *out,
                              const char *path, cp_error *err)
{
    cJSON *root = cJSON_Parse(text);
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return cp_error_set(err, CP_ERR_INPUT, "%s: invalid JSON; expected an adapter_config.json",
                            path);
    }
    const cJSON *c = cJSON_GetObjectItemCaseSensitive(root, "config");
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(root, "model_type");
    const cJSON *hidden = cJSON_GetObjectItemCaseSensitive(root, "hidden_size");
    const cJSON *name = cJSON_GetObjectItemCaseSensitive(root, "name");
    cp_status st = CP_OK;
    if (!cJSON_IsObject(c))
        st = cp_error_set(err, CP_ERR_INPUT, "%s: missing the \"config\" object of the adapter",
                          path);
    else if (cJSON_IsString(type) && strcmp(type->valuestring, cfg->model_type) != 0)
        st = cp_error_set(err, CP_ERR_INPUT,
                          "%s: the adapter is for model_type %s, but the base model is %s", path,
                          type->valuestring, cfg->model_type);
    else if (cJSON_IsNumber(hidden) && hidden->valueint != cfg->hidden_size)
        st = cp_error_set(err, CP_ERR_INPUT,
                          "%s: the adapter is for hidden size %d, but the base model's is %d", path,
                          hidden->valueint, cfg->hidden_size);
    else if (!cJSON_IsString(name) || !name->valuestring[0] ||
             strlen(name->valuestring) >= sizeof out->name)
        st = cp_error_set(err, CP_ERR_INPUT, "%s: missing or invalid adapter \"name\"", path);
    if (st == CP_OK) {
        snprintf(out->name, sizeof out->name, "%s", name->valuestring);
        st = parse_bn_config(c, cfg, out, path, err);
    }
    if (st == CP_OK)
        st = cp_modules_to_save_check_config(root, path, err);
    cJSON_Delete(root);
    return st;
}

/* Copies one stored tensor into dst after checking its shape (cols 0: 1-D). */
static cp_status load_tensor(const cp_safetensors *file, const char *name, int64_t rows,
                             int64_t cols, float *dst, const char *path, cp_error *err)
{
    const cp_st_tensor *t = cp_safetensors_find(file, name);
    if (!t)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: missing tensor \"%s\" that adapter_config.json implies", path, name);
    int ndim = cols ? 2 : 1;
    if (t->ndim != ndim || t->shape[0] != rows || (cols && t->shape[1] != cols))
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: tensor \"%s\" has shape [%lld, %lld] (%d dimensions), expected "
                            "[%lld, %lld]; the adapter was made for another model",
                            path, name, (long long)t->shape[0], (long long)t->shape[1], t->ndim,
                            (long long)rows, (long long)cols);
    size_t n = (size_t)(rows * (cols ? cols : 1)), esize = cp_dtype_size(t->dtype);
    for (size_t i = 0; i < n; i++) {
        uint32_t raw = 0;
        memcpy(&raw, (const uint8_t *)t->data + i * esize, esize);
        cp_dtype_to_f32(t->dtype, &raw, dst + i, 1);
    }
    return CP_OK;
}

static cp_status load_tensors(cp_bottleneck *bn, const cp_safetensors *file, const char *adapter,
                              const char *path, cp_error *err)
{
    char name[192];
    /* modules_to_save copies are read by cp_modules_to_save_load. */
    size_t claimed = cp_modules_to_save_count(file);
    cp_status st = CP_OK;
    for (int l = 0; st == CP_OK && l < bn->n_layers; l++) {
        for (int s = 0; st == CP_OK && s < CP_BN_SITE_COUNT; s++) {
            const cp_bn_slot *slot = cp_bottleneck_slot(bn, l, (cp_bn_site)s);
            if (!slot->down)
                continue;
            float *data[4];
            int64_t shapes[4][2];
            slot_tensors(bn, slot, data, shapes);
            for (int k = 0; st == CP_OK && k < 4; k++, claimed++) {
                tensor_name(&bn->cfg, name, sizeof name, l, (cp_bn_site)s, adapter, tensor_kinds[k]);
                st = load_tensor(file, name, shapes[k][0], shapes[k][1], data[k], path, err);
            }
        }
    }
    if (st == CP_OK && claimed != cp_safetensors_count(file))
        st = cp_error_set(err, CP_ERR_INPUT,
                          "%s: holds %zu tensors but adapter_config.json implies %zu; the config "
                          "and the weights disagree",
                          path, cp_safetensors_count(file), claimed);
    return st;
}

cp_status cp_bottleneck_load(cp_bottleneck *bn, const char *dir, const cp_model_config *cfg,
                             cp_error *err)
{
    memset(bn, 0, sizeof *bn);
    char *config_path = cp_path_join(dir, "adapter_config.json");
    char *weights_path = cp_path_join(dir, WEIGHTS_FILE);
    char *text = NULL;
    bn_settings settings;
    cp_safetensors *file = NULL;
    cp_status st = config_path && weights_path ? CP_OK : cp_error_nomem(err, "a path", 0);
    if (st == CP_OK)
        st = cp_file_read(config_path, &text, NULL, err);
    if (st == CP_OK)
        st = parse_config(text, cfg, &settings, config_path, err);
    if (st == CP_OK)
        st = cp_bottleneck_init(bn, cfg, settings.sites, settings.reduction_factor, settings.act, 0,
                                err);
    if (st == CP_OK && (st = cp_safetensors_open(weights_path, &file, err)) == CP_OK)
        st = load_tensors(bn, file, settings.name, weights_path, err);
    if (st != CP_OK)
        cp_bottleneck_free(bn);
    cp_safetensors_close(file);
    free(text);
    free(config_path);
    free(weights_path);
    return st;
}
