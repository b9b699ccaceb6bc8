/*
 * Byte-level BPE tokenizer in the style of GPT-2: reads a Hugging Face
 * `tokenizer.json` (model type BPE), a `vocab.json` + `merges.txt` pair or
 * in-memory arrays (cp_bpe_build, used for GGUF vocabularies), and encodes
 * and decodes text.
 *
 * Supported: the pre-tokenizer patterns of GPT-2, Llama-3 and Qwen2 (see
 * cp_bpe_pattern), merges by rank, ignore_merges, added tokens matched as
 * whole units, and a BOS token named by the post-processor. Rejected with a
 * message: normalizers, other pre-tokenizers and regexes, add_prefix_space,
 * dropout, subword prefixes and suffixes, byte_fallback, and added tokens
 * with lstrip, rstrip or single_word.
 */
#ifndef CP_BPE_H
#define CP_BPE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/error.h"

/* The regex that splits text into pre-tokens before merges. Each is a
 * hand-written matcher in bpe.c that reproduces the regex's matches. */
typedef enum cp_bpe_pattern {
    /* GPT-2: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ */
    CP_BPE_PATTERN_GPT2,
    /* Llama-3: (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
     * ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+ */
    CP_BPE_PATTERN_LLAMA3,
    /* Qwen2: Llama-3's pattern with \p{N} in place of \p{N}{1,3}. */
    CP_BPE_PATTERN_QWEN2,
} cp_bpe_pattern;

/* A loaded model. Callers only read n_tokens, eos_id, bos_id, pattern and
 * ignore_merges; the other fields are private to bpe.c. */
typedef struct cp_bpe_model {
    int32_t n_tokens;
    int32_t eos_id; /* "<|endoftext|>", else "<|end_of_text|>", or -1 if absent */
    /* The token that the file requests before every text (Llama-3's
     * "<|begin_of_text|>"), or -1. cp_bpe_encode never adds it.
     * NOTE: cp_tokenizer_encode does not read it yet, so BOS is never
     * prepended to byte-level BPE text. */
    int32_t bos_id;

    cp_bpe_pattern pattern;
    /* 1: a pre-token that is itself a vocabulary token becomes that token
     * without merges (tokenizer.json's model.ignore_merges, and llama.cpp's
     * rule for Llama-3 vocabularies). */
    uint8_t ignore_merges;

    char *token_bytes;      /* every token's raw bytes, back to back */
    uint32_t *token_offset; /* n_tokens: where each token starts in token_bytes */
    uint32_t *token_len;    /* n_tokens: bytes in each token */
    uint8_t *token_special; /* 1: an added special token, decoded to no text */
    int32_t byte_ids[256];  /* id of the token for one raw byte, -1 if absent */

    int32_t *token_table; /* open-addressing hash: raw bytes to id, -1 empty */
    uint32_t token_mask;  /* token_table size - 1 (a power of two) */

    int32_t n_merges;
    uint64_t *merge_pair;   /* n_merges: left id << 32 | right id, by rank */
    int32_t *merge_result;  /* n_merges: the id of the merged token */
    int32_t *merge_table;   /* open-addressing hash: pair to rank, -1 empty */
    uint32_t merge_mask;    /* merge_table size - 1 */

    int32_t n_added;
    int32_t *added_ids;     /* added tokens, longest text first */
    uint8_t added_first[32]; /* bit set of the first bytes of added tokens */
} cp_bpe_model;

/* Reads a Hugging Face tokenizer.json. The caller owns *out and releases it
 * with cp_bpe_free. Bad or unsupported files give CP_ERR_INPUT with a
 * message naming the file and the JSON key or byte offset. */
cp_status cp_bpe_load_json(const char *path, cp_bpe_model **out, cp_error *err);

/* Reads vocab.json (token to id) and merges.txt (one "left right" pair per
 * line in rank order, after an optional "#version" first line). The token
 * "<|endoftext|>", if present, becomes a special token and the EOS. */
