/*
 * Builds a tokenizer from the vocabulary that llama.cpp stores in a GGUF
 * file's metadata (the tokenizer.ggml.* keys).
 *
 * tokenizer.ggml.model "llama" becomes a SentencePiece BPE model (tokens,
 * scores, token_type, the special token ids, add_space_prefix,
 * remove_extra_whitespaces). "gpt2" becomes byte-level BPE (tokens,
 * token_type, merges) with the pre-tokenizer that tokenizer.ggml.pre names:
 * "gpt-2", the Llama-3 group ("llama-bpe", "llama3", "llama-v3") or
 * "qwen2", the ones bpe.c implements. Every other model or pre-tokenizer is
 * rejected. Counts, types, ids and merges are checked, and a defect is
 * CP_ERR_INPUT naming the file, the key and the element index.
 *
 * NOTE: tokenizer.ggml.add_eos_token is checked for its type but not
 * applied: encoding never appends EOS.
 */
#include "tokenizer/tokenizer.h"

#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "io/gguf.h"
#include "tokenizer/bpe.h"
#include "tokenizer/sentencepiece.h"

#define KEY_MODEL "tokenizer.ggml.model"
#define KEY_PRE "tokenizer.ggml.pre"
#define KEY_TOKENS "tokenizer.ggml.tokens"
#define KEY_SCORES "tokenizer.ggml.scores"
#define KEY_TYPES "tokenizer.ggml.token_type"
#define KEY_MERGES "tokenizer.ggml.merges"
#define KEY_BOS "tokenizer.ggml.bos_token_id"
#define KEY_EOS "tokenizer.ggml.eos_token_id"
#define KEY_UNK "tokenizer.ggml.unknown_token_id"
#define KEY_PAD "tokenizer.ggml.padding_token_id"
#define KEY_ADD_BOS "tokenizer.ggml.add_bos_token"
#define KEY_ADD_EOS "tokenizer.ggml.add_eos_token"
#define KEY_SPACE_PREFIX "tokenizer.ggml.add_space_prefix"
#define KEY_REMOVE_SPACES "tokenizer.ggml.remove_extra_whitespaces"

#define HINT "re-export the vocabulary with llama.cpp's convert_hf_to_gguf.py"

/* llama.cpp's token types, which match SentencePiece's piece types. */
enum { TOKEN_NORMAL = 1, TOKEN_UNKNOWN = 2, TOKEN_CONTROL = 3, TOKEN_USER_DEFINED = 4,
       TOKEN_UNUSED = 5, TOKEN_BYTE = 6 };

/* The vocabulary arrays shared by both kinds, pointing into the map. */
typedef struct gguf_vocab {
    const char *path;
    const cp_gguf *g;
    int32_t n_tokens;
    const cp_gguf_kv *tokens;
    const cp_gguf_kv *types;
} gguf_vocab;

static int str_is(cp_gguf_str s, const char *text)
{
    return s.len == strlen(text) && memcmp(s.data, text, s.len) == 0;
}

static int print_len(cp_gguf_str s)
{
    return s.len > 60 ? 60 : (int)s.len;
}

/* ---- scalar keys ---- */

/* Sets *out to the token id under key, or -1 when the key is absent. */
static cp_status read_token_id(const gguf_vocab *v, const char *key, int32_t *out,
                               cp_error *err)
{
    *out = -1;
    if (!cp_gguf_find_kv(v->g, key))
        return CP_OK;
    uint32_t id;
    cp_status st = cp_gguf_get_u32(v->g, key, &id, err);
    if (st)
        return st;
    if (id >= (uint32_t)v->n_tokens)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: %s is %u, expected a token id below %d (the length of %s); %s",
                            v->path, key, id, v->n_tokens, KEY_TOKENS, HINT);
    *out = (int32_t)id;
    return CP_OK;
}

/* Sets *out to the bool under key, or to fallback when the key is absent. */
static cp_status read_flag(const cp_gguf *g, const char *key, bool fallback, bool *out,
                           cp_error *err)
{
    *out = fallback;
    if (!cp_gguf_find_kv(g, key))
        return CP_OK;
    int value;
    cp_status st = cp_gguf_get_bool(g, key, &value, err);
    if (!st)
        *out = value != 0;
    return st;
}

/* ---- arrays ---- */

