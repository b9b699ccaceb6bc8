/*
 * QLoRA: LoRA on a base whose projections are NF4. The step against
 * tools/ref_qlora.py (PyTorch on the dequantized NF4 weights), the NF4 model
 * against the same model holding the dequantized weights in float32, and
 * training from the command line.
 */
#include <cJSON.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "io/safetensors.h"
#include "model/kv_cache.h"
#include "model/model.h"
#include "ops/nf4.h"
#include "peft/lora_io.h"
#include "test.h"

#define STEP_FIXTURE "tests/fixtures/lora_step"
#define QLORA_FIXTURE "tests/fixtures/qlora"

/* The loss of the lora_step batch on stories260K quantized with or without
 * double quantization; leaves the gradients in *lora. */
static double step_loss(cp_model *m, cp_lora *lora)
{
    cJSON *batch = test_read_json(STEP_FIXTURE "/batch.json");
    int32_t inputs[64], targets[64];
    const cJSON *rows = cJSON_GetObjectItem(batch, "input_ids");
    for (int b = 0; b < 2; b++)
        for (int t = 0; t < 32; t++) {
            inputs[b * 32 + t] = cJSON_GetArrayItem(cJSON_GetArrayItem(rows, b), t)->valueint;
            targets[b * 32 + t] = cJSON_GetArrayItem(cJSON_GetArrayItem(rows, b), t + 1)->valueint;
        }
    cJSON_Delete(batch);
    cp_forward_buffers fb;
    cp_backward_buffers bb;
    cp_error err = {0};
    CHECK(cp_forward_buffers_init(&fb, &m->cfg, 2, 32, 1, &err) == CP_OK);
    CHECK(cp_backward_buffers_init(&bb, &m->cfg, 2, 32, &err) == CP_OK);
    memset(lora->grads, 0, lora->n_weights * sizeof(float));
    cp_model_forward(m, &fb, inputs);
    double loss = cp_model_backward(m, &fb, &bb, targets, 1.0f);
    cp_backward_buffers_free(&bb);
    cp_forward_buffers_free(&fb);
    return loss;
}

static cp_model *quantized_stories(int double_quant, cp_lora *lora)
{
    cp_model *m = NULL;
    cp_error err = {0};
    CHECK_MSG(cp_model_load(test_shared("models/stories260K"), &m, &err) == CP_OK, "%s", err.msg);
    if (!m)
        return NULL;
    CHECK_MSG(cp_model_quantize_nf4(m, double_quant, &err) == CP_OK, "%s", err.msg);
    CHECK_MSG(cp_lora_load(lora, STEP_FIXTURE, &m->cfg, &err) == CP_OK, "%s", err.msg);
    CHECK(cp_lora_reserve(lora, 64, &err) == CP_OK);
    CHECK(cp_model_attach_lora(m, lora, &err) == CP_OK);
    return m;
}

/* Compares every A and B gradient with grads.safetensors, relative to each
 * tensor's largest entry. */
static void check_grads(const cp_lora *lora)
{
    cp_safetensors *grads = NULL;
    cp_error err = {0};
    CHECK_MSG(cp_safetensors_open(QLORA_FIXTURE "/grads.safetensors", &grads, &err) == CP_OK,
              "%s", err.msg);
    int compared = 0;
    for (int l = 0; grads && l < lora->n_layers; l++) {
        for (int p = 0; p < CP_PROJ_COUNT; p++) {
            cp_lora_slot *s = cp_lora_slot_at(lora, l, (cp_proj)p);
            for (int w = 0; s->A && w < 2; w++) {
                char name[160];
                cp_lora_tensor_name(&lora->cfg, name, sizeof name, l, (cp_proj)p, "AB"[w]);
                const cp_st_tensor *t = cp_safetensors_find(grads, name);
                CHECK_MSG(t != NULL, "grads.safetensors lacks %s", name);
                if (!t)
                    continue;
                const float *got = w ? s->dB : s->dA;
                size_t n = cp_st_tensor_numel(t);
                double scale = 0, worst = 0;
                for (size_t i = 0; i < n; i++) {
                    float want;
                    memcpy(&want, (const char *)t->data + i * sizeof want, sizeof want);
                    scale = fmax(scale, fabs(want));
                    worst = fmax(worst, fabs(got[i] - want));
                }
                CHECK_MSG(worst <= 1e-4 * scale, "%s: max |diff| %g, max |grad| %g", name, worst,
                          scale);
                compared++;
            }
        }
    }
    CHECK_EQ_INT(compared, 5 * 7 * 2);
    cp_safetensors_close(grads);
}

