/*
 * SentencePiece BPE: a hand-written reader for the ModelProto protobuf in
 * `tokenizer.model`, the identity normalizer, BPE encoding and decoding.
 *
 * The reader checks every varint, tag and length against the buffer and
 * skips unknown fields of any wire type except the deprecated groups. The
 * encoder follows SentencePiece's bpe_model: merge the adjacent pair that
 * forms the best-scoring piece (leftmost on ties), using a binary heap of
 * candidate pairs and a linked list of symbols, so it runs in O(n log n).
 * Unigram models and normalization rules are rejected, not implemented.
 */
#include "tokenizer/sentencepiece.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/file.h"

/* SentencePiece rejects pieces of this many bytes or more. The limit also
 * bounds the stack used to split UNUSED pieces. */
#define MAX_PIECE_BYTES 8000

/* A sanity limit far above real vocabularies (Llama 2 has 32,000 pieces),
 * so that ids and hash table sizes cannot overflow. */
#define MAX_PIECES (1 << 24)

/* U+2581 LOWER ONE EIGHTH BLOCK, which stands for a space inside pieces. */
static const char SPACE_SYMBOL[] = "\xe2\x96\x81";
#define SPACE_SYMBOL_LEN 3

static const char NOT_A_MODEL[] = "the file is not a SentencePiece model (re-download it)";

/* ---------------------------------------------------------------------- */
/* Protobuf wire format                                                   */
/* ---------------------------------------------------------------------- */

enum {
    WIRE_VARINT = 0,
    WIRE_I64 = 1,
    WIRE_LEN = 2,
    WIRE_GROUP_START = 3,
    WIRE_GROUP_END = 4,
    WIRE_I32 = 5,
};

/* A cursor over one message. pos and end are offsets into the whole file, so
 * every error names the absolute byte offset. */
typedef struct pb_reader {
    const char *name; /* file name that starts every message */
    const uint8_t *data;
    size_t pos, end;
    char where[48]; /* "piece 17", "trainer_spec", ... */
    cp_error *err;
} pb_reader;

