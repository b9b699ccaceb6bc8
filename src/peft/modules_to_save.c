/*
 * modules_to_save as a layer over any method. The method keeps its state and
 * hooks. Its ops pointer moves to a copy of its table (mts_table) that also
 * carries the trained copies, and whose save and destroy handle them too.
 * The copies share the method's weights file: PEFT's
 * adapter_model.safetensors, or AdapterHub's adapter.safetensors for the
 * bottleneck adapter, whose run folders hold only that one.
 */
#include "peft/modules_to_save.h"

#include <cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/file.h"
#include "io/json_file.h"
#include "model/model.h"
#include "peft/base_params.h"
#include "tasks/seq_cls.h"

#define PEFT_PREFIX "base_model.model."
#define PEFT_WEIGHTS "adapter_model.safetensors"
#define ADAPTERHUB_WEIGHTS "adapter.safetensors"

/* The method's table, extended. ops comes first, so the method's ops pointer
 * is also a pointer to the whole mts_table. */
typedef struct mts_table {
    cp_method_ops ops;          /* the wrapped table with save and destroy replaced */
    const cp_method_ops *inner; /* the wrapped method's own table */
    cp_base_params trained;     /* the modules' copies */
    cJSON *names;               /* the modules as listed, a JSON array of strings */
} mts_table;

static mts_table *table_of(const cp_method *self) { return (mts_table *)self->ops; }

int cp_modules_to_save_is_tensor(const char *name)
{
    size_t len = strlen(name), prefix = strlen(PEFT_PREFIX);
    int suffix = (len > 7 && strcmp(name + len - 7, ".weight") == 0) ||
                 (len > 5 && strcmp(name + len - 5, ".bias") == 0);
    return strncmp(name, PEFT_PREFIX, prefix) == 0 && suffix && !strstr(name, ".lora_") &&
           !cp_seq_cls_is_head_tensor(name);
}

size_t cp_modules_to_save_count(const cp_safetensors *file)
{
    size_t n = 0;
    for (size_t i = 0; i < cp_safetensors_count(file); i++)
        n += (size_t)cp_modules_to_save_is_tensor(cp_safetensors_at(file, i)->name);
    return n;
}

cp_status cp_modules_to_save_check_config(const cJSON *root, const char *path, cp_error *err)
{
    const cJSON *modules = cJSON_GetObjectItemCaseSensitive(root, "modules_to_save"), *el;
    if (!modules || cJSON_IsNull(modules))
        return CP_OK;
    int strings = cJSON_IsArray(modules);
    cJSON_ArrayForEach(el, modules) strings &= cJSON_IsString(el);
    if (!strings)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: modules_to_save must be null or a list of module names "
                            "(strings); fix adapter_config.json",
                            path);
    return CP_OK;
}

/* The path of the weights file in run folder dir: PEFT's, or AdapterHub's
 * when only that one exists (malloc'd, NULL when out of memory). */
static char *weights_file(const char *dir)
{
    char *path = cp_path_join(dir, PEFT_WEIGHTS);
    if (path && !cp_file_exists(path)) {
        char *other = cp_path_join(dir, ADAPTERHUB_WEIGHTS);
        if (other && cp_file_exists(other)) {
            free(path);
            return other;
        }
        free(other);
    }
    return path;
}

/* Returns 1 if the module of tensor name (the name without .weight or .bias)
 * ends with module, PEFT's match for modules_to_save. */
static int module_matches(const char *name, const char *module)
{
    const char *dot = strrchr(name, '.');
    size_t len = (size_t)(dot - name), want = strlen(module);
    return want > 0 && want <= len && strncmp(name + len - want, module, want) == 0;
}

