/*
 * Command-line option parsing shared by the subcommands: "--name value",
 * "--name=value" and bare "--flag" options from a table, positional
 * arguments, and a generated --help.
 */
#ifndef CP_CLI_ARGS_H
#define CP_CLI_ARGS_H

#include <stdint.h>

#include "cpeft.h"

typedef enum cli_kind {
    CLI_STRING, /* dest is const char ** */
    CLI_INT,    /* dest is int * */
    CLI_FLOAT,  /* dest is float * */
    CLI_U64,    /* dest is uint64_t * */
    CLI_FLAG,   /* dest is int *, set to 1 */
} cli_kind;

typedef struct cli_option {
    const char *name; /* without the leading "--" */
    cli_kind kind;
    void *dest;
    const char *metavar; /* shown in help, e.g. "N"; NULL for flags */
    const char *help;
} cli_option;

typedef struct cli_command {
    const char *name;  /* e.g. "generate" */
    const char *usage; /* the synopsis after "cpeft NAME " */
    const char *about; /* one paragraph shown under the synopsis */
    const cli_option *options;
    int n_options;
    const char **positional; /* receives positional arguments, may be NULL */
    int max_positional;
} cli_command;

enum { CLI_PARSED = 0, CLI_HELP_SHOWN = 1, CLI_BAD_USAGE = 2 };

/* Parses argv (argv[0] is the subcommand name). Prints --help to stdout, or a
 * one-line usage error to stderr. *n_positional receives the count. */
int cli_parse(const cli_command *cmd, int argc, char **argv, int *n_positional);

/* Prints "cpeft: message" to stderr and returns the process exit status for
 * the error: 2 for bad input, 1 for everything else. */
int cli_report(const cp_error *err);

/* Prints a usage error naming the command and returns 2. */
int cli_usage_error(const cli_command *cmd, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

#endif
