/*
 * Tests for the Llama-3 and Qwen2 pre-tokenizers of byte-level BPE, and
 * GPT-2's against the same reference.
 *
 * tests/fixtures/pretokenize/<pattern>.json contains the splits that Python's
 * `regex` module makes with each tokenizer.json regex (tools/ref_pretokenize.py
 * writes them); the hand-written matchers in bpe.c must reproduce every one.
 * Small vocabularies written here as tokenizer.json and GGUF files check that
 * the pattern is selected from the file, that encoding respects it and that
 * text round-trips.
 */
#include "test.h"

#include <cJSON.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/file.h"
#include "io/gguf_write.h"
#include "tokenizer/bpe.h"
#include "tokenizer/tokenizer.h"

#define FIXTURES "tests/fixtures/pretokenize/"

/* The Split regexes of Meta-Llama-3's and Qwen2's tokenizer.json. */
#define LLAMA3_REGEX                                                                  \
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "        \
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
#define QWEN2_REGEX                                                                   \
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| "             \
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"

/* ---------------------------------------------------------------------- */
/* Splits against the reference                                           */
/* ---------------------------------------------------------------------- */

/* Splits text with pattern and writes the pre-token boundaries into ends
 * (room for len entries). Returns the count, or 0 after recording a failure
 * when a matcher returns an end that does not advance. */
static size_t split_text(cp_bpe_pattern pattern, const char *text, size_t len, size_t *ends)
{
    size_t n = 0;
    for (size_t pos = 0; pos < len;) {
        size_t end = cp_bpe_pattern_pretoken_end(pattern, text, len, pos);
        CHECK_MSG(end > pos && end <= len, "pattern %d: end %zu at byte %zu of \"%s\"",
                  (int)pattern, end, pos, text);
        if (end <= pos || end > len)
            return 0;
        ends[n++] = end;
        pos = end;
    }
    return n;
}

/* Compares the split of one fixture case with its reference pieces and
 * records the first difference. Returns true when they agree. */
static bool check_case(cp_bpe_pattern pattern, const char *name, int index, const char *text,
                       const cJSON *pieces)
{
    size_t len = strlen(text);
    size_t *ends = malloc((len ? len : 1) * sizeof *ends);
    size_t n = split_text(pattern, text, len, ends);
    size_t start = 0, i = 0;
    bool same = true;
    const cJSON *piece;
    cJSON_ArrayForEach(piece, pieces)
    {
        const char *want = cJSON_GetStringValue(piece);
        size_t want_len = want ? strlen(want) : 0;
        size_t got_len = i < n ? ends[i] - start : 0;
        if (!want || i >= n || got_len != want_len || memcmp(text + start, want, want_len) != 0) {
            CHECK_MSG(false, "%s case %d \"%s\": piece %zu is \"%.*s\", expected \"%s\"", name,
                      index, text, i, (int)got_len, text + start, want ? want : "(not a string)");
            same = false;
            break;
        }
        start = ends[i++];
    }
    if (same && i != n) {
        CHECK_MSG(false, "%s case %d \"%s\": %zu pieces, expected %zu", name, index, text, n, i);
        same = false;
    }
    free(ends);
    return same;
}

/* Checks every case of tests/fixtures/pretokenize/<name>.json. */
static void check_fixture(const char *name, cp_bpe_pattern pattern)
{
    char path[256];
    snprintf(path, sizeof path, FIXTURES "%s.json", name);
    cJSON *doc = test_read_json(path);
    if (!doc)
        return;
    const cJSON *cases = cJSON_GetObjectItemCaseSensitive(doc, "cases");
    CHECK_MSG(cJSON_GetArraySize(cases) >= 90, "%s: %d cases, expected at least 90", path,
              cJSON_GetArraySize(cases));
    int index = 0, n_same = 0, n_pieces = 0;
    const cJSON *item;
    cJSON_ArrayForEach(item, cases)
    {
        const char *text = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(item, "text"));
        const cJSON *pieces = cJSON_GetObjectItemCaseSensitive(item, "pieces");
        CHECK_MSG(text && cJSON_IsArray(pieces), "%s case %d: no text or pieces", path, index);
        if (text && cJSON_IsArray(pieces)) {
            n_same += check_case(pattern, name, index, text, pieces);
            n_pieces += cJSON_GetArraySize(pieces);
        }
        index++;
    }
    printf("    %s: %d of %d cases split as the regex does (%d pieces)\n", name, n_same, index,
           n_pieces);
    cJSON_Delete(doc);
}