TEST(qlora_step_matches_pytorch)
{
    cJSON *expected = test_read_json(QLORA_FIXTURE "/expected.json");
    if (!expected)
        return;
    double want = cJSON_GetObjectItem(expected, "loss_nf4")->valuedouble;
    double want_dq = cJSON_GetObjectItem(expected, "loss_nf4_double_quant")->valuedouble;
    double want_f32 = cJSON_GetObjectItem(expected, "loss_float32_base")->valuedouble;
    double want_bf16 = cJSON_GetObjectItem(expected, "loss_nf4_bf16_embeddings")->valuedouble;
    CHECK_MSG(fabs(want - want_f32) > 1e-3, "NF4 changes the loss by only %g", want - want_f32);

    cp_lora lora;
    cp_model *m = quantized_stories(0, &lora);
    if (m) {
        double loss = step_loss(m, &lora);
        CHECK_MSG(fabs(loss - want) <= 1e-4 * want, "loss %.7f, PyTorch %.7f", loss, want);
        check_grads(&lora);
        cp_model_free(m);
        cp_lora_free(&lora);
    }
    m = quantized_stories(1, &lora);
    if (m) {
        double loss = step_loss(m, &lora);
        CHECK_MSG(fabs(loss - want_dq) <= 1e-4 * want_dq, "double quant: loss %.7f, PyTorch %.7f",
                  loss, want_dq);
        cp_model_free(m);
        cp_lora_free(&lora);
    }

    /* As cpeft train runs QLoRA: the embeddings and tied head in bfloat16. */
    m = quantized_stories(0, &lora);
    if (m) {
        cp_error err = {0};
        CHECK_MSG(cp_model_embeddings_to_bf16(m, &err) == CP_OK, "%s", err.msg);
        CHECK(m->embed == NULL);
        double loss = step_loss(m, &lora);
        CHECK_MSG(fabs(loss - want_bf16) <= 1e-4 * want_bf16,
                  "bfloat16 embeddings: loss %.7f, PyTorch %.7f", loss, want_bf16);
        CHECK_MSG(fabs(loss - want) > 1e-4, "bfloat16 rounding changed the loss by only %g",
                  loss - want);
        cp_model_free(m);
        cp_lora_free(&lora);
    }
    cJSON_Delete(expected);
}

/* Gives every projection of m the float32 values of q's NF4 weights, in m's
 * own layout, as copies the model owns. */
static void use_dequantized(cp_model *m, const cp_model *q)
{
    cp_error err = {0};
    for (int l = 0; l < m->cfg.n_layers; l++) {
        for (int p = 0; p < CP_PROJ_COUNT; p++) {
            const cp_nf4_matrix *w = q->layers[l].nf4[p];
            if (!w)
                continue;
            float *dense = malloc((size_t)w->rows * w->cols * sizeof *dense);
            float *stored = malloc((size_t)w->rows * w->cols * sizeof *stored);
            cp_nf4_dequantize(w, dense);
            for (int r = 0; r < w->rows; r++)
                for (int c = 0; c < w->cols; c++)
                    stored[m->weights_in_out ? (size_t)c * w->rows + r : (size_t)r * w->cols + c] =
                        dense[(size_t)r * w->cols + c];
            free(dense);
            m->layers[l].w[p] = stored;
            CHECK(cp_model_keep_owned(m, stored, &err) == CP_OK);
        }
    }
}

/* The NF4 model's logits, batched and through the KV cache, equal those of
 * the same model holding the dequantized weights in float32. */