/* Picks the tensors of every module in names into a fresh list. */
static cp_status select_modules(const cp_model *m, const cJSON *names, cp_base_tensor **sel,
                                int *n_sel, cp_error *err)
{
    cp_base_tensor *all = NULL;
    int n_all = 0;
    cp_status st = cp_base_tensors_list(m, 1, &all, &n_all, err);
    if (st != CP_OK)
        return st;
    *n_sel = 0;
    *sel = calloc((size_t)n_all, sizeof **sel);
    if (!*sel) {
        free(all);
        return cp_error_nomem(err, "the tensor list", (size_t)n_all * sizeof **sel);
    }
    for (int i = 0; st == CP_OK && i < n_all; i++) {
        const cJSON *el;
        int picked = 0;
        cJSON_ArrayForEach(el, names) picked |= module_matches(all[i].name, el->valuestring);
        if (!picked)
            continue;
        if (all[i].kind == CP_BASE_PROJ_WEIGHT || all[i].kind == CP_BASE_PROJ_BIAS)
            st = cp_error_set(err, CP_ERR_INPUT,
                              "--modules-to-save: %s is a linear projection; modules_to_save "
                              "trains the head, the embeddings and norms only; train "
                              "projections with --method full --trainable",
                              all[i].name);
        (*sel)[(*n_sel)++] = all[i];
    }
    /* Every listed module must select something. */
    const cJSON *el;
    cJSON_ArrayForEach(el, names)
    {
        int found = 0;
        for (int i = 0; i < *n_sel; i++)
            found |= module_matches((*sel)[i].name, el->valuestring);
        if (st == CP_OK && !found)
            st = cp_error_set(err, CP_ERR_INPUT,
                              "--modules-to-save: no module of this %s model is called \"%s\"; "
                              "use lm_head, %s or a norm (%s)",
                              m->cfg.model_type, el->valuestring,
                              m->cfg.conv1d ? "wte, wpe" : "embed_tokens",
                              m->cfg.conv1d ? "ln_f, ln_1, ln_2" : "norm, input_layernorm, "
                                                                   "post_attention_layernorm");
    }
    free(all);
    if (st != CP_OK) {
        free(*sel);
        *sel = NULL;
    }
    return st;
}

/* Splits the comma-separated list into a JSON array of names. */
static cJSON *parse_list(const char *list)
{
    cJSON *names = cJSON_CreateArray();
    for (const char *start = list; names && *start;) {
        size_t len = strcspn(start, ",");
        char name[128];
        if (len > 0 && len < sizeof name) {
            memcpy(name, start, len);
            name[len] = '\0';
            cJSON_AddItemToArray(names, cJSON_CreateString(name));
        }
        start += len + (start[len] == ',');
    }
    return names;
}

/* Merges the copies into the run files the method wrote: its weights file
 * (path) gets them under PEFT's names and adapter_config.json lists the
 * modules. */
static cp_status merge_tensors(const mts_table *t, const char *path, cp_error *err)
{
    cp_safetensors *file = NULL;
    size_t n_old = 0;
    cp_status st = CP_OK;
    if (cp_file_exists(path)) {
        if ((st = cp_safetensors_open(path, &file, err)) != CP_OK)
            return st;
        n_old = cp_safetensors_count(file);
    }
    size_t n = n_old + (size_t)t->trained.n;
    cp_st_tensor *tensors = calloc(n + 1, sizeof *tensors);
    char(*names)[160] = calloc((size_t)t->trained.n + 1, sizeof *names);
    if (!tensors || !names)
        st = cp_error_nomem(err, "the adapter file", n * sizeof *tensors);
    if (st == CP_OK) {
        for (size_t i = 0; i < n_old; i++)
            tensors[i] = *cp_safetensors_at(file, i);
        cp_base_params_describe(&t->trained, PEFT_PREFIX, tensors + n_old, names);
        const cp_st_metadata meta[] = {{"format", "pt"}};
        /* The new file replaces the old by rename, so the map stays readable. */
        st = cp_safetensors_write(path, tensors, n, meta, 1, err);
    }
    free(tensors);
    free(names);
    cp_safetensors_close(file);
    return st;
}

