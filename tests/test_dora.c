/*
 * DoRA (LoRA with use_dora): gradients of A, B and the magnitude against
 * finite differences on small random models, the norm per output feature in
 * both weight layouts, stories260K against PyTorch
 * (tools/ref_lora.py make-step-fixture --dora), PEFT's file layout, and
 * training from the command line.
 */
#include <cJSON.h>
#include <stdlib.h>

#include "core/file.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "peft/lora.h"
#include "peft/lora_io.h"
#include "peft/method.h"
#include "test.h"
#include "train/optimizer.h"

#define STEP_FIXTURE "tests/fixtures/dora/step"

/* Loads the model in dir and a DoRA adapter of r 3 on every projection,
 * bound with PEFT's initial magnitudes. Returns NULL on failure. */
static cp_model *load_with_dora(const char *dir, cp_lora *lora, float dropout)
{
    cp_model *m = NULL;
    cp_error err = {0};
    CHECK_MSG(cp_model_load(dir, &m, &err) == CP_OK, "%s: %s", dir, err.msg);
    if (!m)
        return NULL;
    cp_lora_params p = cp_lora_default_params();
    p.r = 3;
    p.alpha = 5;
    p.dropout = dropout;
    p.use_dora = 1;
    p.targets = cp_proj_all(&m->cfg);
    CHECK_MSG(cp_lora_init(lora, &m->cfg, &p, &err) == CP_OK, "%s", err.msg);
    CHECK_MSG(cp_lora_bind_model(lora, m, 1, &err) == CP_OK, "%s", err.msg);
    return m;
}

/* Moves B off zero and each magnitude up to 20% off its initial norm, so that
 * every gradient path is non-trivial. */
static void perturb_adapter(cp_lora *lora, uint64_t seed)
{
    cp_rng rng;
    cp_rng_seed(&rng, seed);
    for (size_t i = 0; i < (size_t)lora->n_layers * CP_PROJ_COUNT; i++) {
        cp_lora_slot *s = &lora->slots[i];
        if (!s->A)
            continue;
        for (size_t j = 0; j < (size_t)lora->params.r * (s->in + s->out); j++)
            s->A[j] += 0.3f * (cp_rng_uniform(&rng) - 0.5f);
        for (int j = 0; j < s->out; j++)
            s->magnitude[j] *= 1.0f + 0.4f * (cp_rng_uniform(&rng) - 0.5f);
    }
}

/* Mean cross-entropy with the attached adapter on inputs (N) and targets
 * (N); the backward pass runs when backward is set. The dropout masks are
 * drawn from the same seed every time, so every pass applies the same ones. */
static double dora_loss(cp_model *m, cp_lora *lora, cp_forward_buffers *fb,
                        cp_backward_buffers *bb, const int32_t *inputs, const int32_t *targets,
                        int backward)
{
    cp_rng_seed(&lora->rng, 99);
    cp_model_forward(m, fb, inputs);
    if (backward)
        return cp_model_backward(m, fb, bb, targets, 1.0f);
    return test_logits_loss(fb->logits, targets, fb->B * fb->T, m->cfg.vocab_size);
}

/* Checks the gradients of A and B (one entry in 7) and of every fifth
 * magnitude entry against central differences with the norm held at its
 * value for the unperturbed adapter, as the detached norm is. */
