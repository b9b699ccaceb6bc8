/*
 * BitFit as a registered method: only the bias terms train, those of every
 * projection and, where the model has LayerNorm, of every norm. Llama and
 * Mistral have no biases, so BitFit rejects them.
 *
 * The run folder stores the trained biases under their checkpoint names in
 * adapter_model.safetensors, with adapter_config.json's "cpeft_method":
 * "bitfit" (PEFT has no BitFit type).
 */
#include <stdlib.h>

#include "model/model.h"
#include "peft/base_params.h"
#include "peft/method.h"

static cp_status bitfit_create(cp_method *self, const cp_model *m, const cp_method_settings *s,
                               cp_error *err)
{
    (void)s;
    cp_base_params *trained = calloc(1, sizeof *trained);
    if (!trained)
        return cp_error_nomem(err, "the method state", sizeof *trained);
    self->state = trained;
    cp_base_tensor *list = NULL;
    int n = 0, kept = 0;
    cp_status st = cp_base_tensors_list(m, 0, &list, &n, err);
    for (int i = 0; st == CP_OK && i < n; i++)
        if (cp_base_kind_is_bias(list[i].kind))
            list[kept++] = list[i];
    if (st == CP_OK && kept == 0)
        st = cp_error_set(err, CP_ERR_INPUT,
                          "--method bitfit trains bias terms, but this %s model has no biases "
                          "(no projection or norm bias in its checkpoint); use a model with "
                          "biases (GPT-2, Qwen2) or another method such as lora",
                          m->cfg.model_type);
    if (st == CP_OK)
        st = cp_base_params_init(trained, m, list, kept, 0, err);
    free(list);
    if (st == CP_OK)
        st = cp_base_params_append_refs(trained, &self->params, &self->n_params, err);
    return st;
}

static cp_status bitfit_load(cp_method *self, const cp_model *m, const char *dir, cp_error *err)
{
    cp_base_params *trained = calloc(1, sizeof *trained);
    if (!trained)
        return cp_error_nomem(err, "the method state", sizeof *trained);
    self->state = trained;
    cp_status st = cp_base_params_load(trained, m, dir, 1, err);
    if (st == CP_OK)
        st = cp_base_params_append_refs(trained, &self->params, &self->n_params, err);
    return st;
}

static cp_status bitfit_bind_base(cp_method *self, cp_model *m, cp_error *err)
{
    return cp_base_params_bind(self->state, m, "--method bitfit", err);
}

static cp_status bitfit_save(const cp_method *self, const cp_model *m, const char *dir,
                             const char *base_model, cp_error *err)
{
    (void)m;
    return cp_base_params_save(self->state, dir, "bitfit", base_model, NULL, NULL, err);
}

static void bitfit_destroy(cp_method *self)
{
    if (!self->state)
        return;
    cp_base_params_free(self->state);
    free(self->state);
}

/* The biases are the model's own, so there is nothing to reserve. */
static cp_status bitfit_reserve(cp_method *self, int rows, int training, cp_error *err)
{
    (void)self, (void)rows, (void)training, (void)err;
    return CP_OK;
}

const cp_method_ops cp_bitfit_method = {
    .name = "bitfit",
    .peft_type = NULL,
    .summary = "BitFit: trains only the bias terms (models with biases: GPT-2, Qwen2)",
    .create = bitfit_create,
    .load = bitfit_load,
    .save = bitfit_save,
    .destroy = bitfit_destroy,
    .reserve = bitfit_reserve,
    .bind_base = bitfit_bind_base,
};
