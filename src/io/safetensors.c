/*
 * Safetensors reader and writer.
 *
 * The reader rejects, with CP_ERR_INPUT, anything the format does not allow
 * or that cpeft cannot use: a header length past the file or above 100 MB,
 * a header that is not UTF-8 JSON starting with '{', entries with missing or
 * malformed fields, dtypes other than F32/F16/BF16, sizes that overflow or
 * disagree with data_offsets, and data sections with overlaps, gaps or
 * trailing bytes (the format requires the tensors to cover the data section
 * exactly). It does not look at tensor values: NaN and Inf pass through.
 */
#include "io/safetensors.h"

#include <cJSON.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "core/file.h"

#define INDEX_NAME "model.safetensors.index.json"
#define SINGLE_NAME "model.safetensors"

/* Advice appended to messages about a damaged file. */
#define HINT_CORRUPT "the file is corrupt or not a safetensors file, re-download or re-export it"

/* One mapped file. The cJSON tree stays alive because tensor names and
 * metadata strings point into it. */
typedef struct st_file {
    char *path;
    cp_mapped_file map;
    cJSON *header;
    const cJSON *metadata; /* the __metadata__ object, or NULL */
} st_file;

struct cp_safetensors {
    st_file *files; /* capacity fixed at open, so tensor->file stays valid */
    size_t n_files;
    cp_st_tensor *tensors; /* file by file, each in data offset order */
    size_t n_tensors;
    size_t cap_tensors;
    size_t *by_name; /* indices into tensors, sorted by name */
};

/* ---- small helpers ---- */

static uint64_t read_u64_le(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

/* Returns the index of the first byte that does not start a valid UTF-8
 * sequence (overlong forms, surrogates and code points above U+10FFFF are
 * invalid), or n when all n bytes are valid. */
static size_t utf8_scan(const uint8_t *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        size_t len;
        uint32_t cp, min;
        if (c < 0x80) {
            i++;
            continue;
        } else if ((c & 0xe0) == 0xc0) {
            len = 2, cp = c & 0x1f, min = 0x80;
        } else if ((c & 0xf0) == 0xe0) {
            len = 3, cp = c & 0x0f, min = 0x800;
        } else if ((c & 0xf8) == 0xf0) {
            len = 4, cp = c & 0x07, min = 0x10000;
        } else {
            return i;
        }
        if (n - i < len)
            return i;
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xc0) != 0x80)
                return i;
            cp = (cp << 6) | (s[i + k] & 0x3f);
        }
        if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
            return i;
        i += len;
    }
    return n;
}

static int is_json_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

/* Multiplies without wrapping. Returns 0 on overflow. */
static int mul_u64(uint64_t a, uint64_t b, uint64_t *out)
{
    if (a != 0 && b > UINT64_MAX / a)
        return 0;
    *out = a * b;
    return 1;
}

/* Describes a JSON value for a message: its number, or its kind. */
static const char *json_describe(const cJSON *v, char *buf, size_t n)
{
    if (cJSON_IsNumber(v))
        snprintf(buf, n, "%.15g", v->valuedouble);
    else if (cJSON_IsString(v))
        snprintf(buf, n, "a string");
    else if (cJSON_IsArray(v))
        snprintf(buf, n, "an array");
    else if (cJSON_IsObject(v))
        snprintf(buf, n, "an object");
    else if (cJSON_IsBool(v))
        snprintf(buf, n, "a boolean");
    else
        snprintf(buf, n, "null");
    return buf;
}

/* Reads a whole number in [0, 2^53]. cJSON stores numbers as doubles, which
 * hold every integer exactly only up to 2^53, so larger values are rejected
 * rather than rounded. Returns NULL or what is wrong with v. */
static const char *json_get_u64(const cJSON *v, uint64_t *out)
{
    if (!cJSON_IsNumber(v))
        return "not a number";
    double d = v->valuedouble;
    if (d < 0)
        return "negative";
    if (d != floor(d))
        return "not an integer";
    if (!(d <= 9007199254740992.0))
        return "above 2^53";
    *out = (uint64_t)d;
    return NULL;
}

/* Formats a shape as "[a, b, c]". */
static const char *shape_format(const cp_st_tensor *t, char *buf, size_t n)
{
    size_t used = (size_t)snprintf(buf, n, "[");
    for (int d = 0; d < t->ndim && used < n; d++)
        used += (size_t)snprintf(buf + used, n - used, "%s%lld", d ? ", " : "",
                                 (long long)t->shape[d]);
    if (used < n)
        snprintf(buf + used, n - used, "]");
    return buf;
}

/* Sets *bytes to numel(shape) * element size. Returns 0 on overflow. */
static int shape_bytes(const cp_st_tensor *t, uint64_t *bytes)
{
    uint64_t total = cp_dtype_size(t->dtype);
    for (int d = 0; d < t->ndim; d++)
        if (!mul_u64(total, (uint64_t)t->shape[d], &total))
            return 0;
    *bytes = total;
    return 1;
}

static int compare_names(const void *a, const void *b)
{
    const cp_st_tensor *x = *(const cp_st_tensor *const *)a;
    const cp_st_tensor *y = *(const cp_st_tensor *const *)b;
    return strcmp(x->name, y->name);
}

static int compare_strings(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Returns the first key that occurs twice in obj, or NULL. cJSON keeps
 * duplicate keys, and the format forbids them, so every object is checked.
 * Sets *nomem when the scratch array cannot be allocated. */
static const char *json_duplicate_key(const cJSON *obj, int *nomem)
{
    size_t n = (size_t)cJSON_GetArraySize(obj), i = 0;
    *nomem = 0;
    if (n < 2)
        return NULL;
    const char **keys = malloc(n * sizeof *keys);
    if (!keys) {
        *nomem = 1;
        return NULL;
    }
    for (const cJSON *c = obj->child; c; c = c->next)
        keys[i++] = c->string;
    qsort(keys, n, sizeof *keys, compare_strings);
    const char *dup = NULL;
    for (i = 1; i < n && !dup; i++)
        if (strcmp(keys[i - 1], keys[i]) == 0)
            dup = keys[i];
    free(keys);
    return dup;
}

/* ---- header: length prefix, text, JSON ---- */

/* Checks the 8-byte length prefix against the file size and the format's
 * header limit. */
static cp_status header_locate(const char *path, const cp_mapped_file *map, uint64_t *len,
                               cp_error *err)
{
    if (map->size < 8)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: file is %zu bytes, shorter than the 8-byte header length "
                            "that starts a safetensors file; the file is truncated or not a "
                            "safetensors file, re-download it",
                            path, map->size);
    uint64_t n = read_u64_le(map->data);
    if (n == 0)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: byte offset 0: header length is 0, expected at least 2 "
                            "(the JSON object \"{}\"); " HINT_CORRUPT,
                            path);
    if (n > CP_ST_MAX_HEADER)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: byte offset 0: header length %llu is above the format's "
                            "limit of %llu bytes; " HINT_CORRUPT,
                            path, (unsigned long long)n, CP_ST_MAX_HEADER);
    if (n > map->size - 8)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: byte offset 0: header length %llu runs past the end of the "
                            "file (%zu bytes); the file is truncated, re-download it",
                            path, (unsigned long long)n, map->size);
    *len = n;
    return CP_OK;
}

