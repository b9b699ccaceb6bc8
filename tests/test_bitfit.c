/*
 * BitFit: bias gradients against finite differences and PyTorch
 * (tools/ref_full.py make-fixture), save and load, the rejection of a
 * model without biases, and 200 steps on tinyshakespeare.
 */
#include <cJSON.h>
#include <stdlib.h>

#include "core/file.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "peft/method.h"
#include "base_run.h"
#include "random_gpt2.h"
#include "test.h"

TEST(bitfit_gradients_match_finite_differences)
{
    const char *models[] = {"tests/fixtures/tiny-gpt2", "tests/fixtures/tiny-qwen2",
                            "tests/fixtures/tiny-llama-bias"};
    for (size_t i = 0; i < sizeof models / sizeof *models; i++) {
        run r;
        if (base_run_init(&r, models[i], "bitfit", NULL, NULL, 2, 5))
            base_run_check_gradients(&r, 0, models[i]);
        base_run_free(&r);
    }
}

/* GPT-2 has 13 biases in two layers: ln_1, c_attn, attn.c_proj, ln_2, c_fc
 * and mlp.c_proj in each, and ln_f. Weights stay frozen. */
TEST(bitfit_matches_pytorch_on_gpt2)
{
    run r;
    cp_safetensors *grads = NULL;
    cp_error err = {0};
    CHECK_MSG(cp_safetensors_open("tests/fixtures/full/grads_gpt2.safetensors", &grads, &err) ==
                  CP_OK,
              "%s", err.msg);
    cJSON *expected = test_read_json("tests/fixtures/full/expected.json");
    const cJSON *rows = cJSON_GetObjectItem(cJSON_GetObjectItem(expected, "tiny-gpt2"), "input_ids");
    if (grads && rows && base_run_init(&r, "tests/fixtures/tiny-gpt2", "bitfit", NULL, NULL, 2, 8)) {
        for (int b = 0; b < 2; b++)
            for (int t = 0; t < 8; t++) {
                const cJSON *row = cJSON_GetArrayItem(rows, b);
                r.inputs[b * 8 + t] = cJSON_GetArrayItem(row, t)->valueint;
                r.targets[b * 8 + t] = cJSON_GetArrayItem(row, t + 1)->valueint;
            }
        CHECK_EQ_INT(r.method->n_params, 13);
        CHECK(r.m->dembed == NULL);
        CHECK(r.m->layers[0].dw[CP_PROJ_QKV] == NULL);
        CHECK(r.m->layers[0].dattn_norm == NULL);
        CHECK(r.m->layers[0].dattn_norm_bias != NULL);
        CHECK_CLOSE(base_run_loss(&r, 1), base_expected_loss("tiny-gpt2"), 1e-4 * 3.8);
        double worst = 0;
        for (int i = 0; i < r.method->n_params; i++) {
            const cp_param_ref *p = &r.method->params[i];
            const cp_st_tensor *t = cp_safetensors_find(grads, p->name);
            CHECK_MSG(t && cp_st_tensor_numel(t) == p->n, "grads lack %s", p->name);
            if (!t)
                continue;
            double d = base_max_rel_diff(p->grad, p->n, t->data, p->n);
            CHECK_MSG(d < 1e-4, "%s: max relative difference %.3g", p->name, d);
            worst = d > worst ? d : worst;
        }
        printf("bitfit vs PyTorch: worst bias gradient difference %.2g\n", worst);
    }
    cJSON_Delete(expected);
    base_run_free(&r);
    cp_safetensors_close(grads);
}