TEST(bpe_pre_gpt2_matches_regex)
{
    check_fixture("gpt2", CP_BPE_PATTERN_GPT2);
}

TEST(bpe_pre_llama3_matches_regex)
{
    check_fixture("llama3", CP_BPE_PATTERN_LLAMA3);
}

TEST(bpe_pre_qwen2_matches_regex)
{
    check_fixture("qwen2", CP_BPE_PATTERN_QWEN2);
}

/* Joins the pre-tokens of text (len bytes, may hold NUL) with '|'. */
static void join_split(cp_bpe_pattern pattern, const char *text, size_t len, char *out)
{
    size_t ends[64], n = split_text(pattern, text, len, ends), used = 0, start = 0;
    for (size_t i = 0; i < n; i++) {
        if (i)
            out[used++] = '|';
        memcpy(out + used, text + start, ends[i] - start);
        used += ends[i] - start;
        start = ends[i];
    }
    out[used] = '\0';
}

/* Cases the JSON fixtures cannot hold: invalid UTF-8, which counts as one
 * punctuation character per byte, and text cut off mid-character. */
TEST(bpe_pre_llama3_invalid_utf8)
{
    static const char *const cases[][2] = {
        {"a\xff\xfe b", "a|\xff\xfe| b"},
        {"\xffword", "\xffword"}, /* a punctuation byte may lead a word */
        {"x'\xc5", "x|'\xc5"},    /* a cut-off U+017F is no contraction */
        {"1\xff" "23", "1|\xff|23"},
        {"\xff\n\nz", "\xff\n\n|z"},
        {"\xe4\xbd", "\xe4\xbd"},
    };
    char got[64];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        join_split(CP_BPE_PATTERN_LLAMA3, cases[i][0], strlen(cases[i][0]), got);
        CHECK_EQ_STR(got, cases[i][1]);
    }

    /* NUL is a control character: punctuation, not a space. */
    join_split(CP_BPE_PATTERN_QWEN2, "a\0 b", 4, got);
    CHECK_MSG(memcmp(got, "a|\0| b", 6) == 0, "NUL split as \"%.6s\"", got);
}

/* ---------------------------------------------------------------------- */
/* A small vocabulary                                                     */
/* ---------------------------------------------------------------------- */

/* Merges of the test vocabulary as raw bytes, in rank order. The tokens are
 * the 256 bytes (id = byte), then each merge's result, then "abc" (which no
 * merge reaches), then the two special tokens. */
static const char *const MERGES[][2] = {
    {"h", "e"},   {"l", "l"},   {"he", "ll"}, {"hell", "o"}, {" ", "w"},     {" w", "o"},
    {"r", "l"},   {"rl", "d"},  {" wo", "rld"}, {"1", "2"},  {"12", "3"},    {"123", "4"},
    {"'", "s"},   {"\n", "\n"},
};
#define N_MERGES ((int)(sizeof MERGES / sizeof MERGES[0]))
#define ID_MERGED(i) (256 + (i))
#define ID_ABC (256 + N_MERGES)
#define ID_BOS (ID_ABC + 1)
#define ID_EOS (ID_ABC + 2)
#define N_TOKENS (ID_ABC + 3)

/* Writes raw bytes as vocab files spell them (GPT-2's byte-to-unicode
 * table: printable bytes stay, the others become U+0100 on in byte order)
 * into out, NUL-terminated; out needs 2 * n + 1 bytes. */
static void spell(const char *raw, size_t n, char *out)
{
    size_t used = 0;
    for (size_t i = 0; i < n; i++) {
        int b = (uint8_t)raw[i], cp = b;
        if (!((b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF))) {
            cp = 256;
            for (int c = 0; c < b; c++)
                cp += !((c >= '!' && c <= '~') || (c >= 0xA1 && c <= 0xAC) ||
                        (c >= 0xAE && c <= 0xFF));
        }
        if (cp < 0x80) {
            out[used++] = (char)cp;
        } else {
            out[used++] = (char)(0xC0 | (cp >> 6));
            out[used++] = (char)(0x80 | (cp & 0x3F));
        }
    }
    out[used] = '\0';
}

/* Returns token id's spelling in a malloc'd string ("<|...|>" for the
 * special tokens, which are written as they are). */
