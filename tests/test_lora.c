/*
 * LoRA: gradients against finite differences on a small random model, save
 * and load in PEFT's layout, and training from the command line with its
 * failure modes.
 */
#include <stdlib.h>
#include <sys/stat.h>

#include "core/file.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "peft/lora.h"
#include "peft/lora_io.h"
#include "test.h"

/* Mean cross-entropy of the model with its attached adapter on ids (B, T+1). */
static double loss_of(cp_model *m, cp_forward_buffers *fb, cp_backward_buffers *bb,
                      const int32_t *inputs, const int32_t *targets, int backward)
{
    cp_model_forward(m, fb, inputs);
    if (backward)
        return cp_model_backward(m, fb, bb, targets, 1.0f);
    /* Forward only: the same loss without touching the gradients. */
    return test_logits_loss(fb->logits, targets, fb->B * fb->T, m->cfg.vocab_size);
}

/* Checks LoRA's gradients on all seven projections of a small random model,
 * with float32 projections or (nf4) QLoRA's NF4 ones. */
static void check_lora_gradients(const char *model_dir, int nf4)
{
    cp_model *m = NULL;
    cp_error err = {0};
    CHECK_MSG(cp_model_load(model_dir, &m, &err) == CP_OK, "%s", err.msg);
    if (!m)
        return;
    if (nf4)
        CHECK_MSG(cp_model_quantize_nf4(m, 0, &err) == CP_OK, "%s", err.msg);
    cp_lora lora;
    cp_lora_params p = cp_lora_default_params();
    p.r = 3;
    p.alpha = 5;
    p.targets = cp_proj_all(&m->cfg);
    CHECK(cp_lora_init(&lora, &m->cfg, &p, &err) == CP_OK);
    /* B starts at zero; random B makes every A gradient non-trivial. */
    cp_rng rng;
    cp_rng_seed(&rng, 3);
    for (size_t i = 0; i < lora.n_weights; i++)
        lora.weights[i] += 0.3f * (cp_rng_uniform(&rng) - 0.5f);

    int B = 2, T = 6, N = B * T;
    CHECK(cp_lora_reserve(&lora, N, &err) == CP_OK);
    CHECK(cp_model_attach_lora(m, &lora, &err) == CP_OK);
    cp_forward_buffers fb;
    cp_backward_buffers bb;
    CHECK(cp_forward_buffers_init(&fb, &m->cfg, B, T, 1, &err) == CP_OK);
    CHECK(cp_backward_buffers_init(&bb, &m->cfg, B, T, &err) == CP_OK);
    int32_t inputs[12], targets[12];
    for (int i = 0; i < N; i++) {
        inputs[i] = (int32_t)(cp_rng_next(&rng) % 40);
        targets[i] = (int32_t)(cp_rng_next(&rng) % 40);
    }
    memset(lora.grads, 0, lora.n_weights * sizeof(float));
    loss_of(m, &fb, &bb, inputs, targets, 1);

    /* Central differences on a spread of weights, every slot and matrix. */
    double worst = 0, max_grad = 0;
    for (size_t i = 0; i < lora.n_weights; i += 7) {
        float saved = lora.weights[i], eps = 3e-3f; /* truncation error grows as eps² */
        lora.weights[i] = saved + eps;
        double up = loss_of(m, &fb, &bb, inputs, targets, 0);
        lora.weights[i] = saved - eps;
        double down = loss_of(m, &fb, &bb, inputs, targets, 0);
        lora.weights[i] = saved;
        double numeric = (up - down) / (2 * eps);
        double diff = fabs(numeric - lora.grads[i]);
        worst = diff > worst ? diff : worst;
        max_grad = fabs(numeric) > max_grad ? fabs(numeric) : max_grad;
    }
    CHECK_MSG(max_grad > 1e-3, "gradients are all near zero (%g)", max_grad);
    CHECK_MSG(worst < 2e-3 * max_grad + 1e-5, "%s: worst |analytic - numeric| %g, max |grad| %g",
              model_dir, worst, max_grad);

    cp_model_detach_method(m);
    cp_backward_buffers_free(&bb);
    cp_forward_buffers_free(&fb);
    cp_lora_free(&lora);
    cp_model_free(m);
}