static void check_matches_dequantized(const char *dir)
{
    cp_model *q = NULL, *f = NULL;
    cp_error err = {0};
    CHECK(cp_model_load(dir, &q, &err) == CP_OK);
    CHECK(cp_model_load(dir, &f, &err) == CP_OK);
    if (!q || !f) {
        cp_model_free(q);
        cp_model_free(f);
        return;
    }
    CHECK_MSG(cp_model_quantize_nf4(q, 1, &err) == CP_OK, "%s", err.msg);
    use_dequantized(f, q);

    int32_t ids[9] = {1, 5, 9, 3, 7, 2, 8, 4, 6};
    int T = 9, V = q->cfg.vocab_size;
    cp_forward_buffers fq, ff;
    CHECK(cp_forward_buffers_init(&fq, &q->cfg, 1, T, 0, &err) == CP_OK);
    CHECK(cp_forward_buffers_init(&ff, &f->cfg, 1, T, 0, &err) == CP_OK);
    cp_model_forward(q, &fq, ids);
    cp_model_forward(f, &ff, ids);
    cp_kv_cache kv;
    CHECK(cp_kv_cache_init(&kv, &q->cfg, T, &err) == CP_OK);
    double worst = 0, worst_cached = 0, scale = 0;
    for (int t = 0; t < T; t++) {
        cp_kv_cache_step(q, &kv, ids[t]);
        for (int v = 0; v < V; v++) {
            float want = ff.logits[(size_t)t * V + v];
            scale = fmax(scale, fabs(want));
            worst = fmax(worst, fabs(fq.logits[(size_t)t * V + v] - want));
            worst_cached = fmax(worst_cached, fabs(kv.logits[v] - want));
        }
    }
    CHECK_MSG(worst <= 1e-5 * fmax(scale, 1), "%s: max |diff| %g", dir, worst);
    CHECK_MSG(worst_cached <= 1e-5 * fmax(scale, 1), "%s: cached max |diff| %g", dir, worst_cached);
    cp_kv_cache_free(&kv);
    cp_forward_buffers_free(&fq);
    cp_forward_buffers_free(&ff);
    cp_model_free(q);
    cp_model_free(f);
}

TEST(qlora_nf4_model_matches_dequantized)
{
    check_matches_dequantized("tests/fixtures/tiny-gpt2");       /* Conv1D, transposed */
    check_matches_dequantized("tests/fixtures/tiny-llama-bias"); /* biases, untied */
    check_matches_dequantized("tests/fixtures/gguf/tiny-llama-q.q8_0.gguf");
}

/* cpeft train --method qlora: the eval loss falls, the base's size is
 * reported, and the adapter is a PEFT LoRA adapter eval can apply. */
TEST(qlora_cli_trains_and_reloads)
{
    const char *out = test_tmpdir();
    char run[512], args[2048], *stdout_text = NULL, *stderr_text = NULL;
    snprintf(run, sizeof run, "%s/run", out);
    snprintf(args, sizeof args,
             "train --model '%s' --data '%s' --out '%s' --method qlora --double-quant --steps 200 "
             "--batch-size 2 --seq-len 32 --lr 3e-3 --target q_proj,k_proj,v_proj,o_proj --quiet",
             test_shared("models/stories260K"), test_shared("data/tinyshakespeare/input.txt"), run);
    CHECK_EQ_INT(test_run_cli(args, NULL, &stdout_text, &stderr_text), 0);
    double before = 0, after = 0;
    const char *line = stdout_text ? strstr(stdout_text, "eval loss: ") : NULL;
    CHECK_MSG(line && sscanf(line, "eval loss: %lf -> %lf", &before, &after) == 2, "%s %s",
              stdout_text, stderr_text);
    CHECK_MSG(after < 0.85 * before, "eval loss %g -> %g", before, after);
    fprintf(stderr, "    eval loss %.4f -> %.4f\n", before, after);
    CHECK_MSG(stdout_text && strstr(stdout_text, "NF4 base: 35 projections"), "%s", stdout_text);
    CHECK_MSG(stdout_text && strstr(stdout_text, "double quantization of the scales: RMS error"),
              "%s", stdout_text);
    free(stdout_text), free(stderr_text);

    cJSON *config = NULL;
    char path[600];
    snprintf(path, sizeof path, "%s/adapter_config.json", run);
    config = test_read_json(path);
    const cJSON *type = cJSON_GetObjectItem(config, "peft_type");
    CHECK(cJSON_IsString(type));
    if (cJSON_IsString(type))
        CHECK(strcmp(type->valuestring, "LORA") == 0);
    cJSON_Delete(config);

    snprintf(args, sizeof args, "eval --model '%s' --adapter '%s' --data '%s' --seq-len 32",
             test_shared("models/stories260K"), run,
             test_shared("data/tinystories/tinystories_sample.txt"));
    CHECK_EQ_INT(test_run_cli(args, NULL, &stdout_text, &stderr_text), 0);
    free(stdout_text), free(stderr_text);

    snprintf(args, sizeof args, "train --model '%s' --data '%s' --out '%s/dora' --method qlora --dora",
             test_shared("models/stories260K"), test_shared("data/tinyshakespeare/input.txt"), out);
    CHECK_EQ_INT(test_run_cli(args, NULL, &stdout_text, &stderr_text), 2);
    CHECK_MSG(stderr_text && strstr(stderr_text, "--dora does not apply to --method qlora"),
              "%s", stderr_text);
    free(stdout_text), free(stderr_text);
}