/* Fills err with "name: byte N: <what> in <where>; <NOT_A_MODEL>". */
static cp_status pb_fail(const pb_reader *r, size_t offset, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static cp_status pb_fail(const pb_reader *r, size_t offset, const char *fmt, ...)
{
    char what[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    return cp_error_set(r->err, CP_ERR_INPUT, "%s: byte %zu: %s in %s; %s", r->name, offset, what,
                        r->where, NOT_A_MODEL);
}

static pb_reader pb_sub(const pb_reader *parent, size_t start, size_t len, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Returns a reader for the len bytes at start, labelled for messages. */
static pb_reader pb_sub(const pb_reader *parent, size_t start, size_t len, const char *fmt, ...)
{
    pb_reader r = *parent;
    r.pos = start;
    r.end = start + len;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r.where, sizeof r.where, fmt, ap);
    va_end(ap);
    return r;
}

/* Reads a base-128 varint of at most 10 bytes (enough for 64 bits). */
static cp_status pb_read_varint(pb_reader *r, uint64_t *out)
{
    size_t start = r->pos;
    uint64_t v = 0;
    for (int i = 0; i < 10; i++) {
        if (r->pos >= r->end)
            return pb_fail(r, start, "truncated varint");
        uint8_t b = r->data[r->pos++];
        v |= (uint64_t)(b & 0x7f) << (7 * i);
        if (!(b & 0x80)) {
            *out = v;
            return CP_OK;
        }
    }
    return pb_fail(r, start, "varint longer than 10 bytes");
}

/* Reads a field tag and stores its offset in *tag_offset. */
static cp_status pb_read_tag(pb_reader *r, uint32_t *field, int *wire, size_t *tag_offset)
{
    *tag_offset = r->pos;
    uint64_t key;
    cp_status st = pb_read_varint(r, &key);
    if (st)
        return st;
    if ((key >> 3) == 0 || (key >> 3) > 0x1fffffff)
        return pb_fail(r, *tag_offset, "invalid field number %llu", (unsigned long long)(key >> 3));
    *field = (uint32_t)(key >> 3);
    *wire = (int)(key & 7);
    return CP_OK;
}

/* Reads the length of a length-delimited field, checks that the field fits
 * in the message and stores the offset of its first byte in *start. label
 * names the field in messages ("piece 17"), or is NULL for "field N". */
static cp_status pb_read_len(pb_reader *r, uint32_t field, const char *label, size_t *start,
                             size_t *len)
{
    size_t len_offset = r->pos;
    uint64_t n;
    cp_status st = pb_read_varint(r, &n);
    if (st)
        return st;
    if (n > r->end - r->pos) {
        char name[64];
        if (label)
            snprintf(name, sizeof name, "%s (field %u)", label, field);
        else
            snprintf(name, sizeof name, "field %u", field);
        return pb_fail(r, len_offset, "%s has length %llu but only %zu bytes are left", name,
                       (unsigned long long)n, r->end - r->pos);
    }
    *start = r->pos;
    *len = (size_t)n;
    r->pos += (size_t)n;
    return CP_OK;
}

/* Reads a 4-byte little-endian float (wire type I32). */
static cp_status pb_read_float(pb_reader *r, float *out)
{
    if (r->end - r->pos < 4)
        return pb_fail(r, r->pos, "truncated 4-byte field");
    uint32_t bits = (uint32_t)r->data[r->pos] | (uint32_t)r->data[r->pos + 1] << 8 |
                    (uint32_t)r->data[r->pos + 2] << 16 | (uint32_t)r->data[r->pos + 3] << 24;
    memcpy(out, &bits, sizeof *out);
    r->pos += 4;
    return CP_OK;
}

/* Skips the value of a field that this reader does not use. */
static cp_status pb_skip(pb_reader *r, uint32_t field, int wire, size_t tag_offset)
{
    uint64_t v;
    size_t start, len;
    switch (wire) {
    case WIRE_VARINT:
        return pb_read_varint(r, &v);
    case WIRE_I64:
        if (r->end - r->pos < 8)
            return pb_fail(r, r->pos, "truncated 8-byte field %u", field);
        r->pos += 8;
        return CP_OK;
    case WIRE_LEN:
        return pb_read_len(r, field, NULL, &start, &len);
    case WIRE_I32:
        if (r->end - r->pos < 4)
            return pb_fail(r, r->pos, "truncated 4-byte field %u", field);
        r->pos += 4;
        return CP_OK;
    case WIRE_GROUP_START:
    case WIRE_GROUP_END:
        return pb_fail(r, tag_offset, "field %u uses the deprecated group encoding", field);
    default:
        return pb_fail(r, tag_offset, "invalid wire type %d for field %u", wire, field);
    }
}

/* Checks that a known field arrived with the wire type its schema gives. */
static cp_status pb_expect_wire(const pb_reader *r, uint32_t field, int wire, int expected,
                                size_t tag_offset)
{
    if (wire == expected)
        return CP_OK;
    return pb_fail(r, tag_offset, "field %u has wire type %d, expected %d", field, wire, expected);
}

/* Reads a varint field after checking its wire type. */
static cp_status pb_read_varint_field(pb_reader *r, uint32_t field, int wire, size_t tag_offset,
                                      uint64_t *out)
{
    cp_status st = pb_expect_wire(r, field, wire, WIRE_VARINT, tag_offset);
    return st ? st : pb_read_varint(r, out);
}

/* ---------------------------------------------------------------------- */
/* ModelProto                                                             */
/* ---------------------------------------------------------------------- */

enum { MODEL_TYPE_UNIGRAM = 1, MODEL_TYPE_BPE = 2, MODEL_TYPE_WORD = 3, MODEL_TYPE_CHAR = 4 };

/* What the parse collects before the model is validated and built. */
typedef struct model_builder {
    cp_sp_model *m;
    int32_t cap;              /* allocated entries in m->pieces */
    size_t *piece_offset;     /* byte offset of each piece message; NULL for arrays */
    size_t piece_text_bytes;  /* sum of piece lengths + NULs */

    /* Message positions for a vocabulary built from arrays (cp_sp_build):
     * the key of the piece texts and of the piece types. NULL for a file. */
    const char *pieces_key;
    const char *types_key;
    const char *hint; /* what to do, at the end of every vocabulary message */

    /* TrainerSpec, with SentencePiece's defaults */
    uint64_t model_type;
    bool has_model_type;
    size_t model_type_offset;
    bool treat_whitespace_as_suffix;
    int32_t bos_id, eos_id, pad_id;
    size_t trainer_offset;

    /* NormalizerSpec and the optional denormalizer_spec */
    const uint8_t *normalizer_name;
    size_t normalizer_name_len;
    size_t charsmap_len, charsmap_offset;
    size_t denormalizer_charsmap_len, denormalizer_offset;
} model_builder;

/* Appends a piece slot, growing the arrays. Returns NULL when out of memory. */
static cp_sp_piece *builder_add_piece(model_builder *b, size_t offset)
{
    cp_sp_model *m = b->m;
    if (m->n_pieces == b->cap) {
        int32_t cap = b->cap ? b->cap * 2 : 1024;
        cp_sp_piece *pieces = realloc(m->pieces, (size_t)cap * sizeof *pieces);
        if (!pieces)
            return NULL;
        m->pieces = pieces;
        size_t *offsets = realloc(b->piece_offset, (size_t)cap * sizeof *offsets);
        if (!offsets)
            return NULL;
        b->piece_offset = offsets;
        b->cap = cap;
    }
    b->piece_offset[m->n_pieces] = offset;
    cp_sp_piece *p = &m->pieces[m->n_pieces++];
    p->text = NULL;
    p->len = 0;
    p->score = 0.0f;
    p->type = CP_SP_PIECE_NORMAL;
    return p;
}

/* Parses one SentencePiece message: piece (1), score (2), type (3). The text
 * still points into the file until copy_piece_text copies it. */
static cp_status parse_piece(pb_reader *r, cp_sp_piece *p)
{
    while (r->pos < r->end) {
        uint32_t field;
        int wire;
        size_t tag_offset, start, len;
        uint64_t v;
        cp_status st = pb_read_tag(r, &field, &wire, &tag_offset);
        if (st)
            return st;
        switch (field) {
        case 1:
            if ((st = pb_expect_wire(r, field, wire, WIRE_LEN, tag_offset)) ||
                (st = pb_read_len(r, field, "piece text", &start, &len)))
                return st;
            if (len >= MAX_PIECE_BYTES)
                return pb_fail(r, start, "piece text of %zu bytes is too long (the maximum is %d)",
                               len, MAX_PIECE_BYTES - 1);
            p->text = (const char *)r->data + start;
            p->len = (uint32_t)len;
            break;
        case 2:
            if ((st = pb_expect_wire(r, field, wire, WIRE_I32, tag_offset)) ||
                (st = pb_read_float(r, &p->score)))
                return st;
            break;
        case 3:
            if ((st = pb_read_varint_field(r, field, wire, tag_offset, &v)))
                return st;
            if (v < CP_SP_PIECE_NORMAL || v > CP_SP_PIECE_BYTE)
                return pb_fail(r, tag_offset, "invalid piece type %llu (expected 1 to 6)",
                               (unsigned long long)v);
            p->type = (cp_sp_piece_type)v;
            break;
        default:
            if ((st = pb_skip(r, field, wire, tag_offset)))
                return st;
        }
    }
    return CP_OK;
}

/* Reads an int32 varint field. Negative values arrive sign-extended to 64 bits. */
static cp_status read_int32_field(pb_reader *r, uint32_t field, int wire, size_t tag_offset,
                                  int32_t *out)
{
    uint64_t v;
    cp_status st = pb_read_varint_field(r, field, wire, tag_offset, &v);
    if (!st)
        *out = (int32_t)(uint32_t)v;
    return st;
}

/* Parses the TrainerSpec fields that change encoding or name special pieces. */
static cp_status parse_trainer_spec(pb_reader *r, model_builder *b)
{
    b->trainer_offset = r->pos;
    while (r->pos < r->end) {
        uint32_t field;
        int wire;
        size_t tag_offset;
        uint64_t v;
        cp_status st = pb_read_tag(r, &field, &wire, &tag_offset);
        if (st)
            return st;
        switch (field) {
        case 3: /* model_type */
            if ((st = pb_read_varint_field(r, field, wire, tag_offset, &b->model_type)))
                return st;
            b->has_model_type = true;
            b->model_type_offset = tag_offset;
            break;
        case 24: /* treat_whitespace_as_suffix */
            if ((st = pb_read_varint_field(r, field, wire, tag_offset, &v)))
                return st;
            b->treat_whitespace_as_suffix = v != 0;
            break;
        case 35: /* byte_fallback */
            if ((st = pb_read_varint_field(r, field, wire, tag_offset, &v)))
                return st;
            b->m->byte_fallback = v != 0;
            break;
        case 41:
            st = read_int32_field(r, field, wire, tag_offset, &b->bos_id);
            break;
        case 42:
            st = read_int32_field(r, field, wire, tag_offset, &b->eos_id);
            break;
        case 43:
            st = read_int32_field(r, field, wire, tag_offset, &b->pad_id);
            break;
        default:
            st = pb_skip(r, field, wire, tag_offset);
        }
        if (st)
            return st;
    }
    return CP_OK;
}

/* Parses a NormalizerSpec. For the normalizer it stores the name, the rule
 * size and the flags, but for the denormalizer only the rule size matters. */
static cp_status parse_normalizer_spec(pb_reader *r, model_builder *b, bool is_denormalizer)
{
    while (r->pos < r->end) {
        uint32_t field;
        int wire;
        size_t tag_offset, start, len;
        uint64_t v;
        cp_status st = pb_read_tag(r, &field, &wire, &tag_offset);
        if (st)
            return st;
        if (field == 1 || field == 2) {
            if ((st = pb_expect_wire(r, field, wire, WIRE_LEN, tag_offset)) ||
                (st = pb_read_len(r, field, field == 1 ? "name" : "precompiled_charsmap", &start,
                                  &len)))
                return st;
            if (field == 1 && !is_denormalizer) {
                b->normalizer_name = r->data + start;
                b->normalizer_name_len = len;
            } else if (field == 2 && !is_denormalizer) {
                b->charsmap_len = len;
                b->charsmap_offset = start;
            } else if (field == 2) {
                b->denormalizer_charsmap_len = len;
                b->denormalizer_offset = start;
            }
        } else if (field >= 3 && field <= 5) {
            if ((st = pb_read_varint_field(r, field, wire, tag_offset, &v)))
                return st;
            if (is_denormalizer)
                continue;
            if (field == 3)
                b->m->add_dummy_prefix = v != 0;
            else if (field == 4)
                b->m->remove_extra_whitespaces = v != 0;
            else
                b->m->escape_whitespaces = v != 0;
        } else if ((st = pb_skip(r, field, wire, tag_offset))) {
            return st;
        }
    }
    return CP_OK;
}

/* Returns the name of a top-level ModelProto field for messages. */
static void model_field_label(uint32_t field, int32_t n_pieces, char *label, size_t size)
{
    if (field == 1)
        snprintf(label, size, "piece %d", n_pieces);
    else
        snprintf(label, size, "%s", field == 2   ? "trainer_spec"
                                    : field == 3 ? "normalizer_spec"
                                                 : "denormalizer_spec");
}

/* Parses the top-level ModelProto: pieces (1), trainer_spec (2),
 * normalizer_spec (3) and denormalizer_spec (5), and skips the rest. */
static cp_status parse_model_proto(pb_reader *r, model_builder *b)
{
    while (r->pos < r->end) {
        uint32_t field;
        int wire;
        size_t tag_offset, start, len;
        cp_status st = pb_read_tag(r, &field, &wire, &tag_offset);
        if (st)
            return st;
        if (field < 1 || field > 5 || field == 4) {
            if ((st = pb_skip(r, field, wire, tag_offset)))
                return st;
            continue;
        }

        char label[32];
        model_field_label(field, b->m->n_pieces, label, sizeof label);
        if ((st = pb_expect_wire(r, field, wire, WIRE_LEN, tag_offset)) ||
            (st = pb_read_len(r, field, label, &start, &len)))
            return st;
        pb_reader sub = pb_sub(r, start, len, "%s", label);

        if (field == 1) {
            if (b->m->n_pieces == MAX_PIECES)
                return pb_fail(r, tag_offset, "more than %d pieces", MAX_PIECES);
            cp_sp_piece *p = builder_add_piece(b, tag_offset);
            if (!p)
                return cp_error_nomem(r->err, "the SentencePiece vocabulary", (size_t)b->cap * 2);
            st = parse_piece(&sub, p);
            b->piece_text_bytes += p->len + 1;
        } else if (field == 2) {
            st = parse_trainer_spec(&sub, b);
        } else {
            st = parse_normalizer_spec(&sub, b, field == 5);
        }
        if (st)
            return st;
    }
    return CP_OK;
}

/* ---------------------------------------------------------------------- */
/* Piece lookup                                                           */
/* ---------------------------------------------------------------------- */

/* FNV-1a, 32 bits: short keys, no alignment needs. */
static uint32_t hash_bytes(const char *s, size_t len)
{
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < len; i++) {
        h ^= (uint8_t)s[i];
        h *= 16777619u;
    }
    return h;
}

int32_t cp_sp_piece_id(const cp_sp_model *m, const char *text, size_t len)
{
    if (len == 0 || len > m->max_piece_len)
        return -1;
    uint32_t i = hash_bytes(text, len) & m->table_mask;
    for (;; i = (i + 1) & m->table_mask) {
        int32_t id = m->table[i];
        if (id < 0)
            return -1;
        const cp_sp_piece *p = &m->pieces[id];
        if (p->len == len && memcmp(p->text, text, len) == 0)
            return id;
    }
}

/* Inserts piece id and returns -1, or returns the id already stored under
 * the same text. */
static int32_t table_insert(cp_sp_model *m, int32_t id)
{
    const cp_sp_piece *p = &m->pieces[id];
    uint32_t i = hash_bytes(p->text, p->len) & m->table_mask;
    for (;; i = (i + 1) & m->table_mask) {
        int32_t other = m->table[i];
        if (other < 0) {
            m->table[i] = id;
            return -1;
        }
        const cp_sp_piece *q = &m->pieces[other];
        if (q->len == p->len && memcmp(q->text, p->text, p->len) == 0)
            return other;
    }
}

/* Returns the byte that a "<0xNN>" piece stands for, or -1. SentencePiece
 * writes these with two upper-case hex digits. */
static int byte_piece_value(const char *text, uint32_t len)
{
    if (len != 6 || memcmp(text, "<0x", 3) != 0 || text[5] != '>')
        return -1;
    int v = 0;
    for (int i = 3; i < 5; i++) {
        char c = text[i];
        if (c >= '0' && c <= '9')
            v = v * 16 + (c - '0');
        else if (c >= 'A' && c <= 'F')
            v = v * 16 + (c - 'A' + 10);
        else
            return -1;
    }
    return v;
}

/* ---------------------------------------------------------------------- */
/* Building and validating the model                                      */
/* ---------------------------------------------------------------------- */

/* Fills err for a file that parses but that this code cannot use. */
static cp_status model_fail(cp_error *err, const char *name, size_t offset, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static cp_status model_fail(cp_error *err, const char *name, size_t offset, const char *fmt, ...)
{
    char what[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    return cp_error_set(err, CP_ERR_INPUT, "%s: byte %zu: %s", name, offset, what);
}

/* Rejects model types, normalization rules and options that are not implemented. */
static cp_status check_supported(const model_builder *b, const char *name, cp_error *err)
{
    if (b->model_type < MODEL_TYPE_UNIGRAM || b->model_type > MODEL_TYPE_CHAR)
        return model_fail(err, name, b->model_type_offset,
                          "trainer_spec.model_type is %llu, which is not a SentencePiece model "
                          "type (1 to 4); %s",
                          (unsigned long long)b->model_type, NOT_A_MODEL);
    if (b->model_type != MODEL_TYPE_BPE) {
        const char *kind = b->model_type == MODEL_TYPE_UNIGRAM ? "unigram"
                           : b->model_type == MODEL_TYPE_WORD  ? "word"
                                                               : "char";
        if (!b->has_model_type)
            return model_fail(err, name, b->trainer_offset,
                              "trainer_spec.model_type is absent, which means unigram; unigram "
                              "models are not supported yet, only BPE (2)");
        return model_fail(err, name, b->model_type_offset,
                          "trainer_spec.model_type is %llu (%s); %s models are not supported "
                          "yet, only BPE (2)",
                          (unsigned long long)b->model_type, kind, kind);
    }
    if (b->charsmap_len > 0)
        return model_fail(err, name, b->charsmap_offset,
                          "normalizer_spec \"%.*s\" has a %zu-byte precompiled_charsmap; "
                          "normalization rules are not supported, only the identity normalizer",
                          (int)b->normalizer_name_len, (const char *)b->normalizer_name,
                          b->charsmap_len);
    if (b->denormalizer_charsmap_len > 0)
        return model_fail(err, name, b->denormalizer_offset,
                          "denormalizer_spec has a %zu-byte precompiled_charsmap; "
                          "denormalization rules are not supported",
                          b->denormalizer_charsmap_len);
    if (b->treat_whitespace_as_suffix)
        return model_fail(err, name, b->trainer_offset,
                          "trainer_spec.treat_whitespace_as_suffix is set; models that put "
                          "\"▁\" after words are not supported");
    return CP_OK;
}

/* Fills err as "name: <where piece id is>: <what>; <hint>". The place is a
 * byte offset in a .model file, or "key[id]" for arrays. */
static cp_status piece_fail(const model_builder *b, const char *name, int32_t id, cp_error *err,
                            const char *fmt, ...) __attribute__((format(printf, 5, 6)));

static cp_status piece_fail(const model_builder *b, const char *name, int32_t id, cp_error *err,
                            const char *fmt, ...)
{
    char what[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    if (b->pieces_key)
        return cp_error_set(err, CP_ERR_INPUT, "%s: %s[%d]: %s; %s", name, b->pieces_key, id,
                            what, b->hint);
    return cp_error_set(err, CP_ERR_INPUT, "%s: byte %zu: %s; %s", name, b->piece_offset[id],
                        what, b->hint);
}

/* Like piece_fail for a defect of the vocabulary as a whole, which a .model
 * file reports at byte 0 and arrays at the key of the piece types. */
static cp_status vocab_fail(const model_builder *b, const char *name, cp_error *err,
                            const char *fmt, ...) __attribute__((format(printf, 4, 5)));

static cp_status vocab_fail(const model_builder *b, const char *name, cp_error *err,
                            const char *fmt, ...)
{
    char what[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    if (b->types_key)
        return cp_error_set(err, CP_ERR_INPUT, "%s: %s: %s; %s", name, b->types_key, what,
                            b->hint);
    return cp_error_set(err, CP_ERR_INPUT, "%s: byte 0: %s; %s", name, what, b->hint);
}

/* Copies piece texts out of the file into one NUL-separated block. */
static cp_status copy_piece_text(model_builder *b, cp_error *err)
{
    cp_sp_model *m = b->m;
    m->piece_text = malloc(b->piece_text_bytes ? b->piece_text_bytes : 1);
    if (!m->piece_text)
        return cp_error_nomem(err, "SentencePiece piece text", b->piece_text_bytes);
    char *dst = m->piece_text;
    for (int32_t i = 0; i < m->n_pieces; i++) {
        cp_sp_piece *p = &m->pieces[i];
        if (p->len)
            memcpy(dst, p->text, p->len);
        dst[p->len] = '\0';
        p->text = dst;
        dst += p->len + 1;
    }
    return CP_OK;
}

/* Checks one piece on its own: not empty, no NUL, a valid byte piece. */
static cp_status check_piece(const model_builder *b, const char *name, int32_t id, cp_error *err)
{
    const cp_sp_piece *p = &b->m->pieces[id];
    if (p->len == 0)
        return piece_fail(b, name, id, err, "piece %d is empty", id);
    if (p->len >= MAX_PIECE_BYTES)
        return piece_fail(b, name, id, err, "piece %d has %u bytes, expected at most %d", id,
                          p->len, MAX_PIECE_BYTES - 1);
    if (memchr(p->text, '\0', p->len))
        return piece_fail(b, name, id, err, "piece %d contains a NUL byte", id);
    if (p->type == CP_SP_PIECE_BYTE) {
        if (!b->m->byte_fallback)
            return piece_fail(b, name, id, err,
                              "piece %d \"%s\" is a byte piece but trainer_spec.byte_fallback "
                              "is off", id, p->text);
        if (byte_piece_value(p->text, p->len) < 0)
            return piece_fail(b, name, id, err,
                              "byte piece %d is \"%s\", expected <0x00> to <0xFF>", id,
                              p->text);
    }
    return CP_OK;
}

/* Marks the ASCII bytes that occur in no mergeable piece of two or more
 * bytes. Encoding splits the text at these bytes (see segment_len). */
static void mark_isolated_bytes(cp_sp_model *m)
{
    memset(m->isolated, 0xff, sizeof m->isolated);
    for (int32_t id = 0; id < m->n_pieces; id++) {
        const cp_sp_piece *p = &m->pieces[id];
        if (p->len < 2 || (p->type != CP_SP_PIECE_NORMAL && p->type != CP_SP_PIECE_USER_DEFINED &&
                           p->type != CP_SP_PIECE_UNUSED))
            continue;
        for (uint32_t i = 0; i < p->len; i++) {
            uint8_t c = (uint8_t)p->text[i];
            if (c < 128)
                m->isolated[c >> 3] &= (uint8_t)~(1u << (c & 7));
        }
    }
}

/* Orders uint32_t values from largest to smallest, for qsort. */
static int compare_desc(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    if (x == y)
        return 0;
    return x < y ? 1 : -1;
}

/* Collects the distinct lengths of USER_DEFINED pieces, longest first, so
 * that matching them costs one lookup per length rather than per byte. */
static cp_status collect_user_lengths(cp_sp_model *m, cp_error *err)
{
    uint32_t n = 0;
    for (int32_t id = 0; id < m->n_pieces; id++)
        n += m->pieces[id].type == CP_SP_PIECE_USER_DEFINED;
    if (n == 0)
        return CP_OK;
    m->user_lens = malloc(n * sizeof *m->user_lens);
    if (!m->user_lens)
        return cp_error_nomem(err, "USER_DEFINED piece lengths", n * sizeof *m->user_lens);
    n = 0;
    for (int32_t id = 0; id < m->n_pieces; id++)
        if (m->pieces[id].type == CP_SP_PIECE_USER_DEFINED)
            m->user_lens[n++] = m->pieces[id].len;
    qsort(m->user_lens, n, sizeof *m->user_lens, compare_desc);

    uint32_t distinct = 0;
    for (uint32_t i = 0; i < n; i++)
        if (distinct == 0 || m->user_lens[distinct - 1] != m->user_lens[i])
            m->user_lens[distinct++] = m->user_lens[i];
    m->n_user_lens = distinct;
    return CP_OK;
}

/* Fills the hash table and the per-type facts, and checks the vocabulary as
 * a whole: unique texts, one UNKNOWN piece, all 256 byte pieces if needed. */
static cp_status index_pieces(model_builder *b, const char *name, cp_error *err)
{
    cp_sp_model *m = b->m;
    uint32_t size = 64;
    while (size < 2u * (uint32_t)m->n_pieces)
        size *= 2;
    m->table = malloc((size_t)size * sizeof *m->table);
    if (!m->table)
        return cp_error_nomem(err, "SentencePiece piece table", (size_t)size * sizeof *m->table);
    memset(m->table, 0xff, (size_t)size * sizeof *m->table);
    m->table_mask = size - 1;
    m->unk_id = -1;

    for (int32_t id = 0; id < m->n_pieces; id++) {
        const cp_sp_piece *p = &m->pieces[id];
        cp_status st = check_piece(b, name, id, err);
        if (st)
            return st;
        if (p->len > m->max_piece_len)
            m->max_piece_len = p->len;
        int32_t other = table_insert(m, id);
        if (other >= 0)
            return piece_fail(b, name, id, err, "piece %d \"%s\" repeats piece %d", id,
                              p->text, other);

        if (p->type == CP_SP_PIECE_UNKNOWN) {
            if (m->unk_id >= 0)
                return piece_fail(b, name, id, err,
                                  "piece %d is a second UNKNOWN piece (piece %d is the first)",
                                  id, m->unk_id);
            m->unk_id = id;
        } else if (p->type == CP_SP_PIECE_BYTE) {
            m->byte_ids[byte_piece_value(p->text, p->len)] = id;
        } else if (p->type == CP_SP_PIECE_USER_DEFINED) {
            uint8_t first = (uint8_t)p->text[0];
            m->user_first[first >> 3] |= (uint8_t)(1u << (first & 7));
        } else if (p->type == CP_SP_PIECE_UNUSED) {
            m->has_unused = true;
        }
    }

    mark_isolated_bytes(m);
    cp_status st = collect_user_lengths(m, err);
    if (st)
        return st;
    if (m->unk_id < 0)
        return vocab_fail(b, name, err, "no piece has type UNKNOWN (2)");
    for (int byte = 0; m->byte_fallback && byte < 256; byte++)
        if (m->byte_ids[byte] < 0)
            return vocab_fail(b, name, err,
                              "trainer_spec.byte_fallback is on but piece <0x%02X> is missing",
                              byte);
    return CP_OK;
}

/* Returns id when it names a CONTROL piece, else -1, the way SentencePiece
 * reports BOS, EOS and padding only when they are control symbols. */
static int32_t control_id_or_none(const cp_sp_model *m, int32_t id)
{
    if (id < 0 || id >= m->n_pieces || m->pieces[id].type != CP_SP_PIECE_CONTROL)
        return -1;
    return id;
}

/* Validates the parsed fields and builds the lookup tables. */
static cp_status model_build(model_builder *b, const char *name, cp_error *err)
{
    cp_sp_model *m = b->m;
    if (m->n_pieces == 0)
        return model_fail(err, name, 0, "the file has no vocabulary pieces; %s", NOT_A_MODEL);

    cp_status st = check_supported(b, name, err);
    if (!st)
        st = copy_piece_text(b, err);
    if (!st)
        st = index_pieces(b, name, err);
    if (st)
        return st;

    m->bos_id = control_id_or_none(m, b->bos_id);
    m->eos_id = control_id_or_none(m, b->eos_id);
    m->pad_id = control_id_or_none(m, b->pad_id);
    return CP_OK;
}

cp_status cp_sp_build(const char *name, const cp_sp_vocab *v, cp_sp_model **out, cp_error *err)
{
    *out = NULL;
    CP_ASSERT(v->n_pieces > 0 && v->n_pieces <= MAX_PIECES);
    cp_sp_model *m = calloc(1, sizeof *m);
    if (m)
        m->pieces = malloc((size_t)v->n_pieces * sizeof *m->pieces);
    if (!m || !m->pieces) {
        free(m);
        return cp_error_nomem(err, "a SentencePiece vocabulary",
                              (size_t)v->n_pieces * sizeof *m->pieces);
    }
    memcpy(m->pieces, v->pieces, (size_t)v->n_pieces * sizeof *m->pieces);
    m->n_pieces = v->n_pieces;
    memset(m->byte_ids, 0xff, sizeof m->byte_ids);
    m->byte_fallback = v->byte_fallback;
    m->add_dummy_prefix = v->add_dummy_prefix;
    m->remove_extra_whitespaces = v->remove_extra_whitespaces;
    m->escape_whitespaces = true;

    model_builder b = {.m = m,
                       .pieces_key = v->pieces_key,
                       .types_key = v->types_key,
                       .hint = v->hint ? v->hint : "rebuild the vocabulary"};
    for (int32_t i = 0; i < m->n_pieces; i++) {
        CP_ASSERT(m->pieces[i].type >= CP_SP_PIECE_NORMAL && m->pieces[i].type <= CP_SP_PIECE_BYTE);
        b.piece_text_bytes += (size_t)m->pieces[i].len + 1;
    }
    cp_status st = copy_piece_text(&b, err);
    if (!st)
        st = index_pieces(&b, name, err);
    if (st) {
        cp_sp_free(m);
        return st;
    }

    /* The caller names special pieces directly, so any type is accepted. */
    int32_t special[3] = {v->bos_id, v->eos_id, v->pad_id};
    for (int i = 0; i < 3; i++)
        CP_ASSERT(special[i] >= -1 && special[i] < m->n_pieces);
    m->bos_id = v->bos_id;
    m->eos_id = v->eos_id;
    m->pad_id = v->pad_id;
    *out = m;
    return CP_OK;
}

cp_status cp_sp_parse(const char *name, const uint8_t *data, size_t size, cp_sp_model **out,
                      cp_error *err)
{
    *out = NULL;
    if (size == 0)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: byte 0: the file is empty, expected a SentencePiece model "
                            "(re-download it)",
                            name);

    cp_sp_model *m = calloc(1, sizeof *m);
    if (!m)
        return cp_error_nomem(err, "a SentencePiece model", sizeof *m);
    memset(m->byte_ids, 0xff, sizeof m->byte_ids);
    /* Protobuf defaults from sentencepiece_model.proto. */
    m->add_dummy_prefix = true;
    m->remove_extra_whitespaces = true;
    m->escape_whitespaces = true;

    model_builder b = {
        .m = m,
        .hint = NOT_A_MODEL,
        .model_type = MODEL_TYPE_UNIGRAM,
        .bos_id = 1,
        .eos_id = 2,
        .pad_id = -1,
        .normalizer_name = (const uint8_t *)"",
    };
    pb_reader r = {.name = name, .data = data, .pos = 0, .end = size, .err = err};
    snprintf(r.where, sizeof r.where, "ModelProto");

    cp_status st = parse_model_proto(&r, &b);
    if (!st)
        st = model_build(&b, name, err);
    free(b.piece_offset);
    if (st) {
        cp_sp_free(m);
        return st;
    }
    *out = m;
    return CP_OK;
}

cp_status cp_sp_load(const char *path, cp_sp_model **out, cp_error *err)
{
    *out = NULL;
    cp_mapped_file f;
    cp_status st = cp_file_map(path, &f, err);
    if (st)
        return st;
    st = cp_sp_parse(path, f.data, f.size, out, err);
    cp_mapped_file_free(&f);
    return st;
}

void cp_sp_free(cp_sp_model *m)
{
    if (!m)
        return;
    free(m->pieces);
    free(m->piece_text);
    free(m->table);
    free(m->user_lens);
    free(m);
}

/* ---------------------------------------------------------------------- */
/* Normalization                                                          */
/* ---------------------------------------------------------------------- */

static size_t put_space(const cp_sp_model *m, char *out, size_t n)
{
    if (!m->escape_whitespaces) {
        out[n] = ' ';
        return n + 1;
    }
    memcpy(out + n, SPACE_SYMBOL, SPACE_SYMBOL_LEN);
    return n + SPACE_SYMBOL_LEN;
}

/* Writes the normalized text into out (room for 3 * len + 3 bytes) and
 * returns its length. This is SentencePiece's normalizer without a
 * charsmap: only ' ' is whitespace, and an empty or all-space input gives
 * an empty output, with no dummy prefix. Working on bytes rather than
 * characters gives the same result because 0x20 never occurs inside a
 * multi-byte UTF-8 character. */
static size_t normalize_into(const cp_sp_model *m, const char *text, size_t len, char *out)
{
    bool squeeze = m->remove_extra_whitespaces;
    size_t i = 0, n = 0;
    if (squeeze)
        while (i < len && text[i] == ' ')
            i++;
    if (i == len)
        return 0;

    if (m->add_dummy_prefix)
        n = put_space(m, out, n);

    /* With squeeze, a space right after a space (or at the start) is dropped. */
    bool prev_space = squeeze;
    for (; i < len; i++) {
        if (text[i] != ' ') {
            out[n++] = text[i];
            prev_space = false;
        } else if (!prev_space) {
            n = put_space(m, out, n);
            prev_space = squeeze;
        }
    }

    /* SentencePiece strips trailing space symbols, a literal "▁" included. */
    size_t sym_len = m->escape_whitespaces ? SPACE_SYMBOL_LEN : 1;
    const char *sym = m->escape_whitespaces ? SPACE_SYMBOL : " ";
    while (squeeze && n >= sym_len && memcmp(out + n - sym_len, sym, sym_len) == 0)
        n -= sym_len;
    return n;
}

/* Allocates the buffer for normalize_into. */
static cp_status normalize_alloc(size_t len, char **out, cp_error *err)
{
    *out = NULL;
    if (len > (SIZE_MAX - SPACE_SYMBOL_LEN - 1) / SPACE_SYMBOL_LEN)
        return cp_error_set(err, CP_ERR_INPUT, "text of %zu bytes is too long to tokenize", len);
    size_t cap = len * SPACE_SYMBOL_LEN + SPACE_SYMBOL_LEN + 1;
    *out = malloc(cap);
    return *out ? CP_OK : cp_error_nomem(err, "normalized text", cap);
}

cp_status cp_sp_normalize(const cp_sp_model *m, const char *text, size_t len, char **out,
                          size_t *out_len, cp_error *err)
{
    *out_len = 0;
    cp_status st = normalize_alloc(len, out, err);
    if (st)
        return st;
    *out_len = normalize_into(m, text, len, *out);
    (*out)[*out_len] = '\0';
    return CP_OK;
}

/* ---------------------------------------------------------------------- */
/* BPE encoding                                                           */
/* ---------------------------------------------------------------------- */

/* Returns the length of the valid UTF-8 character at s (len > 0 bytes
 * left), or 1 for an invalid byte. Valid means what SentencePiece accepts:
 * shortest form, no surrogates, at most U+10FFFF. */
static size_t utf8_char_len(const uint8_t *s, size_t len)
{
    uint8_t c = s[0];
    if (c < 0x80)
        return 1;
    size_t n;
    uint32_t cp, min;
    if ((c & 0xe0) == 0xc0) {
        n = 2;
        cp = c & 0x1f;
        min = 0x80;
    } else if ((c & 0xf0) == 0xe0) {
        n = 3;
        cp = c & 0x0f;
        min = 0x800;
    } else if ((c & 0xf8) == 0xf0) {
        n = 4;
        cp = c & 0x07;
        min = 0x10000;
    } else {
        return 1;
    }
    if (len < n)
        return 1;
    for (size_t i = 1; i < n; i++) {
        if ((s[i] & 0xc0) != 0x80)
            return 1;
        cp = cp << 6 | (s[i] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp < 0xe000))
        return 1;
    return n;
}

/* One symbol of the text being merged: a byte range, linked to its live
 * neighbours. A symbol absorbed into its left neighbour gets len 0. */
typedef struct bpe_symbol {
    int32_t prev, next; /* -1 at either end */
    uint32_t start, len;
    bool frozen; /* a USER_DEFINED piece, never merged */
} bpe_symbol;

/* A candidate merge of symbol left with its right neighbour into a piece of
 * len bytes. It is stale once either side changed, which shows as a
 * different combined length. */
typedef struct bpe_pair {
    float score;
    int32_t left;
    uint32_t len;
} bpe_pair;

typedef struct bpe_state {
    const cp_sp_model *m;
    const char *text; /* the normalized text */
    bpe_symbol *symbols;
    int32_t n_symbols;
    bpe_pair *heap;
    size_t heap_len, heap_cap;
    /* For each UNUSED piece, the length of the left part of the last pair
     * that could form it, or 0. NULL when the model has no UNUSED piece. */
    uint32_t *unused_split;
} bpe_state;

/* True when pair a should merge before pair b: higher score, then leftmost. */
static bool pair_before(const bpe_pair *a, const bpe_pair *b)
{
    return a->score > b->score || (a->score == b->score && a->left < b->left);
}

static cp_status heap_push(bpe_state *s, bpe_pair pair, cp_error *err)
{
    if (s->heap_len == s->heap_cap) {
        size_t cap = s->heap_cap ? s->heap_cap * 2 : 256;
        bpe_pair *heap = realloc(s->heap, cap * sizeof *heap);
        if (!heap)
            return cp_error_nomem(err, "the BPE merge queue", cap * sizeof *heap);
        s->heap = heap;
        s->heap_cap = cap;
    }
    size_t i = s->heap_len++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!pair_before(&pair, &s->heap[parent]))
            break;
        s->heap[i] = s->heap[parent];
        i = parent;
    }
    s->heap[i] = pair;
    return CP_OK;
}

static bpe_pair heap_pop(bpe_state *s)
{
    bpe_pair top = s->heap[0];
    bpe_pair last = s->heap[--s->heap_len];
    size_t i = 0, n = s->heap_len;
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= n)
            break;
        if (child + 1 < n && pair_before(&s->heap[child + 1], &s->heap[child]))
            child++;
        if (!pair_before(&s->heap[child], &last))
            break;
        s->heap[i] = s->heap[child];
        i = child;
    }
    if (n > 0)
        s->heap[i] = last;
    return top;
}

