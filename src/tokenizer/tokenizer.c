/*
 * The tokenizer interface over the concrete tokenizers. Only SentencePiece
 * BPE (`tokenizer.model`) exists so far. cp_tokenizer_load recognizes
 * tokenizer.json, vocab.json + merges.txt and GGUF files, and rejects them
 * with a message saying that kind is not supported yet.
 */
#include "tokenizer/tokenizer.h"

#include <stdlib.h>
#include <string.h>

#include "core/file.h"
#include "tokenizer/sentencepiece.h"

struct cp_tokenizer {
    cp_sp_model *sp;
};

static int ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

static cp_status reject_kind(const char *path, const char *kind, cp_error *err)
{
    return cp_error_set(err, CP_ERR_INPUT,
                        "%s: %s tokenizers are not supported yet; use a SentencePiece "
                        "tokenizer.model",
                        path, kind);
}

/* Loads a SentencePiece model from a file, after rejecting the file kinds
 * that are recognized but not implemented. */
static cp_status load_file(const char *path, cp_sp_model **sp, cp_error *err)
{
    if (ends_with(path, ".json"))
        return reject_kind(path, "Hugging Face tokenizer.json", err);

    cp_mapped_file f;
    cp_status st = cp_file_map(path, &f, err);
    if (st)
        return st;
    if (ends_with(path, ".gguf") || (f.size >= 4 && memcmp(f.data, "GGUF", 4) == 0))
        st = reject_kind(path, "GGUF vocabulary", err);
    else
        st = cp_sp_parse(path, f.data, f.size, sp, err);
    cp_mapped_file_free(&f);
    return st;
}

/* Returns 1 if dir/name exists, or 0 if not or when out of memory. */
static int dir_has(const char *dir, const char *name)
{
    char *path = cp_path_join(dir, name);
    int found = path && cp_file_exists(path);
    free(path);
    return found;
}

/* Loads the tokenizer file in a model folder, preferring tokenizer.model. */
static cp_status load_dir(const char *dir, cp_sp_model **sp, cp_error *err)
{
    if (dir_has(dir, "tokenizer.model")) {
        char *path = cp_path_join(dir, "tokenizer.model");
        if (!path)
            return cp_error_nomem(err, "a path", strlen(dir) + 17);
        cp_status st = load_file(path, sp, err);
        free(path);
        return st;
    }
    if (dir_has(dir, "tokenizer.json"))
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: the folder has tokenizer.json but no tokenizer.model; Hugging "
                            "Face tokenizer.json tokenizers are not supported yet",
                            dir);
    if (dir_has(dir, "vocab.json") && dir_has(dir, "merges.txt"))
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: the folder has vocab.json and merges.txt but no "
                            "tokenizer.model; byte-level BPE tokenizers are not supported yet",
                            dir);
    return cp_error_set(err, CP_ERR_INPUT,
                        "%s: no tokenizer.model in the folder; pass the tokenizer file or a "
                        "model folder that contains one",
                        dir);
}

cp_status cp_tokenizer_load(const char *path, cp_tokenizer **out, cp_error *err)
{
    *out = NULL;
    cp_tokenizer *t = calloc(1, sizeof *t);
    if (!t)
        return cp_error_nomem(err, "a tokenizer", sizeof *t);
    cp_status st = cp_file_is_dir(path) ? load_dir(path, &t->sp, err)
                                        : load_file(path, &t->sp, err);
    if (st) {
        free(t);
        return st;
    }
    *out = t;
    return CP_OK;
}

void cp_tokenizer_free(cp_tokenizer *t)
{
    if (!t)
        return;
    cp_sp_free(t->sp);
    free(t);
}

int cp_tokenizer_vocab_size(const cp_tokenizer *t)
{
    return t->sp->n_pieces;
}

int32_t cp_tokenizer_bos_id(const cp_tokenizer *t)
{
    return t->sp->bos_id;
}

int32_t cp_tokenizer_eos_id(const cp_tokenizer *t)
{
    return t->sp->eos_id;
}

cp_status cp_tokenizer_encode(const cp_tokenizer *t, const char *text, size_t len, int add_bos,
                              int32_t **ids, size_t *n_ids, cp_error *err)
{
    *ids = NULL;
    *n_ids = 0;
    if (add_bos && t->sp->bos_id < 0)
        return cp_error_set(err, CP_ERR_INPUT,
                            "a BOS token was requested but the tokenizer has none; encode "
                            "without BOS");

    int32_t *body;
    size_t n;
    cp_status st = cp_sp_encode(t->sp, text, len, &body, &n, err);
    if (st || !add_bos) {
        *ids = body;
        *n_ids = n;
        return st;
    }

    int32_t *with_bos = realloc(body, (n + 1) * sizeof *with_bos);
    if (!with_bos) {
        free(body);
        return cp_error_nomem(err, "token ids", (n + 1) * sizeof *with_bos);
    }
    memmove(with_bos + 1, with_bos, n * sizeof *with_bos);
    with_bos[0] = t->sp->bos_id;
    *ids = with_bos;
    *n_ids = n + 1;
    return CP_OK;
}

cp_status cp_tokenizer_decode(const cp_tokenizer *t, const int32_t *ids, size_t n_ids,
                              char **text, size_t *len, cp_error *err)
{
    return cp_sp_decode(t->sp, ids, n_ids, text, len, err);
}
