/*
 * QLoRA: LoRA on a base whose linear projections are NF4. The trainer
 * quantizes the base before create, because cp_method_ops.nf4_base is set.
 * The adapter itself is LoRA's, in float32, and PEFT saves QLoRA adapters
 * as plain LoRA adapters, so this one is saved the same way.
 */
#include "peft/method.h"

extern const cp_method_ops cp_lora_method;

static cp_status qlora_create(cp_method *self, const struct cp_model *m,
                              const cp_method_settings *s, cp_error *err)
{
    if (s->lora.use_dora)
        return cp_error_set(err, CP_ERR_INPUT,
                            "--dora is not supported with --method qlora; drop --dora or use "
                            "--method lora");
    return cp_lora_method.create(self, m, s, err);
}

static cp_status qlora_load(cp_method *self, const struct cp_model *m, const char *dir,
                            cp_error *err)
{
    return cp_lora_method.load(self, m, dir, err);
}

static cp_status qlora_save(const cp_method *self, const struct cp_model *m, const char *dir,
                            const char *base_model, cp_error *err)
{
    return cp_lora_method.save(self, m, dir, base_model, err);
}

static void qlora_destroy(cp_method *self) { cp_lora_method.destroy(self); }

static cp_status qlora_reserve(cp_method *self, int rows, int training, cp_error *err)
{
    return cp_lora_method.reserve(self, rows, training, err);
}

static void qlora_project(cp_method *self, int l, cp_proj p, float *out, const float *x, int N)
{
    cp_lora_method.project(self, l, p, out, x, N);
}

static void qlora_project_backward(cp_method *self, int l, cp_proj p, float *dx, float *dout,
                                   const float *x, int N)
{
    cp_lora_method.project_backward(self, l, p, dx, dout, x, N);
}

const cp_method_ops cp_qlora_method = {
    .name = "qlora",
    .peft_type = NULL, /* its adapters are PEFT LoRA adapters, loaded by "lora" */
    .summary = "LoRA on a base quantized to NF4 at load (--double-quant; LoRA's options apply)",
    .nf4_base = 1,
    .saves_modules = 1,
    .create = qlora_create,
    .load = qlora_load,
    .save = qlora_save,
    .destroy = qlora_destroy,
    .reserve = qlora_reserve,
    .project = qlora_project,
    .project_backward = qlora_project_backward,
};