/* Checks that the header starts with '{' (the format requires it), is valid
 * UTF-8, and has no control characters, which JSON allows only as escapes.
 * cJSON checks neither. */
static cp_status header_check_text(const char *path, const uint8_t *text, size_t n,
                                   cp_error *err)
{
    if (text[0] != '{')
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: byte offset 8: header starts with byte 0x%02x, expected '{' "
                            "(the header must be a JSON object); " HINT_CORRUPT,
                            path, text[0]);
    size_t bad = utf8_scan(text, n);
    if (bad < n)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: byte offset %zu: header is not valid UTF-8 (byte 0x%02x); "
                            HINT_CORRUPT,
                            path, bad + 8, text[bad]);
    for (size_t i = 0; i < n; i++)
        if (text[i] < 0x20 && !is_json_space((char)text[i]))
            return cp_error_set(err, CP_ERR_INPUT,
                                "%s: byte offset %zu: header contains control character "
                                "0x%02x, which JSON does not allow; " HINT_CORRUPT,
                                path, i + 8, (unsigned char)text[i]);
    return CP_OK;
}

/* Parses the header text (NUL-terminated, n bytes) into *out. After the JSON
 * object only whitespace may follow. The format pads with spaces; tabs and
 * newlines are JSON whitespace too, and the reference reader (serde_json)
 * accepts them, so they pass here as well. */
static cp_status header_parse(const char *path, const char *text, size_t n, cJSON **out,
                              cp_error *err)
{
    /* NOTE: cJSON returns NULL for an allocation failure too, so a machine
     * out of memory reports a valid header as invalid JSON. */
    const char *end = NULL;
    *out = cJSON_ParseWithLengthOpts(text, n, &end, 0);
    if (!*out) {
        size_t at = end && end >= text ? (size_t)(end - text) : 0;
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: byte offset %zu: header is not valid JSON; " HINT_CORRUPT,
                            path, at + 8);
    }
    for (size_t i = (size_t)(end - text); i < n; i++) {
        if (!is_json_space(text[i])) {
            cJSON_Delete(*out);
            *out = NULL;
            return cp_error_set(err, CP_ERR_INPUT,
                                "%s: byte offset %zu: unexpected byte 0x%02x after the header's "
                                "JSON object, expected only space padding; " HINT_CORRUPT,
                                path, i + 8, (unsigned char)text[i]);
        }
    }
    if (!cJSON_IsObject(*out)) {
        cJSON_Delete(*out);
        *out = NULL;
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: header is not a JSON object; " HINT_CORRUPT, path);
    }
    return CP_OK;
}

/* Rejects number tokens that are not plain digits and strings that cJSON
 * accepts but strict JSON or C strings cannot carry. cJSON parses "2.0",
 * "1e3", "-0" and "007" to whole numbers, and turns "\u0000" into a NUL that
 * silently cuts a name short. Runs after the entries were checked, so that
 * negative and fractional values get the more precise message there. */
static cp_status header_check_tokens(const char *path, const char *text, size_t n,
                                     cp_error *err)
{
    int depth = 0, expect_key = 0;
    const char *key = "";
    int key_len = 0;

    for (size_t i = 0; i < n; i++) {
        char c = text[i];
        if (c == '"') {
            size_t start = ++i;
            for (; i < n && text[i] != '"'; i++) {
                if ((unsigned char)text[i] < 0x20)
                    return cp_error_set(err, CP_ERR_INPUT,
                                        "%s: byte offset %zu: raw control character 0x%02x "
                                        "inside a JSON string, expected an escape; " HINT_CORRUPT,
                                        path, i + 8, (unsigned char)text[i]);
                if (text[i] != '\\')
                    continue;
                if (n - i > 5 && memcmp(text + i + 1, "u0000", 5) == 0)
                    return cp_error_set(err, CP_ERR_INPUT,
                                        "%s: byte offset %zu: string contains \\u0000, which "
                                        "cpeft cannot store in a name or value; " HINT_CORRUPT,
                                        path, i + 8);
                i++; /* skip the escaped character, which may be '"' */
            }
            if (depth == 1 && expect_key) {
                key = text + start;
                key_len = (int)(i - start);
                expect_key = 0;
            }
        } else if (c == '{' || c == '[') {
            depth++;
            expect_key = depth == 1;
        } else if (c == '}' || c == ']') {
            depth--;
        } else if (c == ',' && depth == 1) {
            expect_key = 1;
        } else if (c == '-' || (c >= '0' && c <= '9')) {
            size_t start = i;
            int digits_only = 1;
            while (i < n && text[i] != '\0' && strchr("0123456789+-.eE", text[i])) {
                digits_only &= text[i] >= '0' && text[i] <= '9';
                i++;
            }
            size_t len = i - start;
            if (!digits_only || (len > 1 && text[start] == '0'))
                return cp_error_set(err, CP_ERR_INPUT,
                                    "%s: byte offset %zu: entry '%.*s': number %.*s is not "
                                    "written as a plain non-negative integer, which shape "
                                    "and data_offsets require; " HINT_CORRUPT,
                                    path, start + 8, key_len, key, (int)len, text + start);
            i--;
        }
    }
    return CP_OK;
}

/* ---- header: __metadata__ and tensor entries ---- */

/* Checks that __metadata__, if present, occurs once and is an object of
 * string values with distinct keys. Sets f->metadata. */
static cp_status metadata_check(st_file *f, cp_error *err)
{
    int seen = 0, nomem = 0;
    for (const cJSON *item = f->header->child; item; item = item->next) {
        if (strcmp(item->string, "__metadata__") != 0)
            continue;
        if (seen++)
            return cp_error_set(err, CP_ERR_INPUT,
                                "%s: key '__metadata__' appears twice in the header, which the "
                                "format forbids; " HINT_CORRUPT,
                                f->path);
        char what[64];
        if (!cJSON_IsObject(item))
            return cp_error_set(err, CP_ERR_INPUT,
                                "%s: '__metadata__' is %s, expected an object of strings; "
                                HINT_CORRUPT,
                                f->path, json_describe(item, what, sizeof what));
        for (const cJSON *m = item->child; m; m = m->next)
            if (!cJSON_IsString(m))
                return cp_error_set(err, CP_ERR_INPUT,
                                    "%s: '__metadata__' value for key '%s' is %s, expected a "
                                    "string (the format allows only string values); "
                                    HINT_CORRUPT,
                                    f->path, m->string, json_describe(m, what, sizeof what));
        const char *dup = json_duplicate_key(item, &nomem);
        if (nomem)
            return cp_error_nomem(err, "safetensors metadata keys", 0);
        if (dup)
            return cp_error_set(err, CP_ERR_INPUT,
                                "%s: '__metadata__' key '%s' appears twice, which the format "
                                "forbids; " HINT_CORRUPT,
                                f->path, dup);
        f->metadata = item;
    }
    return CP_OK;
}

