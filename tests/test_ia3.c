/*
 * (IA)³: gradients against finite differences on small random models, loss
 * and gradients against PyTorch (tools/ref_ia3.py make-fixture), PEFT's file
 * layout and default config, and training from the command line.
 */
#include <cJSON.h>
#include <stdlib.h>

#include "core/file.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "peft/ia3.h"
#include "peft/method.h"
#include "test.h"

#define FIXTURE "tests/fixtures/ia3"

/* Mean cross-entropy of the model with its attached method on one batch,
 * with the backward pass (accumulating gradients) or forward only. */
static double ia3_loss(cp_model *m, cp_forward_buffers *fb, cp_backward_buffers *bb,
                       const int32_t *inputs, const int32_t *targets, int backward)
{
    cp_model_forward(m, fb, inputs);
    if (backward)
        return cp_model_backward(m, fb, bb, targets, 1.0f);
    return test_logits_loss(fb->logits, targets, fb->B * fb->T, m->cfg.vocab_size);
}

/* Every projection adapted (down_proj by its input, the rest by their
 * outputs), vectors drawn around one, every value checked. */
static void check_ia3_gradients(const char *model_dir)
{
    cp_model *m = NULL;
    cp_error err = {0};
    CHECK_MSG(cp_model_load(model_dir, &m, &err) == CP_OK, "%s", err.msg);
    if (!m)
        return;
    cp_method_settings s = cp_method_default_settings();
    s.targets = cp_proj_all(&m->cfg);
    s.targets_given = 1;
    cp_method *method = NULL;
    CHECK_MSG(cp_method_create(cp_method_find("ia3"), m, &s, &method, &err) == CP_OK, "%s", err.msg);
    if (!method)
        return;
    cp_ia3 *ia3 = method->state;
    CHECK_EQ_INT(ia3->feedforward, 1u << CP_PROJ_DOWN);
    cp_rng rng;
    cp_rng_seed(&rng, 5);
    for (size_t i = 0; i < ia3->n_weights; i++)
        ia3->weights[i] = 1.0f + 0.6f * (cp_rng_uniform(&rng) - 0.5f);

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
    ia3_loss(m, &fb, &bb, inputs, targets, 1);

    double worst = 0, max_grad = 0;
    for (size_t i = 0; i < ia3->n_weights; i++) {
        float saved = ia3->weights[i], eps = 3e-3f;
        ia3->weights[i] = saved + eps;
        double up = ia3_loss(m, &fb, &bb, inputs, targets, 0);
        ia3->weights[i] = saved - eps;
        double down = ia3_loss(m, &fb, &bb, inputs, targets, 0);
        ia3->weights[i] = saved;
        double numeric = (up - down) / (2 * eps);
        double diff = fabs(numeric - ia3->grads[i]);
        worst = diff > worst ? diff : worst;
        max_grad = fabs(numeric) > max_grad ? fabs(numeric) : max_grad;
    }
    CHECK_MSG(max_grad > 1e-3, "%s: gradients are all near zero (%g)", model_dir, max_grad);
    CHECK_MSG(worst < 2e-3 * max_grad + 1e-5, "%s: worst |analytic - numeric| %g, max |grad| %g",
              model_dir, worst, max_grad);

    m->method = NULL;
    cp_method_free(method);
    cp_backward_buffers_free(&bb);
    cp_forward_buffers_free(&fb);
    cp_model_free(m);
}

