/*
 * The registry of fine-tuning methods, and what every method shares:
 * creation, loading a run folder by its recorded type, and release.
 */
#include "peft/method.h"

#include <cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/file.h"
#include "peft/modules_to_save.h"

extern const cp_method_ops cp_lora_method;
extern const cp_method_ops cp_prompt_method;
extern const cp_method_ops cp_prefix_method;
extern const cp_method_ops cp_ia3_method;
extern const cp_method_ops cp_bottleneck_method;
extern const cp_method_ops cp_qlora_method;
extern const cp_method_ops cp_full_method;
extern const cp_method_ops cp_bitfit_method;

/* Every method, in the order cpeft train --help lists them. */
static const cp_method_ops *const methods[] = {
    &cp_lora_method,
    &cp_ia3_method,
    &cp_bottleneck_method,
    &cp_qlora_method,
    &cp_prompt_method,
    &cp_prefix_method,
    &cp_full_method,
    &cp_bitfit_method,
};

#define N_METHODS ((int)(sizeof methods / sizeof *methods))

int cp_method_count(void) { return N_METHODS; }

const cp_method_ops *cp_method_at(int i) { return i >= 0 && i < N_METHODS ? methods[i] : NULL; }

const cp_method_ops *cp_method_find(const char *name)
{
    for (int i = 0; i < N_METHODS; i++)
        if (strcmp(methods[i]->name, name) == 0)
            return methods[i];
    return NULL;
}

void cp_method_list(char *buf, size_t size)
{
    size_t used = 0;
    buf[0] = '\0';
    for (int i = 0; i < N_METHODS && used < size; i++)
        used += (size_t)snprintf(buf + used, size - used, "%s%s", i ? ", " : "", methods[i]->name);
}

cp_method_settings cp_method_default_settings(void)
{
    return (cp_method_settings){
        .lora = cp_lora_default_params(),
        .n_virtual_tokens = 20,
        .prompt_init = "random",
        .adapter_config = "houlsby",
        .reduction_factor = 16,
        .non_linearity = "relu",
        .seed = 42,
    };
}

static cp_method *method_new(const cp_method_ops *ops, cp_error *err)
{
    cp_method *method = calloc(1, sizeof *method);
    if (!method) {
        cp_error_nomem(err, "the method", sizeof *method);
        return NULL;
    }
    method->ops = ops;
    return method;
}

cp_status cp_method_create(const cp_method_ops *ops, const struct cp_model *m,
                           const cp_method_settings *s, cp_method **out, cp_error *err)
{
    *out = NULL;
    cp_method *method = method_new(ops, err);
    if (!method)
        return CP_ERR_NOMEM;
    cp_status st = ops->create(method, m, s, err);
    if (st != CP_OK) {
        cp_method_free(method);
        return st;
    }
    *out = method;
    return CP_OK;
}

/* Finds the method that wrote adapter_config.json at path. */
static cp_status method_of_config(const char *path, const cp_method_ops **ops, cp_error *err)
{
    char *text = NULL;
    if (!cp_file_exists(path))
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s is missing, so this is not a run folder; pass the folder "
                            "cpeft train --out wrote, or a PEFT adapter folder",
                            path);
    cp_status st = cp_file_read(path, &text, NULL, err);
    if (st != CP_OK)
        return st;
    cJSON *root = cJSON_Parse(text);
    const char *bad = cJSON_GetErrorPtr();
    size_t offset = !root && bad ? (size_t)(bad - text) : 0;
    free(text);
    if (!root)
        return cp_error_set(err, CP_ERR_INPUT, "%s: invalid JSON near byte %zu; fix the file or "
                            "train the adapter again",
                            path, offset);
    const cJSON *peft = cJSON_GetObjectItem(root, "peft_type");
    const cJSON *own = cJSON_GetObjectItem(root, "cpeft_method");
    *ops = NULL;
    for (int i = 0; i < N_METHODS && !*ops; i++) {
        if (cJSON_IsString(peft) && methods[i]->peft_type &&
            strcmp(peft->valuestring, methods[i]->peft_type) == 0)
            *ops = methods[i];
        if (cJSON_IsString(own) && strcmp(own->valuestring, methods[i]->name) == 0)
            *ops = methods[i];
    }
    if (!*ops) {
        char names[256];
        cp_method_list(names, sizeof names);
        st = cp_error_set(err, CP_ERR_INPUT,
                          "%s: %s \"%s\" is not a method cpeft can load (available: %s); "
                          "check that this is an adapter folder",
                          path, cJSON_IsString(peft) ? "peft_type" : "cpeft_method",
                          cJSON_IsString(peft)  ? peft->valuestring
                          : cJSON_IsString(own) ? own->valuestring
                                                : "(missing)",
                          names);
    }
    cJSON_Delete(root);
    return st;
}

cp_status cp_method_load(const char *dir, struct cp_model *m, cp_method **out, cp_error *err)
{
    *out = NULL;
    char *path = cp_path_join(dir, "adapter_config.json");
    if (!path)
        return cp_error_nomem(err, "a path", strlen(dir));
    const cp_method_ops *ops = NULL;
    cp_status st = method_of_config(path, &ops, err);
    free(path);
    if (st != CP_OK)
        return st;
    cp_method *method = method_new(ops, err);
    if (!method)
        return CP_ERR_NOMEM;
    st = ops->load(method, m, dir, err);
    if (st == CP_OK && ops->bind_base)
        st = ops->bind_base(method, m, err);
    if (st == CP_OK)
        st = cp_modules_to_save_load(method, m, dir, err);
    if (st != CP_OK) {
        cp_method_free(method);
        return st;
    }
    *out = method;
    return CP_OK;
}

void cp_method_free(cp_method *method)
{
    if (!method)
        return;
    if (method->ops->destroy)
        method->ops->destroy(method);
    free(method->params);
    free(method);
}

size_t cp_method_param_count(const cp_method *method)
{
    size_t n = 0;
    for (int i = 0; i < method->n_params; i++)
        n += method->params[i].n;
    return n;
}

void cp_method_zero_grads(cp_method *method)
{
    for (int i = 0; i < method->n_params; i++)
        memset(method->params[i].grad, 0, method->params[i].n * sizeof(float));
}
