/*
 * Prompt tuning: gradients against finite differences on small random
 * models, loss and gradients against PyTorch (tools/ref_prompt.py), generate
 * against the batched forward pass, save and load, training from the
 * command line and its setting errors. The helpers named pl_ serve prefix
 * tuning's tests too (tests/test_prefix.c).
 */
#include <cJSON.h>
#include <stdlib.h>

#include "core/file.h"
#include "core/rng.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "peft/method.h"
#include "peft/prompt_io.h"
#include "test.h"

/* Mean cross-entropy of the forward pass in fb against targets, leaving the
 * gradients alone. */
static double forward_loss(cp_model *m, cp_forward_buffers *fb, const int32_t *inputs,
                           const int32_t *targets)
{
    cp_model_forward(m, fb, inputs);
    return test_logits_loss(fb->logits, targets, fb->B * fb->T, m->cfg.vocab_size);
}

/* Creates method name with settings s on m and attaches it. */
cp_method *pl_attach(cp_model *m, const char *name, const cp_method_settings *s)
{
    cp_method *method = NULL;
    cp_error err = {0};
    CHECK_MSG(cp_method_create(cp_method_find(name), m, s, &method, &err) == CP_OK, "%s",
              err.msg);
    m->method = method;
    if (method)
        method->training = 1;
    return method;
}

void pl_detach(cp_model *m)
{
    cp_method_free(m->method);
    m->method = NULL;
}

/* Checks the method's gradients on model_dir against central differences
 * of every step-th trainable value. */
void pl_check_gradients(const char *model_dir, const char *name, const cp_method_settings *s,
                        int step)
{
    cp_model *m = NULL;
    cp_error err = {0};
    CHECK_MSG(cp_model_load(model_dir, &m, &err) == CP_OK, "%s", err.msg);
    cp_method *method = m ? pl_attach(m, name, s) : NULL;
    if (!method) {
        cp_model_free(m);
        return;
    }
    int B = 2, T = 5;
    cp_forward_buffers fb;
    cp_backward_buffers bb;
    CHECK(cp_forward_buffers_init_model(&fb, m, B, T, 1, &err) == CP_OK);
    CHECK(cp_backward_buffers_init_model(&bb, m, B, T, &err) == CP_OK);
    cp_rng rng;
    cp_rng_seed(&rng, 11);
    int32_t inputs[10], targets[10];
    for (int i = 0; i < B * T; i++) {
        inputs[i] = (int32_t)(cp_rng_next(&rng) % (uint64_t)m->cfg.vocab_size);
        targets[i] = (int32_t)(cp_rng_next(&rng) % (uint64_t)m->cfg.vocab_size);
    }
    cp_method_zero_grads(method);
    cp_model_forward(m, &fb, inputs);
    cp_model_backward(m, &fb, &bb, targets, 1.0f);

    double worst = 0, max_grad = 0;
    int checked = 0;
    for (int p = 0; p < method->n_params; p++) {
        cp_param_ref *ref = &method->params[p];
        for (size_t i = (size_t)p; i < ref->n; i += (size_t)step, checked++) {
            float saved = ref->param[i], eps = 3e-3f;
            ref->param[i] = saved + eps;
            double up = forward_loss(m, &fb, inputs, targets);
            ref->param[i] = saved - eps;
            double down = forward_loss(m, &fb, inputs, targets);
            ref->param[i] = saved;
            double numeric = (up - down) / (2 * eps);
            double diff = fabs(numeric - ref->grad[i]);
            worst = diff > worst ? diff : worst;
            max_grad = fabs(numeric) > max_grad ? fabs(numeric) : max_grad;
        }
    }
    CHECK_MSG(checked > 20, "only %d values checked", checked);
    CHECK_MSG(max_grad > 1e-3, "%s on %s: gradients are all near zero (%g)", name, model_dir,
              max_grad);
    CHECK_MSG(worst < 2e-3 * max_grad + 1e-5,
              "%s on %s: worst |analytic - numeric| %g, max |grad| %g", name, model_dir, worst,
              max_grad);
    pl_detach(m);
    cp_backward_buffers_free(&bb);
    cp_forward_buffers_free(&fb);
    cp_model_free(m);
}

/* Checks that greedy generation with the method equals the argmax of the
 * batched forward pass over the prompt and what was generated. */
