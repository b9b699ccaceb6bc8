/* Base tensors as trainable parameters: names, master copies, binding and files. */
#include "peft/base_params.h"

#include <cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/file.h"
#include "io/json_file.h"

int cp_base_kind_is_bias(cp_base_kind kind)
{
    return kind == CP_BASE_PROJ_BIAS || kind == CP_BASE_ATTN_NORM_BIAS ||
           kind == CP_BASE_MLP_NORM_BIAS || kind == CP_BASE_FINAL_NORM_BIAS;
}

/* Appends one tensor to the list (room is sized by the caller). */
static void add(cp_base_tensor *list, int *n, cp_base_kind kind, int layer, cp_proj proj,
                int64_t rows, int64_t cols, const char *fmt, const char *module)
{
    cp_base_tensor *t = &list[(*n)++];
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, fmt, module);
    t->kind = kind;
    t->layer = layer;
    t->proj = proj;
    t->ndim = cols ? 2 : 1;
    t->shape[0] = rows;
    t->shape[1] = cols;
    t->n = (size_t)rows * (size_t)(cols ? cols : 1);
}

/* A layer's norms and projections, named "<layers>.<l>.<module>.weight". */
static void add_layer(const cp_model *m, cp_base_tensor *list, int *n, int l)
{
    const cp_model_config *c = &m->cfg;
    const cp_layer_weights *w = &m->layers[l];
    int64_t C = c->hidden_size;
    char module[80]; /* fits name[96] with ".weight" */
    const char *layers = c->conv1d ? "transformer.h" : "model.layers";
    const char *norm1 = c->conv1d ? "ln_1" : "input_layernorm";
    const char *norm2 = c->conv1d ? "ln_2" : "post_attention_layernorm";

    snprintf(module, sizeof module, "%s.%d.%s", layers, l, norm1);
    add(list, n, CP_BASE_ATTN_NORM, l, 0, C, 0, "%s.weight", module);
    if (w->attn_norm_bias)
        add(list, n, CP_BASE_ATTN_NORM_BIAS, l, 0, C, 0, "%s.bias", module);
    for (int p = 0; p < CP_PROJ_COUNT; p++) {
        if (!cp_proj_exists(c, (cp_proj)p))
            continue;
        int in, out;
        cp_proj_shape(c, (cp_proj)p, &in, &out);
        snprintf(module, sizeof module, "%s.%d.%s", layers, l, cp_proj_path(c, (cp_proj)p));
        add(list, n, CP_BASE_PROJ_WEIGHT, l, (cp_proj)p, m->weights_in_out ? in : out,
            m->weights_in_out ? out : in, "%s.weight", module);
        if (w->bias[p])
            add(list, n, CP_BASE_PROJ_BIAS, l, (cp_proj)p, out, 0, "%s.bias", module);
    }
    snprintf(module, sizeof module, "%s.%d.%s", layers, l, norm2);
    add(list, n, CP_BASE_MLP_NORM, l, 0, C, 0, "%s.weight", module);
    if (w->mlp_norm_bias)
        add(list, n, CP_BASE_MLP_NORM_BIAS, l, 0, C, 0, "%s.bias", module);
}

cp_status cp_base_tensors_list(const cp_model *m, int with_tied_head, cp_base_tensor **out,
                               int *n, cp_error *err)
{
    const cp_model_config *c = &m->cfg;
    int cap = 8 + c->n_layers * (4 + 2 * CP_PROJ_COUNT);
    cp_base_tensor *list = calloc((size_t)cap, sizeof *list);
    *out = NULL;
    *n = 0;
    if (!list)
        return cp_error_nomem(err, "the tensor list", (size_t)cap * sizeof *list);
    int64_t C = c->hidden_size, V = c->vocab_size;
    const char *top = c->conv1d ? "transformer" : "model";
    char module[64];

    snprintf(module, sizeof module, "%s.%s", top, c->conv1d ? "wte" : "embed_tokens");
    add(list, n, CP_BASE_EMBED, -1, 0, V, C, "%s.weight", module);
    if (m->pos_embed)
        add(list, n, CP_BASE_POS_EMBED, -1, 0, c->max_position_embeddings, C,
            "%s.wpe.weight", top);
    for (int l = 0; l < c->n_layers; l++)
        add_layer(m, list, n, l);
    snprintf(module, sizeof module, "%s.%s", top, c->conv1d ? "ln_f" : "norm");
    add(list, n, CP_BASE_FINAL_NORM, -1, 0, C, 0, "%s.weight", module);
    if (m->final_norm_bias)
        add(list, n, CP_BASE_FINAL_NORM_BIAS, -1, 0, C, 0, "%s.bias", module);
    if (m->lm_head != m->embed || with_tied_head)
        add(list, n, CP_BASE_LM_HEAD, -1, 0, V, C, "%s.weight", "lm_head");
    *out = list;
    return CP_OK;
}

