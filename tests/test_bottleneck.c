/*
 * Bottleneck adapters: gradients against finite differences on small random
 * models, loss and gradients against PyTorch (tools/ref_bottleneck.py
 * make-fixture), AdapterHub's file layout, and training from the command
 * line with its setting errors.
 */
#include <cJSON.h>
#include <stdlib.h>

#include "core/file.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "peft/bottleneck.h"
#include "peft/method.h"
#include "test.h"

#define FIXTURE "tests/fixtures/bottleneck"

/* Mean cross-entropy of the model with its attached method on one batch,
 * with the backward pass (accumulating gradients) or forward only. */
static double bn_loss(cp_model *m, cp_forward_buffers *fb, cp_backward_buffers *bb,
                      const int32_t *inputs, const int32_t *targets, int backward)
{
    cp_model_forward(m, fb, inputs);
    if (backward)
        return cp_model_backward(m, fb, bb, targets, 1.0f);
    return test_logits_loss(fb->logits, targets, fb->B * fb->T, m->cfg.vocab_size);
}

/* Houlsby adapters (both sites) with every weight drawn at random, so the
 * up-projection is not zero; every third value checked. */
static void check_bn_gradients(const char *model_dir, const char *activation)
{
    cp_model *m = NULL;
    cp_error err = {0};
    CHECK_MSG(cp_model_load(model_dir, &m, &err) == CP_OK, "%s", err.msg);
    if (!m)
        return;
    cp_method_settings s = cp_method_default_settings();
    s.reduction_factor = 4;
    s.non_linearity = activation;
    cp_method *method = NULL;
    CHECK_MSG(cp_method_create(cp_method_find("adapter"), m, &s, &method, &err) == CP_OK, "%s",
              err.msg);
    if (!method)
        return;
    cp_bottleneck *bn = method->state;
    cp_rng rng;
    cp_rng_seed(&rng, 9);
    for (size_t i = 0; i < bn->n_weights; i++)
        bn->weights[i] = 0.8f * (cp_rng_uniform(&rng) - 0.5f);

    int B = 2, T = 6, N = B * T;
    CHECK(method->ops->reserve(method, N, 1, &err) == CP_OK);
    method->training = 1;
    m->method = method;
    cp_forward_buffers fb;
    cp_backward_buffers bb;
    CHECK(cp_forward_buffers_init(&fb, &m->cfg, B, T, 1, &err) == CP_OK);
    CHECK(cp_backward_buffers_init(&bb, &m->cfg, B, T, &err) == CP_OK);
    int32_t inputs[12], targets[12];
    for (int i = 0; i < N; i++) {
        inputs[i] = (int32_t)(cp_rng_next(&rng) % 40);
        targets[i] = (int32_t)(cp_rng_next(&rng) % 40);
    }
    cp_method_zero_grads(method);
    bn_loss(m, &fb, &bb, inputs, targets, 1);

    double worst = 0, max_grad = 0;
    for (size_t i = 0; i < bn->n_weights; i += 3) {
        float saved = bn->weights[i], eps = 3e-3f;
        bn->weights[i] = saved + eps;
        double up = bn_loss(m, &fb, &bb, inputs, targets, 0);
        bn->weights[i] = saved - eps;
        double down = bn_loss(m, &fb, &bb, inputs, targets, 0);
        bn->weights[i] = saved;
        double numeric = (up - down) / (2 * eps);
        double diff = fabs(numeric - bn->grads[i]);
        worst = diff > worst ? diff : worst;
        max_grad = fabs(numeric) > max_grad ? fabs(numeric) : max_grad;
    }
    CHECK_MSG(max_grad > 1e-3, "%s: gradients are all near zero (%g)", model_dir, max_grad);
    CHECK_MSG(worst < 2e-3 * max_grad + 1e-5, "%s (%s): worst |analytic - numeric| %g, max |grad| %g",
              model_dir, activation, worst, max_grad);

    m->method = NULL;
    cp_method_free(method);
    cp_backward_buffers_free(&bb);
    cp_forward_buffers_free(&fb);
    cp_model_free(m);
}

TEST(bottleneck_gradients_match_finite_differences)
{
    check_bn_gradients("tests/fixtures/tiny-mistral", "relu");
    check_bn_gradients("tests/fixtures/tiny-qwen2", "swish");
    check_bn_gradients("tests/fixtures/tiny-llama-bias", "gelu");
    check_bn_gradients("tests/fixtures/tiny-gpt2", "gelu"); /* LayerNorm, Conv1D c_proj */
}

