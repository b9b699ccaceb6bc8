/* The subcommands of the cpeft tool. Each returns the process exit status:
 * 0 on success, 2 for bad input or usage, 1 for other failures. */
#ifndef CP_CLI_COMMANDS_H
#define CP_CLI_COMMANDS_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "cpeft.h"

int cmd_train(int argc, char **argv);
int cmd_generate(int argc, char **argv);
int cmd_eval(int argc, char **argv);
int cmd_classify(int argc, char **argv);
int cmd_tokenize(int argc, char **argv);
int cmd_inspect(int argc, char **argv);
int cmd_convert_llama2c(int argc, char **argv);

/* Loads the tokenizer of a model folder and whether it adds BOS. */
cp_status cli_load_tokenizer(const char *path, cp_tokenizer **tok, int *add_bos, cp_error *err);

/* Reads a whole stream into a malloc'd NUL-terminated buffer. */
cp_status cli_read_stream(FILE *fp, const char *name, char **out, size_t *len, cp_error *err);

/* Writes ids as "a<sep>b<sep>c" followed by a newline. */
void cli_print_ids(FILE *fp, const int32_t *ids, size_t n, const char *sep);

/* Returns this process's peak resident memory in MB (VmHWM, which exec
 * resets, unlike getrusage's ru_maxrss), or -1 where /proc is missing. */
double cli_peak_rss_mb(void);

#endif