const cp_base_tensor *cp_base_tensor_find(const cp_base_tensor *list, int n, const char *name)
{
    for (int i = 0; i < n; i++)
        if (strcmp(list[i].name, name) == 0)
            return &list[i];
    return NULL;
}

/* The model's pointer to the tensor's weights and its gradient slot. */
static void slots_of(cp_model *m, const cp_base_tensor *t, const float ***weight, float ***grad)
{
    cp_layer_weights *w = t->layer >= 0 ? &m->layers[t->layer] : NULL;
    switch (t->kind) {
    case CP_BASE_EMBED: *weight = &m->embed; *grad = &m->dembed; return;
    case CP_BASE_POS_EMBED: *weight = &m->pos_embed; *grad = &m->dpos_embed; return;
    case CP_BASE_LM_HEAD: *weight = &m->lm_head; *grad = &m->dlm_head; return;
    case CP_BASE_FINAL_NORM: *weight = &m->final_norm; *grad = &m->dfinal_norm; return;
    case CP_BASE_FINAL_NORM_BIAS:
        *weight = &m->final_norm_bias;
        *grad = &m->dfinal_norm_bias;
        return;
    case CP_BASE_ATTN_NORM: *weight = &w->attn_norm; *grad = &w->dattn_norm; return;
    case CP_BASE_ATTN_NORM_BIAS: *weight = &w->attn_norm_bias; *grad = &w->dattn_norm_bias; return;
    case CP_BASE_MLP_NORM: *weight = &w->mlp_norm; *grad = &w->dmlp_norm; return;
    case CP_BASE_MLP_NORM_BIAS: *weight = &w->mlp_norm_bias; *grad = &w->dmlp_norm_bias; return;
    case CP_BASE_PROJ_WEIGHT: *weight = &w->w[t->proj]; *grad = &w->dw[t->proj]; return;
    case CP_BASE_PROJ_BIAS: *weight = &w->bias[t->proj]; *grad = &w->dbias[t->proj]; return;
    }
    CP_ASSERT(0);
}

const float *cp_base_tensor_data(const cp_model *m, const cp_base_tensor *t)
{
    const float **weight;
    float **grad;
    /* slots_of only takes addresses; nothing is written through them here. */
    slots_of((cp_model *)m, t, &weight, &grad);
    return *weight;
}

/* Checks that the tensor is float32 in the layout its name promises. */
static cp_status check_trainable(const cp_model *m, const cp_base_tensor *t, cp_error *err)
{
    if (t->kind != CP_BASE_PROJ_WEIGHT)
        return CP_OK;
    if (m->layers[t->layer].nf4[t->proj])
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s is stored as NF4 (QLoRA's quantized base), which cannot be "
                            "trained; train it on the float32 model instead",
                            t->name);
    if (m->cfg.conv1d != m->weights_in_out)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: this GGUF model stores GPT-2's Conv1D weights transposed, so "
                            "they cannot be saved under their Hugging Face names; train from "
                            "the Hugging Face folder instead",
                            t->name);
    return CP_OK;
}

cp_status cp_base_params_init(cp_base_params *bp, const cp_model *m, const cp_base_tensor *sel,
                              int n, int follow_tie, cp_error *err)
{
    memset(bp, 0, sizeof *bp);
    bp->follow_tie = follow_tie;
    for (int i = 0; i < n; i++) {
        cp_status st = check_trainable(m, &sel[i], err);
        if (st != CP_OK)
            return st;
        bp->n_values += sel[i].n;
    }
    bp->tensors = malloc((size_t)(n ? n : 1) * sizeof *bp->tensors);
    bp->values = calloc((size_t)(n ? n : 1), sizeof *bp->values);
    bp->grads = calloc((size_t)(n ? n : 1), sizeof *bp->grads);
    bp->memory = calloc(2 * bp->n_values + 1, sizeof(float));
    if (!bp->tensors || !bp->values || !bp->grads || !bp->memory) {
        cp_base_params_free(bp);
        return cp_error_nomem(err, "the trained base tensors", 2 * bp->n_values * sizeof(float));
    }
    bp->n = n;
    memcpy(bp->tensors, sel, (size_t)n * sizeof *sel);
    float *values = bp->memory, *grads = bp->memory + bp->n_values;
    for (int i = 0; i < n; i++) {
        bp->values[i] = values;
        bp->grads[i] = grads;
        memcpy(values, cp_base_tensor_data(m, &sel[i]), sel[i].n * sizeof(float));
        values += sel[i].n;
        grads += sel[i].n;
    }
    return CP_OK;
}

