/*
 * Full fine-tuning: the weight gradients of every tensor kind against finite
 * differences on small random models, the loss and gradients against
 * PyTorch (tools/ref_full.py make-fixture), --trainable, save and load, and
 * training from the command line.
 */
#include <cJSON.h>
#include <stdlib.h>

#include "core/file.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "peft/method.h"
#include "peft/modules_to_save.h"
#include "base_run.h"
#include "test.h"
#include "train/optimizer.h"

#define FIXTURE "tests/fixtures/full"

/* Every tensor kind: GPT-2 (Conv1D (in, out) weights, LayerNorm biases,
 * learned positions, tied head), Qwen2 (q/k/v biases, tied head), Llama with
 * every bias and an untied head, Mistral (GQA, sliding window). */
TEST(full_gradients_match_finite_differences)
{
    const char *models[] = {"tests/fixtures/tiny-gpt2", "tests/fixtures/tiny-qwen2",
                            "tests/fixtures/tiny-llama-bias", "tests/fixtures/tiny-mistral"};
    for (size_t i = 0; i < sizeof models / sizeof *models; i++) {
        run r;
        if (base_run_init(&r, models[i], "full", NULL, NULL, 2, 5))
            base_run_check_gradients(&r, 0, models[i]);
        base_run_free(&r);
    }
}

/* Counts the tensors of model_dir's checkpoint and their values. */
static void count_checkpoint(const char *model_dir, size_t *n_tensors, size_t *n_values)
{
    cp_safetensors *st = NULL;
    cp_error err = {0};
    *n_tensors = *n_values = 0;
    CHECK_MSG(cp_safetensors_open(model_dir, &st, &err) == CP_OK, "%s", err.msg);
    for (size_t i = 0; st && i < cp_safetensors_count(st); i++) {
        (*n_tensors)++;
        *n_values += cp_st_tensor_numel(cp_safetensors_at(st, i));
    }
    cp_safetensors_close(st);
}

TEST(full_trains_every_tensor_once)
{
    /* tiny-gpt2 stores no lm_head: its head is the tied wte. */
    run r;
    size_t n_tensors, n_values;
    count_checkpoint("tests/fixtures/tiny-gpt2", &n_tensors, &n_values);
    if (base_run_init(&r, "tests/fixtures/tiny-gpt2", "full", NULL, NULL, 1, 4)) {
        CHECK_EQ_INT(r.method->n_params, n_tensors);
        CHECK_EQ_INT(cp_method_param_count(r.method), n_values);
        CHECK(r.m->lm_head == r.m->embed);
        CHECK(r.m->dembed != NULL);
        CHECK(r.m->dlm_head == r.m->dembed);
    }
    base_run_free(&r);
}

TEST(full_matches_pytorch_on_stories260k)
{
    run r;
    cp_safetensors *grads = NULL;
    cp_error err = {0};
    CHECK_MSG(cp_safetensors_open(FIXTURE "/grads_stories.safetensors", &grads, &err) == CP_OK,
              "%s", err.msg);
    if (grads && base_run_init(&r, test_shared("models/stories260K"), "full", NULL, NULL, 2, 32)) {
        base_run_stories_batch(&r);
        double loss = base_run_loss(&r, 1);
        CHECK_CLOSE(loss, base_expected_loss("stories260K"), 1e-4 * 3.5);
        double worst = 0;
        for (int i = 0; i < r.method->n_params; i++) {
            const cp_param_ref *p = &r.method->params[i];
            char name[160];
            snprintf(name, sizeof name, "%s.sample", p->name);
            const cp_st_tensor *t = cp_safetensors_find(grads, name);
            CHECK_MSG(t && cp_st_tensor_numel(t) == 64, "grads lack %s", name);
            if (!t)
                continue;
            double d = base_max_rel_diff(p->grad, p->n, t->data, 64);
            CHECK_MSG(d < 1e-4, "%s: max relative difference %.3g", p->name, d);
            worst = d > worst ? d : worst;
        }
        CHECK_EQ_INT(r.method->n_params, 47); /* 5 layers x 9, the embedding (also the head), final norm */
        printf("full vs PyTorch: loss %.7f, worst gradient difference %.2g\n", loss, worst);
    }
    base_run_free(&r);
    cp_safetensors_close(grads);
}

