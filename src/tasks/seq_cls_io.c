/*
 * Reads the classification head of a PEFT adapter with task_type SEQ_CLS.
 *
 * PEFT adds the head (`score` in transformers' decoder models, `classifier`
 * in others) to modules_to_save for SEQ_CLS. Adapters PEFT 0.10 writes store
 * the trained copy as base_model.model.score.weight, because
 * get_peft_model_state_dict drops the adapter name from saved keys. Files
 * that keep the wrapper's full name,
 * base_model.model.score.modules_to_save.default.weight, load as well.
 */
#include <cJSON.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "core/file.h"
#include "io/safetensors.h"
#include "tasks/seq_cls.h"

#define HEAD_PREFIX "base_model.model."

static const char *const head_modules[] = {"score", "classifier"};
static const char *const head_infixes[] = {"", ".modules_to_save.default"};
enum { N_HEAD_MODULES = 2, N_HEAD_INFIXES = 2 };

int cp_seq_cls_is_head_module(const char *module)
{
    for (int i = 0; i < N_HEAD_MODULES; i++)
        if (strcmp(module, head_modules[i]) == 0)
            return 1;
    return 0;
}

int cp_seq_cls_is_head_tensor(const char *name)
{
    size_t prefix = strlen(HEAD_PREFIX);
    if (strncmp(name, HEAD_PREFIX, prefix) != 0)
        return 0;
    for (int i = 0; i < N_HEAD_MODULES; i++) {
        size_t n = strlen(head_modules[i]);
        if (strncmp(name + prefix, head_modules[i], n) == 0 && name[prefix + n] == '.')
            return 1;
    }
    return 0;
}

/* Rejects an adapter_config.json whose task_type is not SEQ_CLS. */
static cp_status check_task_type(const char *path, cp_error *err)
{
    char *text = NULL;
    cp_status st = cp_file_read(path, &text, NULL, err);
    if (st != CP_OK)
        return st;
    cJSON *root = cJSON_Parse(text);
    const cJSON *task = cJSON_GetObjectItemCaseSensitive(root, "task_type");
    if (!cJSON_IsObject(root))
        st = cp_error_set(err, CP_ERR_INPUT, "%s: invalid JSON; expected a PEFT adapter_config.json",
                          path);
    else if (!cJSON_IsString(task) || strcmp(task->valuestring, "SEQ_CLS") != 0)
        st = cp_error_set(err, CP_ERR_INPUT,
                          "%s: task_type is %s, expected \"SEQ_CLS\"; classification needs an "
                          "adapter trained with PEFT's task_type SEQ_CLS",
                          path, cJSON_IsString(task) ? task->valuestring : "not set");
    cJSON_Delete(root);
    free(text);
    return st;
}

/* Finds the one tensor named base_model.model.<module><infix>.<leaf> over
 * every head module and infix. *found is NULL when there is none; two
 * spellings in one file are an error. */
static cp_status find_head_tensor(const cp_safetensors *file, const char *path, const char *leaf,
                                  const cp_st_tensor **found, cp_error *err)
{
    *found = NULL;
    for (int i = 0; i < N_HEAD_MODULES; i++) {
        for (int j = 0; j < N_HEAD_INFIXES; j++) {
            char name[128];
            snprintf(name, sizeof name, HEAD_PREFIX "%s%s.%s", head_modules[i], head_infixes[j],
                     leaf);
            const cp_st_tensor *t = cp_safetensors_find(file, name);
            if (t && *found)
                return cp_error_set(err, CP_ERR_INPUT,
                                    "%s: both \"%s\" and \"%s\" are present; a SEQ_CLS adapter "
                                    "holds one classification head",
                                    path, (*found)->name, t->name);
            if (t)
                *found = t;
        }
    }
    return CP_OK;
}