/* Queues the merge of symbols left and right if their concatenation is a
 * piece that merges may produce (NORMAL, USER_DEFINED or UNUSED). */
static cp_status try_add_pair(bpe_state *s, int32_t left, int32_t right, cp_error *err)
{
    if (left < 0 || right < 0)
        return CP_OK;
    const bpe_symbol *l = &s->symbols[left], *r = &s->symbols[right];
    if (l->frozen || r->frozen)
        return CP_OK;
    uint32_t len = l->len + r->len;
    int32_t id = cp_sp_piece_id(s->m, s->text + l->start, len);
    if (id < 0)
        return CP_OK;
    cp_sp_piece_type type = s->m->pieces[id].type;
    if (type != CP_SP_PIECE_NORMAL && type != CP_SP_PIECE_USER_DEFINED &&
        type != CP_SP_PIECE_UNUSED)
        return CP_OK;
    if (type == CP_SP_PIECE_UNUSED)
        s->unused_split[id] = l->len;
    return heap_push(s, (bpe_pair){s->m->pieces[id].score, left, len}, err);
}

/* Returns the length of the longest USER_DEFINED piece at text[pos], or 0. */
static uint32_t match_user_defined(const cp_sp_model *m, const char *text, size_t pos,
                                   size_t len)
{
    uint8_t first = (uint8_t)text[pos];
    if (!(m->user_first[first >> 3] & (1u << (first & 7))))
        return 0;
    for (uint32_t i = 0; i < m->n_user_lens; i++) {
        uint32_t n = m->user_lens[i];
        if (n > len - pos)
            continue;
        int32_t id = cp_sp_piece_id(m, text + pos, n);
        if (id >= 0 && m->pieces[id].type == CP_SP_PIECE_USER_DEFINED)
            return n;
    }
    return 0;
}