TEST(full_trainable_glob_matches_pytorch)
{
    run r;
    cp_safetensors *grads = NULL;
    cp_error err = {0};
    CHECK_MSG(cp_safetensors_open(FIXTURE "/grads_stories.safetensors", &grads, &err) == CP_OK,
              "%s", err.msg);
    if (grads && base_run_init(&r, test_shared("models/stories260K"), "full",
                          "model.layers.4.self_attn.*,model.norm.weight", NULL, 2, 32)) {
        base_run_stories_batch(&r);
        CHECK_EQ_INT(r.method->n_params, 5);
        CHECK_EQ_INT(cp_method_param_count(r.method), 4096 + 2048 + 2048 + 4096 + 64);
        /* Frozen tensors get no gradient. */
        CHECK(r.m->dembed == NULL);
        CHECK(r.m->dlm_head == NULL);
        CHECK(r.m->layers[3].dw[CP_PROJ_Q] == NULL);
        CHECK(r.m->layers[4].dw[CP_PROJ_GATE] == NULL);
        CHECK(r.m->layers[4].dw[CP_PROJ_Q] != NULL);
        CHECK(r.m->dfinal_norm != NULL);
        CHECK_CLOSE(base_run_loss(&r, 1), base_expected_loss("stories260K"), 1e-4 * 3.5);
        for (int i = 0; i < r.method->n_params; i++) {
            const cp_param_ref *p = &r.method->params[i];
            const cp_st_tensor *t = cp_safetensors_find(grads, p->name);
            CHECK_MSG(t && cp_st_tensor_numel(t) == p->n, "grads lack %s", p->name);
            if (t)
                CHECK_MSG(base_max_rel_diff(p->grad, p->n, t->data, p->n) < 1e-4, "%s", p->name);
        }
        /* AdamW keeps moments for the trained values only. */
        cp_adamw opt;
        cp_adamw_config oc = cp_adamw_default_config();
        CHECK(cp_adamw_init(&opt, r.method->params, r.method->n_params, &oc, &err) == CP_OK);
        CHECK_EQ_INT(opt.n_total, cp_method_param_count(r.method));
        cp_adamw_free(&opt);
    }
    base_run_free(&r);
    cp_safetensors_close(grads);
}

TEST(full_matches_pytorch_on_gpt2)
{
    run r;
    cp_safetensors *grads = NULL;
    cp_error err = {0};
    CHECK_MSG(cp_safetensors_open(FIXTURE "/grads_gpt2.safetensors", &grads, &err) == CP_OK,
              "%s", err.msg);
    cJSON *expected = test_read_json(FIXTURE "/expected.json");
    const cJSON *rows = cJSON_GetObjectItem(cJSON_GetObjectItem(expected, "tiny-gpt2"), "input_ids");
    if (grads && rows && base_run_init(&r, "tests/fixtures/tiny-gpt2", "full", NULL, NULL, 2, 8)) {
        for (int b = 0; b < 2; b++)
            for (int t = 0; t < 8; t++) {
                r.inputs[b * 8 + t] = cJSON_GetArrayItem(cJSON_GetArrayItem(rows, b), t)->valueint;
                r.targets[b * 8 + t] =
                    cJSON_GetArrayItem(cJSON_GetArrayItem(rows, b), t + 1)->valueint;
            }
        CHECK_CLOSE(base_run_loss(&r, 1), base_expected_loss("tiny-gpt2"), 1e-4 * 3.8);
        CHECK_EQ_INT(r.method->n_params, (int)cp_safetensors_count(grads));
        for (int i = 0; i < r.method->n_params; i++) {
            const cp_param_ref *p = &r.method->params[i];
            const cp_st_tensor *t = cp_safetensors_find(grads, p->name);
            CHECK_MSG(t && cp_st_tensor_numel(t) == p->n, "grads lack %s", p->name);
            if (t) {
                double d = base_max_rel_diff(p->grad, p->n, t->data, p->n);
                CHECK_MSG(d < 1e-4, "%s: max relative difference %.3g", p->name, d);
            }
        }
    }
    cJSON_Delete(expected);
    base_run_free(&r);
    cp_safetensors_close(grads);
}

/* Trains a few steps' worth of change into the copies, saves, loads the run
 * into a fresh model, and compares the logits. */