TEST(lora_gradients_match_finite_differences)
{
    check_lora_gradients("tests/fixtures/tiny-mistral", 0); /* sliding window, GQA */
    check_lora_gradients("tests/fixtures/tiny-qwen2", 0);   /* q/k/v biases, tied head */
    check_lora_gradients("tests/fixtures/tiny-llama-bias", 0);
    check_lora_gradients("tests/fixtures/tiny-gpt2", 0); /* LayerNorm, GELU, fused Conv1D */
}

/* QLoRA: the same check with every projection in NF4 (GPT-2's Conv1D
 * weights transposed before quantizing). */
TEST(qlora_gradients_match_finite_differences)
{
    check_lora_gradients("tests/fixtures/tiny-qwen2", 1);
    check_lora_gradients("tests/fixtures/tiny-gpt2", 1);
}

TEST(lora_save_load_round_trip)
{
    cp_model *m = NULL;
    cp_error err = {0};
    CHECK(cp_model_load(test_shared("models/stories260K"), &m, &err) == CP_OK);
    if (!m)
        return;
    cp_lora a, b;
    cp_lora_params p = cp_lora_default_params();
    p.targets = (1u << CP_PROJ_Q) | (1u << CP_PROJ_DOWN);
    p.use_rslora = 1;
    p.alpha = 12;
    CHECK(cp_lora_init(&a, &m->cfg, &p, &err) == CP_OK);
    for (size_t i = 0; i < a.n_weights; i++)
        a.weights[i] = (float)i * 1e-4f - 0.3f;
    const char *dir = test_tmpdir();
    CHECK_MSG(cp_lora_save(&a, dir, "stories260K", &err) == CP_OK, "%s", err.msg);
    CHECK_MSG(cp_lora_load(&b, dir, &m->cfg, &err) == CP_OK, "%s", err.msg);
    CHECK_EQ_INT(b.params.r, 8);
    CHECK_EQ_INT(b.params.use_rslora, 1);
    CHECK_EQ_INT(b.params.targets, p.targets);
    CHECK_CLOSE(b.scaling, 12 / sqrt(8.0), 1e-6);
    CHECK_EQ_INT(b.n_weights, a.n_weights);
    CHECK(memcmp(a.weights, b.weights, a.n_weights * sizeof(float)) == 0);

    char *text = NULL, *path = cp_path_join(dir, "adapter_config.json");
    CHECK(cp_file_read(path, &text, NULL, &err) == CP_OK);
    CHECK(strstr(text, "\"peft_type\":\t\"LORA\"") != NULL);
    CHECK(strstr(text, "\"target_modules\":\t[\"q_proj\", \"down_proj\"]") != NULL);
    free(text), free(path);
    cp_lora_free(&a);
    cp_lora_free(&b);
    cp_model_free(m);
}

/* A small training command on the first 30,000 bytes of tinyshakespeare. */
static char *small_train_args(const char *dir, const char *out, const char *extra)
{
    char *data = NULL, *args = NULL;
    if (asprintf(&data, "%s/train.txt", dir) < 0)
        abort();
    if (!cp_file_exists(data)) {
        char *cmd = NULL;
        if (asprintf(&cmd, "head -c 30000 '%s' > '%s'",
                     test_shared("data/tinyshakespeare/input.txt"), data) < 0 ||
            system(cmd) != 0)
            abort();
        free(cmd);
    }
    if (asprintf(&args,
                 "train --model '%s' --data '%s' --out '%s' --steps 3 --batch-size 2 "
                 "--seq-len 32 --lr 1e-2 --lora-dropout 0.1 --quiet %s",
                 test_shared("models/stories260K"), data, out, extra) < 0)
        abort();
    free(data);
    return args;
}