/* Finds tokens and token_type and checks that their lengths agree. */
static cp_status read_token_arrays(gguf_vocab *v, cp_error *err)
{
    uint64_t n_tokens, n_types;
    cp_status st = cp_gguf_get_array(v->g, KEY_TOKENS, CP_GGUF_TYPE_STRING, &v->tokens,
                                     &n_tokens, err);
    if (st)
        return st;
    if (n_tokens == 0 || n_tokens > INT32_MAX)
        return cp_error_set(err, CP_ERR_INPUT, "%s: %s has %llu entries, expected 1 to %d; %s",
                            v->path, KEY_TOKENS, (unsigned long long)n_tokens, INT32_MAX, HINT);
    v->n_tokens = (int32_t)n_tokens;

    st = cp_gguf_get_array(v->g, KEY_TYPES, CP_GGUF_TYPE_INT32, &v->types, &n_types, err);
    if (st)
        return st;
    if (n_types != n_tokens)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: %s has %llu entries, expected %llu (one per entry of %s); %s",
                            v->path, KEY_TYPES, (unsigned long long)n_types,
                            (unsigned long long)n_tokens, KEY_TOKENS, HINT);
    return CP_OK;
}

/* Sets *type to token_type[i] after checking it is 1 to 6. */
static cp_status read_token_type(const gguf_vocab *v, int32_t i, int *type, cp_error *err)
{
    double t = cp_gguf_array_number(v->types, (uint64_t)i);
    if (t < TOKEN_NORMAL || t > TOKEN_BYTE)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: %s[%d] is %.0f, expected a token type from 1 (normal) to 6 "
                            "(byte); %s",
                            v->path, KEY_TYPES, i, t, HINT);
    *type = (int)t;
    return CP_OK;
}

/* Returns token i's text, after checking that its length fits 32 bits. */
static cp_status read_token_text(const gguf_vocab *v, int32_t i, cp_gguf_str *s, cp_error *err)
{
    *s = cp_gguf_array_str(v->tokens, (uint64_t)i);
    if (s->len > UINT32_MAX)
        return cp_error_set(err, CP_ERR_INPUT, "%s: %s[%d] has %llu bytes, expected under 4 GiB; %s",
                            v->path, KEY_TOKENS, i, (unsigned long long)s->len, HINT);
    return CP_OK;
}

/* ---- llama: SentencePiece ---- */

/* Fills pieces (n_tokens entries) from tokens, scores and token_type. */
static cp_status read_pieces(const gguf_vocab *v, cp_sp_piece *pieces, bool *has_bytes,
                             cp_error *err)
{
    const cp_gguf_kv *scores;
    uint64_t n_scores;
    cp_status st = cp_gguf_get_array(v->g, KEY_SCORES, CP_GGUF_TYPE_FLOAT32, &scores, &n_scores,
                                     err);
    if (st)
        return st;
    if (n_scores != (uint64_t)v->n_tokens)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: %s has %llu entries, expected %d (one per entry of %s); %s",
                            v->path, KEY_SCORES, (unsigned long long)n_scores, v->n_tokens,
                            KEY_TOKENS, HINT);

    *has_bytes = false;
    for (int32_t i = 0; i < v->n_tokens; i++) {
        cp_gguf_str text;
        int type;
        if ((st = read_token_text(v, i, &text, err)) || (st = read_token_type(v, i, &type, err)))
            return st;
        double score = cp_gguf_array_number(scores, (uint64_t)i);
        if (isnan(score))
            return cp_error_set(err, CP_ERR_INPUT, "%s: %s[%d] is NaN, expected a number; %s",
                                v->path, KEY_SCORES, i, HINT);
        pieces[i] = (cp_sp_piece){.text = text.data, .len = (uint32_t)text.len,
                                  .score = (float)score, .type = (cp_sp_piece_type)type};
        *has_bytes |= type == TOKEN_BYTE;
    }
    return CP_OK;
}

/* Reads the special token ids and checks that unknown_token_id, when
 * given, names the one piece of type unknown. */