static char *token_spelling(int id)
{
    char raw[32], *out = malloc(64);
    if (id == ID_BOS || id == ID_EOS) {
        strcpy(out, id == ID_BOS ? "<|begin_of_text|>" : "<|end_of_text|>");
        return out;
    }
    if (id < 256) {
        raw[0] = (char)id;
        spell(raw, 1, out);
    } else if (id == ID_ABC) {
        strcpy(out, "abc");
    } else {
        snprintf(raw, sizeof raw, "%s%s", MERGES[id - 256][0], MERGES[id - 256][1]);
        spell(raw, strlen(raw), out);
    }
    return out;
}

/* Returns merge i as "left right" in vocab spelling, malloc'd. */
static char *merge_spelling(int i)
{
    char left[32], right[32], *out = malloc(80);
    spell(MERGES[i][0], strlen(MERGES[i][0]), left);
    spell(MERGES[i][1], strlen(MERGES[i][1]), right);
    snprintf(out, 80, "%s %s", left, right);
    return out;
}

/* Writes a tokenizer.json with the test vocabulary, the given pre_tokenizer
 * and post_processor (JSON text, or NULL for none) and ignore_merges, and
 * returns its malloc'd path. */
static char *write_json(const char *pre_tokenizer, const char *post_processor,
                        bool ignore_merges)
{
    cJSON *root = cJSON_CreateObject(), *model = cJSON_CreateObject();
    cJSON *vocab = cJSON_CreateObject(), *merges = cJSON_CreateArray();
    cJSON *added = cJSON_CreateArray();
    cJSON_AddNullToObject(root, "normalizer");
    cJSON_AddItemToObject(root, "pre_tokenizer", cJSON_Parse(pre_tokenizer));
    if (post_processor)
        cJSON_AddItemToObject(root, "post_processor", cJSON_Parse(post_processor));
    cJSON_AddItemToObject(root, "decoder", cJSON_Parse("{\"type\": \"ByteLevel\"}"));
    for (int id = 0; id < ID_BOS; id++) {
        char *s = token_spelling(id);
        cJSON_AddNumberToObject(vocab, s, id);
        free(s);
    }
    for (int i = 0; i < N_MERGES; i++) {
        char *s = merge_spelling(i);
        cJSON_AddItemToArray(merges, cJSON_CreateString(s));
        free(s);
    }
    for (int id = ID_BOS; id <= ID_EOS; id++) {
        char *s = token_spelling(id);
        cJSON *t = cJSON_CreateObject();
        cJSON_AddNumberToObject(t, "id", id);
        cJSON_AddStringToObject(t, "content", s);
        cJSON_AddBoolToObject(t, "special", true);
        cJSON_AddItemToArray(added, t);
        free(s);
    }
    cJSON_AddItemToObject(root, "added_tokens", added);
    cJSON_AddStringToObject(model, "type", "BPE");
    cJSON_AddBoolToObject(model, "ignore_merges", ignore_merges);
    cJSON_AddItemToObject(model, "vocab", vocab);
    cJSON_AddItemToObject(model, "merges", merges);
    cJSON_AddItemToObject(root, "model", model);
    char *text = cJSON_Print(root);
    char *path = test_write_file(test_tmpdir(), "tokenizer.json", text, strlen(text));
    free(text);
    cJSON_Delete(root);
    return path;
}

#define BYTE_LEVEL_GPT2 "{\"type\": \"ByteLevel\", \"add_prefix_space\": false, \"use_regex\": true}"
#define BYTE_LEVEL_AFTER_SPLIT                                                        \
    "{\"type\": \"ByteLevel\", \"add_prefix_space\": false, \"trim_offsets\": true, " \
    "\"use_regex\": false}"
#define SPLIT(regex_json)                                                             \
    "{\"type\": \"Split\", \"pattern\": {\"Regex\": \"" regex_json "\"}, "            \
    "\"behavior\": \"Isolated\", \"invert\": false}"
#define SEQUENCE(split) \
    "{\"type\": \"Sequence\", \"pretokenizers\": [" split ", " BYTE_LEVEL_AFTER_SPLIT "]}"

/* The JSON spelling of the regexes: every backslash doubled again. */
#define LLAMA3_REGEX_JSON                                                                    \
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\\\r\\\\n\\\\p{L}\\\\p{N}]?\\\\p{L}+|\\\\p{N}{1,3}| "   \
    "?[^\\\\s\\\\p{L}\\\\p{N}]+[\\\\r\\\\n]*|\\\\s*[\\\\r\\\\n]+|\\\\s+(?!\\\\S)|\\\\s+"