/* A fresh adapter is the identity: the up-projection starts at zero. */
TEST(bottleneck_starts_as_base_model)
{
    cp_model *m = NULL;
    cp_method *method = NULL;
    cp_error err = {0};
    CHECK(cp_model_load("tests/fixtures/tiny-llama-bias", &m, &err) == CP_OK);
    cp_method_settings s = cp_method_default_settings();
    s.reduction_factor = 4;
    CHECK(cp_method_create(cp_method_find("adapter"), m, &s, &method, &err) == CP_OK);
    if (!m || !method)
        return;
    cp_forward_buffers fb;
    CHECK(cp_forward_buffers_init(&fb, &m->cfg, 1, 5, 0, &err) == CP_OK);
    CHECK(method->ops->reserve(method, 5, 0, &err) == CP_OK);
    int32_t ids[5] = {1, 7, 3, 30, 12};
    size_t n = (size_t)5 * m->cfg.vocab_size;
    cp_model_forward(m, &fb, ids);
    float *base = malloc(n * sizeof(float));
    memcpy(base, fb.logits, n * sizeof(float));
    m->method = method;
    cp_model_forward(m, &fb, ids);
    CHECK(memcmp(base, fb.logits, n * sizeof(float)) == 0);
    m->method = NULL;
    free(base);
    cp_forward_buffers_free(&fb);
    cp_method_free(method);
    cp_model_free(m);
}

/* Reads batch.json's input_ids (2, 33) into inputs and targets (2, 32). */
static int read_batch(const char *path, int32_t *inputs, int32_t *targets)
{
    cJSON *batch = test_read_json(path);
    const cJSON *rows = cJSON_GetObjectItem(batch, "input_ids");
    int ok = cJSON_GetArraySize(rows) == 2;
    for (int b = 0; ok && b < 2; b++) {
        const cJSON *row = cJSON_GetArrayItem(rows, b);
        ok = cJSON_GetArraySize(row) == 33;
        for (int t = 0; ok && t < 32; t++) {
            inputs[b * 32 + t] = cJSON_GetArrayItem(row, t)->valueint;
            targets[b * 32 + t] = cJSON_GetArrayItem(row, t + 1)->valueint;
        }
    }
    cJSON_Delete(batch);
    CHECK_MSG(ok, "%s: expected input_ids of 2 rows of 33 ids", path);
    return ok;
}

/* The largest |got - ref| over the largest |ref| of one stored gradient. */
static double relative_difference(const cp_safetensors *grads, const char *name, const float *got,
                                  size_t n)
{
    const cp_st_tensor *t = cp_safetensors_find(grads, name);
    CHECK_MSG(t && cp_st_tensor_numel(t) == n, "grads.safetensors: %s", name);
    if (!t || cp_st_tensor_numel(t) != n)
        return INFINITY;
    const float *ref = t->data;
    double scale = 0, diff = 0;
    for (size_t i = 0; i < n; i++) {
        scale = fabs(ref[i]) > scale ? fabs(ref[i]) : scale;
        diff = fabs(got[i] - ref[i]) > diff ? fabs(got[i] - ref[i]) : diff;
    }
    return diff / scale;
}

