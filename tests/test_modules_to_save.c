/*
 * modules_to_save next to other methods: the untied head copy's gradient
 * against finite differences and PyTorch (tools/ref_full.py make-fixture),
 * PEFT's saved layout, loading, bad names, a training run, and short runs
 * next to IA3, prompt and prefix tuning and the bottleneck adapter.
 */
#include <cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "core/file.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "peft/method.h"
#include "peft/modules_to_save.h"
#include "base_run.h"
#include "test.h"

/* tiny-qwen2 ties its head: the copy unties it. tiny-gpt2: LayerNorm
 * weights and biases of ln_f. */
TEST(modules_to_save_gradients_match_finite_differences)
{
    run r;
    /* The copies follow the method's own parameters, which their tests check. */
    if (base_run_init(&r, "tests/fixtures/tiny-qwen2", "lora", NULL, "lm_head,norm", 2, 5)) {
        CHECK(r.m->lm_head != r.m->embed);
        CHECK(r.m->dembed == NULL);
        CHECK_EQ_STR(r.method->params[r.method->n_params - 1].name, "lm_head.weight");
        base_run_check_gradients(&r, r.method->n_params - 6, "tiny-qwen2 lora + lm_head,norm");
    }
    base_run_free(&r);
    if (base_run_init(&r, "tests/fixtures/tiny-gpt2", "ia3", NULL, "ln_f,wte", 2, 5))
        base_run_check_gradients(&r, r.method->n_params - 3, "tiny-gpt2 ia3 + ln_f,wte");
    base_run_free(&r);
}

TEST(modules_to_save_matches_pytorch)
{
    run r;
    cp_safetensors *grads = NULL;
    cp_error err = {0};
    CHECK_MSG(cp_safetensors_open("tests/fixtures/full/grads_stories.safetensors", &grads,
                                  &err) == CP_OK,
              "%s", err.msg);
    if (grads && base_run_init(&r, test_shared("models/stories260K"), "lora", NULL, "lm_head",
                               2, 32)) {
        base_run_stories_batch(&r);
        /* LoRA's B starts at zero, so the loss is the base model's. */
        CHECK_CLOSE(base_run_loss(&r, 1), base_expected_loss("stories260K"), 1e-4 * 3.5);
        const cp_param_ref *head = &r.method->params[r.method->n_params - 1];
        CHECK_EQ_STR(head->name, "lm_head.weight");
        const cp_st_tensor *t = cp_safetensors_find(grads, "untied.lm_head.weight.sample");
        CHECK(t != NULL);
        if (t) {
            double d = base_max_rel_diff(head->grad, head->n, t->data, 64);
            CHECK_MSG(d < 1e-4, "lm_head copy: max relative difference %.3g", d);
        }
    }
    base_run_free(&r);
    cp_safetensors_close(grads);
}

