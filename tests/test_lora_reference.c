/*
 * LoRA on stories260K against PyTorch (tools/ref_lora.py make-step-fixture):
 * the loss and every LoRA gradient of one batch, the rsLoRA loss, twenty
 * AdamW steps, and evaluation with the adapter applied; and one batch's
 * gradients on small GPT-2, Qwen2 and biased Llama models
 * (tools/ref_lora_arch.py make-fixture).
 */
#include <cJSON.h>
#include <stdlib.h>

#include "core/file.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "peft/lora_io.h"
#include "test.h"
#include "train/optimizer.h"

#define FIXTURE "tests/fixtures/lora_step"

typedef struct fixture {
    cp_model *model;
    cp_lora lora;
    cJSON *expected;
    int32_t inputs[2 * 32], targets[2 * 32];
    cp_forward_buffers fb;
    cp_backward_buffers bb;
} fixture;

static int fixture_init(fixture *f)
{
    cp_error err = {0};
    memset(f, 0, sizeof *f);
    f->expected = test_read_json(FIXTURE "/expected.json");
    cJSON *batch = test_read_json(FIXTURE "/batch.json");
    CHECK_MSG(f->expected && batch, "cannot read the fixture in %s", FIXTURE);
    CHECK_MSG(cp_model_load(test_shared("models/stories260K"), &f->model, &err) == CP_OK, "%s",
              err.msg);
    if (!f->expected || !batch || !f->model)
        return 0;
    CHECK_MSG(cp_lora_load(&f->lora, FIXTURE, &f->model->cfg, &err) == CP_OK, "%s", err.msg);
    CHECK(cp_lora_reserve(&f->lora, 64, &err) == CP_OK);
    CHECK(cp_model_attach_lora(f->model, &f->lora, &err) == CP_OK);

    /* batch.json input_ids is (2, 33): inputs are the first 32, targets the last 32. */
    const cJSON *rows = cJSON_GetObjectItem(batch, "input_ids");
    for (int b = 0; b < 2; b++) {
        const cJSON *row = cJSON_GetArrayItem(rows, b);
        CHECK_EQ_INT(cJSON_GetArraySize(row), 33);
        for (int t = 0; t < 32; t++) {
            f->inputs[b * 32 + t] = cJSON_GetArrayItem(row, t)->valueint;
            f->targets[b * 32 + t] = cJSON_GetArrayItem(row, t + 1)->valueint;
        }
    }
    cJSON_Delete(batch);
    CHECK(cp_forward_buffers_init(&f->fb, &f->model->cfg, 2, 32, 1, &err) == CP_OK);
    CHECK(cp_backward_buffers_init(&f->bb, &f->model->cfg, 2, 32, &err) == CP_OK);
    return 1;
}

static void fixture_free(fixture *f)
{
    cp_backward_buffers_free(&f->bb);
    cp_forward_buffers_free(&f->fb);
    cp_lora_free(&f->lora);
    cp_model_free(f->model);
    cJSON_Delete(f->expected);
}

static double step_loss(fixture *f)
{
    memset(f->lora.grads, 0, f->lora.n_weights * sizeof(float));
    cp_model_forward(f->model, &f->fb, f->inputs);
    return cp_model_backward(f->model, &f->fb, &f->bb, f->targets, 1.0f);
}

static double expected_number(const cJSON *root, const char *a, const char *b)
{
    const cJSON *item = cJSON_GetObjectItem(root, a);
    if (b)
        item = cJSON_GetObjectItem(item, b);
    CHECK_MSG(cJSON_IsNumber(item), "expected.json lacks %s%s%s", a, b ? "." : "", b ? b : "");
    return item ? item->valuedouble : NAN;
}