static char *read_file_or_empty(const char *dir, const char *name)
{
    char *path = cp_path_join(dir, name), *text = NULL;
    size_t len = 0;
    cp_error err = {0};
    if (cp_file_read(path, &text, &len, &err) != CP_OK)
        text = strdup("");
    free(path);
    return text;
}

TEST(train_is_deterministic)
{
    const char *dir = test_tmpdir();
    char out1[512], out2[512];
    snprintf(out1, sizeof out1, "%s/run1", dir);
    snprintf(out2, sizeof out2, "%s/run2", dir);
    char *a1 = small_train_args(dir, out1, ""), *a2 = small_train_args(dir, out2, "");
    char *err = NULL, *out = NULL;
    CHECK_EQ_INT(test_run_cli(a1, NULL, &out, &err), 0);
    CHECK_MSG(strstr(out, "adapter written to") != NULL, "%s %s", out, err);
    free(out), free(err);
    CHECK_EQ_INT(test_run_cli(a2, NULL, NULL, NULL), 0);
    /* Running again over an existing run folder replaces it. */
    CHECK_EQ_INT(test_run_cli(a2, NULL, NULL, NULL), 0);

    const char *files[] = {"adapter_model.safetensors", "adapter_config.json"};
    for (int i = 0; i < 2; i++) {
        char *path1 = cp_path_join(out1, files[i]), *path2 = cp_path_join(out2, files[i]);
        char *cmd = NULL;
        if (asprintf(&cmd, "cmp -s '%s' '%s'", path1, path2) < 0)
            abort();
        CHECK_MSG(system(cmd) == 0, "%s differs between two identical runs", files[i]);
        free(cmd), free(path1), free(path2);
    }
    char *metrics = read_file_or_empty(out1, "metrics.jsonl");
    CHECK_EQ_INT(test_count_lines(metrics), 5); /* eval at 0, 3 steps, eval at 3 */
    CHECK(strstr(metrics, "{\"step\": 0, \"eval_loss\": ") == metrics);
    CHECK(strstr(metrics, "\"tokens_per_s\": ") != NULL);
    free(metrics);

    /* inspect shows the run: method, size against the base, steps. */
    char inspect_args[600], *shown = NULL;
    snprintf(inspect_args, sizeof inspect_args, "inspect '%s'", out1);
    CHECK_EQ_INT(test_run_cli(inspect_args, NULL, &shown, NULL), 0);
    CHECK_MSG(strstr(shown, "method              lora (PEFT LORA)") != NULL, "%s", shown);
    CHECK_MSG(strstr(shown, "trainable params    8960 (3.446% of the base's 260032)") != NULL,
              "%s", shown);
    CHECK_MSG(strstr(shown, "steps trained       3") != NULL, "%s", shown);
    free(shown);

    /* The adapter applies from the command line. */
    char args[1024];
    snprintf(args, sizeof args, "generate --model '%s' --adapter '%s' --prompt 'To be' "
             "--max-new-tokens 8 --temperature 0",
             test_shared("models/stories260K"), out1);
    CHECK_EQ_INT(test_run_cli(args, NULL, NULL, NULL), 0);
    free(a1), free(a2);
}

/* Runs a failing command and checks exit status 2, one stderr line with the
 * phrase, and that no run folder (nor its temporary sibling) was left. */
static void check_train_error(const char *dir, const char *extra, const char *needle)
{
    char out_dir[512];
    snprintf(out_dir, sizeof out_dir, "%s/failed-run", dir);
    char *args = small_train_args(dir, out_dir, extra), *err = NULL;
    int rc = test_run_cli(args, NULL, NULL, &err);
    CHECK_MSG(rc == 2, "%s: exit status %d (%s)", extra, rc, err);
    CHECK_MSG(test_count_lines(err) == 1, "%s: expected one line: %s", extra, err);
    CHECK_MSG(strstr(err, needle) != NULL, "%s: \"%s\" lacks \"%s\"", extra, err, needle);
    CHECK_MSG(!cp_file_exists(out_dir), "%s: left %s behind", extra, out_dir);
    char *cmd = NULL;
    if (asprintf(&cmd, "ls '%s' | grep -q tmp", dir) < 0)
        abort();
    CHECK_MSG(system(cmd) != 0, "%s: left a temporary folder in %s", extra, dir);
    free(cmd), free(args), free(err);
}

