/* cpeft's command-line entry point: dispatches to one subcommand. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/commands.h"

static const struct {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *about;
} commands[] = {
    {"train", cmd_train, "fine-tune a model with one of the methods (train --help lists them)"},
    {"generate", cmd_generate, "continue a prompt with a model"},
    {"eval", cmd_eval, "measure a model's loss and perplexity on a text file"},
    {"classify", cmd_classify, "print the class logits of a text with a SEQ_CLS adapter"},
    {"tokenize", cmd_tokenize, "turn text into token ids, or ids back into text"},
    {"inspect", cmd_inspect, "show a model, run folder, .safetensors or .gguf file"},
    {"convert-llama2c", cmd_convert_llama2c,
     "convert a llama2.c checkpoint to a Hugging Face folder"},
};

static void print_usage(FILE *fp)
{
    fprintf(fp, "usage: cpeft COMMAND [options]\n\ncommands:\n");
    for (size_t i = 0; i < sizeof commands / sizeof *commands; i++)
        fprintf(fp, "  %-16s %s\n", commands[i].name, commands[i].about);
    fprintf(fp, "\nrun 'cpeft COMMAND --help' for a command's options\n");
}

/* OpenMP threads that spin while waiting at a barrier (libgomp's default)
 * stall the whole pass whenever another process takes their core, which
 * made training ten times slower on a busy two-core machine. libgomp reads
 * OMP_WAIT_POLICY only when it loads, so when the user has not chosen a
 * policy the program sets "passive" and starts itself again, once. */
static void prefer_passive_waiting(char **argv)
{
    if (getenv("OMP_WAIT_POLICY"))
        return;
    setenv("OMP_WAIT_POLICY", "passive", 1);
    execv("/proc/self/exe", argv);
    /* When the exec fails the run goes on with the default policy. */
}

int main(int argc, char **argv)
{
    prefer_passive_waiting(argv);
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