/* Splits the normalized text into characters (USER_DEFINED pieces whole)
 * and queues every mergeable neighbour pair. */
static cp_status bpe_init(bpe_state *s, size_t len, cp_error *err)
{
    const cp_sp_model *m = s->m;
    size_t pos = 0;
    int32_t n = 0;
    while (pos < len) {
        uint32_t user = m->n_user_lens ? match_user_defined(m, s->text, pos, len) : 0;
        uint32_t clen = user ? user : (uint32_t)utf8_char_len((const uint8_t *)s->text + pos,
                                                              len - pos);
        s->symbols[n] = (bpe_symbol){n - 1, -1, (uint32_t)pos, clen, user > 0};
        if (n > 0)
            s->symbols[n - 1].next = n;
        n++;
        pos += clen;
    }
    s->n_symbols = n;

    for (int32_t i = 1; i < n; i++) {
        cp_status st = try_add_pair(s, i - 1, i, err);
        if (st)
            return st;
    }
    return CP_OK;
}

/* Applies the best queued merge until none is left. */
static cp_status bpe_merge_all(bpe_state *s, cp_error *err)
{
    bpe_symbol *sym = s->symbols;
    while (s->heap_len > 0) {
        bpe_pair top = heap_pop(s);
        bpe_symbol *left = &sym[top.left];
        if (left->len == 0 || left->next < 0 || left->len + sym[left->next].len != top.len)
            continue;

        int32_t right = left->next;
        left->len = top.len;
        left->next = sym[right].next;
        if (left->next >= 0)
            sym[left->next].prev = top.left;
        sym[right].len = 0;

        cp_status st = try_add_pair(s, left->prev, top.left, err);
        if (!st)
            st = try_add_pair(s, top.left, left->next, err);
        if (st)
            return st;
    }
    return CP_OK;
}