TEST(ia3_gradients_match_finite_differences)
{
    check_ia3_gradients("tests/fixtures/tiny-mistral");    /* sliding window, GQA */
    check_ia3_gradients("tests/fixtures/tiny-qwen2");      /* q/k/v biases */
    check_ia3_gradients("tests/fixtures/tiny-llama-bias"); /* biases scaled with the output */
    check_ia3_gradients("tests/fixtures/tiny-gpt2");       /* fused c_attn, Conv1D */
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

TEST(ia3_matches_pytorch_reference)
{
    cp_model *m = NULL;
    cp_method *method = NULL;
    cp_error err = {0};
    CHECK_MSG(cp_model_load(test_shared("models/stories260K"), &m, &err) == CP_OK, "%s", err.msg);
    if (!m)
        return;
    /* adapter_config.json leaves target_modules null: PEFT's llama defaults. */
    CHECK_MSG(cp_method_load(FIXTURE, m, &method, &err) == CP_OK, "%s", err.msg);
    cJSON *expected = test_read_json(FIXTURE "/expected.json");
    int32_t inputs[64], targets[64];
    if (!method || !expected || !read_batch(FIXTURE "/batch.json", inputs, targets))
        return;
    cp_ia3 *ia3 = method->state;
    CHECK_EQ_STR(method->ops->name, "ia3");
    CHECK_EQ_INT(ia3->targets, (1u << CP_PROJ_K) | (1u << CP_PROJ_V) | (1u << CP_PROJ_DOWN));
    CHECK_EQ_INT(ia3->feedforward, 1u << CP_PROJ_DOWN);

    CHECK(method->ops->reserve(method, 64, 1, &err) == CP_OK);
    method->training = 1;
    m->method = method;
    cp_forward_buffers fb;
    cp_backward_buffers bb;
    CHECK(cp_forward_buffers_init(&fb, &m->cfg, 2, 32, 1, &err) == CP_OK);
    CHECK(cp_backward_buffers_init(&bb, &m->cfg, 2, 32, &err) == CP_OK);
    cp_method_zero_grads(method);
    double loss = ia3_loss(m, &fb, &bb, inputs, targets, 1);
    double want = cJSON_GetObjectItem(expected, "loss")->valuedouble;
    CHECK_MSG(fabs(loss - want) <= 1e-4 * fabs(want), "loss %.9f, PyTorch %.9f", loss, want);

    /* Each vector's gradient within 1e-4 of its largest entry. */
    cp_safetensors *grads = NULL;
    CHECK(cp_safetensors_open(FIXTURE "/grads.safetensors", &grads, &err) == CP_OK);
    double worst = 0;
    char name[160];
    for (int l = 0; grads && l < ia3->n_layers; l++) {
        for (int p = 0; p < CP_PROJ_COUNT; p++) {
            int len;
            if (!cp_ia3_vector(ia3, l, (cp_proj)p, &len))
                continue;
            cp_ia3_tensor_name(&m->cfg, name, sizeof name, l, (cp_proj)p);
            const cp_st_tensor *t = cp_safetensors_find(grads, name);
            CHECK_MSG(t && cp_st_tensor_numel(t) == (size_t)len, "grads.safetensors: %s", name);
            if (!t)
                continue;
            const float *ref = t->data, *got = ia3->grad[(size_t)l * CP_PROJ_COUNT + p];
            double scale = 0, diff = 0;
            for (int i = 0; i < len; i++) {
                scale = fabs(ref[i]) > scale ? fabs(ref[i]) : scale;
                diff = fabs(got[i] - ref[i]) > diff ? fabs(got[i] - ref[i]) : diff;
            }
            worst = diff / scale > worst ? diff / scale : worst;
        }
    }
    CHECK_MSG(worst < 1e-4, "max relative gradient difference %g", worst);
    printf("    ia3 vs PyTorch: loss %.9f vs %.9f, max relative gradient difference %.2g\n", loss,
           want, worst);

    cp_safetensors_close(grads);
    cJSON_Delete(expected);
    m->method = NULL;
    cp_method_free(method);
    cp_backward_buffers_free(&bb);
    cp_forward_buffers_free(&fb);
    cp_model_free(m);
}

/* Copies a file byte for byte. */
static void copy_file(const char *from, const char *to)
{
    char *cmd = NULL;
    if (asprintf(&cmd, "cp '%s' '%s'", from, to) < 0 || system(cmd) != 0)
        abort();
    free(cmd);
}

TEST(ia3_loads_peft_default_config)
{
    /* PEFT's own IA3 config with the fixture's vectors. */
    const char *dir = test_tmpdir();
    char *to = cp_path_join(dir, "adapter_config.json");
    copy_file(test_shared("adapters/peft-configs/ia3_llama-3.2-3B-default.adapter_config.json"), to);
    free(to);
    to = cp_path_join(dir, "adapter_model.safetensors");
    copy_file(FIXTURE "/adapter_model.safetensors", to);
    free(to);

    cp_model *m = NULL;
    cp_method *method = NULL;
    cp_error err = {0};
    CHECK(cp_model_load(test_shared("models/stories260K"), &m, &err) == CP_OK);
    CHECK_MSG(cp_method_load(dir, m, &method, &err) == CP_OK, "%s", err.msg);
    if (method) {
        cp_ia3 *ia3 = method->state;
        CHECK_EQ_INT(ia3->targets, (1u << CP_PROJ_K) | (1u << CP_PROJ_V) | (1u << CP_PROJ_DOWN));
        CHECK_EQ_INT(ia3->feedforward, 1u << CP_PROJ_DOWN);
    }
    cp_method_free(method);
    cp_model_free(m);
}

/* Writes config into a copy of the fixture and checks the load error. */
static void check_config_error(const char *config, const char *needle)
{
    const char *dir = test_tmpdir();
    char *to = cp_path_join(dir, "adapter_model.safetensors");
    copy_file(FIXTURE "/adapter_model.safetensors", to);
    free(to);
    free(test_write_file(dir, "adapter_config.json", config, strlen(config)));
    cp_model *m = NULL;
    cp_method *method = NULL;
    cp_error err = {0};
    CHECK(cp_model_load(test_shared("models/stories260K"), &m, &err) == CP_OK);
    CHECK_EQ_INT(cp_method_load(dir, m, &method, &err), CP_ERR_INPUT);
    CHECK_MSG(strstr(err.msg, needle) != NULL, "\"%s\" lacks \"%s\"", err.msg, needle);
    CHECK_MSG(!strchr(err.msg, '\n'), "not one line: %s", err.msg);
    cp_method_free(method);
    cp_model_free(m);
}

TEST(ia3_load_rejects_mismatches)
{
    check_config_error("{\"peft_type\": \"IA3\", \"target_modules\": [\"k_proj\", \"c_attn\"]}",
                       "lists c_attn, which is not a projection of model_type llama");
    check_config_error("{\"peft_type\": \"IA3\", \"target_modules\": [\"k_proj\", \"v_proj\"], "
                       "\"feedforward_modules\": [\"down_proj\"]}",
                       "feedforward_modules must be a subset of target_modules");
    check_config_error("{\"peft_type\": \"IA3\", \"target_modules\": [\"k_proj\", \"v_proj\", "
                       "\"down_proj\"], \"feedforward_modules\": []}",
                       "has shape [1, 172], expected [64, 1]");
    check_config_error("{\"peft_type\": \"IA3\", \"target_modules\": [\"k_proj\", \"v_proj\"]}",
                       "holds 15 tensors but adapter_config.json's target_modules imply 10");
    check_config_error("{\"peft_type\": \"IA3\", \"modules_to_save\": [\"lm_head\"]}",
                       "missing tensor \"base_model.model.lm_head.weight\"");
}

TEST(ia3_gpt2_uses_peft_names)
{
    cp_model *m = NULL;
    cp_method *method = NULL, *loaded = NULL;
    cp_error err = {0};
    CHECK_MSG(cp_model_load("tests/fixtures/tiny-gpt2", &m, &err) == CP_OK, "%s", err.msg);
    if (!m)
        return;
    cp_method_settings s = cp_method_default_settings();
    CHECK(cp_method_create(cp_method_find("ia3"), m, &s, &method, &err) == CP_OK);
    cp_ia3 *ia3 = method->state;
    for (size_t i = 0; i < ia3->n_weights; i++)
        ia3->weights[i] = 0.5f + 1e-3f * (float)i;
    const char *dir = test_tmpdir();
    CHECK_MSG(method->ops->save(method, m, dir, "gpt2", &err) == CP_OK, "%s", err.msg);

    cp_safetensors *st = NULL;
    char *path = cp_path_join(dir, "adapter_model.safetensors");
    CHECK(cp_safetensors_open(path, &st, &err) == CP_OK);
    const cp_st_tensor *attn = cp_safetensors_find(st, "base_model.model.transformer.h.1.attn.c_attn.ia3_l");
    const cp_st_tensor *mlp = cp_safetensors_find(st, "base_model.model.transformer.h.0.mlp.c_proj.ia3_l");
    CHECK(attn != NULL);
    CHECK(mlp != NULL);
    if (attn) {
        CHECK_EQ_INT(attn->shape[0], 48);
        CHECK_EQ_INT(attn->shape[1], 1);
    }
    if (mlp) {
        CHECK_EQ_INT(mlp->shape[0], 1);
        CHECK_EQ_INT(mlp->shape[1], 64);
    }
    CHECK_EQ_INT(cp_safetensors_count(st), 4);
    cp_safetensors_close(st);
    free(path);

    cJSON *config = NULL;
    path = cp_path_join(dir, "adapter_config.json");
    config = test_read_json(path);
    char *targets = cJSON_PrintUnformatted(cJSON_GetObjectItem(config, "target_modules"));
    char *ff = cJSON_PrintUnformatted(cJSON_GetObjectItem(config, "feedforward_modules"));
    CHECK_EQ_STR(targets, "[\"mlp.c_proj\",\"c_attn\"]");
    CHECK_EQ_STR(ff, "[\"mlp.c_proj\"]");
    CHECK(cJSON_IsTrue(cJSON_GetObjectItem(config, "fan_in_fan_out")));
    free(targets), free(ff), free(path);
    cJSON_Delete(config);

    CHECK_MSG(cp_method_load(dir, m, &loaded, &err) == CP_OK, "%s", err.msg);
    if (loaded) {
        cp_ia3 *back = loaded->state;
        CHECK_EQ_INT(back->targets, ia3->targets);
        CHECK_EQ_INT(back->feedforward, ia3->feedforward);
        CHECK_EQ_INT(back->n_weights, ia3->n_weights);
        CHECK(back->n_weights == ia3->n_weights &&
              memcmp(back->weights, ia3->weights, ia3->n_weights * sizeof(float)) == 0);
    }
    cp_method_free(loaded);
    cp_method_free(method);
    cp_model_free(m);
}

/* 200 steps of batch 4 x 32 tokens: the eval loss must drop, and the saved
 * run must give `cpeft eval` the loss training printed. */
TEST(ia3_recipe_lowers_eval_loss)
{
    const char *dir = test_tmpdir();
    test_write_shakespeare_split(dir);
    char *args = NULL, *out = NULL, *err = NULL;
    if (asprintf(&args, "train --model '%s' --data '%s/train.txt' --eval-data '%s/eval.txt' "
                        "--method ia3 --steps 200 --batch-size 4 --seq-len 32 --lr 3e-2 "
                        "--out '%s/run' --quiet",
                 test_shared("models/stories260K"), dir, dir, dir) < 0)
        abort();
    CHECK_EQ_INT(test_run_cli(args, NULL, &out, &err), 0);
    double before = -1, after = -1;
    const char *at = out ? strstr(out, "eval loss: ") : NULL;
    CHECK_MSG(at && sscanf(at, "eval loss: %lf -> %lf", &before, &after) == 2, "%s %s", out, err);
    CHECK_MSG(after < before - 0.3, "eval loss %.4f -> %.4f", before, after);
    printf("    ia3 200 steps: eval loss %.4f -> %.4f\n", before, after);

    char run[512], eval_file[512];
    snprintf(run, sizeof run, "%s/run", dir);
    snprintf(eval_file, sizeof eval_file, "%s/eval.txt", dir);
    CHECK_CLOSE(test_cli_eval_loss(NULL, eval_file, 32), before, 1e-5);
    CHECK_CLOSE(test_cli_eval_loss(run, eval_file, 32), after, 1e-5);
    free(args), free(out), free(err);
}

TEST(ia3_train_rejects_bad_target)
{
    const char *dir = test_tmpdir();
    test_write_shakespeare_split(dir);
    char *args = NULL, *err = NULL;
    if (asprintf(&args, "train --model '%s' --data '%s/train.txt' --method ia3 --target "
                        "k_proj,c_attn --out '%s/run' --quiet",
                 test_shared("models/stories260K"), dir, dir) < 0)
        abort();
    CHECK_EQ_INT(test_run_cli(args, NULL, NULL, &err), 2);
    CHECK_MSG(strstr(err, "--target") && strstr(err, "\"c_attn\""), "%s", err);
    CHECK_EQ_INT(test_count_lines(err), 1);
    free(args), free(err);
}