static void check_dora_gradients(const char *model_dir, float dropout)
{
    cp_lora lora;
    cp_model *m = load_with_dora(model_dir, &lora, dropout);
    if (!m)
        return;
    perturb_adapter(&lora, 3);
    cp_error err = {0};
    int B = 2, T = 6, N = B * T;
    CHECK(cp_lora_reserve(&lora, N, &err) == CP_OK);
    CHECK_MSG(cp_model_attach_lora(m, &lora, &err) == CP_OK, "%s", err.msg);
    cp_forward_buffers fb;
    cp_backward_buffers bb;
    CHECK(cp_forward_buffers_init(&fb, &m->cfg, B, T, 1, &err) == CP_OK);
    CHECK(cp_backward_buffers_init(&bb, &m->cfg, B, T, &err) == CP_OK);
    cp_rng rng;
    cp_rng_seed(&rng, 5);
    int32_t inputs[12], targets[12];
    for (int i = 0; i < N; i++) {
        inputs[i] = (int32_t)(cp_rng_next(&rng) % 40);
        targets[i] = (int32_t)(cp_rng_next(&rng) % 40);
    }
    memset(lora.grads, 0, lora.n_weights * sizeof(float));
    dora_loss(m, &lora, &fb, &bb, inputs, targets, 1);
    lora.norm_frozen = 1;

    /* worst and max_grad per kind: 0 for A and B, 1 for the magnitudes. */
    double worst[2] = {0, 0}, max_grad[2] = {0, 0};
    for (size_t slot = 0; slot < (size_t)lora.n_layers * CP_PROJ_COUNT; slot++) {
        cp_lora_slot *s = &lora.slots[slot];
        if (!s->A)
            continue;
        size_t n_ab = (size_t)lora.params.r * (s->in + s->out);
        for (size_t i = slot % 7; i < n_ab + s->out; i += (i < n_ab ? 7 : 5)) {
            float *w = i < n_ab ? s->A + i : s->magnitude + (i - n_ab);
            float grad = i < n_ab ? s->dA[i] : s->dmagnitude[i - n_ab];
            int kind = i >= n_ab;
            float saved = *w, eps = 3e-3f; /* truncation error grows as eps² */
            *w = saved + eps;
            double up = dora_loss(m, &lora, &fb, &bb, inputs, targets, 0);
            *w = saved - eps;
            double down = dora_loss(m, &lora, &fb, &bb, inputs, targets, 0);
            *w = saved;
            double numeric = (up - down) / (2 * eps);
            worst[kind] = fmax(worst[kind], fabs(numeric - grad));
            max_grad[kind] = fmax(max_grad[kind], fabs(numeric));
        }
    }
    for (int kind = 0; kind < 2; kind++) {
        const char *tensors = kind ? "magnitude" : "A and B";
        CHECK_MSG(max_grad[kind] > 1e-3, "%s %s: gradients are all near zero (%g)", model_dir,
                  tensors, max_grad[kind]);
        CHECK_MSG(worst[kind] < 2e-3 * max_grad[kind] + 1e-5,
                  "%s (dropout %g) %s: worst |analytic - numeric| %g, max |grad| %g", model_dir,
                  dropout, tensors, worst[kind], max_grad[kind]);
    }

    cp_model_detach_method(m);
    cp_backward_buffers_free(&bb);
    cp_forward_buffers_free(&fb);
    cp_lora_free(&lora);
    cp_model_free(m);
}

TEST(dora_gradients_match_finite_differences)
{
    check_dora_gradients("tests/fixtures/tiny-gpt2", 0.0f); /* Conv1D weights (in, out), biases */
    check_dora_gradients("tests/fixtures/tiny-llama-bias", 0.0f);
    check_dora_gradients("tests/fixtures/tiny-qwen2", 0.0f);
}

TEST(dora_gradients_with_dropout_match_finite_differences)
{
    check_dora_gradients("tests/fixtures/tiny-gpt2", 0.2f);
    check_dora_gradients("tests/fixtures/tiny-llama-bias", 0.2f);
}

/* The largest relative difference between every slot's weight_norm and the
 * row norms of W + scaling B A computed here in double from the model. */
static double worst_norm_error(const cp_model *m, const cp_lora *lora)
{
    double worst = 0;
    for (int l = 0; l < lora->n_layers; l++) {
        for (int p = 0; p < CP_PROJ_COUNT; p++) {
            const cp_lora_slot *s = cp_lora_slot_at(lora, l, (cp_proj)p);
            if (!s->A)
                continue;
            const float *w = cp_model_proj_weight(m, l, p);
            for (int j = 0; j < s->out; j++) {
                double sum = 0;
                for (int i = 0; i < s->in; i++) {
                    double wji = m->weights_in_out ? w[(size_t)i * s->out + j] : w[(size_t)j * s->in + i];
                    for (int k = 0; k < lora->params.r; k++)
                        wji += (double)lora->scaling * s->B[(size_t)j * lora->params.r + k] *
                               s->A[(size_t)k * s->in + i];
                    sum += wji * wji;
                }
                worst = fmax(worst, fabs(s->weight_norm[j] - sqrt(sum)) / sqrt(sum));
            }
        }
    }
    return worst;
}