TEST(train_rejects_bad_input)
{
    const char *dir = test_tmpdir();
    char *empty = test_write_file(dir, "empty.txt", "", 0);
    char extra[1024];
    check_train_error(dir, "--target q_proj,qkv_proj", "unknown target module \"qkv_proj\"");
    check_train_error(dir, "--seq-len 600", "600");
    check_train_error(dir, "--method loha", "unknown --method \"loha\"");
    check_train_error(dir, "--method full --modules-to-save lm_head",
                      "does not apply to --method full");
    check_train_error(dir, "--method prompt --r 4",
                      "does not apply to --method prompt; it is an option of: lora qlora");
    check_train_error(dir, "--r 0", "r must be positive");
    check_train_error(dir, "--schedule exp", "exp");
    snprintf(extra, sizeof extra, "--eval-data '%s'", empty);
    check_train_error(dir, extra, "empty.txt");
    snprintf(extra, sizeof extra, "--data '%s'", dir);
    check_train_error(dir, extra, "is a folder; expected a file");
    check_train_error(dir, "--batch-size 100000", "lower --batch-size or --seq-len");
    check_train_error(dir, "--lora-dropout 1.5", "--lora-dropout must be in [0, 1), got 1.5");

    /* A missing parent folder is named as the user gave it. */
    char missing[512], *err_text = NULL;
    snprintf(missing, sizeof missing, "%s/no/such/run", dir);
    char *missing_args = small_train_args(dir, missing, "");
    CHECK_EQ_INT(test_run_cli(missing_args, NULL, NULL, &err_text), 2);
    CHECK_MSG(strstr(err_text, "its parent folder") && !strstr(err_text, ".tmp-"), "%s", err_text);
    free(missing_args), free(err_text);
    free(empty);

    /* An --out that contains other files is never replaced. */
    char other[512];
    snprintf(other, sizeof other, "%s/precious", dir);
    mkdir(other, 0755);
    free(test_write_file(other, "notes.txt", "keep me", 7));
    char *args = small_train_args(dir, other, ""), *err = NULL;
    CHECK_EQ_INT(test_run_cli(args, NULL, NULL, &err), 2);
    CHECK(strstr(err, "notes.txt") != NULL);
    char *kept = read_file_or_empty(other, "notes.txt");
    CHECK_EQ_STR(kept, "keep me");
    free(kept), free(args), free(err);
}

/* Builds an adapter folder for stories260K with one defect. */
static void check_adapter_error(const char *config, int save_tiny, const char *needle)
{
    const char *dir = test_tmpdir();
    cp_error err = {0};
    cp_model *m = NULL;
    const char *base = save_tiny ? "tests/fixtures/tiny-mistral" : test_shared("models/stories260K");
    CHECK(cp_model_load(base, &m, &err) == CP_OK);
    cp_lora lora;
    cp_lora_params p = cp_lora_default_params();
    CHECK(cp_lora_init(&lora, &m->cfg, &p, &err) == CP_OK);
    CHECK(cp_lora_save(&lora, dir, "base", &err) == CP_OK);
    if (config)
        free(test_write_file(dir, "adapter_config.json", config, strlen(config)));
    cp_lora_free(&lora);
    cp_model_free(m);

    char args[1024], *out_err = NULL;
    snprintf(args, sizeof args, "eval --model '%s' --adapter '%s' --data '%s' --seq-len 32",
             test_shared("models/stories260K"), dir, test_shared("data/tinystories/tinystories_sample.txt"));
    CHECK_EQ_INT(test_run_cli(args, NULL, NULL, &out_err), 2);
    CHECK_MSG(strstr(out_err, needle) != NULL, "\"%s\" lacks \"%s\"", out_err, needle);
    CHECK_EQ_INT(test_count_lines(out_err), 1);
    free(out_err);
}

