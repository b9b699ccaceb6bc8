/* cpeft tokenize: text on stdin to token ids, or ids back to text. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/args.h"
#include "cli/commands.h"
#include "core/error.h"

/* Parses whitespace-separated decimal ids. */
static cp_status parse_ids(const char *text, int32_t **out, size_t *n_out, cp_error *err)
{
    size_t cap = 64, n = 0;
    int32_t *ids = malloc(cap * sizeof *ids);
    if (!ids)
        return cp_error_nomem(err, "token ids", cap * sizeof *ids);
    const char *p = text;
    for (;;) {
        while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')
            p++;
        if (*p == '\0')
            break;
        char *end = NULL;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || v < 0 || v > INT32_MAX ||
            (*end && !strchr(" \t\r\n", *end))) {
            free(ids);
            return cp_error_set(err, CP_ERR_INPUT,
                                "stdin: byte %ld: expected a non-negative token id", (long)(p - text));
        }
        if (n == cap) {
            int32_t *grown = realloc(ids, 2 * cap * sizeof *ids);
            if (!grown) {
                free(ids);
                return cp_error_nomem(err, "token ids", 2 * cap * sizeof *ids);
            }
            ids = grown;
            cap *= 2;
        }
        ids[n++] = (int32_t)v;
        p = end;
    }
    *out = ids;
    *n_out = n;
    return CP_OK;
}

static int run(const char *path, int no_bos, int decode)
{
    cp_error err = {0};
    cp_tokenizer *tok = NULL;
    char *input = NULL, *text = NULL;
    size_t input_len = 0, text_len = 0, n_ids = 0;
    int32_t *ids = NULL;
    int add_bos = 1;

    cp_status st = cli_load_tokenizer(path, &tok, &add_bos, &err);
    if (st == CP_OK)
        st = cli_read_stream(stdin, "stdin", &input, &input_len, &err);
    if (st == CP_OK && decode) {
        st = parse_ids(input, &ids, &n_ids, &err);
        if (st == CP_OK)
            st = cp_tokenizer_decode(tok, ids, n_ids, &text, &text_len, &err);
        if (st == CP_OK)
            fwrite(text, 1, text_len, stdout);
    } else if (st == CP_OK) {
        st = cp_tokenizer_encode(tok, input, input_len, add_bos && !no_bos, &ids, &n_ids, &err);
        if (st == CP_OK)
            cli_print_ids(stdout, ids, n_ids, " ");
    }

    free(ids);
    free(text);
    free(input);
    cp_tokenizer_free(tok);
    return st == CP_OK ? 0 : cli_report(&err);
}

int cmd_tokenize(int argc, char **argv)
{
    const char *model = NULL, *tokenizer = NULL;
    int no_bos = 0, decode = 0;
    const cli_option options[] = {
        {"model", CLI_STRING, &model, "DIR",
         "model folder: its tokenizer and tokenizer_config.json"},
        {"tokenizer", CLI_STRING, &tokenizer, "PATH", "a tokenizer.model, a tokenizer.json, or a folder with one of them or vocab.json + merges.txt"},
        {"no-bos", CLI_FLAG, &no_bos, NULL, "do not add the beginning-of-sequence token"},
        {"decode", CLI_FLAG, &decode, NULL,
         "read space-separated ids and print their text (no newline added)"},
    };
    const cli_command cmd = {
        .name = "tokenize",
        .usage = "--model DIR | --tokenizer PATH [--no-bos] [--decode]",
        .about = "Reads all of stdin as one text, byte for byte, and prints its token ids\n"
                 "on one line separated by spaces. BOS comes first when the model's\n"
                 "tokenizer_config.json sets add_bos_token (the default for a bare\n"
                 "SentencePiece file), unless --no-bos.",
        .options = options,
        .n_options = sizeof options / sizeof *options,
    };
    int rc = cli_parse(&cmd, argc, argv, NULL);
    if (rc != CLI_PARSED)
        return rc == CLI_HELP_SHOWN ? 0 : 2;
    if (!model == !tokenizer)
        return cli_usage_error(&cmd, "give exactly one of --model and --tokenizer");
    return run(model ? model : tokenizer, no_bos, decode);
}