#define QWEN2_REGEX_JSON                                                                     \
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\\\r\\\\n\\\\p{L}\\\\p{N}]?\\\\p{L}+|\\\\p{N}| "        \
    "?[^\\\\s\\\\p{L}\\\\p{N}]+[\\\\r\\\\n]*|\\\\s*[\\\\r\\\\n]+|\\\\s+(?!\\\\S)|\\\\s+"

/* Meta-Llama-3's post-processor: ByteLevel, then a template that puts
 * <|begin_of_text|> before the text. */
#define LLAMA3_POST                                                                          \
    "{\"type\": \"Sequence\", \"processors\": [{\"type\": \"ByteLevel\", "                   \
    "\"add_prefix_space\": true, \"trim_offsets\": false, \"use_regex\": true}, "            \
    "{\"type\": \"TemplateProcessing\", \"single\": [{\"SpecialToken\": {\"id\": "           \
    "\"<|begin_of_text|>\", \"type_id\": 0}}, {\"Sequence\": {\"id\": \"A\", \"type_id\": "  \
    "0}}], \"pair\": [], \"special_tokens\": {\"<|begin_of_text|>\": {\"id\": "              \
    "\"<|begin_of_text|>\", \"ids\": [271], \"tokens\": [\"<|begin_of_text|>\"]}}}]}"

static cp_bpe_model *load_json_model(const char *path)
{
    cp_bpe_model *m = NULL;
    cp_error err = {0};
    CHECK_MSG(cp_bpe_load_json(path, &m, &err) == CP_OK, "%s: %s", path, err.msg);
    return m;
}

/* Encodes text with m and compares the ids with want. */
static void check_ids(const cp_bpe_model *m, const char *text, const int32_t *want,
                      size_t n_want)
{
    cp_error err = {0};
    int32_t *ids = NULL;
    size_t n = 0;
    CHECK_MSG(cp_bpe_encode(m, text, strlen(text), &ids, &n, &err) == CP_OK, "%s: %s", text,
              err.msg);
    test_check_ids(text, ids, n, want, n_want);
    free(ids);
}

/* Checks that decode(encode(text)) is text, byte for byte. */
static void check_round_trip(const cp_bpe_model *m, const char *what, const char *text,
                             size_t len)
{
    cp_error err = {0};
    int32_t *ids = NULL;
    size_t n = 0, out_len = 0;
    char *out = NULL;
    CHECK_MSG(cp_bpe_encode(m, text, len, &ids, &n, &err) == CP_OK, "%s: %s", what, err.msg);
    CHECK_MSG(cp_bpe_decode(m, ids, n, &out, &out_len, &err) == CP_OK, "%s: %s", what, err.msg);
    CHECK_MSG(out && out_len == len && memcmp(out, text, len) == 0,
              "%s: the round trip changed the text (%zu bytes in, %zu out)", what, len, out_len);
    free(out);
    free(ids);
}

/* Round-trips every case of a fixture and the start of tinyshakespeare. */
static void check_round_trips(const cp_bpe_model *m)
{
    cJSON *doc = test_read_json(FIXTURES "llama3.json");
    const cJSON *item;
    int index = 0;
    cJSON_ArrayForEach(item, cJSON_GetObjectItemCaseSensitive(doc, "cases"))
    {
        const char *text = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(item, "text"));
        char what[32];
        snprintf(what, sizeof what, "fixture case %d", index++);
        if (text)
            check_round_trip(m, what, text, strlen(text));
    }
    cJSON_Delete(doc);

    char *text = NULL;
    size_t len = 0;
    cp_error err = {0};
    char *path = test_shared("data/tinyshakespeare/input.txt");
    CHECK_MSG(cp_file_read(path, &text, &len, &err) == CP_OK, "%s: %s", path, err.msg);
    if (text)
        check_round_trip(m, "tinyshakespeare", text, len < 65536 ? len : 65536);
    free(text);
}

/* ---------------------------------------------------------------------- */
/* tokenizer.json                                                         */
/* ---------------------------------------------------------------------- */