TEST(adapter_load_rejects_mismatches)
{
    check_adapter_error(NULL, 1, "has shape [8, 16], expected [8, 64]");
    check_adapter_error("{\"peft_type\": \"LORA\", \"lora_alpha\": 16, "
                        "\"target_modules\": [\"q_proj\", \"v_proj\"]}",
                        0, "missing or invalid \"r\"");
    check_adapter_error("{\"peft_type\": \"LOHA\"}", 0,
                        "peft_type \"LOHA\" is not a method cpeft can load");
    check_adapter_error("{\"peft_type\": \"LORA\", \"r\": 8, \"lora_alpha\": 16, "
                        "\"target_modules\": [\"q_proj\", \"c_attn\"]}",
                        0, "unknown target module \"c_attn\"");
    check_adapter_error("{\"peft_type\": \"LORA\", \"r\": 8, \"lora_alpha\": 16, "
                        "\"target_modules\": [\"q_proj\"]}",
                        0, "unexpected tensor");
    check_adapter_error("{\"peft_type\": \"LORA\", \"r\": 8, \"lora_alpha\": 16, "
                        "\"target_modules\": [\"q_proj\", \"v_proj\", \"k_proj\"]}",
                        0, "missing tensor");
    check_adapter_error("{\"peft_type\": \"LORA\", \"r\": 8, \"lora_alpha\": 16, "
                        "\"use_dora\": true, \"target_modules\": [\"q_proj\", \"v_proj\"]}",
                        0, "q_proj.lora_magnitude_vector\" that adapter_config.json implies");
    check_adapter_error("{\"peft_type\": \"LORA\", \"r\": 8, \"lora_alpha\": 16, "
                        "\"target_modules\": [\"q_proj\", \"v_proj\"], \"task_type\": \"TOKEN_CLS\"}",
                        0, "task_type TOKEN_CLS");
    check_adapter_error("{\"peft_type\": \"LORA\", ", 0, "invalid JSON");
}

/* The reference recipe: tinyshakespeare split 90/10 by characters, LoRA r 8
 * on q/k/v/o, 200 steps. The base model's eval loss must drop by at least
 * 25% (a PyTorch run of the same recipe drops it by about 40%). */
TEST(train_recipe_lowers_eval_loss)
{
    const char *dir = test_tmpdir();
    char *cmd = NULL, *args = NULL, *out = NULL, *err = NULL;
    const char *text = test_shared("data/tinyshakespeare/input.txt");
    if (asprintf(&cmd, "head -c 1003854 '%s' > '%s/train.txt' && tail -c +1003855 '%s' > '%s/eval.txt'",
                 text, dir, text, dir) < 0 || system(cmd) != 0)
        abort();
    if (asprintf(&args,
                 "train --model '%s' --data '%s/train.txt' --eval-data '%s/eval.txt' --method lora "
                 "--r 8 --alpha 16 --target q_proj,k_proj,v_proj,o_proj --steps 200 "
                 "--batch-size 8 --seq-len 128 --lr 3e-3 --out '%s/run' --quiet",
                 test_shared("models/stories260K"), dir, dir, dir) < 0)
        abort();
    CHECK_EQ_INT(test_run_cli(args, NULL, &out, &err), 0);

    /* cpeft eval, as a user would run it, with and without the adapter. */
    double loss[2] = {0, 0};
    for (int with = 0; with < 2; with++) {
        char *eval_args = NULL, *eval_out = NULL;
        if (asprintf(&eval_args, "eval --model '%s' %s%s%s --data '%s/eval.txt' --seq-len 128",
                     test_shared("models/stories260K"), with ? "--adapter '" : "",
                     with ? dir : "", with ? "/run'" : "", dir) < 0)
            abort();
        char *eval_err = NULL;
        CHECK_EQ_INT(test_run_cli(eval_args, NULL, &eval_out, &eval_err), 0);
        CHECK_MSG(eval_err && eval_err[0] == 0, "cpeft %s: %s", eval_args, eval_err);
        free(eval_err);
        const char *at = strstr(eval_out, "\"loss\": ");
        loss[with] = at ? atof(at + 8) : 0;
        free(eval_args), free(eval_out);
    }
    CHECK_MSG(loss[0] > 4.5 && loss[1] > 0, "eval losses %g (base), %g (adapter)", loss[0],
              loss[1]);
    CHECK_MSG(loss[1] <= 0.75 * loss[0], "eval loss %.4f -> %.4f, a drop of %.1f%% (< 25%%)",
              loss[0], loss[1], 100 * (1 - loss[1] / loss[0]));
    free(cmd), free(args), free(out), free(err);
}