TEST(modules_to_save_uses_peft_layout)
{
    const char *dir = test_tmpdir(), *model = "tests/fixtures/tiny-qwen2";
    run r;
    cp_error err = {0};
    if (!base_run_init(&r, model, "lora", NULL, "lm_head", 1, 6)) {
        base_run_free(&r);
        return;
    }
    const cp_param_ref *head = &r.method->params[r.method->n_params - 1];
    for (size_t j = 0; j < head->n; j++)
        head->param[j] += 0.02f * (float)(j % 7);
    base_run_loss(&r, 0);
    float logits[6 * 40];
    memcpy(logits, r.fb.logits, sizeof logits);
    CHECK_MSG(r.method->ops->save(r.method, r.m, dir, model, &err) == CP_OK, "%s", err.msg);

    char *path = cp_path_join(dir, "adapter_config.json");
    cJSON *config = test_read_json(path);
    const cJSON *modules = cJSON_GetObjectItem(config, "modules_to_save");
    CHECK(cJSON_IsArray(modules));
    CHECK_EQ_INT(cJSON_GetArraySize(modules), 1);
    CHECK_EQ_STR(cJSON_GetStringValue(cJSON_GetArrayItem(modules, 0)), "lm_head");
    CHECK_EQ_STR(cJSON_GetStringValue(cJSON_GetObjectItem(config, "peft_type")), "LORA");
    cJSON_Delete(config);
    free(path);
    path = cp_path_join(dir, "adapter_model.safetensors");
    cp_safetensors *saved = NULL;
    CHECK(cp_safetensors_open(path, &saved, &err) == CP_OK);
    CHECK(saved != NULL);
    if (saved) {
        CHECK(cp_safetensors_find(saved, "base_model.model.lm_head.weight") != NULL);
        CHECK(cp_safetensors_find(
                  saved, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight") != NULL);
    }
    cp_safetensors_close(saved);
    free(path);

    cp_model *m = NULL;
    cp_method *loaded = NULL;
    CHECK(cp_model_load(model, &m, &err) == CP_OK);
    CHECK_MSG(cp_method_load(dir, m, &loaded, &err) == CP_OK, "%s", err.msg);
    if (loaded) {
        CHECK_EQ_INT(loaded->n_params, r.method->n_params);
        CHECK(loaded->ops->reserve(loaded, 6, 0, &err) == CP_OK);
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

TEST(modules_to_save_rejects_bad_names)
{
    static const struct {
        const char *modules, *needle;
    } cases[] = {
        {"lm_hed", "no module of this qwen2 model is called \"lm_hed\""},
        {"q_proj", "is a linear projection"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        cp_model *m = NULL;
        cp_method *method = NULL;
        cp_error err = {0};
        CHECK(cp_model_load("tests/fixtures/tiny-qwen2", &m, &err) == CP_OK);
        cp_method_settings s = cp_method_default_settings();
        CHECK(cp_method_create(cp_method_find("lora"), m, &s, &method, &err) == CP_OK);
        CHECK_EQ_INT(cp_modules_to_save_attach(method, m, cases[i].modules, &err), CP_ERR_INPUT);
        CHECK_MSG(strstr(err.msg, cases[i].needle) != NULL, "%s", err.msg);
        cp_method_free(method);
        cp_model_free(m);
    }
}

/* LoRA on q and v plus a trained head copy: 200 steps of 4 x 32 tokens;
 * eval --adapter reproduces the final eval loss. */
TEST(modules_to_save_cli_recipe)
{
    const char *dir = test_tmpdir(), *model = test_shared("models/stories260K");
    const char *text = test_shared("data/tinyshakespeare/input.txt");
    char *cmd = NULL, *args = NULL, *out = NULL, *err = NULL;
    if (asprintf(&cmd, "head -c 400000 '%s' > '%s/train.txt' && tail -c 16000 '%s' > '%s/eval.txt'",
                 text, dir, text, dir) < 0 || system(cmd) != 0)
        abort();
    if (asprintf(&args,
                 "train --model '%s' --data '%s/train.txt' --eval-data '%s/eval.txt' --method lora "
                 "--modules-to-save lm_head --steps 200 --batch-size 4 --seq-len 32 --lr 3e-3 "
                 "--warmup-steps 10 --out '%s/run' --quiet",
                 model, dir, dir, dir) < 0)
        abort();
    CHECK_EQ_INT(test_run_cli(args, NULL, &out, &err), 0);
    double before = NAN, after = NAN;
    const char *at = out ? strstr(out, "eval loss: ") : NULL;
    if (at)
        sscanf(at, "eval loss: %lf -> %lf", &before, &after);
    printf("lora + modules_to_save lm_head, 200 steps: eval loss %.4f -> %.4f\n", before, after);
    CHECK_MSG(after < 0.8 * before, "eval loss %.4f -> %.4f", before, after);
    CHECK_MSG(out && strstr(out, "trainable parameters: 41728") != NULL, "%s", out);
    free(args), free(out), free(err);

    if (asprintf(&args, "eval --model '%s' --adapter '%s/run' --data '%s/eval.txt' --seq-len 32",
                 model, dir, dir) < 0)
        abort();
    CHECK_EQ_INT(test_run_cli(args, NULL, &out, &err), 0);
    at = out ? strstr(out, "\"loss\": ") : NULL;
    CHECK_CLOSE(at ? atof(at + 8) : NAN, after, 1e-4);
    free(cmd), free(args), free(out), free(err);
}

/* Writes a short training text and an eval text from tinyshakespeare into dir. */
static void write_short_data(const char *dir)
{
    const char *text = test_shared("data/tinyshakespeare/input.txt");
    char *cmd = NULL;
    if (asprintf(&cmd, "head -c 20000 '%s' > '%s/train.txt' && tail -c 4000 '%s' > '%s/eval.txt'",
                 text, dir, text, dir) < 0 ||
        system(cmd) != 0)
        abort();
    free(cmd);
}

/* Trains method with a head copy for a few steps. eval --adapter must then
 * reproduce the run's final eval loss, and inspect must list the copy. */
static void check_method_run(const char *method, const char *dir)
{
    const char *model = test_shared("models/stories260K");
    char *args = NULL, *out = NULL, *err = NULL;
    write_short_data(dir);
    if (asprintf(&args,
                 "train --model '%s' --data '%s/train.txt' --eval-data '%s/eval.txt' --method %s "
                 "--modules-to-save lm_head --steps 5 --batch-size 2 --seq-len 16 --lr 3e-3 "
                 "--out '%s/run' --quiet",
                 model, dir, dir, method, dir) < 0)
        abort();
    CHECK_MSG(test_run_cli(args, NULL, &out, &err) == 0, "%s: %s", method, err);
    double before = NAN, after = NAN;
    const char *at = out ? strstr(out, "eval loss: ") : NULL;
    if (at)
        sscanf(at, "eval loss: %lf -> %lf", &before, &after);
    CHECK_MSG(isfinite(before) && isfinite(after), "%s: %s", method, out);
    free(args), free(out), free(err);

    if (asprintf(&args, "eval --model '%s' --adapter '%s/run' --data '%s/eval.txt' --seq-len 16",
                 model, dir, dir) < 0)
        abort();
    CHECK_MSG(test_run_cli(args, NULL, &out, &err) == 0, "%s: %s", method, err);
    at = out ? strstr(out, "\"loss\": ") : NULL;
    double loaded = at ? atof(at + 8) : NAN;
    printf("%s + modules_to_save lm_head, 5 steps: eval loss %.4f -> %.4f, loaded %.4f\n", method,
           before, after, loaded);
    CHECK_MSG(fabs(loaded - after) < 1e-4, "%s: loaded %.6f, trained %.6f", method, loaded, after);
    free(args), free(out), free(err);

    if (asprintf(&args, "inspect '%s/run'", dir) < 0)
        abort();
    CHECK_MSG(test_run_cli(args, NULL, &out, &err) == 0, "%s: %s", method, err);
    CHECK_MSG(out && strstr(out, "modules_to_save     [\"lm_head\"]"), "%s: %s", method, out);
    CHECK_MSG(out && strstr(out, "base_model.model.lm_head.weight"), "%s: %s", method, out);
    free(args), free(out), free(err);
}

TEST(modules_to_save_next_to_ia3) { check_method_run("ia3", test_tmpdir()); }

TEST(modules_to_save_next_to_prompt) { check_method_run("prompt", test_tmpdir()); }

TEST(modules_to_save_next_to_prefix) { check_method_run("prefix", test_tmpdir()); }

/* The bottleneck adapter keeps the copy in AdapterHub's adapter.safetensors. */
TEST(modules_to_save_next_to_adapter)
{
    const char *dir = test_tmpdir();
    check_method_run("adapter", dir);
    char *path = cp_path_join(dir, "run/adapter_model.safetensors");
    CHECK_MSG(!cp_file_exists(path), "%s was written", path);
    free(path);
}

/* full and bitfit train whole tensors themselves. */
TEST(modules_to_save_rejects_full_and_bitfit)
{
    const char *dir = test_tmpdir(), *model = test_shared("models/stories260K");
    static const char *const methods[] = {"full", "bitfit"};
    write_short_data(dir);
    for (size_t i = 0; i < sizeof methods / sizeof *methods; i++) {
        char *args = NULL, *err = NULL, needle[64];
        if (asprintf(&args,
                     "train --model '%s' --data '%s/train.txt' --method %s --modules-to-save "
                     "lm_head --steps 1 --out '%s/run' --quiet",
                     model, dir, methods[i], dir) < 0)
            abort();
        CHECK_EQ_INT(test_run_cli(args, NULL, NULL, &err), 2);
        snprintf(needle, sizeof needle, "does not apply to --method %s", methods[i]);
        CHECK_MSG(err && strstr(err, needle), "%s: %s", methods[i], err);
        free(args), free(err);
    }
}