/* Dtype names the format defines that cpeft does not load. */
static const char *const other_dtypes[] = {
    "BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64", "F64", "C64",
    "F8_E5M2", "F8_E4M3", "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4",
};

static cp_status entry_dtype(const char *path, const char *name, const cJSON *v, cp_dtype *out,
                             cp_error *err)
{
    char what[64];
    if (!cJSON_IsString(v))
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: tensor '%s': dtype is %s, expected a string such as \"F32\"; "
                            HINT_CORRUPT,
                            path, name, json_describe(v, what, sizeof what));
    if (cp_dtype_parse(v->valuestring, out) == 0)
        return CP_OK;
    for (size_t i = 0; i < sizeof other_dtypes / sizeof *other_dtypes; i++)
        if (strcmp(v->valuestring, other_dtypes[i]) == 0)
            return cp_error_set(err, CP_ERR_INPUT,
                                "%s: unsupported dtype %s for tensor '%s'; cpeft loads F32, "
                                "F16 and BF16, convert the model to one of them",
                                path, v->valuestring, name);
    return cp_error_set(err, CP_ERR_INPUT,
                        "%s: tensor '%s': invalid dtype \"%.40s\", not a safetensors dtype; "
                        HINT_CORRUPT,
                        path, name, v->valuestring);
}

static cp_status entry_shape(const char *path, const char *name, const cJSON *v,
                             cp_st_tensor *t, cp_error *err)
{
    char what[64];
    if (!cJSON_IsArray(v))
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: tensor '%s': shape is %s, expected an array of integers; "
                            HINT_CORRUPT,
                            path, name, json_describe(v, what, sizeof what));
    int ndim = cJSON_GetArraySize(v);
    if (ndim > CP_ST_MAX_DIMS)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: tensor '%s': shape has %d dimensions, cpeft supports at "
                            "most %d",
                            path, name, ndim, CP_ST_MAX_DIMS);
    int d = 0;
    for (const cJSON *e = v->child; e; e = e->next, d++) {
        uint64_t dim = 0;
        const char *problem = json_get_u64(e, &dim);
        if (problem)
            return cp_error_set(err, CP_ERR_INPUT,
                                "%s: tensor '%s': shape[%d] is %s (%s), expected a "
                                "non-negative integer; " HINT_CORRUPT,
                                path, name, d, json_describe(e, what, sizeof what), problem);
        t->shape[d] = (int64_t)dim;
    }
    t->ndim = ndim;
    return CP_OK;
}

static cp_status entry_offsets(const char *path, const char *name, const cJSON *v,
                               uint64_t range[2], cp_error *err)
{
    char what[64];
    if (!cJSON_IsArray(v))
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: tensor '%s': data_offsets is %s, expected an array of two "
                            "integers [begin, end]; " HINT_CORRUPT,
                            path, name, json_describe(v, what, sizeof what));
    if (cJSON_GetArraySize(v) != 2)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: tensor '%s': data_offsets has %d values, expected two "
                            "integers [begin, end]; " HINT_CORRUPT,
                            path, name, cJSON_GetArraySize(v));
    int k = 0;
    for (const cJSON *e = v->child; e; e = e->next, k++) {
        const char *problem = json_get_u64(e, &range[k]);
        if (problem)
            return cp_error_set(err, CP_ERR_INPUT,
                                "%s: tensor '%s': data_offsets[%d] is %s (%s), expected a "
                                "non-negative integer; " HINT_CORRUPT,
                                path, name, k, json_describe(e, what, sizeof what), problem);
    }
    if (range[0] > range[1])
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: tensor '%s': data_offsets [%llu, %llu) begin after they end; "
                            HINT_CORRUPT,
                            path, name, (unsigned long long)range[0],
                            (unsigned long long)range[1]);
    return CP_OK;
}

/* Finds dtype, shape and data_offsets in entry, rejecting unknown and
 * repeated keys. */
static cp_status entry_fields(const char *path, const cJSON *entry, const cJSON *field[3],
                              cp_error *err)
{
    static const char *const names[3] = {"dtype", "shape", "data_offsets"};
    field[0] = field[1] = field[2] = NULL;
    for (const cJSON *c = entry->child; c; c = c->next) {
        int k = 0;
        while (k < 3 && strcmp(c->string, names[k]) != 0)
            k++;
        if (k == 3)
            return cp_error_set(err, CP_ERR_INPUT,
                                "%s: tensor '%s': unexpected key '%s', expected only dtype, "
                                "shape and data_offsets; " HINT_CORRUPT,
                                path, entry->string, c->string);
        if (field[k])
            return cp_error_set(err, CP_ERR_INPUT,
                                "%s: tensor '%s': key '%s' appears twice, which the format "
                                "forbids; " HINT_CORRUPT,
                                path, entry->string, names[k]);
        field[k] = c;
    }
    for (int k = 0; k < 3; k++)
        if (!field[k])
            return cp_error_set(err, CP_ERR_INPUT,
                                "%s: tensor '%s': missing '%s'; " HINT_CORRUPT, path,
                                entry->string, names[k]);
    return CP_OK;
}

/* Fills t from one header entry and checks its size and range against the
 * data section of data_size bytes, which starts at file byte data_start. */
