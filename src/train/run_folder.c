/* A run folder written into a temporary sibling and renamed into place. */
#include "train/run_folder.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/file.h"

/* Files a run writes; an existing folder holding anything else is not replaced. */
static const char *const run_files[] = {
    "adapter_config.json", "adapter_model.safetensors", "adapter.safetensors",
    "metrics.jsonl",       "trainer_state.json",        "optimizer.safetensors",
    "report.html",
};

static int is_run_file(const char *name)
{
    for (size_t i = 0; i < sizeof run_files / sizeof *run_files; i++)
        if (strcmp(name, run_files[i]) == 0)
            return 1;
    return 0;
}

/* Removes a folder and the plain files directly inside it. */
static void remove_folder(const char *path)
{
    DIR *d = opendir(path);
    if (d) {
        struct dirent *e;
        while ((e = readdir(d)) != NULL) {
            if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
                continue;
            char *file = cp_path_join(path, e->d_name);
            if (file)
                unlink(file);
            free(file);
        }
        closedir(d);
    }
    rmdir(path);
}

static cp_status check_existing(const char *path, cp_error *err)
{
    struct stat st;
    if (stat(path, &st) != 0)
        return CP_OK;
    if (!S_ISDIR(st.st_mode))
        return cp_error_set(err, CP_ERR_INPUT, "%s: exists and is not a folder; choose another --out",
                            path);
    DIR *d = opendir(path);
    if (!d)
        return cp_error_set(err, CP_ERR_INPUT, "%s: cannot read: %s", path, strerror(errno));
    struct dirent *e;
    cp_status status = CP_OK;
    while (status == CP_OK && (e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0 || is_run_file(e->d_name))
            continue;
        status = cp_error_set(err, CP_ERR_INPUT,
                              "%s: holds \"%s\", which a cpeft run does not write; refusing to "
                              "replace it, choose another --out",
                              path, e->d_name);
    }
    closedir(d);
    return status;
}

cp_status cp_run_folder_begin(cp_run_folder *rf, const char *final_path, cp_error *err)
{
    memset(rf, 0, sizeof *rf);
    cp_status st = check_existing(final_path, err);
    if (st != CP_OK)
        return st;
    size_t n = strlen(final_path);
    while (n > 1 && final_path[n - 1] == '/')
        n--;
    rf->final_path = strndup(final_path, n);
    rf->tmp_path = malloc(n + 32);
    if (!rf->final_path || !rf->tmp_path) {
        cp_run_folder_abort(rf);
        return cp_error_nomem(err, "a path", n + 32);
    }
    snprintf(rf->tmp_path, n + 32, "%s.tmp-%ld", rf->final_path, (long)getpid());

    /* Name the folder the user gave, not the temporary one, when its parent is missing. */
    char *slash = strrchr(rf->final_path, '/');
    if (slash && slash != rf->final_path) {
        *slash = '\0';
        int parent_ok = cp_file_is_dir(rf->final_path);
        char parent[512];
        snprintf(parent, sizeof parent, "%s", rf->final_path);
        *slash = '/';
        if (!parent_ok) {
            st = cp_error_set(err, CP_ERR_INPUT,
                              "%s: cannot create the run folder: its parent folder %s does not "
                              "exist; create it first",
                              rf->final_path, parent);
            cp_run_folder_abort(rf);
            return st;
        }
    }
    remove_folder(rf->tmp_path); /* a leftover of a crashed run with our pid */
    if (mkdir(rf->tmp_path, 0755) != 0) {
        st = cp_error_set(err, CP_ERR_INPUT, "%s: cannot create: %s", rf->tmp_path,
                          strerror(errno));
        cp_run_folder_abort(rf);
        return st;
    }
    return CP_OK;
}

char *cp_run_folder_file(const cp_run_folder *rf, const char *name)
{
    return cp_path_join(rf->tmp_path, name);
}

cp_status cp_run_folder_commit(cp_run_folder *rf, cp_error *err)
{
    char *old = malloc(strlen(rf->final_path) + 32);
    if (!old)
        return cp_error_nomem(err, "a path", 0);
    sprintf(old, "%s.old-%ld", rf->final_path, (long)getpid());

    /* Move an earlier run aside, put the new one in place, then drop the old. */
    int had_old = rename(rf->final_path, old) == 0;
    cp_status st = CP_OK;
    if (rename(rf->tmp_path, rf->final_path) != 0) {
        st = cp_error_set(err, CP_ERR_IO, "%s: cannot rename to %s: %s", rf->tmp_path,
                          rf->final_path, strerror(errno));
        if (had_old)
            rename(old, rf->final_path);
    } else if (had_old) {
        remove_folder(old);
    }
    free(old);
    if (st == CP_OK) {
        free(rf->tmp_path);
        rf->tmp_path = NULL;
    }
    cp_run_folder_abort(rf);
    return st;
}

void cp_run_folder_abort(cp_run_folder *rf)
{
    if (rf->tmp_path)
        remove_folder(rf->tmp_path);
    free(rf->tmp_path);
    free(rf->final_path);
    rf->tmp_path = rf->final_path = NULL;
}
