/*
 * The tokenizer interface over the concrete tokenizers: SentencePiece BPE
 * (`tokenizer.model`) and GPT-2 style byte-level BPE (`tokenizer.json`, or
 * `vocab.json` + `merges.txt`). A folder is searched in that order. A GGUF
 * file (by its extension or magic) yields either kind, built from its
 * metadata by tokenizer_gguf.c.
 */
#include "tokenizer/tokenizer.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "core/file.h"
#include "io/tokenizer_config.h"

/* Exactly one of sp and bpe is set. */
struct cp_tokenizer {
    cp_sp_model *sp;
    cp_bpe_model *bpe;
};

static int ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

/* Loads a tokenizer file: tokenizer.json (any *.json) as byte-level BPE,
 * a GGUF file from its metadata, anything else as SentencePiece. */
static cp_status load_file(const char *path, cp_tokenizer *t, cp_error *err)
{
    /* GPT-2's vocab.json and merges.txt only work as a pair, so name the folder. */
    if (ends_with(path, "vocab.json") || ends_with(path, "merges.txt"))
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: a byte-level BPE vocabulary needs both vocab.json and "
                            "merges.txt; pass the folder that holds them",
                            path);
    if (ends_with(path, ".json"))
        return cp_bpe_load_json(path, &t->bpe, err);
    if (ends_with(path, ".bin"))
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: looks like llama2.c's exported tokenizer, which cpeft does not "
                            "read; pass the SentencePiece tokenizer.model it was made from",
                            path);

    if (ends_with(path, ".gguf"))
        return cp_tokenizer_gguf_load(path, &t->sp, &t->bpe, err);
    cp_mapped_file f;
    cp_status st = cp_file_map(path, &f, err);
    if (st)
        return st;
    bool is_gguf = f.size >= 4 && memcmp(f.data, "GGUF", 4) == 0;
    if (!is_gguf)
        st = cp_sp_parse(path, f.data, f.size, &t->sp, err);
    cp_mapped_file_free(&f);
    return is_gguf ? cp_tokenizer_gguf_load(path, &t->sp, &t->bpe, err) : st;
}

/* Returns 1 if dir/name exists, or 0 if not or when out of memory. */
static int dir_has(const char *dir, const char *name)
{
    char *path = cp_path_join(dir, name);
    int found = path && cp_file_exists(path);
    free(path);
    return found;
}

/* Loads dir/name as a tokenizer file. */
static cp_status load_dir_file(const char *dir, const char *name, cp_tokenizer *t, cp_error *err)
{
    char *path = cp_path_join(dir, name);
    if (!path)
        return cp_error_nomem(err, "a path", strlen(dir) + strlen(name) + 2);
    cp_status st = load_file(path, t, err);
    free(path);
    return st;
}

/* Loads the tokenizer in a model folder: tokenizer.model first, then
 * tokenizer.json, then vocab.json + merges.txt. */
static cp_status load_dir(const char *dir, cp_tokenizer *t, cp_error *err)
{
    if (dir_has(dir, "tokenizer.model"))
        return load_dir_file(dir, "tokenizer.model", t, err);
    if (dir_has(dir, "tokenizer.json"))
        return load_dir_file(dir, "tokenizer.json", t, err);
    if (dir_has(dir, "vocab.json") && dir_has(dir, "merges.txt")) {
        char *vocab = cp_path_join(dir, "vocab.json");
        char *merges = cp_path_join(dir, "merges.txt");
        cp_status st = vocab && merges ? cp_bpe_load_files(vocab, merges, &t->bpe, err)
                                       : cp_error_nomem(err, "a path", strlen(dir) + 12);
        free(vocab);
        free(merges);
        return st;
    }
    return cp_error_set(err, CP_ERR_INPUT,
                        "%s: no tokenizer.model, tokenizer.json or vocab.json + merges.txt in "
                        "the folder; pass a tokenizer file or a model folder that contains one",
                        dir);
}

cp_status cp_tokenizer_load(const char *path, cp_tokenizer **out, cp_error *err)
{
    *out = NULL;
    cp_tokenizer *t = calloc(1, sizeof *t);
    if (!t)
        return cp_error_nomem(err, "a tokenizer", sizeof *t);
    cp_status st = cp_file_is_dir(path) ? load_dir(path, t, err) : load_file(path, t, err);
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
    cp_bpe_free(t->bpe);
    free(t);
}

int cp_tokenizer_vocab_size(const cp_tokenizer *t)
{
    return t->sp ? t->sp->n_pieces : t->bpe->n_tokens;
}

int32_t cp_tokenizer_bos_id(const cp_tokenizer *t)
{
    return t->sp ? t->sp->bos_id : t->bpe->bos_id;
}

int32_t cp_tokenizer_eos_id(const cp_tokenizer *t)
{
    return t->sp ? t->sp->eos_id : t->bpe->eos_id;
}

cp_status cp_tokenizer_encode(const cp_tokenizer *t, const char *text, size_t len, int add_bos,
                              int32_t **ids, size_t *n_ids, cp_error *err)
{
    *ids = NULL;
    *n_ids = 0;
    /* Byte-level BPE adds BOS only where its post-processor names one
     * (Llama-3's <|begin_of_text|>); GPT-2 has none and its models expect
     * none, so add_bos is ignored there. A SentencePiece model without BOS
     * rejects the request. */
    int32_t bos = cp_tokenizer_bos_id(t);
    if (t->bpe && bos < 0)
        return cp_bpe_encode(t->bpe, text, len, ids, n_ids, err);
    if (add_bos && bos < 0)
        return cp_error_set(err, CP_ERR_INPUT,
                            "a BOS token was requested but the tokenizer has none; encode "
                            "without BOS");

    int32_t *body;
    size_t n;
    cp_status st = t->bpe ? cp_bpe_encode(t->bpe, text, len, &body, &n, err)
                          : cp_sp_encode(t->sp, text, len, &body, &n, err);
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
    with_bos[0] = bos;
    *ids = with_bos;
    *n_ids = n + 1;
    return CP_OK;
}

cp_status cp_tokenizer_decode(const cp_tokenizer *t, const int32_t *ids, size_t n_ids,
                              char **text, size_t *len, cp_error *err)
{
    if (t->bpe)
        return cp_bpe_decode(t->bpe, ids, n_ids, text, len, err);
    return cp_sp_decode(t->sp, ids, n_ids, text, len, err);
}

cp_status cp_tokenizer_load_with_bos(const char *path, cp_tokenizer **tok, int *add_bos,
                                     cp_error *err)
{
    *add_bos = 1;
    cp_status st = cp_tokenizer_load(path, tok, err);
    if (st == CP_OK && cp_file_is_dir(path))
        st = cp_tokenizer_config_add_bos(path, add_bos, err);
    else if (st == CP_OK && cp_file_is_gguf(path))
        st = cp_tokenizer_gguf_add_bos(path, *tok, add_bos, err);
    if (st != CP_OK) {
        cp_tokenizer_free(*tok);
        *tok = NULL;
    }
    return st;
}
