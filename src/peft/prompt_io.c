/*
 * Prompt-learning adapters (prompt and prefix tuning) in PEFT's file layout.
 *
 * NOTE: PEFT's PromptLearningConfig (peft/config.py) has no modules_to_save
 * field, so PEFT drops that key with a warning and may not apply the copies
 * that --modules-to-save stores. cpeft loads them back.
 */
#include "peft/prompt_io.h"

#include <cJSON.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/file.h"
#include "io/json_file.h"
#include "io/safetensors.h"
#include "peft/modules_to_save.h"

#define TENSOR_NAME "prompt_embeddings"

/* The keys PEFT's PromptLearningConfig writes, so that PEFT loads the file. */
static cJSON *build_config(const cp_prompt_config *c, const char *base_model)
{
    cJSON *root = cJSON_CreateObject();
    if (!root)
        return NULL;
    int prompt = strcmp(c->peft_type, "PROMPT_TUNING") == 0;
    cJSON_AddNullToObject(root, "auto_mapping");
    cJSON_AddStringToObject(root, "base_model_name_or_path", base_model);
    if (!prompt)
        cJSON_AddNumberToObject(root, "encoder_hidden_size", c->encoder_hidden_size);
    cJSON_AddBoolToObject(root, "inference_mode", 1);
    cJSON_AddNumberToObject(root, "num_attention_heads", c->num_attention_heads);
    cJSON_AddNumberToObject(root, "num_layers", c->num_layers);
    cJSON_AddNumberToObject(root, "num_transformer_submodules", 1);
    cJSON_AddNumberToObject(root, "num_virtual_tokens", c->n_virtual_tokens);
    cJSON_AddStringToObject(root, "peft_type", c->peft_type);
    if (!prompt)
        cJSON_AddBoolToObject(root, "prefix_projection", c->prefix_projection);
    if (prompt) {
        cJSON_AddStringToObject(root, "prompt_tuning_init", c->init);
        if (c->init_text)
            cJSON_AddStringToObject(root, "prompt_tuning_init_text", c->init_text);
        else
            cJSON_AddNullToObject(root, "prompt_tuning_init_text");
    }
    cJSON_AddNullToObject(root, "revision");
    cJSON_AddStringToObject(root, "task_type", "CAUSAL_LM");
    cJSON_AddNumberToObject(root, "token_dim", c->token_dim);
    if (prompt) {
        cJSON_AddNullToObject(root, "tokenizer_kwargs");
        /* PEFT rejects a TEXT init without a tokenizer to name. */
        if (c->init_text)
            cJSON_AddStringToObject(root, "tokenizer_name_or_path", base_model);
        else
            cJSON_AddNullToObject(root, "tokenizer_name_or_path");
    }
    return root;
}

cp_status cp_prompt_config_save(const cp_prompt_config *c, const char *dir,
                                const char *base_model, cp_error *err)
{
    char *path = cp_path_join(dir, "adapter_config.json");
    cJSON *config = build_config(c, base_model);
    cp_status st = path ? cp_json_write_atomic(path, config, err)
                        : cp_error_nomem(err, "adapter_config.json", 0);
    cJSON_Delete(config);
    free(path);
    return st;
}

/* Reads an optional non-negative integer key into *out (0 when missing or null). */
static cp_status read_count(const cJSON *root, const char *key, int *out, const char *path,
                            cp_error *err)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, key);
    *out = 0;
    if (!v || cJSON_IsNull(v))
        return CP_OK;
    if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) || v->valuedouble < 0 ||
        v->valuedouble > 1e9)
        return cp_error_set(err, CP_ERR_INPUT, "%s: \"%s\" must be a non-negative integer", path,
                            key);
    *out = v->valueint;
    return CP_OK;
}