/* Appends the ids for one final symbol: its piece, its <0xNN> bytes when it
 * is unknown and the model has byte fallback, else the unknown id, which
 * absorbs an unknown symbol right before it as SentencePiece does. */
static void emit_symbol(const bpe_state *s, uint32_t start, uint32_t len, int32_t *ids,
                        size_t *n, bool *prev_unknown)
{
    const cp_sp_model *m = s->m;
    int32_t id = cp_sp_piece_id(m, s->text + start, len);
    if (id < 0)
        id = m->unk_id;
    if (id != m->unk_id) {
        ids[(*n)++] = id;
        *prev_unknown = false;
    } else if (m->byte_fallback) {
        for (uint32_t i = 0; i < len; i++)
            ids[(*n)++] = m->byte_ids[(uint8_t)s->text[start + i]];
        *prev_unknown = false;
    } else if (!*prev_unknown) {
        ids[(*n)++] = id;
        *prev_unknown = true;
    }
}

/* Appends the ids for a final symbol, first splitting an UNUSED piece back
 * into the two parts that formed it, recursively, as SentencePiece's
 * resegmentation does. stack has room for max_piece_len + 1 ranges. */
static void emit_resegmented(const bpe_state *s, uint32_t start, uint32_t len, uint32_t *stack,
                             int32_t *ids, size_t *n, bool *prev_unknown)
{
    size_t depth = 0;
    stack[depth++] = start;
    stack[depth++] = len;
    while (depth > 0) {
        len = stack[--depth];
        start = stack[--depth];
        int32_t id = cp_sp_piece_id(s->m, s->text + start, len);
        uint32_t split = id >= 0 && s->m->pieces[id].type == CP_SP_PIECE_UNUSED
                             ? s->unused_split[id]
                             : 0;
        if (split == 0 || split >= len) {
            emit_symbol(s, start, len, ids, n, prev_unknown);
            continue;
        }
        /* Right part first, so the left part comes off the stack first. */
        stack[depth++] = start + split;
        stack[depth++] = len - split;
        stack[depth++] = start;
        stack[depth++] = split;
    }
}