/* The largest relative difference between cp_model_project's output for
 * every adapted projection of layer 0 and PEFT's merged form of DoRA,
 * b + (m / ||W + scaling B A||) x (W + scaling B A)ᵀ, computed here in double:
 * the bias is not scaled. */
static double worst_output_error(const cp_model *m, const cp_lora *lora)
{
    enum { N = 3 };
    double worst = 0;
    cp_rng rng;
    cp_rng_seed(&rng, 17);
    for (int p = 0; p < CP_PROJ_COUNT; p++) {
        const cp_lora_slot *s = cp_lora_slot_at(lora, 0, (cp_proj)p);
        if (!s->A)
            continue;
        float *x = malloc((size_t)N * s->in * sizeof *x), *out = malloc((size_t)N * s->out * sizeof *out);
        double *merged = malloc((size_t)s->in * sizeof *merged);
        for (int i = 0; i < N * s->in; i++)
            x[i] = 2.0f * cp_rng_uniform(&rng) - 1.0f;
        cp_model_project(m, 0, p, out, x, N);
        const float *w = cp_model_proj_weight(m, 0, p), *bias = m->layers[0].bias[p];
        for (int j = 0; j < s->out; j++) {
            double norm = 0;
            for (int i = 0; i < s->in; i++) {
                merged[i] = m->weights_in_out ? w[(size_t)i * s->out + j] : w[(size_t)j * s->in + i];
                for (int k = 0; k < lora->params.r; k++)
                    merged[i] += (double)lora->scaling * s->B[(size_t)j * lora->params.r + k] *
                                 s->A[(size_t)k * s->in + i];
                norm += merged[i] * merged[i];
            }
            double g = s->magnitude[j] / sqrt(norm);
            for (int n = 0; n < N; n++) {
                double want = bias ? bias[j] : 0;
                for (int i = 0; i < s->in; i++)
                    want += g * x[(size_t)n * s->in + i] * merged[i];
                worst = fmax(worst, fabs(out[(size_t)n * s->out + j] - want) / fmax(1, fabs(want)));
            }
        }
        free(merged), free(out), free(x);
    }
    return worst;
}

/* At PEFT's initialization the adapted model equals the base, and the norm
 * is taken per output feature in both weight layouts, and recomputed after
 * B changes. */
static void check_init_and_norms(const char *model_dir)
{
    cp_lora lora;
    cp_model *m = load_with_dora(model_dir, &lora, 0.0f);
    if (!m)
        return;
    cp_error err = {0};
    int B = 1, T = 5;
    int32_t ids[5] = {1, 7, 3, 30, 12};
    cp_forward_buffers fb;
    CHECK(cp_forward_buffers_init(&fb, &m->cfg, B, T, 0, &err) == CP_OK);
    size_t n_logits = (size_t)T * m->cfg.vocab_size;
    float *base = malloc(n_logits * sizeof *base);
    cp_model_forward(m, &fb, ids);
    memcpy(base, fb.logits, n_logits * sizeof *base);

    CHECK(cp_lora_reserve_eval(&lora, T, &err) == CP_OK);
    CHECK_MSG(cp_model_attach_lora(m, &lora, &err) == CP_OK, "%s", err.msg);
    m->method->training = 0;
    cp_model_forward(m, &fb, ids);
    double diff = 0;
    for (size_t i = 0; i < n_logits; i++)
        diff = fmax(diff, fabs(fb.logits[i] - base[i]));
    CHECK_MSG(diff < 1e-6, "%s: DoRA at its initialization changes the logits by %g", model_dir,
              diff);
    CHECK_MSG(worst_norm_error(m, &lora) < 1e-5, "%s: initial norms off by %g", model_dir,
              worst_norm_error(m, &lora));
    const cp_lora_slot *first = cp_lora_slot_at(&lora, 0, m->cfg.fused_qkv ? CP_PROJ_QKV : CP_PROJ_Q);
    CHECK(memcmp(first->magnitude, first->weight_norm, (size_t)first->out * sizeof(float)) == 0);

    for (int round = 0; round < 2; round++) {
        perturb_adapter(&lora, 10 + round);
        cp_model_forward(m, &fb, ids);
        CHECK_MSG(worst_norm_error(m, &lora) < 1e-5, "%s: norms after update %d off by %g",
                  model_dir, round, worst_norm_error(m, &lora));
        CHECK_MSG(worst_output_error(m, &lora) < 1e-5, "%s: outputs after update %d off by %g",
                  model_dir, round, worst_output_error(m, &lora));
    }

    free(base);
    cp_model_detach_method(m);
    cp_forward_buffers_free(&fb);
    cp_lora_free(&lora);
    cp_model_free(m);
}