TEST(bpe_pre_json_llama3_encodes)
{
    CHECK_EQ_INT(ID_BOS, 271); /* LLAMA3_POST names it */
    char *path = write_json(SEQUENCE(SPLIT(LLAMA3_REGEX_JSON)), LLAMA3_POST, true);
    cp_bpe_model *m = load_json_model(path);
    free(path);
    if (!m)
        return;
    CHECK_EQ_INT(m->pattern, CP_BPE_PATTERN_LLAMA3);
    CHECK_EQ_INT(m->ignore_merges, 1);
    CHECK_EQ_INT(m->bos_id, ID_BOS);
    CHECK_EQ_INT(m->eos_id, ID_EOS); /* <|end_of_text|> */
    CHECK_EQ_INT(m->n_tokens, N_TOKENS);

    /* "hello" and " world" merge fully; "1234" is split into "123" "4",
     * so merge 11 ("123" "4") never applies. */
    check_ids(m, "hello world", (const int32_t[]){ID_MERGED(3), ID_MERGED(8)}, 2);
    check_ids(m, "1234", (const int32_t[]){ID_MERGED(10), '4'}, 2);
    /* 'S is a contraction under (?i), so "'" and "S" stay together in one
     * pre-token; "x" is a word of its own. */
    check_ids(m, "x'S", (const int32_t[]){'x', '\'', 'S'}, 3);
    /* ignore_merges: "abc" is a token that no merge reaches. */
    check_ids(m, "abc", (const int32_t[]){ID_ABC}, 1);
    /* Punctuation takes the newlines after it into its pre-token. */
    check_ids(m, "!\n\nhello", (const int32_t[]){'!', ID_MERGED(13), ID_MERGED(3)}, 3);
    check_ids(m, "<|begin_of_text|>hello<|end_of_text|>",
              (const int32_t[]){ID_BOS, ID_MERGED(3), ID_EOS}, 3);
    check_round_trips(m);
    cp_bpe_free(m);
}

TEST(bpe_pre_json_qwen2_and_gpt2)
{
    char *path = write_json(SEQUENCE(SPLIT(QWEN2_REGEX_JSON)), NULL, false);
    cp_bpe_model *m = load_json_model(path);
    free(path);
    if (m) {
        CHECK_EQ_INT(m->pattern, CP_BPE_PATTERN_QWEN2);
        CHECK_EQ_INT(m->ignore_merges, 0);
        CHECK_EQ_INT(m->bos_id, -1);
        check_ids(m, "1234", (const int32_t[]){'1', '2', '3', '4'}, 4); /* one digit each */
        check_ids(m, "abc", (const int32_t[]){'a', 'b', 'c'}, 3);      /* merges only */
        check_round_trips(m);
        cp_bpe_free(m);
    }

    path = write_json(BYTE_LEVEL_GPT2, "{\"type\": \"ByteLevel\", \"trim_offsets\": true}",
                      false);
    m = load_json_model(path);
    free(path);
    if (m) {
        CHECK_EQ_INT(m->pattern, CP_BPE_PATTERN_GPT2);
        CHECK_EQ_INT(m->bos_id, -1);
        check_ids(m, "1234", (const int32_t[]){ID_MERGED(11)}, 1);
        check_ids(m, "x'S", (const int32_t[]){'x', '\'', 'S'}, 3);
        cp_bpe_free(m);
    }
}

/* The regex strings in the fixtures are the ones the loader accepts. */
TEST(bpe_pre_json_fixture_regexes_load)
{
    static const char *const names[] = {"llama3", "qwen2"};
    static const cp_bpe_pattern patterns[] = {CP_BPE_PATTERN_LLAMA3, CP_BPE_PATTERN_QWEN2};
    for (int i = 0; i < 2; i++) {
        char fixture[256];
        snprintf(fixture, sizeof fixture, FIXTURES "%s.json", names[i]);
        cJSON *doc = test_read_json(fixture);
        const char *regex = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(doc, "regex"));
        CHECK_MSG(regex, "%s: no regex", fixture);
        if (!regex) {
            cJSON_Delete(doc);
            continue;
        }
        CHECK_EQ_STR(regex, i == 0 ? LLAMA3_REGEX : QWEN2_REGEX);

        cJSON *split = cJSON_Parse(SPLIT("x"));
        cJSON_SetValuestring(cJSON_GetObjectItemCaseSensitive(
                                 cJSON_GetObjectItemCaseSensitive(split, "pattern"), "Regex"),
                             regex);
        char *split_json = cJSON_PrintUnformatted(split);
        char pre[1024];
        snprintf(pre, sizeof pre, "{\"type\": \"Sequence\", \"pretokenizers\": [%s, %s]}",
                 split_json, BYTE_LEVEL_AFTER_SPLIT);
        char *path = write_json(pre, NULL, false);
        cp_bpe_model *m = load_json_model(path);
        if (m)
            CHECK_EQ_INT(m->pattern, patterns[i]);
        cp_bpe_free(m);
        free(path);
        free(split_json);
        cJSON_Delete(split);
        cJSON_Delete(doc);
    }
}