/* Appends the ids of the merged symbols to ids[*n_ids...]. */
static void bpe_emit(const bpe_state *s, uint32_t *stack, int32_t *ids, size_t *n_ids,
                     bool *prev_unknown)
{
    for (int32_t i = 0; i >= 0 && s->n_symbols > 0; i = s->symbols[i].next) {
        const bpe_symbol *sym = &s->symbols[i];
        if (stack)
            emit_resegmented(s, sym->start, sym->len, stack, ids, n_ids, prev_unknown);
        else
            emit_symbol(s, sym->start, sym->len, ids, n_ids, prev_unknown);
    }
}

static bool is_isolated(const cp_sp_model *m, uint8_t byte)
{
    return byte < 128 && (m->isolated[byte >> 3] & (1u << (byte & 7)));
}

/* Returns the length of the segment that starts at text[pos]: one isolated
 * byte, or the run of bytes up to the next isolated one. No mergeable piece
 * contains an isolated byte next to another byte, so no merge crosses a
 * segment edge. Merging one segment at a time thus gives the same result,
 * with a heap that stays small. */
static size_t segment_len(const cp_sp_model *m, const char *text, size_t pos, size_t len)
{
    if (is_isolated(m, (uint8_t)text[pos]))
        return 1;
    size_t end = pos + 1;
    while (end < len && !is_isolated(m, (uint8_t)text[end]))
        end++;
    return end - pos;
}