TEST(lora_gpt2_uses_peft_names)
{
    cp_model *m = NULL;
    cp_error err = {0};
    CHECK_MSG(cp_model_load("tests/fixtures/tiny-gpt2", &m, &err) == CP_OK, "%s", err.msg);
    if (!m)
        return;
    unsigned mask = 0;
    CHECK(cp_proj_parse_list(&m->cfg, "c_attn,c_proj", &mask, &err) == CP_OK);
    CHECK_EQ_INT(mask, (1u << CP_PROJ_QKV) | (1u << CP_PROJ_O) | (1u << CP_PROJ_DOWN));
    CHECK_EQ_INT(cp_proj_parse_list(&m->cfg, "q_proj", &mask, &err), CP_ERR_INPUT);
    CHECK_MSG(strstr(err.msg, "valid: c_proj, c_fc, c_attn, or all-linear") != NULL, "%s",
              err.msg);

    cp_lora lora;
    cp_lora_params p = cp_lora_default_params();
    p.r = 4;
    p.targets = (1u << CP_PROJ_QKV) | (1u << CP_PROJ_O) | (1u << CP_PROJ_DOWN);
    CHECK(cp_lora_init(&lora, &m->cfg, &p, &err) == CP_OK);
    const char *dir = test_tmpdir();
    CHECK_MSG(cp_lora_save(&lora, dir, "gpt2", &err) == CP_OK, "%s", err.msg);

    char *path = cp_path_join(dir, "adapter_model.safetensors");
    cp_safetensors *st = NULL;
    CHECK(cp_safetensors_open(path, &st, &err) == CP_OK);
    const cp_st_tensor *a = st ? cp_safetensors_find(st, "base_model.model.transformer.h.1.attn.c_attn.lora_A.weight") : NULL;
    const cp_st_tensor *b = st ? cp_safetensors_find(st, "base_model.model.transformer.h.1.attn.c_attn.lora_B.weight") : NULL;
    CHECK(a != NULL);
    CHECK(b != NULL);
    if (a && b) {
        CHECK_EQ_INT(a->shape[0], 4);
        CHECK_EQ_INT(a->shape[1], 16);
        CHECK_EQ_INT(b->shape[0], 48);
        CHECK_EQ_INT(b->shape[1], 4);
    }
    CHECK(st != NULL);
    if (st)
        CHECK(cp_safetensors_find(st, "base_model.model.transformer.h.0.mlp.c_proj.lora_B.weight"));
    CHECK_EQ_INT(st ? cp_safetensors_count(st) : 0, 2 * 3 * 2);
    cp_safetensors_close(st);
    free(path);

    char *text = NULL, *config = cp_path_join(dir, "adapter_config.json");
    CHECK(cp_file_read(config, &text, NULL, &err) == CP_OK);
    CHECK(text != NULL);
    if (text) {
        CHECK(strstr(text, "\"fan_in_fan_out\":\ttrue") != NULL);
        CHECK(strstr(text, "\"target_modules\":\t[\"c_proj\", \"c_attn\"]") != NULL);
    }
    free(text), free(config);

    /* The saved adapter loads back onto the same base. */
    cp_lora back;
    CHECK_MSG(cp_lora_load(&back, dir, &m->cfg, &err) == CP_OK, "%s", err.msg);
    CHECK_EQ_INT(back.params.targets, p.targets);
    cp_lora_free(&back);
    cp_lora_free(&lora);
    cp_model_free(m);
}
