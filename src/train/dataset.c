/*
 * Training data: file tokenization (.txt, .jsonl), the held-out split, the
 * windows and their per-epoch shuffle. The shuffle is Fisher–Yates over the
 * window indices with an unbiased bounded draw from cp_rng, so a seed gives
 * the same order on every machine.
 */
#include <cJSON.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/file.h"
#include "train/dataset.h"

/* ---- file tokenization -------------------------------------------------- */

/* A growing id stream. */
typedef struct id_buffer {
    int32_t *ids;
    size_t n, cap;
} id_buffer;

static cp_status id_buffer_append(id_buffer *b, const int32_t *ids, size_t n, cp_error *err)
{
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->n + n)
            cap *= 2;
        int32_t *grown = realloc(b->ids, cap * sizeof *grown);
        if (!grown)
            return cp_error_nomem(err, "token ids", cap * sizeof *grown);
        b->ids = grown;
        b->cap = cap;
    }
    memcpy(b->ids + b->n, ids, n * sizeof *ids);
    b->n += n;
    return CP_OK;
}

static int has_suffix(const char *s, const char *suffix)
{
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

static int is_blank(const char *line, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if (line[i] != ' ' && line[i] != '\t' && line[i] != '\r')
            return 0;
    return 1;
}

static const char *json_type_name(const cJSON *item)
{
    if (cJSON_IsNull(item))
        return "null";
    if (cJSON_IsBool(item))
        return "a boolean";
    if (cJSON_IsNumber(item))
        return "a number";
    if (cJSON_IsString(item))
        return "a string";
    if (cJSON_IsArray(item))
        return "an array";
    return "an object";
}

/* Parses one NUL-terminated line of len bytes into *root and points *text
 * at its "text" string (owned by *root, which the caller deletes). */
static cp_status parse_record(const char *path, size_t line_no, const char *line, size_t len,
                              cJSON **root, const char **text, cp_error *err)
{
    if (memchr(line, '\0', len))
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s:%zu: the line contains a NUL byte; expected one JSON object",
                            path, line_no);
    const char *end = NULL;
    *root = cJSON_ParseWithOpts(line, &end, 1);
    if (!*root) {
        size_t column = end && end >= line ? (size_t)(end - line) + 1 : 1;
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s:%zu: invalid JSON at column %zu; expected one JSON object per "
                            "line, such as {\"text\": \"...\"}",
                            path, line_no, column);
    }
    if (!cJSON_IsObject(*root))
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s:%zu: found %s; expected a JSON object with a string field \"text\"",
                            path, line_no, json_type_name(*root));
    const cJSON *field = cJSON_GetObjectItemCaseSensitive(*root, "text");
    if (!field)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s:%zu: missing field \"text\"; expected {\"text\": \"...\"}", path,
                            line_no);
    if (!cJSON_IsString(field))
        return cp_error_set(err, CP_ERR_INPUT, "%s:%zu: field \"text\" is %s; expected a string",
                            path, line_no, json_type_name(field));
    *text = field->valuestring;
    return CP_OK;
}

/* Encodes one record's text, with BOS if add_bos and EOS if the tokenizer
 * has one, onto the end of out. */
static cp_status append_record(const cp_tokenizer *tok, const char *text, int add_bos,
                               id_buffer *out, cp_error *err)
{
    int32_t *ids = NULL;
    size_t n = 0;
    cp_status st = cp_tokenizer_encode(tok, text, strlen(text), add_bos, &ids, &n, err);
    if (st == CP_OK)
        st = id_buffer_append(out, ids, n, err);
    free(ids);
    int32_t eos = cp_tokenizer_eos_id(tok);
    if (st == CP_OK && eos >= 0)
        st = id_buffer_append(out, &eos, 1, err);
    return st;
}

/* Tokenizes a JSON Lines buffer of len bytes; buf is modified (each line end
 * becomes a NUL). */
