/* cpeft eval: a model's loss and perplexity on a text file. */
#include <stdio.h>
#include <stdlib.h>

#include "cli/args.h"
#include "cli/commands.h"
#include "core/error.h"
#include "core/file.h"
#include "train/dataset.h"

static int run(const char *model_dir, const char *tokenizer, const char *adapter,
               const char *data_path, int seq_len)
{
    cp_error err = {0};
    cp_model *model = NULL;
    cp_tokenizer *tok = NULL;
    size_t n_ids = 0;
    int32_t *ids = NULL;
    int add_bos = 1;
    cp_eval_result result = {0};

    cp_status st = cp_model_load(model_dir, &model, &err);
    if (st == CP_OK && adapter)
        st = cp_model_load_adapter(model, adapter, &err);
    if (st == CP_OK)
        st = cli_load_tokenizer(tokenizer ? tokenizer : model_dir, &tok, &add_bos, &err);
    /* The same reader as training: plain text as one text, .jsonl by record. */
    if (st == CP_OK)
        st = cp_dataset_tokenize_file(tok, data_path, add_bos, &ids, &n_ids, &err);
    if (st == CP_OK) {
        int context = cp_model_context_length(model);
        if (seq_len < 0)
            seq_len = context < 512 ? context : 512;
        if (seq_len > context)
            st = cp_error_set(&err, CP_ERR_INPUT,
                              "--seq-len %d exceeds the model's context length of %d", seq_len,
                              context);
    }
    if (st == CP_OK) {
        st = cp_model_evaluate(model, ids, n_ids, seq_len, &result, &err);
        if (st != CP_OK)
            cp_error_prefix(&err, "%s", data_path);
    }
    if (st == CP_OK)
        printf("{\"loss\": %.6f, \"perplexity\": %.6f, \"tokens\": %zu}\n", result.loss,
               result.perplexity, result.tokens);

    free(ids);
    cp_tokenizer_free(tok);
    cp_model_free(model);
    return st == CP_OK ? 0 : cli_report(&err);
}

int cmd_eval(int argc, char **argv)
{
    const char *model = NULL, *tokenizer = NULL, *adapter = NULL, *data = NULL;
    int seq_len = -1; /* -1: not given */
    const cli_option options[] = {
        {"model", CLI_STRING, &model, "PATH", "model folder (Hugging Face layout) or GGUF file (required)"},
        {"tokenizer", CLI_STRING, &tokenizer, "PATH", "tokenizer to use instead of the model's own: a folder, tokenizer.model, tokenizer.json or a .gguf file"},
        {"adapter", CLI_STRING, &adapter, "DIR", "apply the run folder DIR of any method (cpeft's or PEFT's)"},
        {"data", CLI_STRING, &data, "FILE", "text file to evaluate on (required)"},
        {"seq-len", CLI_INT, &seq_len, "N",
         "inputs per window (default: the smaller of 512 and the context length)"},
    };
    const cli_command cmd = {
        .name = "eval",
        .usage = "--model DIR [--adapter DIR] --data FILE [--seq-len N]",
        .about = "Tokenizes FILE as one text (BOS once at the start; a .jsonl file record by\n"
                 "record from its \"text\" fields, as training reads it), cuts the ids into\n"
                 "consecutive windows of N inputs, each predicting the ids one position\n"
                 "further on, drops a partial last window, and prints one JSON line:\n"
                 "{\"loss\": mean cross-entropy in nats per predicted token,\n"
                 " \"perplexity\": exp(loss), \"tokens\": predicted tokens}.",
        .options = options,
        .n_options = sizeof options / sizeof *options,
    };
    int rc = cli_parse(&cmd, argc, argv, NULL);
    if (rc != CLI_PARSED)
        return rc == CLI_HELP_SHOWN ? 0 : 2;
    if (!model || !data)
        return cli_usage_error(&cmd, "--model and --data are required");
    if (seq_len == 0 || seq_len < -1)
        return cli_usage_error(&cmd, "--seq-len must be positive");
    return run(model, tokenizer, adapter, data, seq_len);
}