/* Writes a tokenizer.json with pre_tokenizer and checks that loading it
 * fails with a message that starts with the path and contains fragment. */
static void check_pre_rejected(const char *pre_tokenizer, const char *post_processor,
                               const char *fragment)
{
    char *path = write_json(pre_tokenizer, post_processor, false);
    cp_bpe_model *m = NULL;
    cp_error err = {0};
    CHECK_EQ_INT(cp_bpe_load_json(path, &m, &err), CP_ERR_INPUT);
    CHECK(m == NULL);
    CHECK_MSG(strncmp(err.msg, path, strlen(path)) == 0, "message does not start with %s: %s",
              path, err.msg);
    CHECK_MSG(strstr(err.msg, fragment), "message lacks \"%s\": %s", fragment, err.msg);
    CHECK_MSG(!strchr(err.msg, '\n'), "message has a line break: %s", err.msg);
    cp_bpe_free(m);
    free(path);
}

TEST(bpe_pre_json_rejections)
{
    /* GPT-4's regex, which differs from Llama-3's in its contractions and
     * possessive quantifiers, is shown in the message. */
    check_pre_rejected(SEQUENCE(SPLIT("'(?i:[sdmt]|ll|ve|re)|[^\\\\r\\\\n\\\\p{L}\\\\p{N}]?+"
                                      "\\\\p{L}+")),
                       NULL,
                       "pre_tokenizer.pretokenizers[0].pattern.Regex is \"'(?i:[sdmt]|ll|ve|re)|"
                       "[^\\r\\n\\p{L}\\p{N}]?+\\p{L}+\", which is not supported; only the "
                       "Llama-3 and Qwen2 patterns are");
    check_pre_rejected(SEQUENCE("{\"type\": \"Split\", \"pattern\": {\"String\": \" \"}, "
                                "\"behavior\": \"Isolated\", \"invert\": false}"),
                       NULL, "pretokenizers[0].pattern: expected {\"Regex\": ...}");
    check_pre_rejected(SEQUENCE("{\"type\": \"Split\", \"pattern\": {\"Regex\": \""
                                LLAMA3_REGEX_JSON "\"}, \"behavior\": \"Removed\", "
                                "\"invert\": false}"),
                       NULL, "pretokenizers[0].behavior is \"Removed\", expected \"Isolated\"");
    check_pre_rejected(SEQUENCE("{\"type\": \"Split\", \"pattern\": {\"Regex\": \""
                                LLAMA3_REGEX_JSON "\"}, \"behavior\": \"Isolated\", "
                                "\"invert\": true}"),
                       NULL, "pretokenizers[0].invert: only false is supported");
    check_pre_rejected("{\"type\": \"Sequence\", \"pretokenizers\": [" SPLIT(LLAMA3_REGEX_JSON)
                       "]}",
                       NULL, "pre_tokenizer.pretokenizers is [Split], expected [Split, ByteLevel]");
    check_pre_rejected("{\"type\": \"Sequence\", \"pretokenizers\": [{\"type\": \"Digits\"}, "
                       BYTE_LEVEL_AFTER_SPLIT "]}",
                       NULL, "pre_tokenizer.pretokenizers is [Digits, ByteLevel]");
    check_pre_rejected("{\"type\": \"Sequence\", \"pretokenizers\": [" SPLIT(LLAMA3_REGEX_JSON)
                       ", " BYTE_LEVEL_GPT2 "]}",
                       NULL, "pre_tokenizer.pretokenizers[1].use_regex: only false is supported");
    check_pre_rejected("{\"type\": \"ByteLevel\", \"add_prefix_space\": false, "
                       "\"use_regex\": false}",
                       NULL, "pre_tokenizer.use_regex: only true is supported");
    check_pre_rejected("{\"type\": \"Whitespace\"}", NULL,
                       "pre_tokenizer: type Whitespace is not supported; only ByteLevel (GPT-2) "
                       "and a Sequence of Split and ByteLevel (Llama-3, Qwen2) are");

    /* A BOS id outside the vocabulary. */
    check_pre_rejected(SEQUENCE(SPLIT(LLAMA3_REGEX_JSON)),
                       "{\"type\": \"TemplateProcessing\", \"single\": [{\"SpecialToken\": "
                       "{\"id\": \"<s>\", \"type_id\": 0}}], \"special_tokens\": {\"<s>\": "
                       "{\"id\": \"<s>\", \"ids\": [5000], \"tokens\": [\"<s>\"]}}}",
                       "post_processor.special_tokens[\"<s>\"].ids: expected one token id in "
                       "0..272");
}