TEST(full_save_load_round_trip)
{
    const char *dir = test_tmpdir();
    run r;
    cp_error err = {0};
    if (!base_run_init(&r, "tests/fixtures/tiny-llama-bias", "full", "*layers.1.*,lm_head.weight", NULL,
                  1, 6)) {
        base_run_free(&r);
        return;
    }
    for (int i = 0; i < r.method->n_params; i++)
        for (size_t j = 0; j < r.method->params[i].n; j++)
            r.method->params[i].param[j] += 0.01f * (float)((j * 7 + i) % 5);
    base_run_loss(&r, 0);
    float logits[6 * 40];
    memcpy(logits, r.fb.logits, sizeof logits);
    CHECK_MSG(r.method->ops->save(r.method, r.m, dir, "tests/fixtures/tiny-llama-bias", &err) ==
                  CP_OK,
              "%s", err.msg);
    cJSON *config = NULL;
    char *config_path = cp_path_join(dir, "adapter_config.json");
    config = test_read_json(config_path);
    const cJSON *method = cJSON_GetObjectItem(config, "cpeft_method");
    CHECK_EQ_STR(cJSON_IsString(method) ? method->valuestring : NULL, "full");
    cJSON_Delete(config);
    free(config_path);

    cp_model *m = NULL;
    cp_method *loaded = NULL;
    CHECK(cp_model_load("tests/fixtures/tiny-llama-bias", &m, &err) == CP_OK);
    CHECK_MSG(cp_method_load(dir, m, &loaded, &err) == CP_OK, "%s", err.msg);
    if (loaded) {
        CHECK_EQ_STR(loaded->ops->name, "full");
        CHECK_EQ_INT(loaded->n_params, r.method->n_params);
        m->method = loaded;
        cp_forward_buffers fb;
        CHECK(cp_forward_buffers_init_model(&fb, m, 1, 6, 0, &err) == CP_OK);
        cp_model_forward(m, &fb, r.inputs);
        double worst = 0;
        for (int i = 0; i < 6 * 40; i++)
            worst = fmax(worst, fabs(fb.logits[i] - logits[i]));
        CHECK_MSG(worst == 0, "logits differ by %g after save and load", worst);
        cp_forward_buffers_free(&fb);
        m->method = NULL;
    }
    cp_method_free(loaded);
    cp_model_free(m);
    base_run_free(&r);
}

TEST(full_rejects_unmatched_glob)
{
    cp_model *m = NULL;
    cp_method *method = NULL;
    cp_error err = {0};
    CHECK(cp_model_load("tests/fixtures/tiny-mistral", &m, &err) == CP_OK);
    cp_method_settings s = cp_method_default_settings();
    s.trainable = "*layers.9.*";
    CHECK_EQ_INT(cp_method_create(cp_method_find("full"), m, &s, &method, &err), CP_ERR_INPUT);
    CHECK_MSG(strstr(err.msg, "--trainable '*layers.9.*' matches no tensor") != NULL, "%s",
              err.msg);
    cp_model_free(m);
}

/* Runs cpeft with args; returns the eval loss it printed after training
 * ("eval loss: A -> B") in before and after. */
static int train_cli(const char *args, double *before, double *after)
{
    char *out = NULL, *err = NULL;
    int rc = test_run_cli(args, NULL, &out, &err);
    CHECK_MSG(rc == 0, "cpeft %s: %s", args, err);
    const char *at = out ? strstr(out, "eval loss: ") : NULL;
    *before = *after = NAN;
    if (at)
        sscanf(at, "eval loss: %lf -> %lf", before, after);
    free(out), free(err);
    return rc;
}

static double eval_cli(const char *model, const char *adapter, const char *data)
{
    char *args = NULL, *out = NULL, *err = NULL;
    if (asprintf(&args, "eval --model '%s' --adapter '%s' --data '%s' --seq-len 32", model,
                 adapter, data) < 0)
        abort();
    CHECK_EQ_INT(test_run_cli(args, NULL, &out, &err), 0);
    const char *at = out ? strstr(out, "\"loss\": ") : NULL;
    double loss = at ? atof(at + 8) : NAN;
    free(args), free(out), free(err);
    return loss;
}

/* tinyshakespeare: 200 steps of batch 4 x 32 tokens, evaluated on its last
 * 16,000 bytes; eval --adapter then reproduces the final eval loss. */
TEST(full_cli_recipe_lowers_eval_loss)
{
    const char *dir = test_tmpdir(), *model = test_shared("models/stories260K");
    const char *text = test_shared("data/tinyshakespeare/input.txt");
    char *cmd = NULL, *args = NULL, *eval = NULL, *run_dir = NULL;
    if (asprintf(&cmd, "head -c 400000 '%s' > '%s/train.txt' && tail -c 16000 '%s' > '%s/eval.txt'",
                 text, dir, text, dir) < 0 || system(cmd) != 0)
        abort();
    if (asprintf(&eval, "%s/eval.txt", dir) < 0 || asprintf(&run_dir, "%s/run", dir) < 0 ||
        asprintf(&args,
                 "train --model '%s' --data '%s/train.txt' --eval-data '%s' --method full "
                 "--steps 200 --batch-size 4 --seq-len 32 --lr 3e-3 --warmup-steps 10 --out '%s' "
                 "--quiet",
                 model, dir, eval, run_dir) < 0)
        abort();
    double before, after;
    if (train_cli(args, &before, &after) == 0) {
        printf("full, 200 steps: eval loss %.4f -> %.4f\n", before, after);
        CHECK_MSG(after < 0.8 * before, "eval loss %.4f -> %.4f", before, after);
        CHECK_CLOSE(eval_cli(model, run_dir, eval), after, 1e-4);
    }
    free(cmd), free(args), free(eval), free(run_dir);
}