void pl_check_generate(const char *model_dir, const char *name, const cp_method_settings *s)
{
    cp_model *m = NULL;
    cp_error err = {0};
    CHECK_MSG(cp_model_load(model_dir, &m, &err) == CP_OK, "%s", err.msg);
    cp_method *method = m ? pl_attach(m, name, s) : NULL;
    if (!method) {
        cp_model_free(m);
        return;
    }
    const int32_t prompt[] = {1, 5, 9, 3};
    int n_prompt = 4, n_new = 6;
    cp_generate_params gp = cp_generate_default_params();
    gp.max_new_tokens = n_new;
    gp.stop_at_eos = 0;
    int32_t *gen = NULL, ids[16];
    size_t n_gen = 0;
    CHECK_MSG(cp_generate(m, prompt, (size_t)n_prompt, &gp, &gen, &n_gen, &err) == CP_OK, "%s",
              err.msg);
    CHECK_EQ_INT(n_gen, n_new);

    int T = n_prompt + n_new - 1;
    memcpy(ids, prompt, sizeof prompt);
    for (int i = 0; gen && i < n_new - 1; i++)
        ids[n_prompt + i] = gen[i];
    cp_forward_buffers fb;
    CHECK(cp_forward_buffers_init_model(&fb, m, 1, T, 0, &err) == CP_OK);
    method->training = 0;
    cp_model_forward(m, &fb, ids);
    int V = m->cfg.vocab_size;
    for (int i = 0; gen && i < n_new; i++) {
        const float *row = fb.logits + (size_t)(n_prompt - 1 + i) * V;
        int best = 0;
        for (int v = 1; v < V; v++)
            best = row[v] > row[best] ? v : best;
        CHECK_MSG(best == gen[i], "%s on %s: token %d: generate chose %d, the forward pass %d",
                  name, model_dir, i, gen[i], best);
    }
    free(gen);
    cp_forward_buffers_free(&fb);
    pl_detach(m);
    cp_model_free(m);
}

/* Reads expected.json's (2, 16) inputs and targets. */
static int read_batch(const cJSON *expected, int32_t *inputs, int32_t *targets)
{
    const char *keys[2] = {"inputs", "targets"};
    int32_t *dst[2] = {inputs, targets};
    for (int k = 0; k < 2; k++) {
        const cJSON *rows = cJSON_GetObjectItem(expected, keys[k]);
        CHECK_MSG(cJSON_GetArraySize(rows) == 2, "expected.json: %s is not 2 rows", keys[k]);
        for (int b = 0; b < 2; b++) {
            const cJSON *row = cJSON_GetArrayItem(rows, b);
            if (cJSON_GetArraySize(row) != 16)
                return 0;
            for (int t = 0; t < 16; t++)
                dst[k][b * 16 + t] = cJSON_GetArrayItem(row, t)->valueint;
        }
    }
    return 1;
}

/* Loads the fixture's adapter onto stories260K and compares the loss and
 * the gradient of prompt_embeddings of its batch with PyTorch's. */
void pl_check_reference(const char *fixture)
{
    cp_model *m = NULL;
    cp_error err = {0};
    char path[256];
    snprintf(path, sizeof path, "%s/expected.json", fixture);
    cJSON *expected = test_read_json(path);
    CHECK_MSG(cp_model_load(test_shared("models/stories260K"), &m, &err) == CP_OK, "%s",
              err.msg);
    if (m)
        CHECK_MSG(cp_model_load_adapter(m, fixture, &err) == CP_OK, "%s", err.msg);
    int32_t inputs[32], targets[32];
    if (!m || !m->method || !expected || !read_batch(expected, inputs, targets)) {
        cJSON_Delete(expected);
        cp_model_free(m);
        return;
    }
    cp_forward_buffers fb;
    cp_backward_buffers bb;
    CHECK(cp_forward_buffers_init_model(&fb, m, 2, 16, 1, &err) == CP_OK);
    CHECK(cp_backward_buffers_init_model(&bb, m, 2, 16, &err) == CP_OK);
    cp_method_zero_grads(m->method);
    cp_model_forward(m, &fb, inputs);
    double loss = cp_model_backward(m, &fb, &bb, targets, 1.0f);
    double want = cJSON_GetObjectItem(expected, "loss")->valuedouble;
    CHECK_MSG(fabs(loss - want) <= 1e-4 * fabs(want), "%s: loss %.7f, PyTorch %.7f", fixture,
              loss, want);

    snprintf(path, sizeof path, "%s/grads.safetensors", fixture);
    cp_safetensors *grads = NULL;
    CHECK_MSG(cp_safetensors_open(path, &grads, &err) == CP_OK, "%s", err.msg);
    const cp_st_tensor *t = grads ? cp_safetensors_find(grads, "prompt_embeddings") : NULL;
    CHECK(t != NULL);
    CHECK_EQ_INT(m->method->n_params, 1);
    if (t && cp_st_tensor_numel(t) == m->method->params[0].n) {
        size_t n = cp_st_tensor_numel(t);
        float *ref = malloc(n * sizeof *ref);
        memcpy(ref, t->data, n * sizeof *ref);
        double scale = 0, worst = 0;
        for (size_t i = 0; i < n; i++) {
            scale = fabs(ref[i]) > scale ? fabs(ref[i]) : scale;
            double diff = fabs(m->method->params[0].grad[i] - ref[i]);
            worst = diff > worst ? diff : worst;
        }
        CHECK_MSG(worst <= 1e-4 * scale, "%s: max |diff| %g, max |grad| %g (relative %.2g)",
                  fixture, worst, scale, worst / scale);
        printf("    %s: loss %.7f vs %.7f, max gradient difference %.2g of the largest\n",
               fixture, loss, want, worst / scale);
        free(ref);
    }
    cp_safetensors_close(grads);
    cp_backward_buffers_free(&bb);
    cp_forward_buffers_free(&fb);
    cJSON_Delete(expected);
    cp_model_free(m);
}