TEST(bottleneck_matches_pytorch_reference)
{
    cp_model *m = NULL;
    cp_method *method = NULL;
    cp_error err = {0};
    CHECK_MSG(cp_model_load(test_shared("models/stories260K"), &m, &err) == CP_OK, "%s", err.msg);
    if (!m)
        return;
    CHECK_MSG(cp_method_load(FIXTURE, m, &method, &err) == CP_OK, "%s", err.msg);
    cJSON *expected = test_read_json(FIXTURE "/expected.json");
    int32_t inputs[64], targets[64];
    if (!method || !expected || !read_batch(FIXTURE "/batch.json", inputs, targets))
        return;
    cp_bottleneck *bn = method->state;
    CHECK_EQ_STR(method->ops->name, "adapter");
    CHECK_EQ_INT(bn->R, 4);
    CHECK_EQ_INT(bn->act, CP_BN_SWISH);
    CHECK(bn->sites[CP_BN_SITE_ATTENTION]);
    CHECK(bn->sites[CP_BN_SITE_OUTPUT]);

    CHECK(method->ops->reserve(method, 64, 1, &err) == CP_OK);
    method->training = 1;
    m->method = method;
    cp_forward_buffers fb;
    cp_backward_buffers bb;
    CHECK(cp_forward_buffers_init(&fb, &m->cfg, 2, 32, 1, &err) == CP_OK);
    CHECK(cp_backward_buffers_init(&bb, &m->cfg, 2, 32, &err) == CP_OK);
    cp_method_zero_grads(method);
    double loss = bn_loss(m, &fb, &bb, inputs, targets, 1);
    double want = cJSON_GetObjectItem(expected, "loss")->valuedouble;
    CHECK_MSG(fabs(loss - want) <= 1e-4 * fabs(want), "loss %.9f, PyTorch %.9f", loss, want);

    cp_safetensors *grads = NULL;
    CHECK(cp_safetensors_open(FIXTURE "/grads.safetensors", &grads, &err) == CP_OK);
    static const char *const kinds[4] = {"adapter_down.0.weight", "adapter_down.0.bias",
                                         "adapter_up.weight", "adapter_up.bias"};
    size_t C = 64, R = 4;
    double worst = 0;
    char name[192];
    for (int l = 0; grads && l < bn->n_layers; l++) {
        for (int s = 0; s < CP_BN_SITE_COUNT; s++) {
            const cp_bn_slot *slot = cp_bottleneck_slot(bn, l, (cp_bn_site)s);
            const float *got[4] = {slot->d_down, slot->d_down_bias, slot->d_up, slot->d_up_bias};
            size_t sizes[4] = {R * C, R, C * R, C};
            for (int k = 0; k < 4; k++) {
                cp_bottleneck_tensor_name(&m->cfg, name, sizeof name, l, (cp_bn_site)s, kinds[k]);
                double d = relative_difference(grads, name, got[k], sizes[k]);
                worst = d > worst ? d : worst;
            }
        }
    }
    CHECK_MSG(worst < 1e-4, "max relative gradient difference %g", worst);
    printf("    adapter vs PyTorch: loss %.9f vs %.9f, max relative gradient difference %.2g\n",
           loss, want, worst);

    cp_safetensors_close(grads);
    cJSON_Delete(expected);
    m->method = NULL;
    cp_method_free(method);
    cp_backward_buffers_free(&bb);
    cp_forward_buffers_free(&fb);
    cp_model_free(m);
}

TEST(bottleneck_gpt2_uses_adapterhub_names)
{
    cp_model *m = NULL;
    cp_method *method = NULL, *loaded = NULL;
    cp_error err = {0};
    CHECK_MSG(cp_model_load("tests/fixtures/tiny-gpt2", &m, &err) == CP_OK, "%s", err.msg);
    if (!m)
        return;
    cp_method_settings s = cp_method_default_settings();
    s.adapter_config = "pfeiffer";
    s.reduction_factor = 8;
    s.non_linearity = "gelu";
    CHECK(cp_method_create(cp_method_find("adapter"), m, &s, &method, &err) == CP_OK);
    cp_bottleneck *bn = method->state;
    for (size_t i = 0; i < bn->n_weights; i++)
        bn->weights[i] = 1e-3f * (float)i - 0.2f;
    const char *dir = test_tmpdir();
    CHECK_MSG(method->ops->save(method, m, dir, "gpt2", &err) == CP_OK, "%s", err.msg);

    cp_safetensors *st = NULL;
    char *path = cp_path_join(dir, "adapter.safetensors");
    CHECK(cp_safetensors_open(path, &st, &err) == CP_OK);
    const char *prefix = "transformer.h.1.output_adapters.adapters.default.";
    char name[160];
    snprintf(name, sizeof name, "%sadapter_down.0.weight", prefix);
    const cp_st_tensor *down = cp_safetensors_find(st, name);
    snprintf(name, sizeof name, "%sadapter_up.bias", prefix);
    const cp_st_tensor *up_bias = cp_safetensors_find(st, name);
    CHECK_MSG(down != NULL, "no tensor %sadapter_down.0.weight", prefix);
    CHECK_MSG(up_bias != NULL, "no tensor %sadapter_up.bias", prefix);
    if (down) {
        CHECK_EQ_INT(down->ndim, 2);
        CHECK_EQ_INT(down->shape[0], 2);
        CHECK_EQ_INT(down->shape[1], 16);
    }
    if (up_bias) {
        CHECK_EQ_INT(up_bias->ndim, 1);
        CHECK_EQ_INT(up_bias->shape[0], 16);
    }
    CHECK_EQ_INT(cp_safetensors_count(st), 8); /* pfeiffer: the MLP site of 2 layers */
    cp_safetensors_close(st);
    free(path);

    path = cp_path_join(dir, "adapter_config.json");
    cJSON *config = test_read_json(path);
    const cJSON *c = cJSON_GetObjectItem(config, "config");
    CHECK_EQ_STR(cJSON_GetStringValue(cJSON_GetObjectItem(config, "cpeft_method")), "adapter");
    CHECK_EQ_STR(cJSON_GetStringValue(cJSON_GetObjectItem(config, "model_type")), "gpt2");
    CHECK_EQ_STR(cJSON_GetStringValue(cJSON_GetObjectItem(c, "non_linearity")), "gelu");
    CHECK(cJSON_IsFalse(cJSON_GetObjectItem(c, "mh_adapter")));
    CHECK(cJSON_IsTrue(cJSON_GetObjectItem(c, "output_adapter")));
    CHECK_EQ_INT(cJSON_GetObjectItem(c, "reduction_factor")->valueint, 8);
    cJSON_Delete(config);
    free(path);

    CHECK_MSG(cp_method_load(dir, m, &loaded, &err) == CP_OK, "%s", err.msg);
    if (loaded) {
        cp_bottleneck *back = loaded->state;
        CHECK_EQ_INT(back->act, CP_BN_GELU);
        CHECK(!back->sites[CP_BN_SITE_ATTENTION]);
        CHECK(back->sites[CP_BN_SITE_OUTPUT]);
        CHECK_EQ_INT(back->n_weights, bn->n_weights);
        CHECK(back->n_weights == bn->n_weights &&
              memcmp(back->weights, bn->weights, bn->n_weights * sizeof(float)) == 0);
    }
    cp_method_free(loaded);
    cp_method_free(method);
    cp_model_free(m);
}

