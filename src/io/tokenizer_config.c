/* Reads add_bos_token from a Hugging Face tokenizer_config.json. */
#include "io/tokenizer_config.h"

#include <cJSON.h>
#include <stdlib.h>

#include "core/file.h"

cp_status cp_tokenizer_config_add_bos(const char *dir, int *add_bos, cp_error *err)
{
    *add_bos = 1;
    char *path = cp_path_join(dir, "tokenizer_config.json");
    if (!path)
        return cp_error_nomem(err, "a path", 0);
    if (!cp_file_exists(path)) {
        free(path);
        return CP_OK;
    }

    char *text = NULL;
    cp_status st = cp_file_read(path, &text, NULL, err);
    cJSON *root = st == CP_OK ? cJSON_Parse(text) : NULL;
    if (st == CP_OK && !cJSON_IsObject(root)) {
        const char *where = root ? text : cJSON_GetErrorPtr();
        st = cp_error_set(err, CP_ERR_INPUT, "%s: byte %ld: expected a JSON object", path,
                          where ? (long)(where - text) : 0L);
    }
    if (st == CP_OK) {
        const cJSON *item = cJSON_GetObjectItemCaseSensitive(root, "add_bos_token");
        if (cJSON_IsBool(item))
            *add_bos = cJSON_IsTrue(item);
        else if (item && !cJSON_IsNull(item))
            st = cp_error_set(err, CP_ERR_INPUT, "%s: add_bos_token must be true or false", path);
    }
    cJSON_Delete(root);
    free(text);
    free(path);
    return st;
}
