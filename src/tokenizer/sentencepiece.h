/*
 * SentencePiece BPE tokenizer: reads a `tokenizer.model` protobuf file, or
 * builds the model from in-memory arrays (cp_sp_build, used for GGUF
 * vocabularies), and encodes and decodes text the way SentencePiece's BPE
 * model does.
 *
 * Supported: BPE models with the identity normalizer (remove_extra_whitespaces,
 * add_dummy_prefix, escape_whitespaces), byte fallback, USER_DEFINED pieces
 * and UNUSED pieces. Rejected with a message: unigram, word and char models,
 * normalization rules (a non-empty precompiled_charsmap), and
 * treat_whitespace_as_suffix. Invalid UTF-8 is kept byte for byte, which
 * differs from SentencePiece (see cp_sp_encode).
 */
#ifndef CP_SENTENCEPIECE_H
#define CP_SENTENCEPIECE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/error.h"

/* SentencePiece's ModelProto.SentencePiece.Type, numbered as in the file. */
typedef enum cp_sp_piece_type {
    CP_SP_PIECE_NORMAL = 1,
    CP_SP_PIECE_UNKNOWN = 2,
    CP_SP_PIECE_CONTROL = 3,
    CP_SP_PIECE_USER_DEFINED = 4,
    CP_SP_PIECE_UNUSED = 5,
    CP_SP_PIECE_BYTE = 6,
} cp_sp_piece_type;

/* One vocabulary entry, whose id is its index in cp_sp_model.pieces. */
typedef struct cp_sp_piece {
    const char *text; /* NUL-terminated UTF-8, "▁" for a space */
    uint32_t len;     /* bytes in text, without the NUL */
    float score;      /* merge priority: higher merges first */
    cp_sp_piece_type type;
} cp_sp_piece;

/* A loaded model. Callers only read the fields, and the ones from
 * piece_text on are private to sentencepiece.c. */
typedef struct cp_sp_model {
    int32_t n_pieces;
    cp_sp_piece *pieces; /* n_pieces */

    /* unk_id is the one UNKNOWN piece, which every model has. The others are
     * trainer_spec's bos_id, eos_id and pad_id (defaults 1, 2, -1), or -1
     * when that id is not a CONTROL piece, as in SentencePiece. */
    int32_t unk_id;
    int32_t bos_id;
    int32_t eos_id;
    int32_t pad_id;

    bool byte_fallback;            /* unknown characters become <0xNN> pieces */
    bool add_dummy_prefix;         /* a space is put before the text */
    bool remove_extra_whitespaces; /* strip and collapse runs of ' ' */
    bool escape_whitespaces;       /* ' ' is written as U+2581 "▁" */

    char *piece_text;          /* all piece strings, NUL-separated */
    int32_t *table;            /* open-addressing hash: piece text to id, -1 empty */
    uint32_t table_mask;       /* table size - 1 (a power of two) */
    uint32_t max_piece_len;    /* maximum piece length in bytes */
    int32_t byte_ids[256];     /* id of <0xNN>, -1 if absent */
    uint32_t *user_lens;       /* distinct USER_DEFINED piece lengths, longest first */
    uint32_t n_user_lens;      /* 0 if the model has no USER_DEFINED piece */
    uint8_t user_first[32];    /* bit set of the first bytes of USER_DEFINED pieces */
    bool has_unused;           /* some piece is UNUSED */
    uint8_t isolated[16];      /* bit set of the ASCII bytes in no mergeable piece
                                  of 2 or more bytes */
} cp_sp_model;

/* Reads and validates the model file at path. The caller owns *out and
 * releases it with cp_sp_free. Bad files give CP_ERR_INPUT with a message
 * naming the file and the byte offset. */
cp_status cp_sp_load(const char *path, cp_sp_model **out, cp_error *err);

/* Parses a model from memory. name (usually the path) starts every error
 * message. The model copies what it keeps, so data may be freed after. */
cp_status cp_sp_parse(const char *name, const uint8_t *data, size_t size, cp_sp_model **out,
                      cp_error *err);

/* A vocabulary given as arrays, as GGUF files store it. Piece i has id i;
 * its text is copied, so it may be freed after cp_sp_build. */
typedef struct cp_sp_vocab {
    int32_t n_pieces;          /* 1 to 2^24 */
    const cp_sp_piece *pieces; /* n_pieces, type 1 to 6 */
    int32_t bos_id, eos_id, pad_id; /* -1 or a piece id (of any type) */
    bool byte_fallback;
    bool add_dummy_prefix;
    bool remove_extra_whitespaces;

    /* For messages: the name of the piece array and of the type array
     * ("tokenizer.ggml.tokens"), and what the user should do. */
    const char *pieces_key;
    const char *types_key;
    const char *hint;
} cp_sp_vocab;

/* Builds a model from arrays with the checks cp_sp_parse makes on a file's
 * pieces: no empty, repeated or over-long piece, exactly one UNKNOWN piece,
 * valid byte pieces, all 256 of them when byte_fallback is set. A defect is
 * CP_ERR_INPUT with a message that starts with name and points at
 * "pieces_key[id]". Spaces are escaped as "▁". */
cp_status cp_sp_build(const char *name, const cp_sp_vocab *v, cp_sp_model **out, cp_error *err);

void cp_sp_free(cp_sp_model *m);

/* Returns the id of the piece whose text is the len bytes at text, or -1. */
int32_t cp_sp_piece_id(const cp_sp_model *m, const char *text, size_t len);

/* Applies the model's normalizer to len bytes of text: leading, trailing and
 * repeated spaces removed (remove_extra_whitespaces), a space put in front
 * (add_dummy_prefix), spaces written as "▁" (escape_whitespaces). Only ' '
 * (U+0020) counts as a space. *out is malloc'd and NUL-terminated, and the
 * caller frees it. */
cp_status cp_sp_normalize(const cp_sp_model *m, const char *text, size_t len, char **out,
                          size_t *out_len, cp_error *err);

/* Encodes len bytes of text (may contain NUL) into a malloc'd id array owned
 * by the caller, without BOS or EOS. Runs in O(n log n) for n bytes.
 * An invalid UTF-8 byte is one symbol, so with byte fallback it becomes its
 * own <0xNN> piece and decodes back to itself. SentencePiece's normalizer
 * replaces such a byte with U+FFFD first, so its ids differ there. */
cp_status cp_sp_encode(const cp_sp_model *m, const char *text, size_t len, int32_t **ids,
                       size_t *n_ids, cp_error *err);

/* Decodes ids into a malloc'd NUL-terminated string owned by the caller.
 * Byte pieces become raw bytes, even where they do not form valid UTF-8,
 * and "▁" becomes ' ', so a literal "▁" in encoded text comes back as a
 * space. CONTROL and UNKNOWN pieces produce no text (SentencePiece writes
 * " ⁇ " for UNKNOWN). With add_dummy_prefix, the first piece that produces
 * text loses a leading "▁". With remove_extra_whitespaces, every piece loses
 * a leading "▁" until some text has been output. An id outside the
 * vocabulary is CP_ERR_INPUT. */
cp_status cp_sp_decode(const cp_sp_model *m, const int32_t *ids, size_t n_ids, char **text,
                       size_t *len, cp_error *err);

#endif