/* Rejects configurations for other model kinds than a causal language model. */
static cp_status check_task(const cJSON *root, const char *path, cp_error *err)
{
    const cJSON *task = cJSON_GetObjectItemCaseSensitive(root, "task_type");
    if (task && !cJSON_IsNull(task) &&
        (!cJSON_IsString(task) || strcmp(task->valuestring, "CAUSAL_LM") != 0))
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: task_type %s is not supported; cpeft applies prompt-learning "
                            "adapters to CAUSAL_LM models",
                            path, cJSON_IsString(task) ? task->valuestring : "(not a string)");
    int submodules = 0;
    cp_status st = read_count(root, "num_transformer_submodules", &submodules, path, err);
    if (st == CP_OK && submodules > 1)
        st = cp_error_set(err, CP_ERR_INPUT,
                          "%s: num_transformer_submodules is %d; cpeft supports decoder-only "
                          "models (1)",
                          path, submodules);
    return st;
}

/* Checks the counts PEFT would size the tensor by against the base model. */
static cp_status check_model(const cp_prompt_config *c, const cp_model_config *cfg,
                             const char *path, cp_error *err)
{
    if (c->num_layers && c->num_layers != cfg->n_layers)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: num_layers is %d but the base model has %d layers; the adapter "
                            "was made for another model",
                            path, c->num_layers, cfg->n_layers);
    if (c->token_dim && c->num_attention_heads &&
        (c->token_dim % c->num_attention_heads != 0 ||
         c->token_dim / c->num_attention_heads != cfg->head_dim))
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: token_dim %d / num_attention_heads %d does not give the base "
                            "model's head size %d; the adapter was made for another model",
                            path, c->token_dim, c->num_attention_heads, cfg->head_dim);
    return CP_OK;
}

cp_status cp_prompt_config_parse(const char *text, const char *path, const cp_model_config *cfg,
                                 cp_prompt_config *c, cp_error *err)
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
    cp_status st = CP_OK;
    if (!cJSON_IsString(type) || strcmp(type->valuestring, c->peft_type) != 0)
        st = cp_error_set(err, CP_ERR_INPUT, "%s: peft_type must be \"%s\", found %s", path,
                          c->peft_type, cJSON_IsString(type) ? type->valuestring : "none");
    if (st == CP_OK)
        st = check_task(root, path, err);
    if (st == CP_OK)
        st = cp_modules_to_save_check_config(root, path, err);
    if (st == CP_OK)
        st = read_count(root, "num_virtual_tokens", &c->n_virtual_tokens, path, err);
    if (st == CP_OK && c->n_virtual_tokens == 0)
        st = cp_error_set(err, CP_ERR_INPUT,
                          "%s: num_virtual_tokens must be a positive integer", path);
    if (st == CP_OK)
        st = read_count(root, "token_dim", &c->token_dim, path, err);
    if (st == CP_OK)
        st = read_count(root, "num_attention_heads", &c->num_attention_heads, path, err);
    if (st == CP_OK)
        st = read_count(root, "num_layers", &c->num_layers, path, err);
    if (st == CP_OK)
        st = read_count(root, "encoder_hidden_size", &c->encoder_hidden_size, path, err);
    if (st == CP_OK)
        st = check_model(c, cfg, path, err);
    c->prefix_projection =
        cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(root, "prefix_projection"));
    c->init = NULL;
    c->init_text = NULL;
    cJSON_Delete(root);
    return st;
}

cp_status cp_prompt_config_load(const char *dir, const cp_model_config *cfg,
                                cp_prompt_config *c, cp_error *err)
{
    char *path = cp_path_join(dir, "adapter_config.json"), *text = NULL;
    if (!path)
        return cp_error_nomem(err, "a path", strlen(dir));
    cp_status st = cp_file_read(path, &text, NULL, err);
    if (st == CP_OK)
        st = cp_prompt_config_parse(text, path, cfg, c, err);
    free(text);
    free(path);
    return st;
}

