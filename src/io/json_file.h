/* JSON files written whole: a cJSON tree printed with indentation. */
#ifndef CP_JSON_FILE_H
#define CP_JSON_FILE_H

#include <cJSON.h>

#include "core/error.h"

/* Writes root to path atomically, printed by cJSON with a final newline.
 * root may be NULL (a failed build), which is reported as out of memory. */
cp_status cp_json_write_atomic(const char *path, const cJSON *root, cp_error *err);

#endif