static cp_status tokenize_jsonl(const cp_tokenizer *tok, const char *path, char *buf, size_t len,
                                int add_bos, id_buffer *out, cp_error *err)
{
    size_t line_no = 0, records = 0;
    char *line = buf, *stop = buf + len;
    while (line < stop) {
        line_no++;
        char *nl = memchr(line, '\n', (size_t)(stop - line));
        char *end = nl ? nl : stop;
        size_t line_len = (size_t)(end - line);
        *end = '\0'; /* the buffer has one byte past len for the NUL */

        if (!is_blank(line, line_len)) {
            cJSON *root = NULL;
            const char *text = NULL;
            cp_status st = parse_record(path, line_no, line, line_len, &root, &text, err);
            if (st == CP_OK) {
                st = append_record(tok, text, add_bos, out, err);
                if (st != CP_OK)
                    cp_error_prefix(err, "%s:%zu", path, line_no);
            }
            cJSON_Delete(root);
            if (st != CP_OK)
                return st;
            records++;
        }
        line = end + 1;
    }
    if (records == 0)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: no records, only blank lines; expected one JSON object with a "
                            "string field \"text\" per line",
                            path);
    return CP_OK;
}

cp_status cp_dataset_tokenize_file(const cp_tokenizer *tok, const char *path, int add_bos,
                                   int32_t **ids, size_t *n_ids, cp_error *err)
{
    *ids = NULL;
    *n_ids = 0;
    if (has_suffix(path, ".json"))
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: a .json document is not supported; write one {\"text\": ...} "
                            "object per line to a .jsonl file, or use plain text",
                            path);

    char *buf = NULL;
    size_t len = 0;
    cp_status st = cp_file_read(path, &buf, &len, err);
    if (st != CP_OK)
        return st;
    if (len == 0) {
        free(buf);
        return cp_error_set(err, CP_ERR_INPUT, "%s: the file is empty; expected training text",
                            path);
    }

    if (has_suffix(path, ".jsonl")) {
        id_buffer out = {0};
        st = tokenize_jsonl(tok, path, buf, len, add_bos, &out, err);
        if (st == CP_OK) {
            *ids = out.ids;
            *n_ids = out.n;
        } else {
            free(out.ids);
        }
    } else {
        st = cp_tokenizer_encode(tok, buf, len, add_bos, ids, n_ids, err);
        if (st != CP_OK)
            cp_error_prefix(err, "%s", path);
    }
    free(buf);
    return st;
}

/* ---- the dataset -------------------------------------------------------- */

cp_dataset_params cp_dataset_default_params(void)
{
    return (cp_dataset_params){
        .train_path = NULL,
        .eval_path = NULL,
        .seq_len = 512,
        .context_length = 0,
        .eval_split = 0.05,
        .add_bos = 1,
        .seed = 42,
    };
}

/* Rejects a stream of n ids that cannot fill one window of N inputs plus one
 * target. stream_name is the stream's name in the message. */
static cp_status check_window_fits(const char *path, const char *stream_name, size_t n, int N,
                                   cp_error *err)
{
    if (n >= (size_t)N + 1)
        return CP_OK;
    return cp_error_set(err, CP_ERR_INPUT,
                        "%s: %s has %zu tokens, but one window of sequence length %d needs %d "
                        "(the inputs plus one target); use more text or a shorter sequence length",
                        path, stream_name, n, N, N + 1);
}

/* Splits the tail off train_path's stream, or tokenizes eval_path. */
static cp_status setup_eval(cp_dataset *ds, const cp_tokenizer *tok, const cp_dataset_params *p,
                            size_t n_ids, cp_error *err)
{
    if (p->eval_path) {
        cp_status st = cp_dataset_tokenize_file(tok, p->eval_path, p->add_bos,
                                                &ds->eval_file_ids, &ds->n_eval, err);
        if (st != CP_OK)
            return st;
        ds->eval_ids = ds->eval_file_ids;
        ds->n_train = n_ids;
        return check_window_fits(p->eval_path, "the evaluation file", ds->n_eval, ds->seq_len, err);
    }

    size_t n_eval = (size_t)floor(p->eval_split * (double)n_ids);
    ds->n_train = n_ids - n_eval;
    ds->n_eval = n_eval;
    ds->eval_ids = n_eval > 0 ? ds->ids + ds->n_train : NULL;
    if (n_eval > 0 && n_eval < (size_t)ds->seq_len + 1)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: the held-out last %g%% of the stream is %zu tokens, but one "
                            "evaluation window of sequence length %d needs %d; raise "
                            "--eval-split, give --eval-data, or set --eval-split 0",
                            p->train_path, p->eval_split * 100.0, n_eval, ds->seq_len,
                            ds->seq_len + 1);
    return CP_OK;
}