/* Runs BPE over normalized text of len bytes (len > 0) and writes the ids
 * into ids, which has room for one id per byte. */
static cp_status bpe_encode(const cp_sp_model *m, const char *text, size_t len, int32_t *ids,
                            size_t *n_ids, cp_error *err)
{
    bpe_state s = {.m = m};
    uint32_t *stack = NULL;
    cp_status st = CP_OK;

    /* SentencePiece splits an UNUSED piece at the last pair queued for it
     * anywhere in the text, so such models need the whole text as one
     * segment, queued in SentencePiece's order. */
    bool whole = m->has_unused;
    if (whole) {
        size_t stack_bytes = 2 * ((size_t)m->max_piece_len + 1) * sizeof *stack;
        s.unused_split = calloc((size_t)m->n_pieces, sizeof *s.unused_split);
        stack = malloc(stack_bytes);
        if (!s.unused_split || !stack)
            st = cp_error_nomem(err, "the UNUSED piece splits", stack_bytes);
    }

    size_t max_segment = 0;
    for (size_t pos = 0; pos < len && !whole;) {
        size_t n = segment_len(m, text, pos, len);
        max_segment = n > max_segment ? n : max_segment;
        pos += n;
    }
    size_t symbols_bytes = (whole ? len : max_segment) * sizeof *s.symbols;
    if (!st && !(s.symbols = malloc(symbols_bytes)))
        st = cp_error_nomem(err, "BPE symbols", symbols_bytes);

    bool prev_unknown = false;
    *n_ids = 0;
    for (size_t pos = 0; pos < len && !st;) {
        size_t n = whole ? len : segment_len(m, text, pos, len);
        s.text = text + pos;
        s.heap_len = 0;
        st = bpe_init(&s, n, err);
        if (!st)
            st = bpe_merge_all(&s, err);
        if (!st)
            bpe_emit(&s, stack, ids, n_ids, &prev_unknown);
        pos += n;
    }
    free(s.symbols);
    free(s.heap);
    free(s.unused_split);
    free(stack);
    return st;
}

