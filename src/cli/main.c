/* cpeft's command-line entry point: dispatches to one subcommand. */
#include <stdio.h>
#include <string.h>

#include "cli/commands.h"

static const struct {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *about;
} commands[] = {
    {"train", cmd_train, "fine-tune a model with LoRA and write a PEFT adapter"},
    {"generate", cmd_generate, "continue a prompt with a model"},
    {"eval", cmd_eval, "measure a model's loss and perplexity on a text file"},
    {"tokenize", cmd_tokenize, "turn text into token ids, or ids back into text"},
    {"inspect", cmd_inspect, "show a model folder's config and tensors"},
    {"convert-llama2c", cmd_convert_llama2c,
     "convert a llama2.c checkpoint to a Hugging Face folder"},
};

static void print_usage(FILE *fp)
{
    fprintf(fp, "usage: cpeft COMMAND [options]\n\ncommands:\n");
    for (size_t i = 0; i < sizeof commands / sizeof *commands; i++)
        fprintf(fp, "  %-10s %s\n", commands[i].name, commands[i].about);
    fprintf(fp, "\nrun 'cpeft COMMAND --help' for a command's options\n");
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        print_usage(stderr);
        return 2;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
        strcmp(argv[1], "help") == 0) {
        print_usage(stdout);
        return 0;
    }
    for (size_t i = 0; i < sizeof commands / sizeof *commands; i++)
        if (strcmp(argv[1], commands[i].name) == 0)
            return commands[i].run(argc - 1, argv + 1);
    fprintf(stderr, "cpeft: unknown command \"%s\"; run 'cpeft --help' for the list\n", argv[1]);
    return 2;
}