static cp_status entry_parse(const st_file *f, const cJSON *entry, uint64_t data_start,
                             uint64_t data_size, cp_st_tensor *t, cp_error *err)
{
    const char *name = entry->string;
    char what[64], shape[256];
    memset(t, 0, sizeof *t);
    t->name = name;
    t->file = f->path;

    if (!cJSON_IsObject(entry))
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: tensor '%s': entry is %s, expected an object with dtype, "
                            "shape and data_offsets; " HINT_CORRUPT,
                            f->path, name, json_describe(entry, what, sizeof what));
    const cJSON *field[3];
    uint64_t range[2] = {0, 0};
    cp_status s = entry_fields(f->path, entry, field, err);
    if (s == CP_OK)
        s = entry_dtype(f->path, name, field[0], &t->dtype, err);
    if (s == CP_OK)
        s = entry_shape(f->path, name, field[1], t, err);
    if (s == CP_OK)
        s = entry_offsets(f->path, name, field[2], range, err);
    if (s != CP_OK)
        return s;

    uint64_t nbytes = 0;
    if (!shape_bytes(t, &nbytes))
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: tensor '%s': shape %s with dtype %s overflows a 64-bit byte "
                            "count; " HINT_CORRUPT,
                            f->path, name, shape_format(t, shape, sizeof shape),
                            cp_dtype_name(t->dtype));
    if (nbytes != range[1] - range[0])
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: tensor '%s': shape %s with dtype %s needs %llu bytes, but "
                            "data_offsets [%llu, %llu) hold %llu; " HINT_CORRUPT,
                            f->path, name, shape_format(t, shape, sizeof shape),
                            cp_dtype_name(t->dtype), (unsigned long long)nbytes,
                            (unsigned long long)range[0], (unsigned long long)range[1],
                            (unsigned long long)(range[1] - range[0]));
    if (range[1] > data_size)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: tensor '%s': data_offsets [%llu, %llu) end past the data "
                            "section (%llu bytes); the file is truncated or corrupt, "
                            "re-download it",
                            f->path, name, (unsigned long long)range[0],
                            (unsigned long long)range[1], (unsigned long long)data_size);

    t->nbytes = (size_t)nbytes;
    t->offset = data_start + range[0];
    t->data = f->map.data + t->offset;
    return CP_OK;
}

/* ---- data section layout ---- */

/* Orders by data offset. Ties (empty tensors) go by size, then by name,
 * which is unique by now, so the order is deterministic. */
static int compare_offsets(const void *a, const void *b)
{
    const cp_st_tensor *x = a, *y = b;
    if (x->offset != y->offset)
        return x->offset < y->offset ? -1 : 1;
    if (x->nbytes != y->nbytes)
        return x->nbytes < y->nbytes ? -1 : 1;
    return strcmp(x->name, y->name);
}

static cp_status names_check_unique(const char *path, const cp_st_tensor *t, size_t n,
                                    cp_error *err)
{
    if (n < 2)
        return CP_OK;
    const cp_st_tensor **sorted = malloc(n * sizeof *sorted);
    if (!sorted)
        return cp_error_nomem(err, "safetensors name list", n * sizeof *sorted);
    for (size_t i = 0; i < n; i++)
        sorted[i] = &t[i];
    qsort(sorted, n, sizeof *sorted, compare_names);
    cp_status s = CP_OK;
    for (size_t i = 1; i < n && s == CP_OK; i++)
        if (strcmp(sorted[i - 1]->name, sorted[i]->name) == 0)
            s = cp_error_set(err, CP_ERR_INPUT,
                             "%s: tensor name '%s' appears twice in the header, which the "
                             "format forbids; " HINT_CORRUPT,
                             path, sorted[i]->name);
    free(sorted);
    return s;
}

/* Sorts t by offset and checks that the tensors tile the data section
 * [data_start, data_start + data_size) exactly. The format forbids overlaps
 * (each byte belongs to one tensor) and holes (every byte belongs to some
 * tensor, so a file cannot smuggle other content). */
static cp_status layout_check(const char *path, cp_st_tensor *t, size_t n, uint64_t data_start,
                              uint64_t data_size, cp_error *err)
{
    if (n > 1)
        qsort(t, n, sizeof *t, compare_offsets);
    uint64_t pos = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t begin = t[i].offset - data_start, end = begin + t[i].nbytes;
        if (begin < pos)
            return cp_error_set(err, CP_ERR_INPUT,
                                "%s: tensor '%s': data_offsets [%llu, %llu) overlap tensor "
                                "'%s', which ends at %llu; " HINT_CORRUPT,
                                path, t[i].name, (unsigned long long)begin,
                                (unsigned long long)end, t[i - 1].name,
                                (unsigned long long)pos);
        if (begin > pos)
            return cp_error_set(err, CP_ERR_INPUT,
                                "%s: bytes [%llu, %llu) of the data section belong to no "
                                "tensor (a gap before tensor '%s'), which the format "
                                "forbids; " HINT_CORRUPT,
                                path, (unsigned long long)pos, (unsigned long long)begin,
                                t[i].name);
        pos = end;
    }
    if (pos != data_size)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: the data section has %llu bytes but the tensors cover only "
                            "the first %llu, and the format forbids trailing bytes; "
                            HINT_CORRUPT,
                            path, (unsigned long long)data_size, (unsigned long long)pos);
    return CP_OK;
}

/* ---- loading one file ---- */

static cp_status tensors_reserve(cp_safetensors *st, size_t extra, cp_error *err)
{
    if (st->tensors && st->cap_tensors - st->n_tensors >= extra)
        return CP_OK;
    size_t cap = st->n_tensors + (extra ? extra : 1);
    if (cap < 2 * st->cap_tensors)
        cap = 2 * st->cap_tensors;
    cp_st_tensor *grown = realloc(st->tensors, cap * sizeof *grown);
    if (!grown)
        return cp_error_nomem(err, "safetensors tensor table", cap * sizeof *grown);
    st->tensors = grown;
    st->cap_tensors = cap;
    return CP_OK;
}

/* Checks every entry of f's parsed header against the data section and
 * appends the tensors to st, which has room for them, in data offset order.
 * text is the header text, which the token check rereads. */
static cp_status file_parse_entries(cp_safetensors *st, st_file *f, const char *text,
                                    uint64_t header_len, cp_error *err)
{
    uint64_t data_start = 8 + header_len, data_size = f->map.size - data_start;
    cp_st_tensor *first = st->tensors + st->n_tensors;
    size_t parsed = 0;
    cp_status s = CP_OK;

    for (const cJSON *e = f->header->child; e && s == CP_OK; e = e->next) {
        if (e == f->metadata)
            continue;
        s = entry_parse(f, e, data_start, data_size, &first[parsed++], err);
    }
    if (s == CP_OK)
        s = header_check_tokens(f->path, text, (size_t)header_len, err);
    if (s == CP_OK)
        s = names_check_unique(f->path, first, parsed, err);
    if (s == CP_OK)
        s = layout_check(f->path, first, parsed, data_start, data_size, err);
    if (s == CP_OK)
        st->n_tensors += parsed;
    return s;
}

/* Checks the header of the mapped file f, then loads its entries. */
static cp_status file_parse(cp_safetensors *st, st_file *f, cp_error *err)
{
    uint64_t header_len = 0;
    cp_status s = header_locate(f->path, &f->map, &header_len, err);
    if (s == CP_OK)
        s = header_check_text(f->path, f->map.data + 8, (size_t)header_len, err);
    if (s != CP_OK)
        return s;

    /* A NUL-terminated copy, so cJSON cannot read past the header. */
    char *text = malloc((size_t)header_len + 1);
    if (!text)
        return cp_error_nomem(err, f->path, (size_t)header_len + 1);
    memcpy(text, f->map.data + 8, (size_t)header_len);
    text[header_len] = '\0';

    s = header_parse(f->path, text, (size_t)header_len, &f->header, err);
    if (s == CP_OK)
        s = metadata_check(f, err);
    if (s == CP_OK)
        s = tensors_reserve(st, (size_t)cJSON_GetArraySize(f->header), err);
    if (s == CP_OK)
        s = file_parse_entries(st, f, text, header_len, err);
    free(text);
    return s;
}

