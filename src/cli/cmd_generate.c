/* cpeft generate: continue a prompt with a model. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/args.h"
#include "cli/commands.h"
#include "core/error.h"

typedef struct generate_options {
    const char *model;
    const char *tokenizer; /* NULL: the model's own */
    const char *adapter;
    const char *prompt;
    int max_new_tokens;
    float temperature;
    float top_p;
    uint64_t seed;
    int print_ids;
} generate_options;

/* Prints the prompt as given, then the text the new ids add to it. */
static cp_status print_continuation(const cp_tokenizer *tok, const char *prompt,
                                    const int32_t *all, size_t n_prompt, size_t n_all,
                                    cp_error *err)
{
    char *before = NULL, *after = NULL;
    size_t n_before = 0, n_after = 0;
    cp_status st = cp_tokenizer_decode(tok, all, n_prompt, &before, &n_before, err);
    if (st == CP_OK)
        st = cp_tokenizer_decode(tok, all, n_all, &after, &n_after, err);
    if (st == CP_OK) {
        /* Decoding the whole sequence keeps characters split across the
         * prompt's last byte pieces whole; the new text is what follows the
         * prompt's own decoding. */
        fputs(prompt, stdout);
        if (n_after >= n_before && memcmp(before, after, n_before) == 0) {
            fwrite(after + n_before, 1, n_after - n_before, stdout);
        } else {
            char *tail = NULL;
            size_t n_tail = 0;
            st = cp_tokenizer_decode(tok, all + n_prompt, n_all - n_prompt, &tail, &n_tail, err);
            if (st == CP_OK)
                fwrite(tail, 1, n_tail, stdout);
            free(tail);
        }
        fputc('\n', stdout);
    }
    free(before);
    free(after);
    return st;
}

static int run(const generate_options *o)
{
    cp_error err = {0};
    cp_model *model = NULL;
    cp_tokenizer *tok = NULL;
    int32_t *prompt_ids = NULL, *new_ids = NULL, *all = NULL;
    size_t n_prompt = 0, n_new = 0;
    int add_bos = 1;

    cp_status st = cp_model_load(o->model, &model, &err);
    if (st == CP_OK && o->adapter)
        st = cp_model_load_adapter(model, o->adapter, &err);
    if (st == CP_OK)
        st = cli_load_tokenizer(o->tokenizer ? o->tokenizer : o->model, &tok, &add_bos, &err);
    if (st == CP_OK)
        st = cp_tokenizer_encode(tok, o->prompt, strlen(o->prompt), add_bos, &prompt_ids,
                                 &n_prompt, &err);
    if (st == CP_OK && n_prompt == 0) {
        /* An empty prompt without BOS still needs one token to start from. */
        int32_t bos = cp_tokenizer_bos_id(tok);
        int32_t *one = bos >= 0 ? realloc(prompt_ids, sizeof *one) : NULL;
        if (bos < 0) {
            st = cp_error_set(&err, CP_ERR_INPUT,
                              "the prompt is empty and the tokenizer has no BOS token; give a "
                              "non-empty --prompt");
        } else if (!one) {
            st = cp_error_nomem(&err, "the prompt", sizeof *one);
        } else {
            prompt_ids = one;
            prompt_ids[n_prompt++] = bos;
        }
    }

    if (st == CP_OK) {
        cp_generate_params p = cp_generate_default_params();
        p.max_new_tokens = o->max_new_tokens;
        /* The default stops at the context length; an explicit count beyond
         * it is an error from cp_generate. */
        int room = cp_model_context_length(model) - (int)n_prompt;
        if (o->max_new_tokens < 0) {
            p.max_new_tokens = room < 256 ? room : 256;
            if (p.max_new_tokens < 0)
                p.max_new_tokens = 0;
        }
        p.temperature = o->temperature;
        p.top_p = o->top_p;
        p.seed = o->seed;
        st = cp_generate(model, prompt_ids, n_prompt, &p, &new_ids, &n_new, &err);
    }
    if (st == CP_OK) {
        all = malloc((n_prompt + n_new) * sizeof *all);
        if (!all)
            st = cp_error_nomem(&err, "token ids", (n_prompt + n_new) * sizeof *all);
    }
    if (st == CP_OK) {
        memcpy(all, prompt_ids, n_prompt * sizeof *all);
        memcpy(all + n_prompt, new_ids, n_new * sizeof *all);
        st = print_continuation(tok, o->prompt, all, n_prompt, n_prompt + n_new, &err);
    }
    if (st == CP_OK && o->print_ids)
        cli_print_ids(stdout, all, n_prompt + n_new, ",");

    free(all);
    free(new_ids);
    free(prompt_ids);
    cp_tokenizer_free(tok);
    cp_model_free(model);
    return st == CP_OK ? 0 : cli_report(&err);
}

int cmd_generate(int argc, char **argv)
{
    generate_options o = {
        .max_new_tokens = -1, .temperature = 0.8f, .top_p = 0.95f, .seed = 0};
    const cli_option options[] = {
        {"model", CLI_STRING, &o.model, "PATH", "model folder (Hugging Face layout) or GGUF file (required)"},
        {"tokenizer", CLI_STRING, &o.tokenizer, "PATH", "tokenizer to use instead of the model's own: a folder, tokenizer.model, tokenizer.json or a .gguf file"},
        {"adapter", CLI_STRING, &o.adapter, "DIR",
         "apply the run folder DIR of any method (cpeft's or PEFT's)"},
        {"prompt", CLI_STRING, &o.prompt, "TEXT", "text to continue (required; may be empty)"},
        {"max-new-tokens", CLI_INT, &o.max_new_tokens, "N", "tokens to generate (default 256, or up to the context length)"},
        {"temperature", CLI_FLOAT, &o.temperature, "T",
         "softmax temperature; 0 picks the most likely token (default 0.8)"},
        {"top-p", CLI_FLOAT, &o.top_p, "P",
         "sample only from the most likely tokens holding mass P (default 0.95)"},
        {"seed", CLI_U64, &o.seed, "S", "random seed for sampling (default 0)"},
        {"ids", CLI_FLAG, &o.print_ids, NULL,
         "also print every token id, prompt first, comma-separated"},
    };
    const cli_command cmd = {
        .name = "generate",
        .usage = "--model DIR [--adapter DIR] --prompt TEXT [options]",
        .about = "Prints the prompt followed by the model's continuation and a newline.\n"
                 "Generation starts from BOS plus the prompt's tokens and stops after N\n"
                 "tokens or at the end-of-sequence token.",
        .options = options,
        .n_options = sizeof options / sizeof *options,
    };
    int rc = cli_parse(&cmd, argc, argv, NULL);
    if (rc != CLI_PARSED)
        return rc == CLI_HELP_SHOWN ? 0 : 2;
    if (!o.model)
        return cli_usage_error(&cmd, "--model is required");
    if (!o.prompt)
        return cli_usage_error(&cmd, "--prompt is required (use --prompt \"\" to start from BOS)");
    if (o.max_new_tokens < -1)
        return cli_usage_error(&cmd, "--max-new-tokens must be >= 0");
    if (o.temperature < 0)
        return cli_usage_error(&cmd, "--temperature must be >= 0");
    if (!(o.top_p > 0 && o.top_p <= 1))
        return cli_usage_error(&cmd, "--top-p must be in (0, 1]");
    return run(&o);
}
