/*
 * The command-line tool as a user runs it: outputs, help, and one-line
 * errors with exit status 2 for bad input.
 */
#include <cJSON.h>
#include <stdlib.h>

#include "core/file.h"
#include "test.h"

/* Runs the CLI and checks for exit status 2, a single stderr line, and a
 * phrase in it. */
static void check_user_error(const char *args, const char *stdin_text, const char *needle)
{
    char *out = NULL, *err = NULL;
    int rc = test_run_cli(args, stdin_text, &out, &err);
    CHECK_MSG(rc == 2, "cpeft %s: exit status %d, expected 2 (stderr: %s)", args, rc, err);
    CHECK_MSG(test_count_lines(err) == 1, "cpeft %s: expected one stderr line, got: %s", args,
              err);
    CHECK_MSG(strstr(err, needle) != NULL, "cpeft %s: stderr \"%s\" lacks \"%s\"", args, err,
              needle);
    free(out), free(err);
}

static char *model_dir(void) { return test_shared("models/stories260K"); }

TEST(cli_help_and_usage)
{
    const char *commands[] = {"generate", "eval", "tokenize", "inspect"};
    for (size_t i = 0; i < 4; i++) {
        char args[64], *out = NULL;
        snprintf(args, sizeof args, "%s --help", commands[i]);
        CHECK_EQ_INT(test_run_cli(args, NULL, &out, NULL), 0);
        CHECK_MSG(strstr(out, "usage: cpeft") != NULL, "%s --help: %s", commands[i], out);
        free(out);
    }
    char *out = NULL;
    CHECK_EQ_INT(test_run_cli("--help", NULL, &out, NULL), 0);
    CHECK(strstr(out, "generate") != NULL);
    CHECK(strstr(out, "tokenize") != NULL);
    free(out);
    char *err = NULL;
    CHECK_EQ_INT(test_run_cli("", NULL, NULL, &err), 2);
    CHECK(strstr(err, "usage: cpeft COMMAND") != NULL);
    free(err);
    check_user_error("frobnicate", NULL, "unknown command \"frobnicate\"");
    check_user_error("generate --model x --prompt y --bogus", NULL, "unknown option --bogus");
    check_user_error("generate --prompt y", NULL, "--model is required");
    check_user_error("generate --model x --prompt y --max-new-tokens abc", NULL,
                     "expects an integer");
    check_user_error("generate --model x --prompt y --top-p 0", NULL, "--top-p");
    check_user_error("eval --model x", NULL, "--data");
    check_user_error("tokenize", NULL, "exactly one of --model and --tokenizer");
    check_user_error("inspect", NULL, "expected one PATH");
}

TEST(cli_tokenize_round_trip)
{
    char args[512], *out = NULL;
    snprintf(args, sizeof args, "tokenize --model '%s'", model_dir());
    CHECK_EQ_INT(test_run_cli(args, "Once upon a time", &out, NULL), 0);
    CHECK_EQ_STR(out, "1 403 407 261 378\n");
    free(out);

    snprintf(args, sizeof args, "tokenize --model '%s' --no-bos", model_dir());
    CHECK_EQ_INT(test_run_cli(args, "Once upon a time", &out, NULL), 0);
    CHECK_EQ_STR(out, "403 407 261 378\n");
    free(out);

    snprintf(args, sizeof args, "tokenize --tokenizer '%s' --decode",
             test_shared("models/stories260K/tokenizer.model"));
    CHECK_EQ_INT(test_run_cli(args, "1 403 407 261 378\n", &out, NULL), 0);
    CHECK_EQ_STR(out, "Once upon a time");
    free(out);

    /* Empty input: BOS alone, or an empty line. */
    snprintf(args, sizeof args, "tokenize --model '%s'", model_dir());
    CHECK_EQ_INT(test_run_cli(args, "", &out, NULL), 0);
    CHECK_EQ_STR(out, "1\n");
    free(out);

    snprintf(args, sizeof args, "tokenize --tokenizer '%s'",
             test_shared("tokenizers/gpt2/vocab.json"));
    check_user_error(args, "hi", "pass the folder that holds them");
    snprintf(args, sizeof args, "tokenize --tokenizer '%s'",
             test_shared("models/stories260K/llama2c/tok512.bin"));
    check_user_error(args, "hi", "llama2.c's exported tokenizer");

    snprintf(args, sizeof args, "tokenize --model '%s' --decode", model_dir());
    check_user_error(args, "1 2 x", "byte 4: expected a non-negative token id");
    check_user_error(args, "1 99999", "99999");
}