static cp_status read_sp_specials(const gguf_vocab *v, const cp_sp_piece *pieces,
                                  cp_sp_vocab *sv, cp_error *err)
{
    int32_t unk;
    cp_status st;
    if ((st = read_token_id(v, KEY_BOS, &sv->bos_id, err)) ||
        (st = read_token_id(v, KEY_EOS, &sv->eos_id, err)) ||
        (st = read_token_id(v, KEY_PAD, &sv->pad_id, err)) ||
        (st = read_token_id(v, KEY_UNK, &unk, err)))
        return st;
    if (unk >= 0 && pieces[unk].type != CP_SP_PIECE_UNKNOWN)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: %s is %d, but %s[%d] is %d, expected 2 (unknown); %s", v->path,
                            KEY_UNK, unk, KEY_TYPES, unk, (int)pieces[unk].type, HINT);
    return CP_OK;
}

static cp_status load_sentencepiece(const gguf_vocab *v, cp_sp_model **out, cp_error *err)
{
    cp_sp_piece *pieces = malloc((size_t)v->n_tokens * sizeof *pieces);
    if (!pieces)
        return cp_error_nomem(err, "the vocabulary", (size_t)v->n_tokens * sizeof *pieces);
    cp_sp_vocab sv = {.n_pieces = v->n_tokens, .pieces = pieces, .pieces_key = KEY_TOKENS,
                      .types_key = KEY_TYPES, .hint = HINT};
    bool has_bytes = false;
    cp_status st = read_pieces(v, pieces, &has_bytes, err);
    if (!st)
        st = read_sp_specials(v, pieces, &sv, err);
    /* llama.cpp's defaults when the keys are absent. */
    if (!st)
        st = read_flag(v->g, KEY_SPACE_PREFIX, true, &sv.add_dummy_prefix, err);
    if (!st)
        st = read_flag(v->g, KEY_REMOVE_SPACES, false, &sv.remove_extra_whitespaces, err);
    sv.byte_fallback = has_bytes;
    if (!st)
        st = cp_sp_build(v->path, &sv, out, err);
    free(pieces);
    return st;
}

/* ---- gpt2: byte-level BPE ---- */

/* A tokenizer.ggml.pre value that bpe.c implements, with the settings that
 * llama.cpp's src/llama-vocab.cpp (2025) gives it. The Llama-3 group ignores
 * merges for whole-token pre-tokens and adds BOS unless add_bos_token is
 * false. */
typedef struct bpe_pre {
    const char *name;
    cp_bpe_pattern pattern;
    bool ignore_merges;
    bool add_bos;
} bpe_pre;

static const bpe_pre BPE_PRES[] = {
    {"gpt-2", CP_BPE_PATTERN_GPT2, false, false},
    {"llama-bpe", CP_BPE_PATTERN_LLAMA3, true, true},
    {"llama3", CP_BPE_PATTERN_LLAMA3, true, true},
    {"llama-v3", CP_BPE_PATTERN_LLAMA3, true, true},
    {"qwen2", CP_BPE_PATTERN_QWEN2, false, false},
};

#define SUPPORTED_PRES "\"gpt-2\", \"llama-bpe\", \"llama3\", \"llama-v3\" or \"qwen2\""

/* Finds tokenizer.ggml.pre in BPE_PRES. */
static cp_status read_bpe_pre(const gguf_vocab *v, const bpe_pre **out, cp_error *err)
{
    cp_gguf_str pre = {"", 0};
    if (cp_gguf_find_kv(v->g, KEY_PRE)) {
        cp_status st = cp_gguf_get_str(v->g, KEY_PRE, &pre, err);
        if (st)
            return st;
    }
    for (size_t i = 0; i < sizeof BPE_PRES / sizeof *BPE_PRES; i++) {
        if (str_is(pre, BPE_PRES[i].name)) {
            *out = &BPE_PRES[i];
            return CP_OK;
        }
    }
    if (pre.len == 0 || str_is(pre, "default"))
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: %s is %s, which in llama.cpp selects its generic BPE "
                            "pre-tokenizer, not GPT-2's; only " SUPPORTED_PRES " are supported "
                            "for %s \"gpt2\"; %s",
                            v->path, KEY_PRE, pre.len ? "\"default\"" : "absent", KEY_MODEL,
                            HINT);
    return cp_error_set(err, CP_ERR_INPUT,
                        "%s: %s is \"%.*s\", expected " SUPPORTED_PRES ", the byte-level BPE "
                        "pre-tokenizers implemented; use the model's tokenizer.json if it has "
                        "one of them",
                        v->path, KEY_PRE, print_len(pre), pre.data);
}

