/*
 * Full fine-tuning as a registered method: every float tensor of the base
 * model trains, or those whose checkpoint names match --trainable (comma-
 * separated shell globs, e.g. 'model.layers.4.*,*norm*'). A tied head trains
 * with the embedding it shares.
 *
 * The run folder stores only the trained tensors, under their checkpoint
 * names, in adapter_model.safetensors, with adapter_config.json's
 * "cpeft_method": "full", and `cpeft eval --adapter RUN` puts them over the
 * base. Storing only what trained keeps a --trainable run small, and the
 * run loads through the same path as every method. The frozen tensors stay
 * in the base folder, which the run names as base_model_name_or_path.
 */
#include <fnmatch.h>
#include <stdlib.h>
#include <string.h>

#include "model/model.h"
#include "peft/base_params.h"
#include "peft/method.h"

typedef struct full_state {
    cp_base_params trained;
    char *trainable; /* --trainable, or NULL: every tensor */
} full_state;

/* Returns 1 if name matches one of the comma-separated globs. */
static int matches_any(const char *globs, const char *name)
{
    const char *start = globs;
    while (*start) {
        size_t len = strcspn(start, ",");
        char glob[256];
        if (len > 0 && len < sizeof glob) {
            memcpy(glob, start, len);
            glob[len] = '\0';
            if (fnmatch(glob, name, 0) == 0)
                return 1;
        }
        start += len + (start[len] == ',');
    }
    return 0;
}

/* Keeps the tensors of list that --trainable selects, in place. */
static cp_status select_trainable(const cp_model *m, const char *globs, cp_base_tensor *list,
                                  int *n, cp_error *err)
{
    if (!globs)
        return CP_OK;
    int n_matched = 0;
    for (int i = 0; i < *n; i++)
        if (matches_any(globs, list[i].name))
            list[n_matched++] = list[i];
    if (n_matched == 0)
        return cp_error_set(err, CP_ERR_INPUT,
                            "--trainable '%s' matches no tensor of the %s model; names look like "
                            "%s or %s (cpeft inspect MODEL lists them all)",
                            globs, m->cfg.model_type, list[*n > 1 ? 1 : 0].name,
                            list[*n - 1].name);
    *n = n_matched;
    return CP_OK;
}

static cp_status state_new(cp_method *self, cp_error *err)
{
    full_state *state = calloc(1, sizeof *state);
    if (!state)
        return cp_error_nomem(err, "the method state", sizeof *state);
    self->state = state;
    return CP_OK;
}

static cp_status full_create(cp_method *self, const cp_model *m, const cp_method_settings *s,
                             cp_error *err)
{
    cp_status st = state_new(self, err);
    if (st != CP_OK)
        return st;
    full_state *state = self->state;
    cp_base_tensor *list = NULL;
    int n = 0;
    st = cp_base_tensors_list(m, 0, &list, &n, err);
    if (st == CP_OK)
        st = select_trainable(m, s->trainable, list, &n, err);
    if (st == CP_OK)
        st = cp_base_params_init(&state->trained, m, list, n, 1, err);
    free(list);
    if (st == CP_OK && s->trainable && !(state->trainable = strdup(s->trainable)))
        st = cp_error_nomem(err, "--trainable", strlen(s->trainable));
    if (st == CP_OK)
        st = cp_base_params_append_refs(&state->trained, &self->params, &self->n_params, err);
    return st;
}

static cp_status full_load(cp_method *self, const cp_model *m, const char *dir, cp_error *err)
{
    cp_status st = state_new(self, err);
    full_state *state = self->state;
    if (st == CP_OK)
        st = cp_base_params_load(&state->trained, m, dir, 0, err);
    if (st == CP_OK)
        st = cp_base_params_append_refs(&state->trained, &self->params, &self->n_params, err);
    return st;
}

static cp_status full_bind_base(cp_method *self, cp_model *m, cp_error *err)
{
    full_state *state = self->state;
    return cp_base_params_bind(&state->trained, m, "--method full", err);
}

static cp_status full_save(const cp_method *self, const cp_model *m, const char *dir,
                           const char *base_model, cp_error *err)
{
    (void)m;
    const full_state *state = self->state;
    return cp_base_params_save(&state->trained, dir, "full", base_model, "trainable",
                               state->trainable, err);
}

static void full_destroy(cp_method *self)
{
    full_state *state = self->state;
    if (!state)
        return;
    cp_base_params_free(&state->trained);
    free(state->trainable);
    free(state);
}

/* The trained tensors are the model's own, so there is nothing to reserve. */
static cp_status full_reserve(cp_method *self, int rows, int training, cp_error *err)
{
    (void)self, (void)rows, (void)training, (void)err;
    return CP_OK;
}

const cp_method_ops cp_full_method = {
    .name = "full",
    .peft_type = NULL,
    .summary = "full fine-tuning of every weight, or of those --trainable GLOB names",
    .create = full_create,
    .load = full_load,
    .save = full_save,
    .destroy = full_destroy,
    .reserve = full_reserve,
    .bind_base = full_bind_base,
};