TEST(dora_init_and_norm_per_output_feature)
{
    check_init_and_norms("tests/fixtures/tiny-gpt2");
    check_init_and_norms("tests/fixtures/tiny-llama-bias");
}

/* stories260K with the fixture's adapter, and its batch. */
typedef struct step_fixture {
    cp_model *model;
    cp_lora lora;
    cJSON *expected;
    int32_t inputs[2 * 32], targets[2 * 32];
    cp_forward_buffers fb;
    cp_backward_buffers bb;
} step_fixture;

static int step_fixture_init(step_fixture *f)
{
    cp_error err = {0};
    memset(f, 0, sizeof *f);
    f->expected = test_read_json(STEP_FIXTURE "/expected.json");
    cJSON *batch = test_read_json(STEP_FIXTURE "/batch.json");
    CHECK_MSG(cp_model_load(test_shared("models/stories260K"), &f->model, &err) == CP_OK, "%s",
              err.msg);
    if (!f->expected || !batch || !f->model) {
        cJSON_Delete(batch);
        return 0;
    }
    CHECK_MSG(cp_lora_load(&f->lora, STEP_FIXTURE, &f->model->cfg, &err) == CP_OK, "%s", err.msg);
    CHECK_EQ_INT(f->lora.params.use_dora, 1);
    CHECK_MSG(cp_lora_bind_model(&f->lora, f->model, 0, &err) == CP_OK, "%s", err.msg);
    CHECK(cp_lora_reserve(&f->lora, 64, &err) == CP_OK);
    CHECK(cp_lora_reserve_eval(&f->lora, 512, &err) == CP_OK);
    CHECK_MSG(cp_model_attach_lora(f->model, &f->lora, &err) == CP_OK, "%s", err.msg);

    /* batch.json input_ids is (2, 33): inputs are the first 32, targets the last 32. */
    const cJSON *rows = cJSON_GetObjectItem(batch, "input_ids");
    for (int b = 0; b < 2; b++)
        for (int t = 0; t < 32; t++) {
            f->inputs[b * 32 + t] = cJSON_GetArrayItem(cJSON_GetArrayItem(rows, b), t)->valueint;
            f->targets[b * 32 + t] =
                cJSON_GetArrayItem(cJSON_GetArrayItem(rows, b), t + 1)->valueint;
        }
    cJSON_Delete(batch);
    CHECK(cp_forward_buffers_init(&f->fb, &f->model->cfg, 2, 32, 1, &err) == CP_OK);
    CHECK(cp_backward_buffers_init(&f->bb, &f->model->cfg, 2, 32, &err) == CP_OK);
    return 1;
}

static void step_fixture_free(step_fixture *f)
{
    if (f->model)
        cp_model_detach_method(f->model);
    cp_backward_buffers_free(&f->bb);
    cp_forward_buffers_free(&f->fb);
    cp_lora_free(&f->lora);
    cp_model_free(f->model);
    cJSON_Delete(f->expected);
}

static double step_loss(step_fixture *f)
{
    memset(f->lora.grads, 0, f->lora.n_weights * sizeof(float));
    cp_model_forward(f->model, &f->fb, f->inputs);
    return cp_model_backward(f->model, &f->fb, &f->bb, f->targets, 1.0f);
}