static cp_status merge_config(const mts_table *t, const char *path, cp_error *err)
{
    char *text = NULL;
    cp_status st = cp_file_read(path, &text, NULL, err);
    if (st != CP_OK)
        return st;
    cJSON *root = cJSON_Parse(text);
    free(text);
    cJSON *names = cJSON_Duplicate(t->names, 1);
    if (!cJSON_IsObject(root) || !names) {
        cJSON_Delete(root);
        cJSON_Delete(names);
        return cp_error_set(err, CP_ERR_IO, "%s: the method wrote invalid JSON", path);
    }
    cJSON_DeleteItemFromObjectCaseSensitive(root, "modules_to_save");
    cJSON_AddItemToObject(root, "modules_to_save", names);
    st = cp_json_write_atomic(path, root, err);
    cJSON_Delete(root);
    return st;
}

static cp_status mts_save(const cp_method *self, const struct cp_model *m, const char *dir,
                          const char *base_model, cp_error *err)
{
    const mts_table *t = table_of(self);
    cp_status st = t->inner->save(self, m, dir, base_model, err);
    char *weights = weights_file(dir);
    char *config = cp_path_join(dir, "adapter_config.json");
    if (st == CP_OK && (!weights || !config))
        st = cp_error_nomem(err, "a path", strlen(dir));
    if (st == CP_OK)
        st = merge_tensors(t, weights, err);
    if (st == CP_OK)
        st = merge_config(t, config, err);
    free(weights);
    free(config);
    return st;
}

static void mts_destroy(cp_method *self)
{
    mts_table *t = table_of(self);
    if (t->inner->destroy)
        t->inner->destroy(self);
    cp_base_params_free(&t->trained);
    cJSON_Delete(t->names);
    free(t);
}

/* Binds the copies, adds them to the optimizer's list and puts the extended
 * table in place. Takes names; frees everything on failure. */
static cp_status wrap(cp_method *method, cp_model *m, mts_table *t, cp_error *err)
{
    cp_status st = cp_base_params_bind(&t->trained, m, "--modules-to-save", err);
    if (st == CP_OK)
        st = cp_base_params_append_refs(&t->trained, &method->params, &method->n_params, err);
    if (st != CP_OK) {
        cp_base_params_free(&t->trained);
        cJSON_Delete(t->names);
        free(t);
        return st;
    }
    t->inner = method->ops;
    t->ops = *method->ops;
    t->ops.save = mts_save;
    t->ops.destroy = mts_destroy;
    method->ops = &t->ops;
    return CP_OK;
}

/* A fresh table with the copies of the modules in names (which it takes). */
static cp_status table_new(const cp_model *m, cJSON *names, mts_table **out, cp_error *err)
{
    *out = NULL;
    mts_table *t = calloc(1, sizeof *t);
    if (!t || !names) {
        free(t);
        cJSON_Delete(names);
        return cp_error_nomem(err, "the modules_to_save state", sizeof *t);
    }
    t->names = names;
    cp_base_tensor *sel = NULL;
    int n_sel = 0;
    cp_status st = select_modules(m, names, &sel, &n_sel, err);
    if (st == CP_OK)
        st = cp_base_params_init(&t->trained, m, sel, n_sel, 0, err);
    free(sel);
    if (st != CP_OK) {
        cJSON_Delete(names);
        free(t);
        return st;
    }
    *out = t;
    return CP_OK;
}

cp_status cp_modules_to_save_attach(cp_method *method, cp_model *m, const char *list,
                                    cp_error *err)
{
    mts_table *t = NULL;
    cp_status st = table_new(m, parse_list(list), &t, err);
    return st == CP_OK ? wrap(method, m, t, err) : st;
}

/* The modules adapter_config.json lists besides a SEQ_CLS head, as a fresh
 * array (NULL with CP_OK when there are none). */