/* Writes the first n bytes of tinyshakespeare after skip bytes into
 * dir/name and returns the malloc'd path. */
char *pl_shakespeare(const char *dir, const char *name, long skip, long n)
{
    char *path = cp_path_join(dir, name), *cmd = NULL;
    if (asprintf(&cmd, "tail -c +%ld '%s' | head -c %ld > '%s'", skip + 1,
                 test_shared("data/tinyshakespeare/input.txt"), n, path) < 0 ||
        system(cmd) != 0)
        abort();
    free(cmd);
    return path;
}

/* The last eval_loss in run/metrics.jsonl, or NAN. */
static double last_eval_loss(const char *run)
{
    char *path = cp_path_join(run, "metrics.jsonl"), *text = NULL;
    cp_error err = {0};
    double loss = NAN;
    if (cp_file_read(path, &text, NULL, &err) == CP_OK) {
        const char *at = text, *hit;
        while ((hit = strstr(at, "\"eval_loss\": ")) != NULL) {
            loss = strtod(hit + 13, NULL);
            at = hit + 1;
        }
    }
    free(text);
    free(path);
    return loss;
}

/* Trains method (with extra options) on stories260K, then checks that
 * cpeft eval with the saved adapter gives the loss the run ended with. */
void pl_check_save_load(const char *method, const char *extra)
{
    const char *dir = test_tmpdir();
    char *train = pl_shakespeare(dir, "train.txt", 0, 20000);
    char *eval = pl_shakespeare(dir, "eval.txt", 20000, 3000);
    char *run = cp_path_join(dir, "run"), *args = NULL, *err = NULL;
    if (asprintf(&args,
                 "train --model '%s' --data '%s' --eval-data '%s' --out '%s' --method %s %s "
                 "--steps 3 --batch-size 2 --seq-len 32 --lr 1e-2 --quiet",
                 test_shared("models/stories260K"), train, eval, run, method, extra) < 0)
        abort();
    CHECK_MSG(test_run_cli(args, NULL, NULL, &err) == 0, "%s: %s", args, err);
    double trained = last_eval_loss(run), loaded = test_cli_eval_loss(run, eval, 32);
    CHECK_MSG(fabs(trained - loaded) < 2e-6, "%s: eval loss %.6f after training, %.6f loaded",
              method, trained, loaded);
    free(train), free(eval), free(run), free(args), free(err);
}

/* Checks that cpeft train args exits with status 2 and one line containing needle. */
void pl_check_train_error(const char *method_args, const char *needle)
{
    const char *dir = test_tmpdir();
    char *train = pl_shakespeare(dir, "train.txt", 0, 5000), *args = NULL, *err = NULL;
    if (asprintf(&args, "train --model '%s' --data '%s' --out '%s/run' --steps 1 --quiet %s",
                 test_shared("models/stories260K"), train, dir, method_args) < 0)
        abort();
    CHECK_EQ_INT(test_run_cli(args, NULL, NULL, &err), 2);
    CHECK_MSG(err && strstr(err, needle), "%s: \"%s\" lacks \"%s\"", method_args, err, needle);
    CHECK_EQ_INT(test_count_lines(err), 1);
    free(train), free(args), free(err);
}

static cp_method_settings prompt_settings(int n, const char *init)
{
    cp_method_settings s = cp_method_default_settings();
    s.n_virtual_tokens = n;
    s.prompt_init = init;
    return s;
}

TEST(prompt_gradients_match_finite_differences)
{
    cp_method_settings s = prompt_settings(3, "random");
    pl_check_gradients("tests/fixtures/tiny-llama3", "prompt", &s, 2); /* GQA, llama3 RoPE */
    pl_check_gradients("tests/fixtures/tiny-gpt2", "prompt", &s, 2);   /* learned positions */
}

TEST(prompt_matches_pytorch)
{
    pl_check_reference("tests/fixtures/prompt");
}

TEST(prompt_generate_matches_forward)
{
    cp_method_settings s = prompt_settings(3, "random");
    pl_check_generate("tests/fixtures/tiny-llama3", "prompt", &s);
    pl_check_generate("tests/fixtures/tiny-gpt2", "prompt", &s);
    pl_check_generate("tests/fixtures/tiny-mistral", "prompt", &s); /* sliding window */
}