TEST(cli_generate_sampling_is_seeded)
{
    char args[512], *a = NULL, *b = NULL, *c = NULL;
    snprintf(args, sizeof args,
             "generate --model '%s' --prompt 'The cat' --max-new-tokens 30 --temperature 1 "
             "--seed 7",
             model_dir());
    CHECK_EQ_INT(test_run_cli(args, NULL, &a, NULL), 0);
    CHECK_EQ_INT(test_run_cli(args, NULL, &b, NULL), 0);
    CHECK_EQ_STR(a, b);
    CHECK(strncmp(a, "The cat", 7) == 0);
    snprintf(args, sizeof args,
             "generate --model '%s' --prompt 'The cat' --max-new-tokens 30 --temperature 1 "
             "--seed 8",
             model_dir());
    CHECK_EQ_INT(test_run_cli(args, NULL, &c, NULL), 0);
    CHECK_MSG(strcmp(a, c) != 0, "seeds 7 and 8 gave the same text: %s", a);
    free(a), free(b), free(c);

    snprintf(args, sizeof args, "generate --model '%s' --prompt '' --max-new-tokens 600",
             model_dir());
    check_user_error(args, NULL, "exceeds the context length of 512");
}

TEST(cli_eval_reads_jsonl_records)
{
    const char *dir = test_tmpdir();
    char *txt_path = NULL, *cmd = NULL;
    if (asprintf(&txt_path, "%s/text.txt", dir) < 0 ||
        asprintf(&cmd, "head -c 4000 '%s' > '%s'", test_shared("data/tinyshakespeare/input.txt"),
                 txt_path) < 0 ||
        system(cmd) != 0)
        abort();
    /* The same text as one .jsonl record: eval must read the field, not the JSON. */
    char *text = NULL;
    cp_error err = {0};
    CHECK(cp_file_read(txt_path, &text, NULL, &err) == CP_OK);
    cJSON *record = cJSON_CreateObject();
    cJSON_AddStringToObject(record, "text", text);
    char *line = cJSON_PrintUnformatted(record);
    char *jsonl = test_write_file(dir, "text.jsonl", line, strlen(line));

    char args[1024], *out_txt = NULL, *out_jsonl = NULL;
    snprintf(args, sizeof args, "eval --model '%s' --data '%s' --seq-len 64", model_dir(), txt_path);
    CHECK_EQ_INT(test_run_cli(args, NULL, &out_txt, NULL), 0);
    snprintf(args, sizeof args, "eval --model '%s' --data '%s' --seq-len 64", model_dir(), jsonl);
    CHECK_EQ_INT(test_run_cli(args, NULL, &out_jsonl, NULL), 0);
    /* One record adds EOS after the text, so the loss may differ only by
     * one extra window; the JSON syntax itself must not be tokenized. */
    const char *a = strstr(out_txt, "\"loss\": "), *b = strstr(out_jsonl, "\"loss\": ");
    CHECK(a != NULL);
    CHECK(b != NULL);
    if (a && b)
        CHECK_MSG(fabs(atof(a + 8) - atof(b + 8)) < 0.05, "text %s jsonl %s", out_txt, out_jsonl);
    free(out_txt), free(out_jsonl), free(jsonl), free(line), free(text), free(cmd), free(txt_path);
    cJSON_Delete(record);

    snprintf(args, sizeof args, "eval --model '%s' --data '%s'", model_dir(), dir);
    check_user_error(args, NULL, "is a folder; expected a file");
}

TEST(cli_eval_errors)
{
    const char *dir = test_tmpdir();
    char *empty = test_write_file(dir, "empty.txt", "", 0);
    char *short_text = test_write_file(dir, "short.txt", "Hi", 2);
    char args[1024];

    snprintf(args, sizeof args, "eval --model '%s' --data '%s'", model_dir(), empty);
    check_user_error(args, NULL, "empty.txt");
    snprintf(args, sizeof args, "eval --model '%s' --data '%s' --seq-len 128", model_dir(),
             short_text);
    check_user_error(args, NULL, "do not fill one window");
    snprintf(args, sizeof args, "eval --model '%s' --data '%s' --seq-len 513", model_dir(),
             test_shared("data/tinyshakespeare/input.txt"));
    check_user_error(args, NULL, "exceeds the model's context length of 512");
    snprintf(args, sizeof args, "eval --model '%s' --data '%s/missing.txt'", model_dir(), dir);
    check_user_error(args, NULL, "missing.txt: cannot open");
    free(empty), free(short_text);
}