static cp_status listed_modules(const char *path, cJSON **out, cp_error *err)
{
    *out = NULL;
    char *text = NULL;
    cp_status st = cp_file_read(path, &text, NULL, err);
    if (st != CP_OK)
        return st;
    cJSON *root = cJSON_Parse(text);
    free(text);
    const cJSON *list = cJSON_GetObjectItemCaseSensitive(root, "modules_to_save"), *el;
    if (!cJSON_IsArray(list))
        list = NULL;
    const cJSON *task = cJSON_GetObjectItemCaseSensitive(root, "task_type");
    int seq_cls = cJSON_IsString(task) && strcmp(task->valuestring, "SEQ_CLS") == 0;
    cJSON *names = cJSON_CreateArray();
    cJSON_ArrayForEach(el, list)
    {
        if (!cJSON_IsString(el)) {
            st = cp_error_set(err, CP_ERR_INPUT, "%s: modules_to_save must list strings", path);
            break;
        }
        if (!(seq_cls && cp_seq_cls_is_head_module(el->valuestring)))
            cJSON_AddItemToArray(names, cJSON_CreateString(el->valuestring));
    }
    cJSON_Delete(root);
    if (st != CP_OK || cJSON_GetArraySize(names) == 0) {
        cJSON_Delete(names);
        return st;
    }
    *out = names;
    return CP_OK;
}

/* Rejects modules_to_save copies in the file that the config does not list,
 * which no loader would otherwise read. */
static cp_status check_unlisted(const cp_model *m, const cp_safetensors *file,
                                const cp_base_params *trained, const char *path, cp_error *err)
{
    cp_base_tensor *all = NULL;
    int n_all = 0;
    cp_status st = cp_base_tensors_list(m, 1, &all, &n_all, err);
    size_t prefix = strlen(PEFT_PREFIX);
    for (size_t i = 0; st == CP_OK && i < cp_safetensors_count(file); i++) {
        const char *name = cp_safetensors_at(file, i)->name;
        if (!cp_modules_to_save_is_tensor(name) || !cp_base_tensor_find(all, n_all, name + prefix))
            continue;
        if (!trained || !cp_base_tensor_find(trained->tensors, trained->n, name + prefix))
            st = cp_error_set(err, CP_ERR_INPUT,
                              "%s: tensor \"%s\" is a modules_to_save copy, but "
                              "adapter_config.json's modules_to_save does not list its module; "
                              "add the module there",
                              path, name);
    }
    free(all);
    return st;
}

/* Puts "modules_to_save lists A, B: " before the message in err. */
static cp_status prefix_modules(const cJSON *names, cp_error *err)
{
    char list[256] = "";
    size_t used = 0;
    const cJSON *el;
    cJSON_ArrayForEach(el, names) if (used < sizeof list) used +=
        (size_t)snprintf(list + used, sizeof list - used, "%s%s", used ? ", " : "",
                         el->valuestring);
    return cp_error_prefix(err, "modules_to_save lists %s", list);
}

cp_status cp_modules_to_save_load(cp_method *method, cp_model *m, const char *dir,
                                  cp_error *err)
{
    char *config = cp_path_join(dir, "adapter_config.json");
    char *weights = weights_file(dir);
    cJSON *names = NULL;
    cp_safetensors *file = NULL;
    mts_table *t = NULL;
    cp_status st = config && weights ? CP_OK : cp_error_nomem(err, "a path", strlen(dir));
    if (st == CP_OK)
        st = listed_modules(config, &names, err);
    if (st == CP_OK && names)
        st = cp_safetensors_open(weights, &file, err);
    /* Without listed modules, a file the method loaded is only searched for
     * unlisted copies, and a method whose file is not safetensors has none. */
    if (st == CP_OK && !names && cp_file_exists(weights) &&
        cp_safetensors_open(weights, &file, NULL) != CP_OK)
        file = NULL;
    if (st == CP_OK && names)
        st = table_new(m, names, &t, err); /* takes names */
    if (st == CP_OK && t && cp_base_params_read(&t->trained, file, PEFT_PREFIX, weights, err))
        st = prefix_modules(t->names, err);
    if (st == CP_OK && file)
        st = check_unlisted(m, file, t ? &t->trained : NULL, weights, err);
    if (st == CP_OK && t) {
        st = wrap(method, m, t, err); /* frees t on failure */
        t = NULL;
    }
    if (t) {
        cp_base_params_free(&t->trained);
        cJSON_Delete(t->names);
        free(t);
    }
    cp_safetensors_close(file);
    free(config);
    free(weights);
    return st;
}