/* Maps path into the next free file slot and loads its tensors. The slot
 * is counted at once, so that cp_safetensors_close frees it on any failure. */
static cp_status file_load(cp_safetensors *st, const char *path, cp_error *err)
{
    st_file *f = &st->files[st->n_files++];
    f->path = strdup(path);
    if (!f->path)
        return cp_error_nomem(err, "safetensors path", strlen(path) + 1);
    cp_status s = cp_file_map(f->path, &f->map, err);
    if (s != CP_OK)
        return s;
    return file_parse(st, f, err);
}

static cp_status files_alloc(cp_safetensors *st, size_t n, cp_error *err)
{
    st->files = calloc(n, sizeof *st->files);
    if (!st->files)
        return cp_error_nomem(err, "safetensors file table", n * sizeof *st->files);
    return CP_OK;
}

/* Builds st->by_name. Names are unique across files by now: each file was
 * checked, and every shard tensor is listed under its own shard alone. */
static cp_status names_build_index(cp_safetensors *st, cp_error *err)
{
    size_t n = st->n_tensors;
    const cp_st_tensor **sorted = malloc((n ? n : 1) * sizeof *sorted);
    size_t *index = malloc((n ? n : 1) * sizeof *index);
    if (!sorted || !index) {
        free(sorted);
        free(index);
        return cp_error_nomem(err, "safetensors name index", n * sizeof *index);
    }
    for (size_t i = 0; i < n; i++)
        sorted[i] = &st->tensors[i];
    qsort(sorted, n, sizeof *sorted, compare_names);
    for (size_t i = 0; i < n; i++)
        index[i] = (size_t)(sorted[i] - st->tensors);
    free(sorted);
    free(st->by_name);
    st->by_name = index;
    return CP_OK;
}

/* ---- sharded folders ---- */

/* One weight_map entry: tensor name -> shard file name. */
typedef struct shard_ref {
    const char *tensor;
    const char *shard;
} shard_ref;

static int compare_refs(const void *a, const void *b)
{
    return strcmp(((const shard_ref *)a)->tensor, ((const shard_ref *)b)->tensor);
}

/* Returns how a shard name could reach outside the model folder, or NULL. */
static const char *shard_name_problem(const char *name)
{
    if (name[0] == '\0')
        return "is empty";
    if (name[0] == '/')
        return "is an absolute path";
    for (const char *p = name; *p;) {
        size_t len = strcspn(p, "/");
        if (len == 2 && p[0] == '.' && p[1] == '.')
            return "contains a '..' component";
        p += len;
        p += *p == '/';
    }
    return NULL;
}

/* Reads weight_map from the index root into a name-sorted array of refs,
 * checking each value is a safe shard file name. */
static cp_status index_read_refs(const char *index_path, const cJSON *root, shard_ref **out,
                                 size_t *n_out, cp_error *err)
{
    char what[64];
    const cJSON *map = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
    if (!map)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: missing \"weight_map\" (an object mapping tensor names to "
                            "shard files); re-download the index",
                            index_path);
    if (!cJSON_IsObject(map))
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: \"weight_map\" is %s, expected an object mapping tensor names "
                            "to shard files; re-download the index",
                            index_path, json_describe(map, what, sizeof what));

    size_t n = (size_t)cJSON_GetArraySize(map), i = 0;
    if (n == 0)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: \"weight_map\" is empty, expected at least one tensor; "
                            "re-download the index",
                            index_path);
    shard_ref *refs = calloc(n ? n : 1, sizeof *refs);
    if (!refs)
        return cp_error_nomem(err, "safetensors index", n * sizeof *refs);
    for (const cJSON *e = map->child; e; e = e->next, i++) {
        const char *problem = cJSON_IsString(e) ? shard_name_problem(e->valuestring) : NULL;
        cp_status s = CP_OK;
        if (!cJSON_IsString(e))
            s = cp_error_set(err, CP_ERR_INPUT,
                             "%s: shard file for tensor '%s' is %s, expected a file name "
                             "string; fix or re-download the index",
                             index_path, e->string, json_describe(e, what, sizeof what));
        else if (problem)
            s = cp_error_set(err, CP_ERR_INPUT,
                             "%s: shard file \"%s\" for tensor '%s' %s, expected a file name "
                             "inside the model folder; fix or re-download the index",
                             index_path, e->valuestring, e->string, problem);
        if (s != CP_OK) {
            free(refs);
            return s;
        }
        refs[i].tensor = e->string;
        refs[i].shard = e->valuestring;
    }
    qsort(refs, n, sizeof *refs, compare_refs);
    for (i = 1; i < n; i++) {
        if (strcmp(refs[i - 1].tensor, refs[i].tensor) == 0) {
            cp_status s = cp_error_set(err, CP_ERR_INPUT,
                                       "%s: tensor '%s' appears twice in weight_map; "
                                       "re-download the index",
                                       index_path, refs[i].tensor);
            free(refs);
            return s;
        }
    }
    *out = refs;
    *n_out = n;
    return CP_OK;
}

/* Collects the distinct shard names of refs, sorted, into *out. */
static cp_status index_shard_names(const shard_ref *refs, size_t n, const char ***out,
                                   size_t *n_out, cp_error *err)
{
    const char **names = malloc((n ? n : 1) * sizeof *names);
    if (!names)
        return cp_error_nomem(err, "safetensors shard list", n * sizeof *names);
    for (size_t i = 0; i < n; i++)
        names[i] = refs[i].shard;
    qsort(names, n, sizeof *names, compare_strings);
    size_t unique = 0;
    for (size_t i = 0; i < n; i++)
        if (unique == 0 || strcmp(names[unique - 1], names[i]) != 0)
            names[unique++] = names[i];
    *out = names;
    *n_out = unique;
    return CP_OK;
}

/* Checks that every tensor loaded from file f is listed under shard in the
 * index: a tensor the index does not know means index and shards disagree. */
static cp_status shard_check_listed(const char *index_path, const char *shard,
                                    const cp_st_tensor *t, size_t n, const shard_ref *refs,
                                    size_t n_refs, cp_error *err)
{
    for (size_t i = 0; i < n; i++) {
        shard_ref key = {t[i].name, NULL};
        const shard_ref *r = bsearch(&key, refs, n_refs, sizeof *refs, compare_refs);
        if (!r)
            return cp_error_set(err, CP_ERR_INPUT,
                                "%s: tensor '%s' is not listed in %s; the index and the shards "
                                "disagree, re-download the model",
                                t[i].file, t[i].name, index_path);
        if (strcmp(r->shard, shard) != 0)
            return cp_error_set(err, CP_ERR_INPUT,
                                "%s: contains tensor '%s', but %s assigns it to %s; the index "
                                "and the shards disagree, re-download the model",
                                t[i].file, t[i].name, index_path, r->shard);
    }
    return CP_OK;
}

