/* Shared by the tests of methods that train base tensors: a model with a
 * method attached, one batch, and checks of its gradients. */
#include "base_run.h"

#include <cJSON.h>
#include <stdlib.h>

#include "core/rng.h"
#include "peft/modules_to_save.h"
#include "test.h"

int base_run_init(run *r, const char *model_dir, const char *method, const char *trainable,
                  const char *modules, int B, int T)
{
    cp_error err = {0};
    memset(r, 0, sizeof *r);
    r->B = B, r->T = T;
    CHECK_MSG(cp_model_load(model_dir, &r->m, &err) == CP_OK, "%s", err.msg);
    if (!r->m)
        return 0;
    cp_method_settings s = cp_method_default_settings();
    s.trainable = trainable;
    const cp_method_ops *ops = cp_method_find(method);
    CHECK_MSG(cp_method_create(ops, r->m, &s, &r->method, &err) == CP_OK, "%s", err.msg);
    if (!r->method)
        return 0;
    if (ops->bind_base)
        CHECK_MSG(ops->bind_base(r->method, r->m, &err) == CP_OK, "%s", err.msg);
    if (modules)
        CHECK_MSG(cp_modules_to_save_attach(r->method, r->m, modules, &err) == CP_OK, "%s",
                  err.msg);
    r->m->method = r->method;
    CHECK(r->method->ops->reserve(r->method, B * T, 1, &err) == CP_OK);
    r->method->training = 1;
    CHECK(cp_forward_buffers_init_model(&r->fb, r->m, B, T, 1, &err) == CP_OK);
    CHECK(cp_backward_buffers_init_model(&r->bb, r->m, B, T, &err) == CP_OK);
    cp_rng rng;
    cp_rng_seed(&rng, 11);
    for (int i = 0; i < B * T; i++) {
        r->inputs[i] = (int32_t)(cp_rng_next(&rng) % (uint64_t)r->m->cfg.vocab_size);
        r->targets[i] = (int32_t)(cp_rng_next(&rng) % (uint64_t)r->m->cfg.vocab_size);
    }
    return 1;
}

void base_run_free(run *r)
{
    cp_backward_buffers_free(&r->bb);
    cp_forward_buffers_free(&r->fb);
    if (r->m)
        r->m->method = NULL;
    cp_method_free(r->method);
    cp_model_free(r->m);
}

double base_run_loss(run *r, int backward)
{
    cp_model_forward(r->m, &r->fb, r->inputs);
    if (backward)
        return cp_model_backward(r->m, &r->fb, &r->bb, r->targets, 1.0f);
    return test_logits_loss(r->fb.logits, r->targets, r->B * r->T, r->m->cfg.vocab_size);
}

void base_run_check_gradients(run *r, int first, const char *label)
{
    cp_method_zero_grads(r->method);
    base_run_loss(r, 1);
    for (int i = first; i < r->method->n_params; i++) {
        cp_param_ref *p = &r->method->params[i];
        size_t largest = 0;
        for (size_t j = 1; j < p->n; j++)
            largest = fabsf(p->grad[j]) > fabsf(p->grad[largest]) ? j : largest;
        size_t picks[3] = {largest, p->n / 3, p->n - 1};
        for (int k = 0; k < 3; k++) {
            size_t j = picks[k];
            float saved = p->param[j], eps = 3e-3f, analytic = p->grad[j];
            p->param[j] = saved + eps;
            double up = base_run_loss(r, 0);
            p->param[j] = saved - eps;
            double down = base_run_loss(r, 0);
            p->param[j] = saved;
            double numeric = (up - down) / (2 * eps);
            CHECK_MSG(fabs(numeric - analytic) <= 1e-2 * fabs(numeric) + 3e-4,
                      "%s %s[%zu]: analytic %.6g, numeric %.6g", label, p->name, j, analytic,
                      numeric);
        }
        CHECK_MSG(fabsf(p->grad[largest]) > 1e-6, "%s %s: the gradient is zero", label, p->name);
    }
}

double base_max_rel_diff(const float *got, size_t total, const float *want, size_t n)
{
    double diff = 0, scale = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)got[i * total / n] - want[i]);
        diff = d > diff ? d : diff;
        scale = fabs(want[i]) > scale ? fabs(want[i]) : scale;
    }
    return scale > 0 ? diff / scale : diff;
}

void base_run_stories_batch(run *r)
{
    cJSON *batch = test_read_json("tests/fixtures/lora_step/batch.json");
    const cJSON *rows = cJSON_GetObjectItem(batch, "input_ids");
    for (int b = 0; b < 2 && rows; b++) {
        const cJSON *row = cJSON_GetArrayItem(rows, b);
        for (int t = 0; t < 32; t++) {
            r->inputs[b * 32 + t] = cJSON_GetArrayItem(row, t)->valueint;
            r->targets[b * 32 + t] = cJSON_GetArrayItem(row, t + 1)->valueint;
        }
    }
    cJSON_Delete(batch);
}

double base_expected_loss(const char *model)
{
    cJSON *expected = test_read_json("tests/fixtures/full/expected.json");
    const cJSON *loss = cJSON_GetObjectItem(cJSON_GetObjectItem(expected, model), "loss");
    double value = cJSON_IsNumber(loss) ? loss->valuedouble : NAN;
    cJSON_Delete(expected);
    return value;
}