cp_status cp_bpe_load_files(const char *vocab_path, const char *merges_path, cp_bpe_model **out,
                            cp_error *err);

/* How a token of a cp_bpe_vocab is matched and decoded. */
typedef enum cp_bpe_token_kind {
    CP_BPE_TOKEN_NORMAL,       /* vocab-file spelling, reached by merges */
    CP_BPE_TOKEN_CONTROL,      /* raw text matched as a whole, decoded to no text */
    CP_BPE_TOKEN_USER_DEFINED, /* raw text matched as a whole, decoded to itself */
} cp_bpe_token_kind;

/* A string that need not be NUL-terminated. */
typedef struct cp_bpe_token {
    const char *text;
    uint32_t len;
    cp_bpe_token_kind kind; /* unused for merges */
} cp_bpe_token;

/* A vocabulary given as arrays, as GGUF files store it. Token i has id i.
 * Everything is copied, so the arrays may be freed after cp_bpe_build. */
typedef struct cp_bpe_vocab {
    int32_t n_tokens;
    const cp_bpe_token *tokens; /* n_tokens */
    int32_t n_merges;
    const cp_bpe_token *merges; /* n_merges "left right" strings in rank order */
    int32_t eos_id;             /* -1: the token "<|endoftext|>" if present */
    cp_bpe_pattern pattern;
    bool ignore_merges;         /* see cp_bpe_model.ignore_merges */
    bool add_bos;               /* true: bos_id is the model's bos_id */
    int32_t bos_id;             /* a token id, read only when add_bos is set */

    /* For messages: the names of the two arrays ("tokenizer.ggml.tokens")
     * and what the user should do. */
    const char *tokens_key;
    const char *merges_key;
    const char *hint;
} cp_bpe_vocab;

/* Builds a model from arrays with the checks the file loaders make: no
 * empty or repeated token, and every merge names two tokens whose
 * concatenation is a token. A defect is CP_ERR_INPUT with a message that
 * starts with name and points at "tokens_key[i]" or "merges_key[i]". */
cp_status cp_bpe_build(const char *name, const cp_bpe_vocab *v, cp_bpe_model **out,
                       cp_error *err);

void cp_bpe_free(cp_bpe_model *m);

/* Returns the id of the token whose raw bytes are the len bytes at bytes,
 * or -1. Added tokens are found by their text. */
int32_t cp_bpe_token_id(const cp_bpe_model *m, const char *bytes, size_t len);

/* Returns the end of the pre-token of pattern that starts at byte pos of
 * text (pos < len). Invalid UTF-8 bytes count as one punctuation character
 * each. Letters and numbers are the general categories L* and N* of
 * Unicode 14.0; characters added later count as punctuation. */
size_t cp_bpe_pattern_pretoken_end(cp_bpe_pattern pattern, const char *text, size_t len,
                                   size_t pos);

/* cp_bpe_pattern_pretoken_end for GPT-2's pattern. */
size_t cp_bpe_pretoken_end(const char *text, size_t len, size_t pos);

/* Encodes len bytes of text (may contain NUL) into a malloc'd id array owned
 * by the caller. Added tokens are cut out first; the rest is split into
 * pre-tokens by m->pattern and each is merged in O(n log n) for n bytes. A
 * byte with no single-byte token is CP_ERR_INPUT. No BOS is added. */
cp_status cp_bpe_encode(const cp_bpe_model *m, const char *text, size_t len, int32_t **ids,
                        size_t *n_ids, cp_error *err);

/* Decodes ids into a malloc'd NUL-terminated string owned by the caller.
 * Tokens become their raw bytes and special tokens produce no text. An id
 * outside the vocabulary is CP_ERR_INPUT. */
cp_status cp_bpe_decode(const cp_bpe_model *m, const int32_t *ids, size_t n_ids, char **text,
                        size_t *len, cp_error *err);

#endif