/* Builds a model folder in a temp dir: the real weights with a config.json
 * edited by the caller. */
static const char *model_with_config(const char *config)
{
    const char *dir = test_tmpdir();
    char *src = test_shared("models/stories260K/model.safetensors"), *dst = NULL;
    char *cmd = NULL;
    if (asprintf(&dst, "%s/model.safetensors", dir) < 0 ||
        asprintf(&cmd, "cp '%s' '%s' && cp '%s' '%s'", src,
                 dst, test_shared("models/stories260K/tokenizer.model"), dir) < 0 ||
        system(cmd) != 0)
        abort();
    free(test_write_file(dir, "config.json", config, strlen(config)));
    free(dst), free(cmd);
    return dir;
}

TEST(cli_bad_model_folders)
{
    char args[1024];
    static const char *base =
        "{\"model_type\": \"llama\", \"hidden_size\": 64, \"intermediate_size\": %d, "
        "\"num_hidden_layers\": %d, \"num_attention_heads\": 8, \"num_key_value_heads\": 4, "
        "\"vocab_size\": 512, \"max_position_embeddings\": 512, \"tie_word_embeddings\": %s}";
    char config[512];

    snprintf(config, sizeof config, base, 172, 6, "true");
    snprintf(args, sizeof args, "generate --prompt x --model '%s'", model_with_config(config));
    check_user_error(args, NULL, "missing tensor \"model.layers.5.input_layernorm.weight\"");

    snprintf(config, sizeof config, base, 128, 5, "true");
    snprintf(args, sizeof args, "generate --prompt x --model '%s'", model_with_config(config));
    check_user_error(args, NULL, "has shape [172, 64] but config.json implies [128, 64]");

    snprintf(config, sizeof config, base, 172, 5, "false");
    snprintf(args, sizeof args, "generate --prompt x --model '%s'", model_with_config(config));
    check_user_error(args, NULL, "missing tensor \"lm_head.weight\"");

    snprintf(args, sizeof args, "generate --prompt x --model '%s'",
             model_with_config("{\"model_type\": \"llama\""));
    check_user_error(args, NULL, "config.json: byte");

    snprintf(args, sizeof args, "generate --prompt x --model '%s'", test_tmpdir());
    check_user_error(args, NULL, "config.json: cannot open");

    /* A model folder where a run folder belongs, and a text file to inspect. */
    snprintf(args, sizeof args, "generate --prompt x --model '%s' --adapter '%s'",
             test_shared("models/stories260K"), test_shared("models/stories260K"));
    check_user_error(args, NULL, "adapter_config.json is missing, so this is not a run folder");
    snprintf(args, sizeof args, "inspect '%s'", test_shared("data/tinyshakespeare/input.txt"));
    check_user_error(args, NULL, "not a model folder, run folder, .safetensors or .gguf file");

    /* A truncated checkpoint. */
    const char *dir = model_with_config("{}");
    snprintf(config, sizeof config, base, 172, 5, "true");
    free(test_write_file(dir, "config.json", config, strlen(config)));
    char *cmd = NULL;
    if (asprintf(&cmd, "truncate -s 500000 '%s/model.safetensors'", dir) < 0 || system(cmd) != 0)
        abort();
    free(cmd);
    snprintf(args, sizeof args, "eval --data x --model '%s'", dir);
    check_user_error(args, NULL, "model.safetensors");
}

TEST(cli_inspect_model)
{
    char args[512], *out = NULL;
    snprintf(args, sizeof args, "inspect '%s'", model_dir());
    CHECK_EQ_INT(test_run_cli(args, NULL, &out, NULL), 0);
    CHECK(strstr(out, "model_type          llama") != NULL);
    CHECK(strstr(out, "model.layers.4.mlp.down_proj.weight") != NULL);
    CHECK(strstr(out, "tensors: 47") != NULL);
    /* 32768 (embedding) + 5 * 45440 (per layer: two norms 128, q 4096, k 2048,
     * v 2048, o 4096, gate, up and down 11008 each) + 64 (final norm). */
    CHECK_MSG(strstr(out, "parameters: 260032") != NULL, "%s", out);
    free(out);
    check_user_error("inspect /nonexistent/path", NULL, "/nonexistent/path");
}