static double json_number(const cJSON *root, const char *key)
{
    const cJSON *item = cJSON_GetObjectItem(root, key);
    CHECK_MSG(cJSON_IsNumber(item), "expected.json lacks %s", key);
    return item ? item->valuedouble : NAN;
}

/* Compares every A, B and magnitude gradient with the file's, each relative
 * to its tensor's largest entry; returns the worst such ratio. */
static double compare_grads(const cp_lora *lora, const char *path)
{
    cp_safetensors *grads = NULL;
    cp_error err = {0};
    CHECK_MSG(cp_safetensors_open(path, &grads, &err) == CP_OK, "%s", err.msg);
    double worst_ratio = 0;
    int compared = 0;
    for (int l = 0; grads && l < lora->n_layers; l++) {
        for (int p = 0; p < CP_PROJ_COUNT; p++) {
            const cp_lora_slot *s = cp_lora_slot_at(lora, l, (cp_proj)p);
            for (int w = 0; s->A && w < 3; w++) {
                char name[176];
                cp_lora_tensor_name(&lora->cfg, name, sizeof name, l, (cp_proj)p, "ABM"[w]);
                const cp_st_tensor *t = cp_safetensors_find(grads, name);
                CHECK_MSG(t != NULL, "%s lacks %s", path, name);
                if (!t)
                    continue;
                const float *got = s->dmagnitude;
                if (w == 0)
                    got = s->dA;
                else if (w == 1)
                    got = s->dB;
                size_t n = cp_st_tensor_numel(t);
                float *want = malloc(n * sizeof *want);
                memcpy(want, t->data, n * sizeof *want);
                double scale = 0, worst = 0;
                for (size_t i = 0; i < n; i++) {
                    scale = fmax(scale, fabs(want[i]));
                    worst = fmax(worst, fabs(got[i] - want[i]));
                }
                CHECK_MSG(worst <= 1e-4 * scale, "%s: max |diff| %g, max |grad| %g", name, worst,
                          scale);
                worst_ratio = fmax(worst_ratio, worst / scale);
                compared++;
                free(want);
            }
        }
    }
    CHECK_EQ_INT(compared, grads ? cp_safetensors_count(grads) : 1);
    cp_safetensors_close(grads);
    return worst_ratio;
}

TEST(dora_step_matches_pytorch)
{
    step_fixture f;
    if (!step_fixture_init(&f)) {
        step_fixture_free(&f);
        return;
    }
    double loss = step_loss(&f), want = json_number(f.expected, "loss");
    CHECK_MSG(fabs(loss - want) <= 1e-4 * want, "loss %.7f, PyTorch %.7f", loss, want);
    double worst = compare_grads(&f.lora, STEP_FIXTURE "/grads.safetensors");
    printf("dora: loss rel diff %.2g, worst grad diff / max |grad| %.2g\n", fabs(loss - want) / want,
           worst);

    /* rsLoRA: the same tensors scaled by alpha / sqrt(r) = 4 instead of 2,
     * which also changes the norm. */
    f.lora.params.use_rslora = 1;
    f.lora.scaling = 8.0f / 2.0f;
    loss = step_loss(&f);
    want = json_number(f.expected, "rslora_loss");
    CHECK_MSG(fabs(loss - want) <= 1e-4 * want, "rsLoRA loss %.7f, PyTorch %.7f", loss, want);
    worst = compare_grads(&f.lora, STEP_FIXTURE "/grads_rslora.safetensors");
    printf("dora rslora: loss rel diff %.2g, worst grad diff / max |grad| %.2g\n",
           fabs(loss - want) / want, worst);
    step_fixture_free(&f);
}

