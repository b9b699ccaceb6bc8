/*
 * Prefix tuning: gradients against finite differences on small random
 * models (with and without the projection MLP), loss and gradients against
 * PyTorch (tools/ref_prefix.py), generate against the batched forward pass,
 * save and load, training from the command line and its setting errors.
 */
#include <stdlib.h>

#include "core/file.h"
#include "model/model.h"
#include "peft/method.h"
#include "peft/prompt_io.h"
#include "test.h"

/* Shared with prompt tuning's tests, defined in tests/test_prompt.c. */
void pl_check_gradients(const char *model_dir, const char *name, const cp_method_settings *s,
                        int step);
void pl_check_generate(const char *model_dir, const char *name, const cp_method_settings *s);
void pl_check_reference(const char *fixture);
void pl_check_save_load(const char *method, const char *extra);
void pl_check_train_error(const char *method_args, const char *needle);
char *pl_shakespeare(const char *dir, const char *name, long skip, long n);

static cp_method_settings prefix_settings(int n, int projection)
{
    cp_method_settings s = cp_method_default_settings();
    s.n_virtual_tokens = n;
    s.prefix_projection = projection;
    return s;
}

TEST(prefix_gradients_match_finite_differences)
{
    cp_method_settings s = prefix_settings(2, 0);
    pl_check_gradients("tests/fixtures/tiny-llama3", "prefix", &s, 3); /* GQA: 1 kv head */
    pl_check_gradients("tests/fixtures/tiny-gpt2", "prefix", &s, 5);
    /* A window of 3 keys: later queries no longer attend to the prefix. */
    pl_check_gradients("tests/fixtures/tiny-mistral", "prefix", &s, 2);
}

TEST(prefix_projection_gradients_match_finite_differences)
{
    cp_method_settings s = prefix_settings(2, 1);
    pl_check_gradients("tests/fixtures/tiny-llama3", "prefix", &s, 5);
    pl_check_gradients("tests/fixtures/tiny-gpt2", "prefix", &s, 23);
}

TEST(prefix_matches_pytorch)
{
    pl_check_reference("tests/fixtures/prefix");
}

TEST(prefix_generate_matches_forward)
{
    cp_method_settings s = prefix_settings(3, 0);
    pl_check_generate("tests/fixtures/tiny-llama3", "prefix", &s);
    pl_check_generate("tests/fixtures/tiny-gpt2", "prefix", &s);
    pl_check_generate("tests/fixtures/tiny-mistral", "prefix", &s); /* sliding window */
}

TEST(prefix_peft_config_accepted)
{
    /* Llama-3.2-3B, the model the configuration was written for: 24 query
     * heads but 8 key/value heads of 128, which PEFT sizes the prefixes by. */
    cp_model_config cfg = {.hidden_size = 3072, .n_layers = 28, .n_heads = 24, .n_kv_heads = 8,
                           .head_dim = 128};
    char *text = NULL;
    cp_error err = {0};
    const char *path =
        test_shared("adapters/peft-configs/prefixtuning_llama-3.2-3B-lr_0.001.adapter_config.json");
    CHECK_MSG(cp_file_read(path, &text, NULL, &err) == CP_OK, "%s", err.msg);
    cp_prompt_config c = {.peft_type = "PREFIX_TUNING"};
    CHECK_MSG(text && cp_prompt_config_parse(text, path, &cfg, &c, &err) == CP_OK, "%s",
              err.msg);
    CHECK_EQ_INT(c.n_virtual_tokens, 200);
    CHECK_EQ_INT(c.prefix_projection, 0);
    size_t values = (size_t)c.n_virtual_tokens * cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim;
    CHECK_EQ_INT(values, 11468800);
    free(text);

    /* A config for a model of another depth is rejected by name. */
    cfg.n_layers = 16;
    CHECK(cp_file_read(path, &text, NULL, &err) == CP_OK);
    CHECK(cp_prompt_config_parse(text, path, &cfg, &c, &err) == CP_ERR_INPUT);
    CHECK_MSG(strstr(err.msg, "num_layers is 28"), "%s", err.msg);
    free(text);
}

TEST(prefix_save_load_round_trip)
{
    pl_check_save_load("prefix", "--num-virtual-tokens 4");
    /* Saved projected: the loaded adapter has no MLP but the same prefixes. */
    pl_check_save_load("prefix", "--num-virtual-tokens 3 --prefix-projection");
}

TEST(prefix_train_recipe_lowers_eval_loss)
{
    const char *dir = test_tmpdir();
    char *train = pl_shakespeare(dir, "train.txt", 0, 200000);
    char *eval = pl_shakespeare(dir, "eval.txt", 1003854, 4000);
    char *run = cp_path_join(dir, "run"), *args = NULL, *err = NULL, *out = NULL;
    if (asprintf(&args,
                 "train --model '%s' --data '%s' --eval-data '%s' --out '%s' --method prefix "
                 "--num-virtual-tokens 8 --steps 200 --batch-size 2 --seq-len 32 --lr 3e-2 "
                 "--quiet",
                 test_shared("models/stories260K"), train, eval, run) < 0)
        abort();
    CHECK_MSG(test_run_cli(args, NULL, NULL, &err) == 0, "%s", err);
    char *metrics = cp_path_join(run, "metrics.jsonl"), *text = NULL;
    cp_error e = {0};
    CHECK(cp_file_read(metrics, &text, NULL, &e) == CP_OK);
    const char *first = text ? strstr(text, "\"eval_loss\": ") : NULL;
    const char *last = first;
    while (last && strstr(last + 1, "\"eval_loss\": "))
        last = strstr(last + 1, "\"eval_loss\": ");
    double before = first ? strtod(first + 13, NULL) : NAN;
    double after = last ? strtod(last + 13, NULL) : NAN;
    printf("    prefix, 200 steps: eval loss %.4f -> %.4f\n", before, after);
    CHECK_MSG(after < before - 0.3, "eval loss %.4f -> %.4f", before, after);
    free(text), free(metrics), free(out);
    free(train), free(eval), free(run), free(args), free(err);
}

TEST(prefix_rejects_bad_settings)
{
    pl_check_train_error("--method prefix --num-virtual-tokens 0", "--num-virtual-tokens");
    pl_check_train_error("--method prefix --num-virtual-tokens -3", "--num-virtual-tokens");
    pl_check_train_error("--method prefix --num-virtual-tokens 500 --seq-len 64",
                         "--num-virtual-tokens");
}
