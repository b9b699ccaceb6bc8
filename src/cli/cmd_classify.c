/* cpeft classify: class logits of one text from a SEQ_CLS adapter. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/args.h"
#include "cli/commands.h"
#include "core/error.h"
#include "tasks/seq_cls.h"

typedef struct classify_options {
    const char *model;
    const char *adapter;
    const char *text;
    const char *ids;
    const char *tokenizer;
    int json;
} classify_options;

/* Parses "1 2 3" (spaces, commas or both between ids) into a malloc'd array. */
static cp_status parse_ids(const char *text, int32_t **out, size_t *n, cp_error *err)
{
    size_t cap = strlen(text) / 2 + 1, count = 0;
    int32_t *ids = malloc(cap * sizeof *ids);
    if (!ids)
        return cp_error_nomem(err, "token ids", cap * sizeof *ids);
    const char *p = text;
    for (;;) {
        while (*p == ' ' || *p == ',' || *p == '\t' || *p == '\n')
            p++;
        if (*p == '\0')
            break;
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || v < 0 || v > INT32_MAX || errno ||
            (*end != '\0' && *end != ' ' && *end != ',' && *end != '\t' && *end != '\n')) {
            free(ids);
            return cp_error_set(err, CP_ERR_INPUT,
                                "--ids: invalid token id at character %zu of \"%s\"; expected "
                                "non-negative integers separated by spaces or commas",
                                (size_t)(p - text), text);
        }
        ids[count++] = (int32_t)v;
        p = end;
    }
    if (count == 0) {
        free(ids);
        return cp_error_set(err, CP_ERR_INPUT, "--ids lists no token ids; give at least one");
    }
    *out = ids;
    *n = count;
    return CP_OK;
}

/* The token ids of --ids, or of --text through the tokenizer. */
static cp_status input_ids(const classify_options *o, int32_t **ids, size_t *n, cp_error *err)
{
    if (o->ids)
        return parse_ids(o->ids, ids, n, err);
    cp_tokenizer *tok = NULL;
    int add_bos = 1;
    cp_status st = cli_load_tokenizer(o->tokenizer ? o->tokenizer : o->model, &tok, &add_bos, err);
    if (st == CP_OK)
        st = cp_tokenizer_encode(tok, o->text, strlen(o->text), add_bos, ids, n, err);
    if (st == CP_OK && *n == 0) {
        free(*ids);
        *ids = NULL;
        st = cp_error_set(err, CP_ERR_INPUT, "--text gives no tokens; give a non-empty text");
    }
    cp_tokenizer_free(tok);
    return st;
}

static size_t argmax(const float *v, int n)
{
    size_t best = 0;
    for (int i = 1; i < n; i++)
        if (v[i] > v[best])
            best = (size_t)i;
    return best;
}

static void print_logits(const float *logits, int n, size_t n_tokens, int json)
{
    size_t best = argmax(logits, n);
    if (!json) {
        for (int i = 0; i < n; i++)
            printf("label %d: %.6f\n", i, logits[i]);
        printf("argmax: %zu\n", best);
        return;
    }
    printf("{\"logits\": [");
    for (int i = 0; i < n; i++)
        printf(i ? ", %.9g" : "%.9g", logits[i]);
    printf("], \"argmax\": %zu, \"tokens\": %zu}\n", best, n_tokens);
}

static int run(const classify_options *o)
{
    cp_error err = {0};
    cp_model *model = NULL;
    cp_seq_cls head = {0};
    int32_t *ids = NULL;
    size_t n_ids = 0;
    float *logits = NULL;

    /* The input first, then the head: a CAUSAL_LM adapter or a missing head
     * fails before the LoRA weights load. */
    cp_status st = input_ids(o, &ids, &n_ids, &err);
    if (st == CP_OK)
        st = cp_model_load(o->model, &model, &err);
    if (st == CP_OK)
        st = cp_seq_cls_load(&head, o->adapter, model, &err);
    if (st == CP_OK)
        st = cp_model_load_adapter(model, o->adapter, &err);
    if (st == CP_OK && n_ids > (size_t)cp_model_context_length(model))
        st = cp_error_set(&err, CP_ERR_INPUT,
                          "the input has %zu tokens, more than the model's context length of %d; "
                          "shorten it",
                          n_ids, cp_model_context_length(model));
    if (st == CP_OK) {
        logits = malloc((size_t)head.num_labels * sizeof *logits);
        if (!logits)
            st = cp_error_nomem(&err, "logits", (size_t)head.num_labels * sizeof *logits);
    }
    if (st == CP_OK)
        st = cp_seq_cls_classify(model, &head, ids, 1, (int)n_ids, NULL, logits, NULL, &err);
    if (st == CP_OK)
        print_logits(logits, head.num_labels, n_ids, o->json);

    free(logits);
    free(ids);
    cp_seq_cls_free(&head);
    cp_model_free(model);
    return st == CP_OK ? 0 : cli_report(&err);
}

int cmd_classify(int argc, char **argv)
{
    classify_options o = {0};
    const cli_option options[] = {
        {"model", CLI_STRING, &o.model, "PATH", "model folder (Hugging Face layout) or GGUF file (required)"},
        {"adapter", CLI_STRING, &o.adapter, "DIR",
         "PEFT SEQ_CLS adapter: LoRA weights and score head (required)"},
        {"text", CLI_STRING, &o.text, "TEXT", "text to classify"},
        {"ids", CLI_STRING, &o.ids, "IDS",
         "token ids to classify instead of --text, e.g. \"464 3797 3332\""},
        {"tokenizer", CLI_STRING, &o.tokenizer, "PATH",
         "tokenizer file or folder for --text (default: the model folder)"},
        {"json", CLI_FLAG, &o.json, NULL,
         "print one JSON line: {\"logits\": [...], \"argmax\": N, \"tokens\": N}"},
    };
    const cli_command cmd = {
        .name = "classify",
        .usage = "--model DIR --adapter DIR (--text TEXT | --ids IDS) [options]",
        .about = "Runs the model with the adapter's LoRA weights on one sequence and applies\n"
                 "the adapter's classification head to the final hidden state of the last\n"
                 "token, as transformers' GPT2ForSequenceClassification does. Prints one line\n"
                 "per label, \"label I: LOGIT\", then \"argmax: I\".",
        .options = options,
        .n_options = sizeof options / sizeof *options,
    };
    int rc = cli_parse(&cmd, argc, argv, NULL);
    if (rc != CLI_PARSED)
        return rc == CLI_HELP_SHOWN ? 0 : 2;
    if (!o.model || !o.adapter)
        return cli_usage_error(&cmd, "--model and --adapter are required");
    if (!o.text == !o.ids)
        return cli_usage_error(&cmd, "give exactly one of --text and --ids");
    return run(&o);
}
