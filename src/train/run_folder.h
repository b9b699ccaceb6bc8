/*
 * A run folder written all at once: files go into a temporary sibling folder
 * that replaces the final one only on success. An existing folder is only
 * replaced when it contains nothing but files a run writes, so a mistyped --out
 * never deletes unrelated data.
 */
#ifndef CP_RUN_FOLDER_H
#define CP_RUN_FOLDER_H

#include "core/error.h"

typedef struct cp_run_folder {
    char *final_path;
    char *tmp_path;
} cp_run_folder;

/* Checks final_path and creates the temporary folder. */
cp_status cp_run_folder_begin(cp_run_folder *rf, const char *final_path, cp_error *err);

/* The path of name inside the temporary folder (malloc'd, caller frees). */
char *cp_run_folder_file(const cp_run_folder *rf, const char *name);

/* Moves the temporary folder into place, replacing an earlier run. */
cp_status cp_run_folder_commit(cp_run_folder *rf, cp_error *err);

/* Removes the temporary folder and everything in it. */
void cp_run_folder_abort(cp_run_folder *rf);

#endif