TEST(bitfit_save_load_round_trip)
{
    const char *dir = test_tmpdir(), *model = "tests/fixtures/tiny-qwen2";
    run r;
    cp_error err = {0};
    if (!base_run_init(&r, model, "bitfit", NULL, NULL, 1, 6)) {
        base_run_free(&r);
        return;
    }
    CHECK_EQ_INT(r.method->n_params, 6); /* q, k and v biases of two layers */
    for (int i = 0; i < r.method->n_params; i++)
        for (size_t j = 0; j < r.method->params[i].n; j++)
            r.method->params[i].param[j] += 0.05f * (float)((j + 3 * i) % 4);
    base_run_loss(&r, 0);
    float logits[6 * 40];
    memcpy(logits, r.fb.logits, sizeof logits);
    CHECK_MSG(r.method->ops->save(r.method, r.m, dir, model, &err) == CP_OK, "%s", err.msg);

    char *path = cp_path_join(dir, "adapter_config.json");
    cJSON *config = test_read_json(path);
    const cJSON *name = cJSON_GetObjectItem(config, "cpeft_method");
    CHECK_EQ_STR(cJSON_IsString(name) ? name->valuestring : NULL, "bitfit");
    cJSON_Delete(config);
    free(path);
    cp_safetensors *saved = NULL;
    path = cp_path_join(dir, "adapter_model.safetensors");
    CHECK(cp_safetensors_open(path, &saved, &err) == CP_OK);
    CHECK(saved != NULL);
    if (saved)
        CHECK(cp_safetensors_find(saved, "model.layers.1.self_attn.v_proj.bias") != NULL);
    cp_safetensors_close(saved);
    free(path);

    cp_model *m = NULL;
    cp_method *loaded = NULL;
    CHECK(cp_model_load(model, &m, &err) == CP_OK);
    CHECK_MSG(cp_method_load(dir, m, &loaded, &err) == CP_OK, "%s", err.msg);
    if (loaded) {
        m->method = loaded;
        cp_forward_buffers fb;
        CHECK(cp_forward_buffers_init_model(&fb, m, 1, 6, 0, &err) == CP_OK);
        cp_model_forward(m, &fb, r.inputs);
        CHECK_MSG(memcmp(fb.logits, logits, sizeof logits) == 0, "logits differ after load");
        cp_forward_buffers_free(&fb);
        m->method = NULL;
    }
    cp_method_free(loaded);
    cp_model_free(m);
    base_run_free(&r);
}

/* stories260K is a Llama model: no biases anywhere. */
TEST(bitfit_rejects_model_without_biases)
{
    const char *dir = test_tmpdir();
    char *data = NULL, *args = NULL, *out = NULL, *err = NULL;
    data = test_write_file(dir, "train.txt", "To be or not to be, that is the question.\n", 42);
    if (asprintf(&args,
                 "train --model '%s' --data '%s' --out '%s/run' --method bitfit --seq-len 8 "
                 "--eval-split 0 --quiet",
                 test_shared("models/stories260K"), data, dir) < 0)
        abort();
    CHECK_EQ_INT(test_run_cli(args, NULL, &out, &err), 2);
    CHECK_MSG(err && strstr(err, "this llama model has no biases") != NULL, "%s", err);
    CHECK_EQ_INT(test_count_lines(err), 1);
    free(data), free(args), free(out), free(err);
}

/* BitFit on tinyshakespeare: a small random GPT-2 with GPT-2's tokenizer
 * and its whole 50257-token vocabulary trains only its biases for 200
 * steps, and the eval loss falls. */
TEST(bitfit_recipe_lowers_eval_loss)
{
    const char *dir = test_write_random_gpt2(64, 2, 4, 256, 7, NULL);
    char *text = NULL;
    size_t len = 0;
    cp_error err = {0};
    CHECK(cp_file_read(test_shared("data/tinyshakespeare/input.txt"), &text, &len, &err) == CP_OK);
    char *data = test_write_file(dir, "train.txt", text, len > 100000 ? 100000 : len);
    free(text);

    char *args = NULL, *out = NULL, *err_text = NULL;
    if (asprintf(&args,
                 "train --model '%s' --data '%s' --out '%s/run' --method bitfit --steps 200 "
                 "--batch-size 2 --seq-len 16 --lr 0.3 --quiet",
                 dir, data, dir) < 0)
        abort();
    CHECK_EQ_INT(test_run_cli(args, NULL, &out, &err_text), 0);
    double before = 0, after = 0;
    const char *line = out ? strstr(out, "eval loss: ") : NULL;
    CHECK_MSG(line && sscanf(line, "eval loss: %lf -> %lf", &before, &after) == 2, "%s %s", out,
              err_text);
    CHECK_MSG(after < before - 0.5, "eval loss %g -> %g", before, after);
    fprintf(stderr, "    eval loss %.4f -> %.4f\n", before, after);
    free(data), free(args), free(out), free(err_text);
}
