/*
 * cpeft convert-llama2c: turn a llama2.c legacy checkpoint and its
 * SentencePiece tokenizer into a Hugging Face Llama folder that the other
 * subcommands (and transformers) load. The conversion itself is in
 * io/llama2c.c, and this file parses the options and prints one line on
 * success.
 */
#include <stdio.h>

#include "cli/args.h"
#include "cli/commands.h"
#include "core/error.h"
#include "io/llama2c.h"

int cmd_convert_llama2c(int argc, char **argv)
{
    const char *checkpoint = NULL, *tokenizer = NULL, *out = NULL;
    const cli_option options[] = {
        {"checkpoint", CLI_STRING, &checkpoint, "FILE",
         "llama2.c checkpoint in the legacy format, e.g. stories260K.bin (required)"},
        {"tokenizer", CLI_STRING, &tokenizer, "FILE",
         "SentencePiece model it was trained with, e.g. tok512.model (required)"},
        {"out", CLI_STRING, &out, "DIR",
         "folder to create; it must not exist or be empty (required)"},
    };
    const cli_command cmd = {
        .name = "convert-llama2c",
        .usage = "--checkpoint FILE --tokenizer FILE --out DIR",
        .about = "Writes DIR/config.json, model.safetensors (float32), tokenizer.model and\n"
                 "tokenizer_config.json, reordering the q and k projections for Hugging\n"
                 "Face's RoPE. Files go to a temporary folder beside DIR that is renamed\n"
                 "to DIR when complete, so a failed run leaves DIR as it was.",
        .options = options,
        .n_options = sizeof options / sizeof *options,
    };
    int rc = cli_parse(&cmd, argc, argv, NULL);
    if (rc != CLI_PARSED)
        return rc == CLI_HELP_SHOWN ? 0 : 2;
    if (!checkpoint || !tokenizer || !out)
        return cli_usage_error(&cmd, "--checkpoint, --tokenizer and --out are required");

    cp_error err = {0};
    if (cp_llama2c_convert(checkpoint, tokenizer, out, &err) != CP_OK)
        return cli_report(&err);
    printf("wrote %s\n", out);
    return 0;
}