/* ---------------------------------------------------------------------- */
/* GGUF                                                                   */
/* ---------------------------------------------------------------------- */

/* Writes the test vocabulary as a GGUF file with tokenizer.ggml.pre pre
 * and, unless negative, add_bos_token add_bos and bos_token_id bos. */
static char *write_gguf(const char *pre, int add_bos, int bos)
{
    const char *tokens[N_TOKENS], *merges[N_MERGES];
    int32_t types[N_TOKENS];
    for (int id = 0; id < N_TOKENS; id++) {
        tokens[id] = token_spelling(id);
        types[id] = id >= ID_BOS ? 3 : 1; /* control : normal */
    }
    for (int i = 0; i < N_MERGES; i++)
        merges[i] = merge_spelling(i);

    cp_gguf_writer *w = NULL;
    cp_error err = {0};
    cp_status st = cp_gguf_writer_init(&w, &err);
    if (!st)
        st = cp_gguf_writer_set_str(w, "tokenizer.ggml.model", "gpt2", &err);
    if (!st)
        st = cp_gguf_writer_set_str(w, "tokenizer.ggml.pre", pre, &err);
    if (!st)
        st = cp_gguf_writer_set_str_array(w, "tokenizer.ggml.tokens", tokens, NULL, N_TOKENS,
                                          &err);
    if (!st)
        st = cp_gguf_writer_set_i32_array(w, "tokenizer.ggml.token_type", types, N_TOKENS, &err);
    if (!st)
        st = cp_gguf_writer_set_str_array(w, "tokenizer.ggml.merges", merges, NULL, N_MERGES,
                                          &err);
    if (!st)
        st = cp_gguf_writer_set_u32(w, "tokenizer.ggml.eos_token_id", ID_EOS, &err);
    if (!st && bos >= 0)
        st = cp_gguf_writer_set_u32(w, "tokenizer.ggml.bos_token_id", (uint32_t)bos, &err);
    if (!st && add_bos >= 0)
        st = cp_gguf_writer_set_bool(w, "tokenizer.ggml.add_bos_token", add_bos, &err);
    char *path = malloc(512);
    snprintf(path, 512, "%s/vocab.gguf", test_tmpdir());
    if (!st)
        st = cp_gguf_writer_write(w, path, &err);
    CHECK_MSG(st == CP_OK, "writing %s: %s", path, err.msg);
    cp_gguf_writer_free(w);
    for (int id = 0; id < N_TOKENS; id++)
        free((char *)tokens[id]);
    for (int i = 0; i < N_MERGES; i++)
        free((char *)merges[i]);
    return path;
}

/* Loads a GGUF vocabulary as byte-level BPE. */
static cp_bpe_model *load_gguf_model(const char *path)
{
    cp_sp_model *sp = NULL;
    cp_bpe_model *bpe = NULL;
    cp_error err = {0};
    CHECK_MSG(cp_tokenizer_gguf_load(path, &sp, &bpe, &err) == CP_OK, "%s: %s", path, err.msg);
    CHECK(sp == NULL);
    return bpe;
}