/* Checks that weight is (L, C) and bias, when present, (L). */
static cp_status check_shapes(const cp_st_tensor *weight, const cp_st_tensor *bias, int C,
                              const char *path, cp_error *err)
{
    if (weight->ndim != 2 || weight->shape[0] < 1 || weight->shape[1] != C ||
        weight->shape[0] > INT_MAX / C)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: tensor \"%s\" has shape [%lld, %lld], expected [num_labels, %d] "
                            "(the base model's hidden size); the adapter was made for another "
                            "base model",
                            path, weight->name, (long long)weight->shape[0],
                            (long long)(weight->ndim > 1 ? weight->shape[1] : 0), C);
    if (bias && (bias->ndim != 1 || bias->shape[0] != weight->shape[0]))
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: tensor \"%s\" has %d dimensions and %lld rows, expected shape "
                            "[%lld] to match \"%s\"",
                            path, bias->name, bias->ndim, (long long)bias->shape[0],
                            (long long)weight->shape[0], weight->name);
    return CP_OK;
}

/* Rejects head tensors other than weight and bias, such as the dense and
 * out_proj layers of a two-layer encoder head. */
static cp_status reject_other_head_tensors(const cp_safetensors *file, const cp_st_tensor *weight,
                                           const cp_st_tensor *bias, const char *path,
                                           cp_error *err)
{
    for (size_t i = 0; i < cp_safetensors_count(file); i++) {
        const cp_st_tensor *t = cp_safetensors_at(file, i);
        if (t != weight && t != bias && cp_seq_cls_is_head_tensor(t->name))
            return cp_error_set(err, CP_ERR_INPUT,
                                "%s: unexpected tensor \"%s\"; cpeft supports a classification "
                                "head of one linear layer (weight and optional bias)",
                                path, t->name);
    }
    return CP_OK;
}

/* Widens n elements of t into dst, one at a time because the data may be
 * misaligned for its dtype. */
static void copy_to_f32(const cp_st_tensor *t, float *dst, size_t n)
{
    size_t esize = cp_dtype_size(t->dtype);
    for (size_t i = 0; i < n; i++) {
        uint32_t raw = 0;
        memcpy(&raw, (const uint8_t *)t->data + i * esize, esize);
        cp_dtype_to_f32(t->dtype, &raw, dst + i, 1);
    }
}

/* Reads the head tensors of the open weights file into a fresh head. */
static cp_status read_head(cp_seq_cls *head, const cp_safetensors *file, int C, const char *path,
                           cp_error *err)
{
    const cp_st_tensor *weight = NULL, *bias = NULL;
    cp_status st = find_head_tensor(file, path, "weight", &weight, err);
    if (st == CP_OK && !weight)
        st = cp_error_set(err, CP_ERR_INPUT,
                          "%s: no classification head: expected tensor \"" HEAD_PREFIX
                          "score.weight\" (or classifier.weight); save the adapter with its "
                          "score module, as PEFT does for task_type SEQ_CLS",
                          path);
    if (st == CP_OK)
        st = find_head_tensor(file, path, "bias", &bias, err);
    if (st == CP_OK)
        st = check_shapes(weight, bias, C, path, err);
    if (st == CP_OK)
        st = reject_other_head_tensors(file, weight, bias, path, err);
    if (st == CP_OK)
        st = cp_seq_cls_init(head, (int)weight->shape[0], C, bias != NULL, err);
    if (st != CP_OK)
        return st;

    copy_to_f32(weight, head->weight, (size_t)head->num_labels * C);
    if (bias)
        copy_to_f32(bias, head->bias, (size_t)head->num_labels);
    return CP_OK;
}

cp_status cp_seq_cls_load(cp_seq_cls *head, const char *dir, const cp_model *m, cp_error *err)
{
    memset(head, 0, sizeof *head);
    char *config_path = cp_path_join(dir, "adapter_config.json");
    char *weights_path = cp_path_join(dir, "adapter_model.safetensors");
    cp_safetensors *file = NULL;
    cp_status st = config_path && weights_path ? CP_OK : cp_error_nomem(err, "a path", 0);

    if (st == CP_OK)
        st = check_task_type(config_path, err);
    if (st == CP_OK)
        st = cp_safetensors_open(weights_path, &file, err);
    if (st == CP_OK)
        st = read_head(head, file, m->cfg.hidden_size, weights_path, err);

    cp_safetensors_close(file);
    free(config_path);
    free(weights_path);
    return st;
}