void cp_base_params_free(cp_base_params *bp)
{
    free(bp->tensors);
    free(bp->values);
    free(bp->grads);
    free(bp->memory);
    memset(bp, 0, sizeof *bp);
}

cp_status cp_base_params_append_refs(const cp_base_params *bp, cp_param_ref **params,
                                     int *n_params, cp_error *err)
{
    size_t total = (size_t)*n_params + (size_t)bp->n;
    cp_param_ref *grown = realloc(*params, (total ? total : 1) * sizeof *grown);
    if (!grown)
        return cp_error_nomem(err, "the parameter list", total * sizeof *grown);
    *params = grown;
    for (int i = 0; i < bp->n; i++) {
        const cp_base_tensor *t = &bp->tensors[i];
        int decay = t->ndim == 2; /* matrices decay, biases and norm weights do not */
        grown[(*n_params)++] = (cp_param_ref){t->name, bp->values[i], bp->grads[i], t->n, decay};
    }
    return CP_OK;
}

cp_status cp_base_params_bind(const cp_base_params *bp, cp_model *m, const char *option,
                              cp_error *err)
{
    for (int i = 0; i < bp->n; i++) {
        const float **weight;
        float **grad;
        slots_of(m, &bp->tensors[i], &weight, &grad);
        if (*grad)
            return cp_error_set(err, CP_ERR_INPUT,
                                "%s: %s is already trained by the method; remove it from %s",
                                option, bp->tensors[i].name, option);
    }
    for (int i = 0; i < bp->n; i++) {
        const cp_base_tensor *t = &bp->tensors[i];
        const float **weight;
        float **grad;
        slots_of(m, t, &weight, &grad);
        /* A tied head reads the embedding's copy and adds to its gradient. */
        if (t->kind == CP_BASE_EMBED && bp->follow_tie && m->lm_head == m->embed) {
            m->lm_head = bp->values[i];
            m->dlm_head = bp->grads[i];
        }
        *weight = bp->values[i];
        *grad = bp->grads[i];
    }
    return CP_OK;
}

void cp_base_params_describe(const cp_base_params *bp, const char *prefix, cp_st_tensor *tensors,
                             char (*names)[160])
{
    for (int i = 0; i < bp->n; i++) {
        const cp_base_tensor *t = &bp->tensors[i];
        snprintf(names[i], sizeof names[i], "%s%s", prefix, t->name);
        tensors[i] = (cp_st_tensor){.name = names[i], .dtype = CP_DTYPE_F32, .ndim = t->ndim,
                                    .shape = {t->shape[0], t->shape[1]}, .data = bp->values[i],
                                    .nbytes = t->n * sizeof(float)};
    }
}

cp_status cp_base_params_read(cp_base_params *bp, const cp_safetensors *file, const char *prefix,
                              const char *path, cp_error *err)
{
    char name[160];
    for (int i = 0; i < bp->n; i++) {
        const cp_base_tensor *want = &bp->tensors[i];
        snprintf(name, sizeof name, "%s%s", prefix, want->name);
        const cp_st_tensor *t = cp_safetensors_find(file, name);
        if (!t)
            return cp_error_set(err, CP_ERR_INPUT, "%s: missing tensor \"%s\"", path, name);
        if (t->ndim != want->ndim || t->shape[0] != want->shape[0] ||
            (want->ndim == 2 && t->shape[1] != want->shape[1]))
            return cp_error_set(err, CP_ERR_INPUT,
                                "%s: tensor \"%s\" has %d dimensions (%lld, ...), expected "
                                "(%lld, %lld) for this base model; the run was trained on "
                                "another model",
                                path, name, t->ndim, (long long)t->shape[0],
                                (long long)want->shape[0], (long long)want->shape[1]);
        if (t->dtype != CP_DTYPE_F32 && t->dtype != CP_DTYPE_F16 && t->dtype != CP_DTYPE_BF16)
            return cp_error_set(err, CP_ERR_INPUT,
                                "%s: tensor \"%s\" is not F32, F16 or BF16; save it as float",
                                path, name);
        size_t esize = cp_dtype_size(t->dtype);
        for (size_t j = 0; j < want->n; j++) {
            uint32_t raw = 0;
            memcpy(&raw, (const uint8_t *)t->data + j * esize, esize);
            cp_dtype_to_f32(t->dtype, &raw, bp->values[i] + j, 1);
        }
    }
    return CP_OK;
}