/* Returns a uniform integer in [0, bound), bound >= 1, without modulo bias:
 * draws below 2^64 mod bound are rejected. */
static uint64_t uniform_below(cp_rng *rng, uint64_t bound)
{
    uint64_t threshold = (0 - bound) % bound;
    for (;;) {
        uint64_t r = cp_rng_next(rng);
        if (r >= threshold)
            return r % bound;
    }
}

/* Starts an epoch: order becomes a fresh Fisher–Yates permutation of
 * 0 .. n_windows-1 drawn from the continuing random stream. */
static void shuffle_epoch(cp_dataset *ds)
{
    size_t n = ds->n_windows;
    for (size_t i = 0; i < n; i++)
        ds->order[i] = i;
    for (size_t i = n; i > 1; i--) {
        size_t j = (size_t)uniform_below(&ds->rng, i);
        size_t tmp = ds->order[i - 1];
        ds->order[i - 1] = ds->order[j];
        ds->order[j] = tmp;
    }
    ds->cursor = 0;
}

static cp_status check_params(const cp_dataset_params *p, cp_error *err)
{
    CP_ASSERT(p->train_path && p->context_length > 0);
    if (p->seq_len < 1 || p->seq_len > p->context_length)
        return cp_error_set(err, CP_ERR_INPUT,
                            "sequence length %d (--seq-len) is outside [1, %d]: it must be "
                            "positive and at most the model's context length",
                            p->seq_len, p->context_length);
    if (!p->eval_path && !(p->eval_split >= 0.0 && p->eval_split < 1.0))
        return cp_error_set(err, CP_ERR_INPUT, "eval split %g must lie in [0, 1)",
                            p->eval_split);
    return CP_OK;
}

cp_status cp_dataset_init(cp_dataset *ds, const cp_tokenizer *tok, const cp_dataset_params *p,
                          cp_error *err)
{
    memset(ds, 0, sizeof *ds);
    cp_status st = check_params(p, err);
    if (st != CP_OK)
        return st;
    ds->seq_len = p->seq_len;

    size_t n_ids = 0;
    st = cp_dataset_tokenize_file(tok, p->train_path, p->add_bos, &ds->ids, &n_ids, err);
    if (st == CP_OK)
        st = check_window_fits(p->train_path, "the file", n_ids, ds->seq_len, err);
    if (st == CP_OK)
        st = setup_eval(ds, tok, p, n_ids, err);
    if (st == CP_OK)
        st = check_window_fits(p->train_path, "the part before the held-out split", ds->n_train,
                               ds->seq_len, err);
    if (st != CP_OK) {
        cp_dataset_free(ds);
        return st;
    }
    ds->train_ids = ds->ids;

    /* The windows, shuffled for epoch 0. */
    ds->n_windows = (ds->n_train - 1) / (size_t)ds->seq_len;
    ds->order = malloc(ds->n_windows * sizeof *ds->order);
    if (!ds->order) {
        cp_dataset_free(ds);
        return cp_error_nomem(err, "window order", ds->n_windows * sizeof(size_t));
    }
    cp_rng_seed(&ds->rng, p->seed);
    shuffle_epoch(ds);
    return CP_OK;
}

void cp_dataset_free(cp_dataset *ds)
{
    if (!ds)
        return;
    free(ds->ids);
    free(ds->eval_file_ids);
    free(ds->order);
    memset(ds, 0, sizeof *ds);
}

size_t cp_dataset_n_windows(const cp_dataset *ds) { return ds->n_windows; }

const int32_t *cp_dataset_window(const cp_dataset *ds, size_t k)
{
    CP_ASSERT(k < ds->n_windows);
    return ds->train_ids + k * (size_t)ds->seq_len;
}

void cp_dataset_next_batch(cp_dataset *ds, int32_t *batch, int B, size_t *windows)
{
    CP_ASSERT(B > 0 && ds->n_windows > 0);
    size_t row = (size_t)ds->seq_len + 1;
    for (int b = 0; b < B; b++) {
        if (ds->cursor == ds->n_windows) {
            ds->epoch++;
            shuffle_epoch(ds);
        }
        size_t k = ds->order[ds->cursor++];
        memcpy(batch + (size_t)b * row, cp_dataset_window(ds, k), row * sizeof *batch);
        if (windows)
            windows[b] = k;
    }
}