cp_status cp_prompt_embeddings_save(const char *dir, const float *data, int rows, int cols,
                                    cp_error *err)
{
    char *path = cp_path_join(dir, "adapter_model.safetensors");
    if (!path)
        return cp_error_nomem(err, "a path", strlen(dir));
    cp_st_tensor t = {0};
    t.name = TENSOR_NAME;
    t.dtype = CP_DTYPE_F32;
    t.ndim = 2;
    t.shape[0] = rows;
    t.shape[1] = cols;
    t.data = data;
    t.nbytes = (size_t)rows * cols * sizeof(float);
    const cp_st_metadata meta[] = {{"format", "pt"}};
    cp_status st = cp_safetensors_write(path, &t, 1, meta, 1, err);
    free(path);
    return st;
}

/* Copies the one expected tensor of file into dst after checking its shape. */
static cp_status read_embeddings(const cp_safetensors *file, float *dst, int rows, int cols,
                                 const char *path, cp_error *err)
{
    const cp_st_tensor *t = cp_safetensors_find(file, TENSOR_NAME);
    if (!t)
        return cp_error_set(err, CP_ERR_INPUT, "%s: missing tensor \"" TENSOR_NAME "\"", path);
    if (t->ndim != 2 || t->shape[0] != rows || t->shape[1] != cols)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: tensor \"" TENSOR_NAME "\" has shape [%lld, %lld], expected "
                            "[%d, %d] for this base model and adapter_config.json; the adapter "
                            "was made for another model",
                            path, (long long)t->shape[0],
                            (long long)(t->ndim > 1 ? t->shape[1] : 0), rows, cols);
    if (t->dtype != CP_DTYPE_F32 && t->dtype != CP_DTYPE_F16 && t->dtype != CP_DTYPE_BF16)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: tensor \"" TENSOR_NAME "\" must be F32, F16 or BF16", path);
    size_t n = (size_t)rows * cols, esize = cp_dtype_size(t->dtype);
    for (size_t i = 0; i < n; i++) {
        uint32_t raw = 0;
        memcpy(&raw, (const uint8_t *)t->data + i * esize, esize);
        cp_dtype_to_f32(t->dtype, &raw, dst + i, 1);
    }
    for (size_t i = 0; i < cp_safetensors_count(file); i++) {
        const char *name = cp_safetensors_at(file, i)->name;
        /* modules_to_save copies are read by cp_modules_to_save_load. */
        if (strcmp(name, TENSOR_NAME) != 0 && !cp_modules_to_save_is_tensor(name))
            return cp_error_set(err, CP_ERR_INPUT,
                                "%s: unexpected tensor \"%s\"; a prompt-learning adapter holds "
                                "only \"" TENSOR_NAME "\" and modules_to_save copies",
                                path, name);
    }
    return CP_OK;
}

cp_status cp_prompt_embeddings_load(const char *dir, float *dst, int rows, int cols,
                                    cp_error *err)
{
    char *path = cp_path_join(dir, "adapter_model.safetensors");
    if (!path)
        return cp_error_nomem(err, "a path", strlen(dir));
    cp_safetensors *file = NULL;
    cp_status st = cp_safetensors_open(path, &file, err);
    if (st == CP_OK)
        st = read_embeddings(file, dst, rows, cols, path, err);
    cp_safetensors_close(file);
    free(path);
    return st;
}

void cp_prompt_fill_normal(float *x, size_t n, cp_rng *rng)
{
    for (size_t i = 0; i < n; i += 2) {
        /* 1 - u lies in (0, 1], so the logarithm is finite. */
        double u1 = 1.0 - cp_rng_uniform(rng), u2 = cp_rng_uniform(rng);
        double radius = sqrt(-2.0 * log(u1)), angle = 2.0 * M_PI * u2;
        x[i] = (float)(radius * cos(angle));
        if (i + 1 < n)
            x[i + 1] = (float)(radius * sin(angle));
    }
}