TEST(prompt_init_copies_token_embeddings)
{
    cp_model *m = NULL;
    cp_error err = {0};
    CHECK(cp_model_load(test_shared("models/stories260K"), &m, &err) == CP_OK);
    if (!m)
        return;
    /* "ab" is BOS plus fewer than 5 tokens, so PEFT repeats the ids from the start. */
    cp_method_settings s = prompt_settings(5, "text");
    s.prompt_init_text = "ab";
    cp_method *method = pl_attach(m, "prompt", &s);
    int32_t *ids = NULL;
    size_t n_ids = 0;
    cp_tokenizer *tok = NULL;
    CHECK(cp_tokenizer_load(m->dir, &tok, &err) == CP_OK);
    CHECK(tok != NULL);
    if (tok)
        CHECK(cp_tokenizer_encode(tok, "ab", 2, 1, &ids, &n_ids, &err) == CP_OK);
    CHECK(n_ids >= 2);
    CHECK(n_ids < 5);
    size_t C = m->cfg.hidden_size;
    for (int i = 0; method && ids && i < 5; i++)
        CHECK(memcmp(method->params[0].param + i * C, m->embed + (size_t)ids[i % n_ids] * C,
                     C * sizeof(float)) == 0);
    free(ids);
    cp_tokenizer_free(tok);
    pl_detach(m);

    /* A text longer than the prompt is cut to its first tokens, as PEFT cuts it. */
    s = prompt_settings(2, "text");
    s.prompt_init_text = "a much longer text than two tokens";
    CHECK(pl_attach(m, "prompt", &s) != NULL);
    pl_detach(m);
    cp_model_free(m);
}

TEST(prompt_peft_config_accepted)
{
    /* The sizes of Llama-3.2-3B, which the configuration was written for. */
    cp_model_config cfg = {.hidden_size = 3072, .n_layers = 28, .n_heads = 24, .n_kv_heads = 8,
                           .head_dim = 128};
    char *text = NULL;
    cp_error err = {0};
    const char *path =
        test_shared("adapters/peft-configs/prompt_tuning_llama-3.2-3B-default.adapter_config.json");
    CHECK_MSG(cp_file_read(path, &text, NULL, &err) == CP_OK, "%s", err.msg);
    cp_prompt_config c = {.peft_type = "PROMPT_TUNING"};
    CHECK_MSG(text && cp_prompt_config_parse(text, path, &cfg, &c, &err) == CP_OK, "%s",
              err.msg);
    CHECK_EQ_INT(c.n_virtual_tokens, 200);
    CHECK_EQ_INT(c.token_dim, 3072);
    free(text);
}

TEST(prompt_save_load_round_trip)
{
    pl_check_save_load("prompt", "--num-virtual-tokens 4");
    pl_check_save_load("prompt", "--num-virtual-tokens 3 --prompt-init-text 'First Citizen'");
}

TEST(prompt_train_recipe_lowers_eval_loss)
{
    const char *dir = test_tmpdir();
    char *train = pl_shakespeare(dir, "train.txt", 0, 200000);
    char *eval = pl_shakespeare(dir, "eval.txt", 1003854, 4000);
    char *run = cp_path_join(dir, "run"), *args = NULL, *err = NULL;
    if (asprintf(&args,
                 "train --model '%s' --data '%s' --eval-data '%s' --out '%s' --method prompt "
                 "--num-virtual-tokens 8 --prompt-init vocab --steps 200 --batch-size 2 "
                 "--seq-len 32 --lr 3e-2 --quiet",
                 test_shared("models/stories260K"), train, eval, run) < 0)
        abort();
    CHECK_MSG(test_run_cli(args, NULL, NULL, &err) == 0, "%s", err);
    double before = test_cli_eval_loss(NULL, eval, 32), after = last_eval_loss(run);
    printf("    prompt, 200 steps: eval loss %.4f -> %.4f\n", before, after);
    CHECK_MSG(after < before - 0.3, "eval loss %.4f -> %.4f", before, after);
    free(train), free(eval), free(run), free(args), free(err);
}

TEST(prompt_rejects_bad_settings)
{
    pl_check_train_error("--method prompt --num-virtual-tokens 0", "--num-virtual-tokens");
    pl_check_train_error("--method prompt --prompt-init words", "--prompt-init must be");
    pl_check_train_error("--method prompt --prompt-init text", "--prompt-init-text");
    pl_check_train_error("--method prompt --prompt-init vocab --prompt-init-text hi",
                         "--prompt-init-text");
    pl_check_train_error("--method prompt --num-virtual-tokens 600", "--num-virtual-tokens");
}