TEST(lora_step_matches_pytorch)
{
    fixture f;
    if (!fixture_init(&f)) {
        fixture_free(&f);
        return;
    }
    CHECK_CLOSE(step_loss(&f), expected_number(f.expected, "loss", NULL), 1e-4);

    cp_safetensors *grads = NULL;
    cp_error err = {0};
    CHECK_MSG(cp_safetensors_open(FIXTURE "/grads.safetensors", &grads, &err) == CP_OK, "%s",
              err.msg);
    int compared = 0;
    for (int l = 0; grads && l < f.lora.n_layers; l++) {
        for (int p = 0; p < CP_PROJ_COUNT; p++) {
            if (!cp_proj_exists(&f.lora.cfg, (cp_proj)p))
                continue;
            cp_lora_slot *s = cp_lora_slot_at(&f.lora, l, (cp_proj)p);
            for (int w = 0; w < 2; w++) {
                char name[160];
                cp_lora_tensor_name(&f.lora.cfg, name, sizeof name, l, (cp_proj)p, "AB"[w]);
                const cp_st_tensor *t = cp_safetensors_find(grads, name);
                CHECK_MSG(t != NULL, "grads.safetensors lacks %s", name);
                if (!t)
                    continue;
                const float *got = w ? s->dB : s->dA;
                size_t n = cp_st_tensor_numel(t);
                float *want = malloc(n * sizeof *want);
                memcpy(want, t->data, n * sizeof *want);
                /* Relative to the tensor's largest entry, so tiny entries
                 * do not demand more than float32 gives. */
                double scale = 0, worst = 0;
                for (size_t i = 0; i < n; i++)
                    scale = fabs(want[i]) > scale ? fabs(want[i]) : scale;
                for (size_t i = 0; i < n; i++)
                    worst = fabs(got[i] - want[i]) > worst ? fabs(got[i] - want[i]) : worst;
                CHECK_MSG(worst <= 1e-4 * scale, "%s: max |diff| %g, max |grad| %g", name, worst,
                          scale);
                compared++;
                free(want);
            }
        }
    }
    CHECK_EQ_INT(compared, 5 * 7 * 2);
    cp_safetensors_close(grads);

    /* rsLoRA: the same weights scaled by alpha / sqrt(r) = 4 instead of 2. */
    f.lora.scaling = 8.0f / 2.0f;
    CHECK_CLOSE(step_loss(&f), expected_number(f.expected, "rslora_loss", NULL), 1e-4);
    fixture_free(&f);
}

TEST(lora_adamw_steps_match_pytorch)
{
    fixture f;
    if (!fixture_init(&f)) {
        fixture_free(&f);
        return;
    }
    cp_param_ref ref = {"lora", f.lora.weights, f.lora.grads, f.lora.n_weights, 1};
    cp_adamw_config oc = cp_adamw_default_config();
    oc.weight_decay = 0.0;
    cp_adamw opt;
    cp_error err = {0};
    CHECK(cp_adamw_init(&opt, &ref, 1, &oc, &err) == CP_OK);

    const cJSON *adamw = cJSON_GetObjectItem(f.expected, "adamw");
    const cJSON *losses = cJSON_GetObjectItem(adamw, "loss_before_step");
    CHECK_EQ_INT(cJSON_GetArraySize(losses), 20);
    for (int step = 0; step < 20; step++) {
        double loss = step_loss(&f), norm = 0;
        CHECK_MSG(fabs(loss - cJSON_GetArrayItem(losses, step)->valuedouble) <=
                      1e-3 * cJSON_GetArrayItem(losses, step)->valuedouble,
                  "step %d: loss %.7f, PyTorch %.7f", step, loss,
                  cJSON_GetArrayItem(losses, step)->valuedouble);
        CHECK(cp_grad_clip_norm(&ref, 1, 1.0, &norm, &err) == CP_OK);
        cp_adamw_step(&opt, 1e-3);
    }
    CHECK_CLOSE(step_loss(&f), expected_number(adamw, "loss_after_last_step", NULL), 1e-3);
    cp_adamw_free(&opt);
    fixture_free(&f);
}

TEST(lora_eval_matches_pytorch)
{
    fixture f;
    if (!fixture_init(&f)) {
        fixture_free(&f);
        return;
    }
    cp_tokenizer *tok = NULL;
    cp_error err = {0};
    char *text = NULL;
    size_t len = 0, n_ids = 0;
    int32_t *ids = NULL;
    CHECK(cp_tokenizer_load(test_shared("models/stories260K"), &tok, &err) == CP_OK);
    CHECK(cp_file_read(test_shared("data/tinyshakespeare/input.txt"), &text, &len, &err) == CP_OK);
    if (tok && text)
        CHECK(cp_tokenizer_encode(tok, text, 20000, 1, &ids, &n_ids, &err) == CP_OK);
    const cJSON *ev = cJSON_GetObjectItem(f.expected, "eval");
    CHECK_EQ_INT(n_ids, (long long)expected_number(ev, "num_ids", NULL));

    cp_eval_result with = {0}, without = {0};
    CHECK(cp_model_evaluate(f.model, ids, n_ids, 128, &with, &err) == CP_OK);
    cp_model_detach_method(f.model);
    CHECK(cp_model_evaluate(f.model, ids, n_ids, 128, &without, &err) == CP_OK);
    CHECK_CLOSE(with.loss, expected_number(ev, "adapter_loss", NULL), 1e-4);
    CHECK_CLOSE(without.loss, expected_number(ev, "base_loss", NULL), 1e-4);
    CHECK_EQ_INT(with.tokens, (long long)expected_number(ev, "tokens", NULL));

    free(ids);
    free(text);
    cp_tokenizer_free(tok);
    fixture_free(&f);
}

/* One batch's loss and every LoRA gradient on a small random model of each
 * architecture, against tools/ref_lora_arch.py (PEFT semantics in PyTorch). */
