/* Command-line option parsing and error reporting for the subcommands. */
#include "cli/args.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void print_help(const cli_command *cmd)
{
    printf("usage: cpeft %s %s\n\n%s\n", cmd->name, cmd->usage, cmd->about);
    if (cmd->n_options == 0)
        return;
    printf("\noptions:\n");
    for (int i = 0; i < cmd->n_options; i++) {
        const cli_option *o = &cmd->options[i];
        char left[64];
        snprintf(left, sizeof left, "--%s%s%s", o->name, o->metavar ? " " : "",
                 o->metavar ? o->metavar : "");
        printf("  %-26s %s\n", left, o->help);
    }
    printf("  %-26s %s\n", "--help", "show this help and exit");
}

int cli_usage_error(const cli_command *cmd, const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "cpeft %s: ", cmd->name);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "; run 'cpeft %s --help'\n", cmd->name);
    return CLI_BAD_USAGE;
}

/* Stores text into the option's destination, checking its type. */
static int store_value(const cli_command *cmd, const cli_option *o, const char *text)
{
    char *end = NULL;
    errno = 0;
    switch (o->kind) {
    case CLI_STRING:
        *(const char **)o->dest = text;
        return CLI_PARSED;
    case CLI_INT: {
        long v = strtol(text, &end, 10);
        if (*text == '\0' || *end != '\0' || errno || v < -2147483647L || v > 2147483647L)
            return cli_usage_error(cmd, "--%s expects an integer, got \"%s\"", o->name, text);
        *(int *)o->dest = (int)v;
        return CLI_PARSED;
    }
    case CLI_U64: {
        unsigned long long v = strtoull(text, &end, 10);
        if (*text == '\0' || *text == '-' || *end != '\0' || errno)
            return cli_usage_error(cmd, "--%s expects a non-negative integer, got \"%s\"",
                                   o->name, text);
        *(uint64_t *)o->dest = (uint64_t)v;
        return CLI_PARSED;
    }
    case CLI_FLOAT: {
        float v = strtof(text, &end);
        if (*text == '\0' || *end != '\0' || errno || !isfinite(v))
            return cli_usage_error(cmd, "--%s expects a number, got \"%s\"", o->name, text);
        *(float *)o->dest = v;
        return CLI_PARSED;
    }
    case CLI_FLAG:
        break;
    }
    return cli_usage_error(cmd, "--%s takes no value", o->name);
}

static const cli_option *find_option(const cli_command *cmd, const char *name, size_t len)
{
    for (int i = 0; i < cmd->n_options; i++)
        if (strlen(cmd->options[i].name) == len && strncmp(cmd->options[i].name, name, len) == 0)
            return &cmd->options[i];
    return NULL;
}

int cli_parse(const cli_command *cmd, int argc, char **argv, int *n_positional)
{
    int n_pos = 0;
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (strcmp(arg, "--help") == 0 || strcmp(arg, "-h") == 0) {
            print_help(cmd);
            return CLI_HELP_SHOWN;
        }
        if (strncmp(arg, "--", 2) != 0 || arg[2] == '\0') {
            if (n_pos == cmd->max_positional)
                return cli_usage_error(cmd, "unexpected argument \"%s\"", arg);
            cmd->positional[n_pos++] = arg;
            continue;
        }

        const char *name = arg + 2, *eq = strchr(name, '=');
        size_t len = eq ? (size_t)(eq - name) : strlen(name);
        const cli_option *o = find_option(cmd, name, len);
        if (!o)
            return cli_usage_error(cmd, "unknown option --%.*s", (int)len, name);
        if (o->kind == CLI_FLAG) {
            if (eq)
                return cli_usage_error(cmd, "--%s takes no value", o->name);
            *(int *)o->dest = 1;
            continue;
        }
        const char *value = eq ? eq + 1 : (i + 1 < argc ? argv[++i] : NULL);
        if (!value)
            return cli_usage_error(cmd, "--%s needs a value (%s)", o->name, o->metavar);
        int rc = store_value(cmd, o, value);
        if (rc != CLI_PARSED)
            return rc;
    }
    if (n_positional)
        *n_positional = n_pos;
    return CLI_PARSED;
}

int cli_report(const cp_error *err)
{
    fprintf(stderr, "cpeft: %s\n", err->msg);
    return err->code == CP_ERR_INPUT ? 2 : 1;
}