/* 200 steps of batch 4 x 32 tokens: the eval loss must drop, and the saved
 * run must give `cpeft eval` the loss training printed. */
TEST(bottleneck_recipe_lowers_eval_loss)
{
    const char *dir = test_tmpdir();
    test_write_shakespeare_split(dir);
    char *args = NULL, *out = NULL, *err = NULL;
    if (asprintf(&args, "train --model '%s' --data '%s/train.txt' --eval-data '%s/eval.txt' "
                        "--method adapter --steps 200 --batch-size 4 --seq-len 32 --lr 3e-3 "
                        "--out '%s/run' --quiet",
                 test_shared("models/stories260K"), dir, dir, dir) < 0)
        abort();
    CHECK_EQ_INT(test_run_cli(args, NULL, &out, &err), 0);
    double before = -1, after = -1;
    const char *at = out ? strstr(out, "eval loss: ") : NULL;
    CHECK_MSG(at && sscanf(at, "eval loss: %lf -> %lf", &before, &after) == 2, "%s %s", out, err);
    CHECK_MSG(after < before - 0.3, "eval loss %.4f -> %.4f", before, after);
    printf("    adapter 200 steps: eval loss %.4f -> %.4f\n", before, after);

    char run[512], eval_file[512];
    snprintf(run, sizeof run, "%s/run", dir);
    snprintf(eval_file, sizeof eval_file, "%s/eval.txt", dir);
    CHECK_CLOSE(test_cli_eval_loss(run, eval_file, 32), after, 1e-5);
    free(args), free(out), free(err);
}

/* Runs train with one bad setting: exit status 2 and one line naming it. */
static void check_setting_error(const char *dir, const char *extra, const char *needle)
{
    char *args = NULL, *err = NULL;
    if (asprintf(&args, "train --model '%s' --data '%s/train.txt' --method adapter %s "
                        "--out '%s/failed' --quiet",
                 test_shared("models/stories260K"), dir, extra, dir) < 0)
        abort();
    int rc = test_run_cli(args, NULL, NULL, &err);
    CHECK_MSG(rc == 2, "%s: exit status %d (%s)", extra, rc, err);
    CHECK_MSG(err && strstr(err, needle), "%s: \"%s\" lacks \"%s\"", extra, err, needle);
    CHECK_MSG(test_count_lines(err) == 1, "%s: expected one line: %s", extra, err);
    free(args), free(err);
}

TEST(bottleneck_train_rejects_bad_settings)
{
    const char *dir = test_tmpdir();
    test_write_shakespeare_split(dir);
    check_setting_error(dir, "--reduction-factor 0",
                        "--reduction-factor must be between 1 and the hidden size 64, got 0");
    check_setting_error(dir, "--reduction-factor 65", "--reduction-factor");
    check_setting_error(dir, "--adapter-config lora", "--adapter-config \"lora\"");
    check_setting_error(dir, "--non-linearity tanh", "--non-linearity \"tanh\"");
    check_setting_error(dir, "--target o_proj", "--target does not apply");
}