/* adapter_config.json of a full or BitFit run. */
static cp_status write_config(const char *path, const char *method, const char *base_model,
                              const char *extra_key, const char *extra_value, cp_error *err)
{
    cJSON *root = cJSON_CreateObject();
    if (root) {
        cJSON_AddStringToObject(root, "base_model_name_or_path", base_model);
        cJSON_AddStringToObject(root, "cpeft_method", method);
        if (extra_key && extra_value)
            cJSON_AddStringToObject(root, extra_key, extra_value);
        else if (extra_key)
            cJSON_AddNullToObject(root, extra_key);
        cJSON_AddStringToObject(root, "task_type", "CAUSAL_LM");
    }
    cp_status st = cp_json_write_atomic(path, root, err);
    cJSON_Delete(root);
    return st;
}

cp_status cp_base_params_save(const cp_base_params *bp, const char *dir, const char *method,
                              const char *base_model, const char *extra_key,
                              const char *extra_value, cp_error *err)
{
    size_t n = (size_t)(bp->n ? bp->n : 1);
    cp_st_tensor *tensors = calloc(n, sizeof *tensors);
    char(*names)[160] = calloc(n, sizeof *names);
    char *weights_path = cp_path_join(dir, "adapter_model.safetensors");
    char *config_path = cp_path_join(dir, "adapter_config.json");
    cp_status st = CP_OK;
    if (!tensors || !names || !weights_path || !config_path)
        st = cp_error_nomem(err, "the run files", n * sizeof *names);
    const cp_st_metadata meta[] = {{"format", "pt"}};
    if (st == CP_OK) {
        cp_base_params_describe(bp, "", tensors, names);
        st = cp_safetensors_write(weights_path, tensors, (size_t)bp->n, meta, 1, err);
    }
    if (st == CP_OK)
        st = write_config(config_path, method, base_model, extra_key, extra_value, err);
    free(tensors);
    free(names);
    free(weights_path);
    free(config_path);
    return st;
}

/* Picks the tensors of m that file stores without PEFT's prefix into a
 * fresh list, rejecting names m lacks. */
static cp_status select_stored(const cp_model *m, const cp_safetensors *file, int only_biases,
                               const char *path, cp_base_tensor **sel, int *n_sel,
                               cp_error *err)
{
    cp_base_tensor *all = NULL;
    int n_all = 0;
    cp_status st = cp_base_tensors_list(m, 0, &all, &n_all, err);
    if (st != CP_OK)
        return st;
    *sel = calloc((size_t)n_all + 1, sizeof **sel);
    *n_sel = 0;
    if (!*sel) {
        free(all);
        return cp_error_nomem(err, "the tensor list", (size_t)n_all * sizeof **sel);
    }
    /* In checkpoint order, so that save and load list them alike. */
    for (int i = 0; i < n_all; i++)
        if (cp_safetensors_find(file, all[i].name))
            (*sel)[(*n_sel)++] = all[i];
    for (size_t i = 0; st == CP_OK && i < cp_safetensors_count(file); i++) {
        const char *name = cp_safetensors_at(file, i)->name;
        if (strncmp(name, "base_model.model.", 17) == 0)
            continue; /* PEFT's modules_to_save copies, read by modules_to_save.c */
        const cp_base_tensor *t = cp_base_tensor_find(all, n_all, name);
        if (!t)
            st = cp_error_set(err, CP_ERR_INPUT,
                              "%s: tensor \"%s\" is not a tensor of this %s base model; the "
                              "run was trained on another model",
                              path, name, m->cfg.model_type);
        else if (only_biases && !cp_base_kind_is_bias(t->kind))
            st = cp_error_set(err, CP_ERR_INPUT,
                              "%s: tensor \"%s\" is not a bias, but a BitFit run stores only "
                              "biases; check adapter_config.json's cpeft_method",
                              path, name);
    }
    free(all);
    if (st != CP_OK) {
        free(*sel);
        *sel = NULL;
    }
    return st;
}

cp_status cp_base_params_load(cp_base_params *bp, const cp_model *m, const char *dir,
                              int only_biases, cp_error *err)
{
    memset(bp, 0, sizeof *bp);
    char *path = cp_path_join(dir, "adapter_model.safetensors");
    if (!path)
        return cp_error_nomem(err, "a path", strlen(dir));
    cp_safetensors *file = NULL;
    cp_base_tensor *sel = NULL;
    int n_sel = 0;
    cp_status st = cp_safetensors_open(path, &file, err);
    if (st == CP_OK)
        st = select_stored(m, file, only_biases, path, &sel, &n_sel, err);
    if (st == CP_OK)
        st = cp_base_params_init(bp, m, sel, n_sel, 1, err);
    if (st == CP_OK)
        st = cp_base_params_read(bp, file, "", path, err);
    if (st != CP_OK)
        cp_base_params_free(bp);
    free(sel);
    cp_safetensors_close(file);
    free(path);
    return st;
}