TEST(dora_adamw_steps_match_pytorch)
{
    step_fixture f;
    if (!step_fixture_init(&f)) {
        step_fixture_free(&f);
        return;
    }
    cp_param_ref ref = {"dora", f.lora.weights, f.lora.grads, f.lora.n_weights, 1};
    cp_adamw_config oc = cp_adamw_default_config();
    oc.weight_decay = 0.0;
    cp_adamw opt;
    cp_error err = {0};
    CHECK(cp_adamw_init(&opt, &ref, 1, &oc, &err) == CP_OK);
    const cJSON *adamw = cJSON_GetObjectItem(f.expected, "adamw");
    const cJSON *losses = cJSON_GetObjectItem(adamw, "loss_before_step");
    CHECK_EQ_INT(cJSON_GetArraySize(losses), 20);
    for (int step = 0; step < 20 && step < cJSON_GetArraySize(losses); step++) {
        double loss = step_loss(&f), norm = 0;
        double want = cJSON_GetArrayItem(losses, step)->valuedouble;
        CHECK_MSG(fabs(loss - want) <= 1e-3 * want, "step %d: loss %.7f, PyTorch %.7f", step, loss,
                  want);
        CHECK(cp_grad_clip_norm(&ref, 1, 1.0, &norm, &err) == CP_OK);
        cp_adamw_step(&opt, 1e-3);
    }
    double last = step_loss(&f), want = json_number(adamw, "loss_after_last_step");
    CHECK_MSG(fabs(last - want) <= 1e-3 * want, "after 20 steps: loss %.7f, PyTorch %.7f", last,
              want);
    cp_adamw_free(&opt);
    step_fixture_free(&f);
}