/* Fills tokens (n_tokens entries) from tokens and token_type. */
static cp_status read_bpe_tokens(const gguf_vocab *v, cp_bpe_token *tokens, cp_error *err)
{
    for (int32_t i = 0; i < v->n_tokens; i++) {
        cp_gguf_str text;
        int type;
        cp_status st;
        if ((st = read_token_text(v, i, &text, err)) || (st = read_token_type(v, i, &type, err)))
            return st;
        if (type == TOKEN_UNKNOWN || type == TOKEN_BYTE)
            return cp_error_set(err, CP_ERR_INPUT,
                                "%s: %s[%d] is %d, expected 1 (normal), 3 (control), 4 "
                                "(user-defined) or 5 (unused) in a %s \"gpt2\" vocabulary; %s",
                                v->path, KEY_TYPES, i, type, KEY_MODEL, HINT);
        cp_bpe_token_kind kind = type == TOKEN_CONTROL        ? CP_BPE_TOKEN_CONTROL
                                 : type == TOKEN_USER_DEFINED ? CP_BPE_TOKEN_USER_DEFINED
                                                              : CP_BPE_TOKEN_NORMAL;
        tokens[i] = (cp_bpe_token){.text = text.data, .len = (uint32_t)text.len, .kind = kind};
    }
    return CP_OK;
}

/* Finds the merges and fills a malloc'd array of them, which the caller
 * frees (also on error). */
static cp_status read_bpe_merges(const gguf_vocab *v, cp_bpe_vocab *bv, cp_bpe_token **merges,
                                 cp_error *err)
{
    const cp_gguf_kv *kv;
    uint64_t n;
    *merges = NULL;
    cp_status st = cp_gguf_get_array(v->g, KEY_MERGES, CP_GGUF_TYPE_STRING, &kv, &n, err);
    if (st)
        return st;
    if (n > INT32_MAX)
        return cp_error_set(err, CP_ERR_INPUT, "%s: %s has %llu entries, expected at most %d; %s",
                            v->path, KEY_MERGES, (unsigned long long)n, INT32_MAX, HINT);
    *merges = malloc((size_t)(n ? n : 1) * sizeof **merges);
    if (!*merges)
        return cp_error_nomem(err, "the merges", (size_t)n * sizeof **merges);
    for (uint64_t i = 0; i < n; i++) {
        cp_gguf_str s = cp_gguf_array_str(kv, i);
        if (s.len > UINT32_MAX)
            return cp_error_set(err, CP_ERR_INPUT, "%s: %s[%llu] has %llu bytes, expected under "
                                "4 GiB; %s", v->path, KEY_MERGES, (unsigned long long)i,
                                (unsigned long long)s.len, HINT);
        (*merges)[i] = (cp_bpe_token){.text = s.data, .len = (uint32_t)s.len};
    }
    bv->n_merges = (int32_t)n;
    bv->merges = *merges;
    return CP_OK;
}

/* Sets bv's BOS from add_bos_token (pre's default when absent) and
 * bos_token_id. A requested BOS without bos_token_id is CP_ERR_INPUT. */
static cp_status read_bpe_bos(const gguf_vocab *v, const bpe_pre *pre, cp_bpe_vocab *bv,
                              cp_error *err)
{
    cp_status st = read_flag(v->g, KEY_ADD_BOS, pre->add_bos, &bv->add_bos, err);
    if (!st)
        st = read_token_id(v, KEY_BOS, &bv->bos_id, err);
    if (!st && bv->add_bos && bv->bos_id < 0)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: %s is missing, but BOS is requested by %s or, without that "
                            "key, by %s \"%s\"; %s",
                            v->path, KEY_BOS, KEY_ADD_BOS, KEY_PRE, pre->name, HINT);
    return st;
}