static void check_arch_step(const char *name, int from_gguf)
{
    char model_dir[128], adapter_dir[128], path[200];
    snprintf(model_dir, sizeof model_dir, from_gguf ? "tests/fixtures/gguf/%s.gguf" : "tests/fixtures/%s",
             name);
    snprintf(adapter_dir, sizeof adapter_dir, "tests/fixtures/lora_arch/%s", name);
    snprintf(path, sizeof path, "%s/expected.json", adapter_dir);
    cJSON *expected = test_read_json(path);
    cp_model *m = NULL;
    cp_lora lora;
    cp_error err = {0};
    CHECK_MSG(expected != NULL, "cannot read %s", path);
    CHECK_MSG(cp_model_load(model_dir, &m, &err) == CP_OK, "%s", err.msg);
    if (!expected || !m) {
        cJSON_Delete(expected);
        cp_model_free(m);
        return;
    }
    CHECK_MSG(cp_lora_load(&lora, adapter_dir, &m->cfg, &err) == CP_OK, "%s: %s", name, err.msg);
    CHECK(cp_lora_reserve(&lora, 16, &err) == CP_OK);
    CHECK(cp_model_attach_lora(m, &lora, &err) == CP_OK);

    int32_t inputs[16], targets[16];
    const cJSON *rows = cJSON_GetObjectItem(expected, "input_ids");
    for (int b = 0; b < 2; b++)
        for (int t = 0; t < 8; t++) {
            inputs[b * 8 + t] = cJSON_GetArrayItem(cJSON_GetArrayItem(rows, b), t)->valueint;
            targets[b * 8 + t] = cJSON_GetArrayItem(cJSON_GetArrayItem(rows, b), t + 1)->valueint;
        }
    cp_forward_buffers fb;
    cp_backward_buffers bb;
    CHECK(cp_forward_buffers_init(&fb, &m->cfg, 2, 8, 1, &err) == CP_OK);
    CHECK(cp_backward_buffers_init(&bb, &m->cfg, 2, 8, &err) == CP_OK);
    memset(lora.grads, 0, lora.n_weights * sizeof(float));
    cp_model_forward(m, &fb, inputs);
    double loss = cp_model_backward(m, &fb, &bb, targets, 1.0f);
    CHECK_MSG(fabs(loss - expected_number(expected, "loss", NULL)) <=
                  1e-4 * expected_number(expected, "loss", NULL),
              "%s: loss %.7f, PyTorch %.7f", name, loss, expected_number(expected, "loss", NULL));

    cp_safetensors *grads = NULL;
    snprintf(path, sizeof path, "%s/grads.safetensors", adapter_dir);
    CHECK_MSG(cp_safetensors_open(path, &grads, &err) == CP_OK, "%s", err.msg);
    size_t compared = 0;
    for (int l = 0; grads && l < lora.n_layers; l++) {
        for (int p = 0; p < CP_PROJ_COUNT; p++) {
            cp_lora_slot *s = cp_lora_slot_at(&lora, l, (cp_proj)p);
            for (int w = 0; s->A && w < 2; w++) {
                char tensor[160];
                cp_lora_tensor_name(&lora.cfg, tensor, sizeof tensor, l, (cp_proj)p, "AB"[w]);
                const cp_st_tensor *t = cp_safetensors_find(grads, tensor);
                CHECK_MSG(t != NULL, "%s lacks %s", path, tensor);
                if (!t)
                    continue;
                size_t n = cp_st_tensor_numel(t);
                float *want = malloc(n * sizeof *want);
                memcpy(want, t->data, n * sizeof *want);
                const float *got = w ? s->dB : s->dA;
                double scale = 0, worst = 0;
                for (size_t i = 0; i < n; i++) {
                    scale = fmax(scale, fabs(want[i]));
                    worst = fmax(worst, fabs(got[i] - want[i]));
                }
                CHECK_MSG(worst <= 1e-4 * scale, "%s %s: max |diff| %g, max |grad| %g", name,
                          tensor, worst, scale);
                compared++;
                free(want);
            }
        }
    }
    CHECK_EQ_INT(compared, grads ? cp_safetensors_count(grads) : 1);
    cp_safetensors_close(grads);
    cp_model_detach_method(m);
    cp_backward_buffers_free(&bb);
    cp_forward_buffers_free(&fb);
    cp_lora_free(&lora);
    cp_model_free(m);
    cJSON_Delete(expected);
}

TEST(lora_arch_gpt2_matches_pytorch) { check_arch_step("tiny-gpt2", 0); }
TEST(lora_arch_qwen2_matches_pytorch) { check_arch_step("tiny-qwen2", 0); }
TEST(lora_arch_llama_bias_matches_pytorch) { check_arch_step("tiny-llama-bias", 0); }

/* The same steps on the GGUF copies of those models (tools/make_gguf.py):
 * an adapter trained on a GGUF model gets PEFT's gradients. */
TEST(lora_arch_from_gguf_matches_pytorch)
{
    check_arch_step("tiny-gpt2", 1);
    check_arch_step("tiny-qwen2", 1);
    check_arch_step("tiny-llama-bias", 1);
}