TEST(dora_eval_matches_pytorch)
{
    step_fixture f;
    if (!step_fixture_init(&f)) {
        step_fixture_free(&f);
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
    CHECK_EQ_INT(n_ids, (long long)json_number(ev, "num_ids"));
    cp_eval_result with = {0};
    CHECK_MSG(cp_model_evaluate(f.model, ids, n_ids, 128, &with, &err) == CP_OK, "%s", err.msg);
    CHECK_CLOSE(with.loss, json_number(ev, "adapter_loss"), 1e-4);
    free(ids);
    free(text);
    cp_tokenizer_free(tok);
    step_fixture_free(&f);
}

/* Copies the adapter file in dir with every magnitude renamed by adding
 * suffix, keeping the original names too when keep_original is set. */
static void rename_magnitudes(const char *dir, const char *suffix, int keep_original)
{
    char *path = cp_path_join(dir, "adapter_model.safetensors");
    cp_safetensors *file = NULL;
    cp_error err = {0};
    CHECK(cp_safetensors_open(path, &file, &err) == CP_OK);
    size_t n = file ? cp_safetensors_count(file) : 0, out = 0;
    cp_st_tensor *tensors = calloc(2 * n + 1, sizeof *tensors);
    char (*names)[192] = calloc(2 * n + 1, sizeof *names);
    void **copies = calloc(2 * n + 1, sizeof *copies);
    for (size_t i = 0; i < n; i++) {
        const cp_st_tensor *t = cp_safetensors_at(file, i);
        int magnitude = strstr(t->name, "lora_magnitude_vector") != NULL;
        for (int copy = 0; copy < (magnitude && keep_original ? 2 : 1); copy++) {
            tensors[out] = *t;
            snprintf(names[out], sizeof names[out], "%s%s", t->name,
                     magnitude && copy == 0 ? suffix : "");
            tensors[out].name = names[out];
            copies[out] = malloc(t->nbytes);
            memcpy(copies[out], t->data, t->nbytes);
            tensors[out].data = copies[out];
            out++;
        }
    }
    cp_safetensors_close(file);
    const cp_st_metadata meta[] = {{"format", "pt"}};
    CHECK_MSG(cp_safetensors_write(path, tensors, out, meta, 1, &err) == CP_OK, "%s", err.msg);
    for (size_t i = 0; i < out; i++)
        free(copies[i]);
    free(copies), free(names), free(tensors), free(path);
}

TEST(dora_save_load_round_trip)
{
    cp_model *m = NULL;
    cp_error err = {0};
    CHECK(cp_model_load(test_shared("models/stories260K"), &m, &err) == CP_OK);
    if (!m)
        return;
    cp_lora a, b;
    cp_lora_params p = cp_lora_default_params();
    p.targets = (1u << CP_PROJ_K) | (1u << CP_PROJ_DOWN);
    p.use_dora = 1;
    CHECK(cp_lora_init(&a, &m->cfg, &p, &err) == CP_OK);
    CHECK(cp_lora_bind_model(&a, m, 1, &err) == CP_OK);
    perturb_adapter(&a, 21);
    const char *dir = test_tmpdir();
    CHECK_MSG(cp_lora_save(&a, dir, "stories260K", &err) == CP_OK, "%s", err.msg);

    char *text = NULL, *config = cp_path_join(dir, "adapter_config.json");
    CHECK(cp_file_read(config, &text, NULL, &err) == CP_OK);
    CHECK(text != NULL);
    if (text)
        CHECK(strstr(text, "\"use_dora\":\ttrue") != NULL);
    free(text), free(config);

    /* PEFT's name and shape: "...k_proj.lora_magnitude_vector", 1-D (out). */
    char *path = cp_path_join(dir, "adapter_model.safetensors");
    cp_safetensors *st = NULL;
    CHECK(cp_safetensors_open(path, &st, &err) == CP_OK);
    const cp_st_tensor *t =
        st ? cp_safetensors_find(st, "base_model.model.model.layers.2.self_attn.k_proj."
                                     "lora_magnitude_vector")
           : NULL;
    CHECK(t != NULL);
    if (t) {
        CHECK_EQ_INT(t->ndim, 1);
        CHECK_EQ_INT(t->shape[0], 32);
    }
    CHECK_EQ_INT(st ? cp_safetensors_count(st) : 0, 5 * 2 * 3);
    cp_safetensors_close(st);
    free(path);

    /* Loads back bit for bit, also with the magnitudes named "....weight". */
    for (int renamed = 0; renamed < 2; renamed++) {
        if (renamed)
            rename_magnitudes(dir, ".weight", 0);
        CHECK_MSG(cp_lora_load(&b, dir, &m->cfg, &err) == CP_OK, "%s", err.msg);
        CHECK_EQ_INT(b.params.use_dora, 1);
        CHECK_EQ_INT(b.n_weights, a.n_weights);
        CHECK(b.n_weights == a.n_weights &&
              memcmp(a.weights, b.weights, a.n_weights * sizeof(float)) == 0);
        cp_lora_free(&b);
    }

    /* Both names at once is ambiguous. */
    CHECK(cp_lora_save(&a, dir, "stories260K", &err) == CP_OK);
    rename_magnitudes(dir, ".weight", 1);
    CHECK_EQ_INT(cp_lora_load(&b, dir, &m->cfg, &err), CP_ERR_INPUT);
    CHECK_MSG(strstr(err.msg, "stored twice") != NULL, "%s", err.msg);

    /* Magnitudes in a file whose config sets use_dora false are rejected. */
    CHECK(cp_lora_save(&a, dir, "stories260K", &err) == CP_OK);
    const char *plain = "{\"peft_type\": \"LORA\", \"r\": 8, \"lora_alpha\": 16, "
                        "\"target_modules\": [\"k_proj\", \"down_proj\"], \"use_dora\": false}";
    free(test_write_file(dir, "adapter_config.json", plain, strlen(plain)));
    CHECK_EQ_INT(cp_lora_load(&b, dir, &m->cfg, &err), CP_ERR_INPUT);
    CHECK_MSG(strstr(err.msg, "unexpected tensor") && strstr(err.msg, "lora_magnitude_vector"),
              "%s", err.msg);
    cp_lora_free(&a);
    cp_model_free(m);
}

/* PEFT's own DoRA config (Llama 3.2 3B, r 32, target_modules null: PEFT's
 * default q_proj and v_proj) over a stories260K adapter of that shape. */
TEST(dora_loads_peft_config)
{
    cp_model *m = NULL;
    cp_error err = {0};
    CHECK(cp_model_load(test_shared("models/stories260K"), &m, &err) == CP_OK);
    char *config = NULL;
    size_t len = 0;
    CHECK(cp_file_read(test_shared("adapters/peft-configs/lora_llama-3.2-3B-rank32-dora."
                                   "adapter_config.json"),
                       &config, &len, &err) == CP_OK);
    if (!m || !config) {
        cp_model_free(m);
        free(config);
        return;
    }

    cp_lora a, b;
    cp_lora_params p = cp_lora_default_params();
    p.r = 32;
    p.alpha = 64;
    p.use_dora = 1;
    CHECK(cp_lora_init(&a, &m->cfg, &p, &err) == CP_OK);
    CHECK(cp_lora_bind_model(&a, m, 1, &err) == CP_OK);
    const char *dir = test_tmpdir();
    CHECK(cp_lora_save(&a, dir, "stories260K", &err) == CP_OK);
    free(test_write_file(dir, "adapter_config.json", config, len));

    CHECK_MSG(cp_lora_load(&b, dir, &m->cfg, &err) == CP_OK, "%s", err.msg);
    CHECK_EQ_INT(b.params.use_dora, 1);
    CHECK_EQ_INT(b.params.r, 32);
    CHECK_EQ_INT(b.params.targets, (1u << CP_PROJ_Q) | (1u << CP_PROJ_V));
    CHECK_CLOSE(b.scaling, 2.0, 1e-7);
    cp_lora_free(&b);
    cp_lora_free(&a);
    free(config);
    cp_model_free(m);
}

/* Reads "key": number from the text after the last occurrence of key. */
static double last_number(const char *text, const char *key)
{
    const char *at = NULL;
    for (const char *p = text; (p = strstr(p, key)) != NULL; p++)
        at = p;
    return at ? atof(at + strlen(key)) : NAN;
}

/* cpeft train --dora on tinyshakespeare (with dropout), then cpeft eval
 * --adapter on the same text: training lowers the eval loss, and the saved
 * adapter gives the loss training measured last. */
TEST(dora_cli_train_then_eval)
{
    const char *dir = test_tmpdir();
    char *cmd = NULL, *args = NULL, *out = NULL, *err = NULL;
    const char *text = test_shared("data/tinyshakespeare/input.txt");
    if (asprintf(&cmd, "head -c 1003854 '%s' > '%s/train.txt' && tail -c +1003855 '%s' | "
                 "head -c 8000 > '%s/eval.txt'",
                 text, dir, text, dir) < 0 || system(cmd) != 0)
        abort();
    if (asprintf(&args,
                 "train --model '%s' --data '%s/train.txt' --eval-data '%s/eval.txt' --dora "
                 "--r 8 --alpha 16 --target q_proj,k_proj,v_proj,o_proj --lora-dropout 0.05 "
                 "--steps 200 --batch-size 4 --seq-len 32 --lr 1e-2 --out '%s/run' --quiet",
                 test_shared("models/stories260K"), dir, dir, dir) < 0)
        abort();
    CHECK_EQ_INT(test_run_cli(args, NULL, &out, &err), 0);
    char *metrics_path = NULL, *metrics = NULL;
    if (asprintf(&metrics_path, "%s/run/metrics.jsonl", dir) < 0)
        abort();
    cp_error error = {0};
    CHECK_MSG(cp_file_read(metrics_path, &metrics, NULL, &error) == CP_OK, "%s (%s)", error.msg,
              err);
    double before = metrics ? atof(strstr(metrics, "\"eval_loss\": ") + 13) : NAN;
    double after = metrics ? last_number(metrics, "\"eval_loss\": ") : NAN;
    printf("dora cli: eval loss %.4f -> %.4f\n", before, after);
    CHECK_MSG(after < 0.85 * before, "eval loss %.4f -> %.4f: less than a 15%% drop", before,
              after);

    char *eval_args = NULL, *eval_out = NULL;
    if (asprintf(&eval_args, "eval --model '%s' --adapter '%s/run' --data '%s/eval.txt' "
                 "--seq-len 32",
                 test_shared("models/stories260K"), dir, dir) < 0)
        abort();
    CHECK_EQ_INT(test_run_cli(eval_args, NULL, &eval_out, NULL), 0);
    double loaded = eval_out ? last_number(eval_out, "\"loss\": ") : NAN;
    CHECK_MSG(fabs(loaded - after) <= 1e-5 * after, "cpeft eval --adapter gives %.6f, training "
              "measured %.6f", loaded, after);
    free(eval_args), free(eval_out), free(metrics), free(metrics_path);
    free(cmd), free(args), free(out), free(err);
}
