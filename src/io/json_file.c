/* JSON files written whole: see json_file.h. */
#include "io/json_file.h"

#include <stdlib.h>
#include <string.h>

#include "core/file.h"

cp_status cp_json_write_atomic(const char *path, const cJSON *root, cp_error *err)
{
    char *text = root ? cJSON_Print(root) : NULL;
    if (!text)
        return cp_error_nomem(err, path, 0);
    size_t len = strlen(text);
    text[len] = '\n'; /* replaces the NUL: the file ends with a newline */
    cp_status st = cp_file_write_atomic(path, text, len + 1, err);
    free(text);
    return st;
}