/* Opens each shard named in refs once, in name order. */
static cp_status index_load_shards(cp_safetensors *st, const char *dir, const char *index_path,
                                   const shard_ref *refs, size_t n_refs, cp_error *err)
{
    const char **shards = NULL;
    size_t n_shards = 0;
    cp_status s = index_shard_names(refs, n_refs, &shards, &n_shards, err);
    if (s == CP_OK)
        s = files_alloc(st, n_shards ? n_shards : 1, err);

    for (size_t k = 0; k < n_shards && s == CP_OK; k++) {
        char *path = cp_path_join(dir, shards[k]);
        if (!path) {
            s = cp_error_nomem(err, "safetensors shard path", strlen(dir) + strlen(shards[k]) + 2);
            break;
        }
        if (!cp_file_exists(path))
            s = cp_error_set(err, CP_ERR_INPUT,
                             "%s: lists shard %s, but %s does not exist; the download is "
                             "incomplete, download the missing shard",
                             index_path, shards[k], path);
        size_t first = st->n_tensors;
        if (s == CP_OK)
            s = file_load(st, path, err);
        if (s == CP_OK)
            s = shard_check_listed(index_path, shards[k], st->tensors + first,
                                   st->n_tensors - first, refs, n_refs, err);
        free(path);
    }
    free(shards);
    return s;
}

/* Checks that every tensor in the index was found. Needs st->by_name. */
static cp_status index_check_complete(const cp_safetensors *st, const char *dir,
                                      const char *index_path, const shard_ref *refs,
                                      size_t n_refs, cp_error *err)
{
    for (size_t i = 0; i < n_refs; i++)
        if (!cp_safetensors_find(st, refs[i].tensor))
            return cp_error_set(err, CP_ERR_INPUT,
                                "%s: lists tensor '%s' in shard %s/%s, but that shard does not "
                                "contain it; the download is incomplete or the index is stale, "
                                "re-download the model",
                                index_path, refs[i].tensor, dir, refs[i].shard);
    return CP_OK;
}

/* Reads and parses the index file into *root, which must be a UTF-8 JSON
 * object without duplicate keys. */
static cp_status index_parse(const char *index_path, cJSON **root, cp_error *err)
{
    char *text = NULL;
    size_t len = 0;
    *root = NULL;
    cp_status s = cp_file_read(index_path, &text, &len, err);
    if (s != CP_OK)
        return s;

    size_t bad = utf8_scan((const uint8_t *)text, len);
    if (bad < len) {
        s = cp_error_set(err, CP_ERR_INPUT,
                         "%s: byte offset %zu: not valid UTF-8; re-download the index",
                         index_path, bad);
        free(text);
        return s;
    }

    /* The length includes the NUL, which cJSON then requires right after
     * the JSON value and any trailing whitespace. */
    const char *end = NULL;
    *root = cJSON_ParseWithLengthOpts(text, len + 1, &end, 1);
    if (!*root) {
        size_t at = end && end >= text ? (size_t)(end - text) : 0;
        s = cp_error_set(err, CP_ERR_INPUT,
                         "%s: byte offset %zu: not valid JSON; re-download the index",
                         index_path, at);
    }
    free(text);
    if (s != CP_OK)
        return s;

    int nomem = 0;
    const char *dup = cJSON_IsObject(*root) ? json_duplicate_key(*root, &nomem) : NULL;
    if (!cJSON_IsObject(*root))
        s = cp_error_set(err, CP_ERR_INPUT,
                         "%s: top level is not a JSON object; re-download the index",
                         index_path);
    else if (nomem)
        s = cp_error_nomem(err, "safetensors index keys", 0);
    else if (dup)
        s = cp_error_set(err, CP_ERR_INPUT, "%s: key '%s' appears twice; re-download the index",
                         index_path, dup);
    if (s != CP_OK) {
        cJSON_Delete(*root);
        *root = NULL;
    }
    return s;
}

/* Loads a sharded model from its index file, found in folder dir. */
static cp_status index_load(cp_safetensors *st, const char *dir, const char *index_path,
                            cp_error *err)
{
    cJSON *root = NULL;
    cp_status s = index_parse(index_path, &root, err);
    if (s != CP_OK)
        return s;

    shard_ref *refs = NULL;
    size_t n_refs = 0;
    s = index_read_refs(index_path, root, &refs, &n_refs, err);
    if (s == CP_OK)
        s = index_load_shards(st, dir, index_path, refs, n_refs, err);
    if (s == CP_OK)
        s = names_build_index(st, err);
    if (s == CP_OK)
        s = index_check_complete(st, dir, index_path, refs, n_refs, err);
    free(refs);
    cJSON_Delete(root);
    return s;
}

/* ---- public reader API ---- */