cp_status cp_sp_encode(const cp_sp_model *m, const char *text, size_t len, int32_t **ids,
                       size_t *n_ids, cp_error *err)
{
    *ids = NULL;
    *n_ids = 0;
    char *norm;
    cp_status st = normalize_alloc(len, &norm, err);
    if (st)
        return st;
    size_t norm_len = normalize_into(m, text, len, norm);
    if (norm_len > INT32_MAX) {
        free(norm);
        return cp_error_set(err, CP_ERR_INPUT,
                            "text of %zu bytes is too long to encode in one call (the limit is "
                            "2 GiB after normalization); encode it in parts",
                            len);
    }

    /* Every byte yields at most one id, even with byte fallback. */
    size_t cap = norm_len ? norm_len : 1;
    int32_t *out = malloc(cap * sizeof *out);
    if (!out) {
        free(norm);
        return cp_error_nomem(err, "token ids", cap * sizeof *out);
    }
    size_t n = 0;
    st = norm_len ? bpe_encode(m, norm, norm_len, out, &n, err) : CP_OK;
    free(norm);
    if (st) {
        free(out);
        return st;
    }

    int32_t *shrunk = realloc(out, (n ? n : 1) * sizeof *out);
    *ids = shrunk ? shrunk : out;
    *n_ids = n;
    return CP_OK;
}

/* ---------------------------------------------------------------------- */
/* Decoding                                                               */
/* ---------------------------------------------------------------------- */

/* Copies a piece into out with every "▁" turned into ' ' and returns the
 * bytes written. */
static size_t copy_unescaped(const char *p, size_t len, char *out)
{
    size_t n = 0;
    for (size_t i = 0; i < len;) {
        if (len - i >= SPACE_SYMBOL_LEN && memcmp(p + i, SPACE_SYMBOL, SPACE_SYMBOL_LEN) == 0) {
            out[n++] = ' ';
            i += SPACE_SYMBOL_LEN;
        } else {
            out[n++] = p[i++];
        }
    }
    return n;
}

cp_status cp_sp_decode(const cp_sp_model *m, const int32_t *ids, size_t n_ids, char **text,
                       size_t *len, cp_error *err)
{
    *text = NULL;
    *len = 0;
    size_t cap = 1;
    for (size_t i = 0; i < n_ids; i++) {
        if (ids[i] < 0 || ids[i] >= m->n_pieces)
            return cp_error_set(err, CP_ERR_INPUT,
                                "token %zu: id %d is outside the vocabulary of %d pieces", i,
                                ids[i], m->n_pieces);
        cap += m->pieces[ids[i]].len;
    }
    char *out = malloc(cap);
    if (!out)
        return cp_error_nomem(err, "decoded text", cap);

    /* SentencePiece drops a leading "▁" from the first piece that produces
     * text: the space that add_dummy_prefix added. With
     * remove_extra_whitespaces it keeps dropping one "▁" per piece while the
     * output is still empty, because the encoder never emits leading spaces. */
    bool strip_leading = m->add_dummy_prefix || m->remove_extra_whitespaces;
    bool at_start = true, stripped = false;
    size_t n = 0;
    for (size_t i = 0; i < n_ids; i++) {
        const cp_sp_piece *p = &m->pieces[ids[i]];
        if (p->type == CP_SP_PIECE_BYTE) {
            out[n++] = (char)byte_piece_value(p->text, p->len);
            continue;
        }
        if (stripped || n > 0)
            at_start = false;
        stripped = false;
        if (p->type == CP_SP_PIECE_CONTROL || p->type == CP_SP_PIECE_UNKNOWN)
            continue;

        const char *s = p->text;
        size_t s_len = p->len;
        if (at_start && strip_leading && s_len >= SPACE_SYMBOL_LEN &&
            memcmp(s, SPACE_SYMBOL, SPACE_SYMBOL_LEN) == 0) {
            s += SPACE_SYMBOL_LEN;
            s_len -= SPACE_SYMBOL_LEN;
            stripped = !m->remove_extra_whitespaces;
        }
        n += copy_unescaped(s, s_len, out + n);
    }
    out[n] = '\0';
    *text = out;
    *len = n;
    return CP_OK;
}