TEST(bpe_pre_gguf_llama_bpe)
{
    char *path = write_gguf("llama-bpe", -1, ID_BOS);
    cp_bpe_model *m = load_gguf_model(path);
    free(path);
    if (!m)
        return;
    CHECK_EQ_INT(m->pattern, CP_BPE_PATTERN_LLAMA3);
    CHECK_EQ_INT(m->ignore_merges, 1);
    CHECK_EQ_INT(m->bos_id, ID_BOS); /* llama.cpp's default for the Llama-3 group */
    CHECK_EQ_INT(m->eos_id, ID_EOS);
    check_ids(m, "hello world", (const int32_t[]){ID_MERGED(3), ID_MERGED(8)}, 2);
    check_ids(m, "1234", (const int32_t[]){ID_MERGED(10), '4'}, 2);
    check_ids(m, "abc", (const int32_t[]){ID_ABC}, 1);
    check_round_trips(m);
    cp_bpe_free(m);

    /* The same through cp_tokenizer, as `cpeft tokenize --tokenizer` runs it. */
    path = write_gguf("llama3", 0, ID_BOS);
    cp_tokenizer *tok = NULL;
    cp_error err = {0};
    CHECK_MSG(cp_tokenizer_load(path, &tok, &err) == CP_OK, "%s: %s", path, err.msg);
    if (tok) {
        int32_t *ids = NULL;
        size_t n = 0;
        CHECK(cp_tokenizer_encode(tok, "hello 1234", 10, 0, &ids, &n, &err) == CP_OK);
        test_check_ids("hello 1234", ids, n,
                       (const int32_t[]){ID_MERGED(3), ' ', ID_MERGED(10), '4'}, 4);
        char *text = NULL;
        size_t len = 0;
        CHECK(cp_tokenizer_decode(tok, ids, n, &text, &len, &err) == CP_OK);
        CHECK_EQ_STR(text, "hello 1234");
        free(text);
        free(ids);
    }
    cp_tokenizer_free(tok);
    m = load_gguf_model(path);
    if (m)
        CHECK_EQ_INT(m->bos_id, -1); /* add_bos_token false */
    cp_bpe_free(m);
    free(path);
}

TEST(bpe_pre_gguf_qwen2_and_gpt2)
{
    static const struct {
        const char *pre;
        cp_bpe_pattern pattern;
        int ignore_merges;
    } cases[] = {
        {"qwen2", CP_BPE_PATTERN_QWEN2, 0},
        {"llama-v3", CP_BPE_PATTERN_LLAMA3, 1},
        {"gpt-2", CP_BPE_PATTERN_GPT2, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char *path = write_gguf(cases[i].pre, -1, ID_BOS);
        cp_bpe_model *m = load_gguf_model(path);
        free(path);
        if (!m)
            continue;
        CHECK_EQ_INT(m->pattern, cases[i].pattern);
        CHECK_EQ_INT(m->ignore_merges, cases[i].ignore_merges);
        CHECK_EQ_INT(m->bos_id, cases[i].ignore_merges ? ID_BOS : -1);
        check_round_trip(m, cases[i].pre, "it's 12345 \xe4\xbd\xa0\xe5\xa5\xbd!\n\n  x", 23);
        cp_bpe_free(m);
    }
}

/* Loads path as GGUF and checks the one-line message. */
static void check_gguf_rejected(const char *path, const char *fragment)
{
    cp_sp_model *sp = NULL;
    cp_bpe_model *bpe = NULL;
    cp_error err = {0};
    CHECK_EQ_INT(cp_tokenizer_gguf_load(path, &sp, &bpe, &err), CP_ERR_INPUT);
    CHECK(sp == NULL);
    CHECK(bpe == NULL);
    CHECK_MSG(strncmp(err.msg, path, strlen(path)) == 0, "message does not start with %s: %s",
              path, err.msg);
    CHECK_MSG(strstr(err.msg, fragment), "message lacks \"%s\": %s", fragment, err.msg);
}

TEST(bpe_pre_gguf_rejections)
{
    char *path = write_gguf("default", -1, -1);
    check_gguf_rejected(path, "tokenizer.ggml.pre is \"default\", which in llama.cpp selects "
                              "its generic BPE pre-tokenizer, not GPT-2's; only \"gpt-2\", "
                              "\"llama-bpe\", \"llama3\", \"llama-v3\" or \"qwen2\" are "
                              "supported");
    free(path);

    path = write_gguf("deepseek-llm", -1, -1);
    check_gguf_rejected(path, "tokenizer.ggml.pre is \"deepseek-llm\", expected \"gpt-2\", "
                              "\"llama-bpe\", \"llama3\", \"llama-v3\" or \"qwen2\"");
    free(path);

    /* The Llama-3 group requests BOS by default, so its id must be there. */
    path = write_gguf("llama-bpe", -1, -1);
    check_gguf_rejected(path, "tokenizer.ggml.bos_token_id is missing, but BOS is requested");
    free(path);
    path = write_gguf("qwen2", 1, -1);
    check_gguf_rejected(path, "tokenizer.ggml.bos_token_id is missing");
    free(path);
}