static int ends_with(const char *s, const char *suffix)
{
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

/* Opens a folder: model.safetensors if present, else the sharded index. */
static cp_status folder_load(cp_safetensors *st, const char *dir, cp_error *err)
{
    char *single = cp_path_join(dir, SINGLE_NAME);
    char *index = cp_path_join(dir, INDEX_NAME);
    cp_status s;
    if (!single || !index)
        s = cp_error_nomem(err, "safetensors path", strlen(dir) + sizeof INDEX_NAME + 1);
    else if (cp_file_exists(single))
        s = files_alloc(st, 1, err) == CP_OK ? file_load(st, single, err) : CP_ERR_NOMEM;
    else if (cp_file_exists(index))
        s = index_load(st, dir, index, err);
    else
        s = cp_error_set(err, CP_ERR_INPUT,
                         "%s: folder contains neither " SINGLE_NAME " nor " INDEX_NAME
                         "; pass a .safetensors file or a Hugging Face model folder",
                         dir);
    free(single);
    free(index);
    return s;
}

/* Opens an index file given by path: the shards sit beside it. */
static cp_status index_path_load(cp_safetensors *st, const char *path, cp_error *err)
{
    char *dir = strdup(path);
    if (!dir)
        return cp_error_nomem(err, "safetensors path", strlen(path) + 1);
    char *slash = strrchr(dir, '/');
    if (slash)
        slash[slash == dir ? 1 : 0] = '\0';
    cp_status s = index_load(st, slash ? dir : ".", path, err);
    free(dir);
    return s;
}

cp_status cp_safetensors_open(const char *path, cp_safetensors **out, cp_error *err)
{
    *out = NULL;
    cp_safetensors *st = calloc(1, sizeof *st);
    if (!st)
        return cp_error_nomem(err, "safetensors reader", sizeof *st);

    cp_status s;
    if (cp_file_is_dir(path))
        s = folder_load(st, path, err);
    else if (ends_with(path, ".index.json"))
        s = index_path_load(st, path, err);
    else if ((s = files_alloc(st, 1, err)) == CP_OK)
        s = file_load(st, path, err);

    if (s == CP_OK && !st->by_name)
        s = names_build_index(st, err);
    if (s != CP_OK) {
        cp_safetensors_close(st);
        return s;
    }
    *out = st;
    return CP_OK;
}

void cp_safetensors_close(cp_safetensors *st)
{
    if (!st)
        return;
    for (size_t i = 0; i < st->n_files; i++) {
        free(st->files[i].path);
        cp_mapped_file_free(&st->files[i].map);
        cJSON_Delete(st->files[i].header);
    }
    free(st->files);
    free(st->tensors);
    free(st->by_name);
    free(st);
}

size_t cp_safetensors_count(const cp_safetensors *st) { return st->n_tensors; }

const cp_st_tensor *cp_safetensors_at(const cp_safetensors *st, size_t i)
{
    CP_ASSERT(i < st->n_tensors);
    return &st->tensors[i];
}

const cp_st_tensor *cp_safetensors_find(const cp_safetensors *st, const char *name)
{
    size_t lo = 0, hi = st->n_tensors;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const cp_st_tensor *t = &st->tensors[st->by_name[mid]];
        int c = strcmp(name, t->name);
        if (c == 0)
            return t;
        if (c < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return NULL;
}

const char *cp_safetensors_metadata(const cp_safetensors *st, const char *key)
{
    for (size_t i = 0; i < st->n_files; i++) {
        const cJSON *v = st->files[i].metadata
                             ? cJSON_GetObjectItemCaseSensitive(st->files[i].metadata, key)
                             : NULL;
        if (v)
            return v->valuestring;
    }
    return NULL;
}

size_t cp_st_tensor_numel(const cp_st_tensor *t)
{
    size_t n = 1;
    for (int d = 0; d < t->ndim; d++)
        n *= (size_t)t->shape[d];
    return n;
}

int cp_st_tensor_is_aligned(const cp_st_tensor *t)
{
    return (uintptr_t)t->data % cp_dtype_size(t->dtype) == 0;
}

/* ---- writer ---- */

/* A growable string. The failed flag records an allocation failure, so
 * callers can append freely and check once. */
typedef struct strbuf {
    char *s;
    size_t len, cap;
    int failed;
} strbuf;

static void sb_append(strbuf *b, const char *s, size_t n)
{
    if (b->failed)
        return;
    if (b->cap - b->len < n + 1) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap - b->len < n + 1)
            cap *= 2;
        char *grown = realloc(b->s, cap);
        if (!grown) {
            b->failed = 1;
            return;
        }
        b->s = grown;
        b->cap = cap;
    }
    memcpy(b->s + b->len, s, n);
    b->len += n;
    b->s[b->len] = '\0';
}

static void sb_printf(strbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void sb_printf(strbuf *b, const char *fmt, ...)
{
    char tmp[128];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    CP_ASSERT(n >= 0 && (size_t)n < sizeof tmp);
    sb_append(b, tmp, (size_t)n);
}

/* Appends s as a JSON string, escaped the way serde_json (the reference
 * writer) and Python's json module escape. Bytes from 0x80 up pass through:
 * the caller has checked that s is UTF-8. */
static void sb_json_string(strbuf *b, const char *s)
{
    static const char short_escape[0x20] = {['\b'] = 'b', ['\t'] = 't', ['\n'] = 'n',
                                            ['\f'] = 'f', ['\r'] = 'r'};
    sb_append(b, "\"", 1);
    for (const char *p = s; *p; p++) {
        unsigned char c = (unsigned char)*p;
        if (c == '"' || c == '\\' || (c < 0x20 && short_escape[c])) {
            char esc[2] = {'\\', c < 0x20 ? short_escape[c] : (char)c};
            sb_append(b, esc, 2);
        } else if (c < 0x20) {
            sb_printf(b, "\\u%04x", c);
        } else {
            sb_append(b, p, 1);
        }
    }
    sb_append(b, "\"", 1);
}

static int utf8_valid(const char *s) { return utf8_scan((const uint8_t *)s, strlen(s)) == strlen(s); }

/* Checks one tensor given to the writer. */
static cp_status writer_check_tensor(const char *path, size_t i, const cp_st_tensor *t,
                                     cp_error *err)
{
    char shape[256];
    if (!t->name || !utf8_valid(t->name))
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: tensor %zu: name is %s, expected a UTF-8 string", path, i,
                            t->name ? "not valid UTF-8" : "NULL");
    if (strcmp(t->name, "__metadata__") == 0)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: tensor %zu: the name '__metadata__' is reserved for metadata; "
                            "rename the tensor",
                            path, i);
    if ((unsigned)t->dtype >= CP_DTYPE_COUNT)
        return cp_error_set(err, CP_ERR_INPUT, "%s: tensor '%s': dtype %d is not F32, F16 or BF16",
                            path, t->name, (int)t->dtype);
    if (t->ndim < 0 || t->ndim > CP_ST_MAX_DIMS)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: tensor '%s': ndim is %d, expected 0 to %d", path, t->name,
                            t->ndim, CP_ST_MAX_DIMS);
    for (int d = 0; d < t->ndim; d++)
        if (t->shape[d] < 0)
            return cp_error_set(err, CP_ERR_INPUT,
                                "%s: tensor '%s': shape[%d] is %lld, expected a non-negative "
                                "size",
                                path, t->name, d, (long long)t->shape[d]);
    uint64_t nbytes = 0;
    if (!shape_bytes(t, &nbytes))
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: tensor '%s': shape %s with dtype %s overflows a 64-bit byte "
                            "count",
                            path, t->name, shape_format(t, shape, sizeof shape),
                            cp_dtype_name(t->dtype));
    if (nbytes != (uint64_t)t->nbytes)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: tensor '%s': shape %s with dtype %s needs %llu bytes, but "
                            "nbytes is %zu",
                            path, t->name, shape_format(t, shape, sizeof shape),
                            cp_dtype_name(t->dtype), (unsigned long long)nbytes, t->nbytes);
    if (t->nbytes > 0 && !t->data)
        return cp_error_set(err, CP_ERR_INPUT, "%s: tensor '%s': data is NULL", path, t->name);
    return CP_OK;
}

/* Writer order: larger elements first, then by name. Every size is a
 * multiple of the element size, and element sizes divide each other, so
 * each tensor starts at a multiple of its own element size. */