static cp_status load_bpe(const gguf_vocab *v, cp_bpe_model **out, cp_error *err)
{
    const bpe_pre *pre = NULL;
    cp_status st = read_bpe_pre(v, &pre, err);
    if (st)
        return st;
    cp_bpe_token *tokens = malloc((size_t)v->n_tokens * sizeof *tokens);
    if (!tokens)
        return cp_error_nomem(err, "the vocabulary", (size_t)v->n_tokens * sizeof *tokens);
    cp_bpe_token *merges = NULL;
    cp_bpe_vocab bv = {.n_tokens = v->n_tokens, .tokens = tokens, .tokens_key = KEY_TOKENS,
                       .merges_key = KEY_MERGES, .hint = HINT, .pattern = pre->pattern,
                       .ignore_merges = pre->ignore_merges};
    int32_t unused;
    st = read_bpe_tokens(v, tokens, err);
    if (!st)
        st = read_bpe_merges(v, &bv, &merges, err);
    /* Unknown and padding are checked but unused: byte-level BPE has no
     * unknown token. */
    if (!st)
        st = read_token_id(v, KEY_EOS, &bv.eos_id, err);
    if (!st)
        st = read_bpe_bos(v, pre, &bv, err);
    if (!st)
        st = read_token_id(v, KEY_UNK, &unused, err);
    if (!st)
        st = read_token_id(v, KEY_PAD, &unused, err);
    if (!st)
        st = cp_bpe_build(v->path, &bv, out, err);
    free(merges);
    free(tokens);
    return st;
}

/* ---- entry points ---- */

/* Reads tokenizer.ggml.model and rejects kinds other than llama and gpt2.
 * Sets *is_llama. */
static cp_status read_model_kind(const cp_gguf *g, const char *path, bool *is_llama,
                                 cp_error *err)
{
    cp_gguf_str model;
    cp_status st = cp_gguf_get_str(g, KEY_MODEL, &model, err);
    if (st)
        return st;
    *is_llama = str_is(model, "llama");
    if (*is_llama || str_is(model, "gpt2"))
        return CP_OK;
    return cp_error_set(err, CP_ERR_INPUT,
                        "%s: %s is \"%.*s\", expected \"llama\" (SentencePiece) or \"gpt2\" "
                        "(byte-level BPE), the kinds cpeft reads from GGUF; pass the model's "
                        "tokenizer.model or tokenizer.json instead",
                        path, KEY_MODEL, print_len(model), model.data);
}

/* Rejects a pre-tokenizer on a SentencePiece vocabulary other than
 * llama.cpp's "default", which SentencePiece ignores. */
static cp_status check_sp_pre(const cp_gguf *g, const char *path, cp_error *err)
{
    if (!cp_gguf_find_kv(g, KEY_PRE))
        return CP_OK;
    cp_gguf_str pre;
    cp_status st = cp_gguf_get_str(g, KEY_PRE, &pre, err);
    if (st || str_is(pre, "default"))
        return st;
    return cp_error_set(err, CP_ERR_INPUT,
                        "%s: %s is \"%.*s\", expected \"default\" for %s \"llama\", since "
                        "SentencePiece has no pre-tokenizer; %s",
                        path, KEY_PRE, print_len(pre), pre.data, KEY_MODEL, HINT);
}

cp_status cp_tokenizer_gguf_load(const char *path, cp_sp_model **sp, cp_bpe_model **bpe,
                                 cp_error *err)
{
    *sp = NULL;
    *bpe = NULL;
    cp_gguf *g = NULL;
    cp_status st = cp_gguf_open(path, &g, err);
    if (st)
        return st;

    gguf_vocab v = {.path = path, .g = g};
    bool is_llama = false, add_eos;
    st = read_model_kind(g, path, &is_llama, err);
    if (!st && is_llama)
        st = check_sp_pre(g, path, err);
    if (!st)
        st = read_token_arrays(&v, err);
    if (!st)
        st = read_flag(g, KEY_ADD_EOS, false, &add_eos, err);
    if (!st)
        st = is_llama ? load_sentencepiece(&v, sp, err) : load_bpe(&v, bpe, err);
    cp_gguf_close(g);
    return st;
}

cp_status cp_tokenizer_gguf_add_bos(const char *path, const cp_tokenizer *t, int *add_bos,
                                    cp_error *err)
{
    cp_gguf *g = NULL;
    cp_status st = cp_gguf_open(path, &g, err);
    if (st)
        return st;
    bool flag;
    /* Without the key, llama.cpp adds BOS for SentencePiece vocabularies
     * and for the Llama-3 group of BPE ones. Here the default is 1 only when
     * cp_tokenizer_bos_id names a token, and it is -1 for byte-level BPE. */
    st = read_flag(g, KEY_ADD_BOS, cp_tokenizer_bos_id(t) >= 0, &flag, err);
    if (!st)
        *add_bos = flag;
    cp_gguf_close(g);
    return st;
}