static int compare_layout(const void *a, const void *b)
{
    const cp_st_tensor *x = *(const cp_st_tensor *const *)a;
    const cp_st_tensor *y = *(const cp_st_tensor *const *)b;
    size_t sx = cp_dtype_size(x->dtype), sy = cp_dtype_size(y->dtype);
    if (sx != sy)
        return sx > sy ? -1 : 1;
    return strcmp(x->name, y->name);
}

static int compare_metadata(const void *a, const void *b)
{
    return strcmp(((const cp_st_metadata *)a)->key, ((const cp_st_metadata *)b)->key);
}

/* Checks the metadata entries and returns them sorted by key in *out. */
static cp_status writer_sort_metadata(const char *path, const cp_st_metadata *m, size_t n,
                                      cp_st_metadata **out, cp_error *err)
{
    *out = NULL;
    for (size_t i = 0; i < n; i++)
        if (!m[i].key || !m[i].value || !utf8_valid(m[i].key) || !utf8_valid(m[i].value))
            return cp_error_set(err, CP_ERR_INPUT,
                                "%s: metadata entry %zu: key and value must be UTF-8 strings, "
                                "not NULL",
                                path, i);
    cp_st_metadata *sorted = malloc((n ? n : 1) * sizeof *sorted);
    if (!sorted)
        return cp_error_nomem(err, "safetensors metadata", n * sizeof *sorted);
    if (n)
        memcpy(sorted, m, n * sizeof *sorted);
    qsort(sorted, n, sizeof *sorted, compare_metadata);
    for (size_t i = 1; i < n; i++) {
        if (strcmp(sorted[i - 1].key, sorted[i].key) == 0) {
            cp_status s = cp_error_set(err, CP_ERR_INPUT,
                                       "%s: metadata key '%s' appears twice; keys must be "
                                       "unique",
                                       path, sorted[i].key);
            free(sorted);
            return s;
        }
    }
    *out = sorted;
    return CP_OK;
}

/* Checks the tensors and returns pointers to them in writer order. */
static cp_status writer_order_tensors(const char *path, const cp_st_tensor *t, size_t n,
                                      const cp_st_tensor ***out, cp_error *err)
{
    *out = NULL;
    for (size_t i = 0; i < n; i++) {
        cp_status s = writer_check_tensor(path, i, &t[i], err);
        if (s != CP_OK)
            return s;
    }
    const cp_st_tensor **order = malloc((n ? n : 1) * sizeof *order);
    if (!order)
        return cp_error_nomem(err, "safetensors tensor order", n * sizeof *order);
    for (size_t i = 0; i < n; i++)
        order[i] = &t[i];

    /* Duplicates need not be neighbours in writer order, so check by name. */
    qsort(order, n, sizeof *order, compare_names);
    for (size_t i = 1; i < n; i++) {
        if (strcmp(order[i - 1]->name, order[i]->name) == 0) {
            cp_status s = cp_error_set(err, CP_ERR_INPUT,
                                       "%s: tensor name '%s' appears twice; names must be "
                                       "unique",
                                       path, order[i]->name);
            free(order);
            return s;
        }
    }
    qsort(order, n, sizeof *order, compare_layout);
    *out = order;
    return CP_OK;
}

/* Builds the header: __metadata__ first (when there is any), then the
 * tensors in writer order, then spaces up to a multiple of 8 bytes so that
 * the data section, at 8 + header length, is 8-byte aligned. */
static cp_status writer_build_header(const char *path, const cp_st_tensor *const *order,
                                     size_t n, const cp_st_metadata *meta, size_t n_meta,
                                     strbuf *b, cp_error *err)
{
    sb_append(b, "{", 1);
    if (n_meta > 0) {
        sb_append(b, "\"__metadata__\":{", 16);
        for (size_t i = 0; i < n_meta; i++) {
            if (i)
                sb_append(b, ",", 1);
            sb_json_string(b, meta[i].key);
            sb_append(b, ":", 1);
            sb_json_string(b, meta[i].value);
        }
        sb_append(b, "}", 1);
    }
    uint64_t offset = 0;
    for (size_t i = 0; i < n; i++) {
        const cp_st_tensor *t = order[i];
        if (i || n_meta)
            sb_append(b, ",", 1);
        sb_json_string(b, t->name);
        sb_printf(b, ":{\"dtype\":\"%s\",\"shape\":[", cp_dtype_name(t->dtype));
        for (int d = 0; d < t->ndim; d++)
            sb_printf(b, "%s%lld", d ? "," : "", (long long)t->shape[d]);
        sb_printf(b, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)offset,
                  (unsigned long long)(offset + t->nbytes));
        offset += t->nbytes;
    }
    sb_append(b, "}", 1);
    while (!b->failed && b->len % 8 != 0)
        sb_append(b, " ", 1);

    if (b->failed)
        return cp_error_nomem(err, "safetensors header", b->cap * 2);
    if (b->len > CP_ST_MAX_HEADER)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: header would be %zu bytes, above the format's limit of %llu; "
                            "write fewer tensors or shorter names",
                            path, b->len, CP_ST_MAX_HEADER);
    return CP_OK;
}

/* Writes the length prefix, header and data through an atomic file. */
static cp_status writer_emit(const char *path, const strbuf *header,
                             const cp_st_tensor *const *order, size_t n, cp_error *err)
{
    uint8_t prefix[8];
    for (int i = 0; i < 8; i++)
        prefix[i] = (uint8_t)((uint64_t)header->len >> (8 * i));

    cp_atomic_file f;
    cp_status s = cp_atomic_open(&f, path, err);
    if (s != CP_OK)
        return s;
    s = cp_atomic_write(&f, prefix, sizeof prefix, err);
    if (s == CP_OK)
        s = cp_atomic_write(&f, header->s, header->len, err);
    for (size_t i = 0; i < n && s == CP_OK; i++)
        if (order[i]->nbytes > 0)
            s = cp_atomic_write(&f, order[i]->data, order[i]->nbytes, err);
    if (s != CP_OK) {
        cp_atomic_abort(&f);
        return s;
    }
    return cp_atomic_commit(&f, err);
}

cp_status cp_safetensors_write(const char *path, const cp_st_tensor *tensors, size_t n,
                               const cp_st_metadata *metadata, size_t n_metadata,
                               cp_error *err)
{
    const cp_st_tensor **order = NULL;
    cp_st_metadata *meta = NULL;
    strbuf header = {0};

    cp_status s = writer_order_tensors(path, tensors, n, &order, err);
    if (s == CP_OK)
        s = writer_sort_metadata(path, metadata, n_metadata, &meta, err);
    if (s == CP_OK)
        s = writer_build_header(path, order, n, meta, n_metadata, &header, err);
    if (s == CP_OK)
        s = writer_emit(path, &header, order, n, err);

    free(header.s);
    free(meta);
    free(order);
    return s;
}
