/*
 * Tests for the GPT-2 style byte-level BPE tokenizer through cp_tokenizer.
 *
 * Reference ids come from llama.cpp's GPT-2 tokenizer test vectors (the
 * .inp/.out pair, whose ids match Hugging Face tokenizers). Both loaders are
 * checked against them; round trips cover tinyshakespeare and the vectors;
 * broken files are written here by editing or cutting the real ones.
 */
#include "test.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/file.h"
#include "tokenizer/bpe.h"
#include "tokenizer/tokenizer.h"

#define GPT2_DIR "tokenizers/gpt2"
#define GPT2_JSON "tokenizers/gpt2/tokenizer.json"
#define VECTORS "tokenizers/gguf-vocab/ggml-vocab-gpt-2.gguf"

/* ---------------------------------------------------------------------- */
/* Helpers                                                                */
/* ---------------------------------------------------------------------- */

static cp_tokenizer *load_shared(const char *relative)
{
    cp_tokenizer *tok = NULL;
    cp_error err = {0};
    char *path = test_shared(relative);
    CHECK_MSG(cp_tokenizer_load(path, &tok, &err) == CP_OK, "loading %s: %s", path, err.msg);
    return tok;
}

/* Reads a whole shared file. On error it fails the test and returns NULL. */
static char *read_shared(const char *relative, size_t *len)
{
    cp_error err = {0};
    char *text = NULL;
    char *path = test_shared(relative);
    CHECK_MSG(cp_file_read(path, &text, len, &err) == CP_OK, "reading %s: %s", path, err.msg);
    return text;
}

/* Checks that decode(encode(text)) gives text back byte for byte. */
static void check_round_trip(const cp_tokenizer *tok, const char *what, const char *text,
                             size_t len)
{
    cp_error err = {0};
    int32_t *ids = NULL;
    size_t n = 0, out_len = 0;
    char *out = NULL;
    CHECK_MSG(cp_tokenizer_encode(tok, text, len, 0, &ids, &n, &err) == CP_OK, "%s: %s", what,
              err.msg);
    CHECK_MSG(cp_tokenizer_decode(tok, ids, n, &out, &out_len, &err) == CP_OK, "%s: %s", what,
              err.msg);
    CHECK_MSG(out && out_len == len && memcmp(out, text, len) == 0,
              "%s: the round trip changed the text (%zu bytes in, %zu out)", what, len, out_len);
    free(out);
    free(ids);
}

/* ---------------------------------------------------------------------- */
/* Reference ids and round trips                                          */
/* ---------------------------------------------------------------------- */

/* llama.cpp's test-tokenizer-0 splits the .inp file at
 * "\n__ggml_vocab_test__\n", so the newline before a separator ends the
 * case before it and is not part of it. The .out file has one line of ids
 * per case. Every case is encoded without BOS and must also round-trip. */
static void check_test_vectors(const char *tokenizer)
{
    cp_tokenizer *tok = load_shared(tokenizer);
    size_t inp_len = 0, out_len = 0;
    char *inp = read_shared(VECTORS ".inp", &inp_len);
    char *out = read_shared(VECTORS ".out", &out_len);
    if (!tok || !inp || !out)
        goto done;

    static const char sep[] = "\n__ggml_vocab_test__\n";
    size_t pos = 0, line_start = 0, n_cases = 0;
    while (pos < inp_len && line_start < out_len) {
        const char *found = memmem(inp + pos, inp_len - pos, sep, sizeof sep - 1);
        size_t case_end = found ? (size_t)(found - inp) : inp_len;
        const char *nl = memchr(out + line_start, '\n', out_len - line_start);
        size_t line_end = nl ? (size_t)(nl - out) : out_len;

        cp_error err = {0};
        size_t n_want, n_got = 0;
        int32_t *want = test_parse_id_line(out + line_start, line_end - line_start, &n_want);
        int32_t *got = NULL;
        CHECK_MSG(cp_tokenizer_encode(tok, inp + pos, case_end - pos, 0, &got, &n_got, &err) ==
                      CP_OK, "%s", err.msg);
        char what[128];
        snprintf(what, sizeof what, "%s case %zu \"%.40s\"", tokenizer, n_cases, inp + pos);
        test_check_ids(what, got, n_got, want, n_want);
        check_round_trip(tok, what, inp + pos, case_end - pos);
        free(got);
        free(want);

        n_cases++;
        line_start = line_end + 1;
        pos = found ? case_end + sizeof sep - 1 : inp_len;
    }
    CHECK_MSG(pos >= inp_len, "the .inp file has more cases than the .out file has lines");
    CHECK_MSG(line_start >= out_len, "the .out file has more lines than the .inp file has cases");
    CHECK_EQ_INT(n_cases, 46);
done:
    free(inp);
    free(out);
    cp_tokenizer_free(tok);
}

TEST(bpe_vectors_vocab_and_merges)
{
    check_test_vectors(GPT2_DIR);
}

TEST(bpe_vectors_tokenizer_json)
{
    check_test_vectors(GPT2_JSON);
}

TEST(bpe_gpt2_basics)
{
    cp_tokenizer *tok = load_shared(GPT2_JSON);
    if (!tok)
        return;
    CHECK_EQ_INT(cp_tokenizer_vocab_size(tok), 50257);
    CHECK_EQ_INT(cp_tokenizer_bos_id(tok), -1);
    CHECK_EQ_INT(cp_tokenizer_eos_id(tok), 50256);

    /* add_bos is ignored: GPT-2 has no BOS token. */
    cp_error err = {0};
    int32_t *ids = NULL;
    size_t n = 0;
    CHECK(cp_tokenizer_encode(tok, "Hello world", 11, 1, &ids, &n, &err) == CP_OK);
    test_check_ids("Hello world with add_bos", ids, n, (const int32_t[]){15496, 995}, 2);
    free(ids);

    /* <|endoftext|> is one unit, even inside words, and decodes to no text. */
    const char *text = "a<|endoftext|>b <|endoftext|>";
    CHECK(cp_tokenizer_encode(tok, text, strlen(text), 0, &ids, &n, &err) == CP_OK);
    test_check_ids("endoftext", ids, n, (const int32_t[]){64, 50256, 65, 220, 50256}, 5);
    char *out = NULL;
    size_t out_len = 0;
    CHECK(cp_tokenizer_decode(tok, ids, n, &out, &out_len, &err) == CP_OK);
    CHECK_EQ_STR(out, "ab ");
    free(out);
    free(ids);

    CHECK(cp_tokenizer_encode(tok, "", 0, 1, &ids, &n, &err) == CP_OK);
    CHECK_EQ_INT(n, 0);
    free(ids);
    CHECK_EQ_INT(cp_tokenizer_decode(tok, (const int32_t[]){50257}, 1, &out, &out_len, &err),
                 CP_ERR_INPUT);
    CHECK_MSG(strstr(err.msg, "id 50257 is outside the vocabulary"), "%s", err.msg);
    cp_tokenizer_free(tok);
}

/* Pre-token boundaries of GPT-2's pattern, "|" between pre-tokens. */
TEST(bpe_pretokenizer_splits)
{
    static const char *const cases[][2] = {
        {"Hello world", "Hello| world"},
        {"  Hello", " | Hello"},
        {"a  \tb", "a|  |\t|b"}, /* the run gives up its last character */
        {"a\t\nb", "a|\t|\n|b"},
        {"end   ", "end|   "},
        {"it's we'll I'M", "it|'s| we|'ll| I|'|M"},
        {"x 123abc", "x| 123|abc"},
        {"!!'s ?!", "!!'|s| ?!"},
        {"\xc3\x84pfel \xe2\x85\xa7", "\xc3\x84pfel| \xe2\x85\xa7"}, /* Ä letter, Ⅷ number */
        {"a\xff\xfe b", "a|\xff\xfe| b"}, /* invalid UTF-8 counts as punctuation */
        {"\xc2\xa0x", "\xc2\xa0|x"},       /* NO-BREAK SPACE is \s but not ' ' */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *text = cases[i][0];
        size_t len = strlen(text);
        char got[64];
        size_t n = 0;
        for (size_t pos = 0; pos < len;) {
            size_t end = cp_bpe_pretoken_end(text, len, pos);
            CHECK_MSG(end > pos && end <= len, "case %zu: bad end %zu at %zu", i, end, pos);
            if (end <= pos || end > len)
                break;
            if (pos)
                got[n++] = '|';
            memcpy(got + n, text + pos, end - pos);
            n += end - pos;
            pos = end;
        }
        got[n] = '\0';
        CHECK_EQ_STR(got, cases[i][1]);
    }
}

/* All of tinyshakespeare round-trips. The time limit is loose, for
 * sanitizer builds; an optimized build takes well under a second. */
TEST(bpe_shakespeare_round_trip)
{
    cp_tokenizer *tok = load_shared(GPT2_DIR);
    size_t len = 0;
    char *text = read_shared("data/tinyshakespeare/input.txt", &len);
    if (tok && text) {
        struct timespec start;
        clock_gettime(CLOCK_MONOTONIC, &start);
        int32_t *ids = NULL;
        size_t n = 0;
        cp_error err = {0};
        CHECK_MSG(cp_tokenizer_encode(tok, text, len, 0, &ids, &n, &err) == CP_OK, "%s",
                  err.msg);
        double seconds = test_seconds_since(&start);
        printf("  tinyshakespeare: %zu bytes, %zu tokens in %.3f s\n", len, n, seconds);
        CHECK_MSG(seconds < 20, "encoding took %.1f s", seconds);
        CHECK(n > len / 5);
        CHECK(n < len / 2);
        free(ids);
        check_round_trip(tok, "tinyshakespeare", text, len);
    }
    free(text);
    cp_tokenizer_free(tok);
}

/* Both loaders give the same ids on text with every byte value. */
TEST(bpe_loaders_agree_on_all_bytes)
{
    cp_tokenizer *a = load_shared(GPT2_DIR), *b = load_shared(GPT2_JSON);
    char text[512];
    for (int i = 0; i < 512; i++)
        text[i] = (char)(i * 7 + (i >> 3));
    if (a && b) {
        cp_error err = {0};
        int32_t *ids_a = NULL, *ids_b = NULL;
        size_t n_a = 0, n_b = 0;
        CHECK(cp_tokenizer_encode(a, text, sizeof text, 0, &ids_a, &n_a, &err) == CP_OK);
        CHECK(cp_tokenizer_encode(b, text, sizeof text, 0, &ids_b, &n_b, &err) == CP_OK);
        test_check_ids("all bytes", ids_a, n_a, ids_b, n_b);
        free(ids_a);
        free(ids_b);
        check_round_trip(a, "all bytes", text, sizeof text);
    }
    cp_tokenizer_free(a);
    cp_tokenizer_free(b);
}

/* ---------------------------------------------------------------------- */
/* Command line                                                           */
/* ---------------------------------------------------------------------- */

TEST(bpe_cli_tokenize_and_decode)
{
    const char *text = "Hello, y'all! \xf0\x9f\x98\x81 <|endoftext|>\n";
    char args[512], *from_dir = NULL, *from_json = NULL, *err = NULL;
    snprintf(args, sizeof args, "tokenize --tokenizer '%s' --no-bos", test_shared(GPT2_DIR));
    CHECK_EQ_INT(test_run_cli(args, text, &from_dir, &err), 0);
    CHECK_MSG(err && err[0] == '\0', "stderr: %s", err);
    free(err);
    snprintf(args, sizeof args, "tokenize --tokenizer '%s'", test_shared(GPT2_JSON));
    CHECK_EQ_INT(test_run_cli(args, text, &from_json, NULL), 0);
    CHECK_EQ_STR(from_dir, from_json);
    CHECK_EQ_STR(from_dir, "15496 11 331 6 439 0 30325 223 220 50256 198\n");

    char *decoded = NULL;
    snprintf(args, sizeof args, "tokenize --tokenizer '%s' --decode", test_shared(GPT2_JSON));
    CHECK_EQ_INT(test_run_cli(args, from_dir, &decoded, NULL), 0);
    CHECK_EQ_STR(decoded, "Hello, y'all! \xf0\x9f\x98\x81 \n"); /* <|endoftext|> gives no text */
    free(decoded);

    snprintf(args, sizeof args, "tokenize --tokenizer '%s' --decode", test_shared(GPT2_DIR));
    CHECK_EQ_INT(test_run_cli(args, "15496 11 995", &decoded, NULL), 0);
    CHECK_EQ_STR(decoded, "Hello, world");
    free(decoded);
    free(from_dir);
    free(from_json);
}

/* ---------------------------------------------------------------------- */
/* Broken and unsupported files                                           */
/* ---------------------------------------------------------------------- */

/* Loads path (a file or folder) and checks for CP_ERR_INPUT with a one-line
 * message that starts with file and contains fragment. */
static void check_rejected_at(const char *path, const char *file, const char *fragment)
{
    cp_tokenizer *tok = NULL;
    cp_error err = {0};
    CHECK_EQ_INT(cp_tokenizer_load(path, &tok, &err), CP_ERR_INPUT);
    CHECK(tok == NULL);
    CHECK_MSG(strncmp(err.msg, file, strlen(file)) == 0, "message does not start with %s: %s",
              file, err.msg);
    CHECK_MSG(strstr(err.msg, fragment), "message lacks \"%s\": %s", fragment, err.msg);
    CHECK_MSG(!strchr(err.msg, '\n'), "message spans lines: %s", err.msg);
    cp_tokenizer_free(tok);
}

/* Writes a tokenizer.json and checks that it is rejected. */
static void check_json_rejected(const char *json, const char *fragment)
{
    char *path = test_write_file(test_tmpdir(), "tokenizer.json", json, strlen(json));
    check_rejected_at(path, path, fragment);
    free(path);
}

/* Writes vocab.json + merges.txt into a folder and checks that loading the
 * folder is rejected with a message naming bad_file. */
static void check_pair_rejected(const char *vocab, const char *merges, const char *bad_file,
                                const char *fragment)
{
    const char *dir = test_tmpdir();
    free(test_write_file(dir, "vocab.json", vocab, strlen(vocab)));
    free(test_write_file(dir, "merges.txt", merges, strlen(merges)));
    char file[512];
    snprintf(file, sizeof file, "%s/%s", dir, bad_file);
    check_rejected_at(dir, file, fragment);
}

#define PIPELINE                                                                  \
    "\"normalizer\": null, \"decoder\": {\"type\": \"ByteLevel\"}, "              \
    "\"pre_tokenizer\": {\"type\": \"ByteLevel\", \"add_prefix_space\": false}, "
#define SMALL_VOCAB "{\"a\": 0, \"b\": 1, \"ab\": 2}"

TEST(bpe_small_json_loads)
{
    const char *json = "{" PIPELINE "\"added_tokens\": [{\"id\": 3, \"content\": \"<|endoftext|>\","
                       " \"special\": true}], \"model\": {\"type\": \"BPE\", \"vocab\": "
                       SMALL_VOCAB ", \"merges\": [[\"a\", \"b\"]]}}";
    char *path = test_write_file(test_tmpdir(), "tokenizer.json", json, strlen(json));
    cp_tokenizer *tok = NULL;
    cp_error err = {0};
    CHECK_MSG(cp_tokenizer_load(path, &tok, &err) == CP_OK, "%s", err.msg);
    if (tok) {
        CHECK_EQ_INT(cp_tokenizer_vocab_size(tok), 4);
        CHECK_EQ_INT(cp_tokenizer_eos_id(tok), 3);
        int32_t *ids = NULL;
        size_t n = 0;
        CHECK(cp_tokenizer_encode(tok, "abba<|endoftext|>", 17, 0, &ids, &n, &err) == CP_OK);
        test_check_ids("abba", ids, n, (const int32_t[]){2, 1, 0, 3}, 4);
        free(ids);
        /* "c" has no single-byte token in this vocabulary. */
        CHECK_EQ_INT(cp_tokenizer_encode(tok, "abc", 3, 0, &ids, &n, &err), CP_ERR_INPUT);
        CHECK_MSG(strstr(err.msg, "byte 2 of the text: byte 0x63"), "%s", err.msg);
    }
    cp_tokenizer_free(tok);
    free(path);
}

TEST(bpe_json_rejections)
{
    check_json_rejected("", "byte 0: invalid JSON");
    check_json_rejected("{\"model\": {\"type\": \"BPE\"", "invalid JSON");
    check_json_rejected("[1, 2]", "not a JSON object");

    /* Pipeline settings that are not implemented. */
    check_json_rejected("{" PIPELINE "\"model\": {\"type\": \"WordPiece\", \"vocab\": {}}}",
                        "model.type: WordPiece is not supported");
    check_json_rejected("{" PIPELINE "\"model\": 3}", "model is missing");
    check_json_rejected("{\"pre_tokenizer\": {\"type\": \"Metaspace\"}, \"model\": {}}",
                        "pre_tokenizer: type Metaspace is not supported");
    check_json_rejected("{\"pre_tokenizer\": {\"type\": \"ByteLevel\", \"add_prefix_space\": "
                        "true}, \"model\": {}}",
                        "pre_tokenizer.add_prefix_space");
    check_json_rejected("{\"normalizer\": {\"type\": \"NFC\"}, \"model\": {}}",
                        "normalizer: type NFC is not supported");
    check_json_rejected("{" PIPELINE "\"model\": {\"type\": \"BPE\", \"byte_fallback\": true}}",
                        "model.byte_fallback");
    check_json_rejected("{" PIPELINE "\"model\": {\"type\": \"BPE\", \"dropout\": 0.1}}",
                        "model.dropout");

    /* Missing keys, bad ids and bad merges. */
    check_json_rejected("{" PIPELINE "\"model\": {\"type\": \"BPE\", \"merges\": []}}",
                        "model.vocab is missing");
    check_json_rejected("{" PIPELINE "\"model\": {\"type\": \"BPE\", \"vocab\": " SMALL_VOCAB "}}",
                        "model.merges is missing");
    check_json_rejected("{" PIPELINE "\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, "
                        "\"b\": 7}, \"merges\": []}}",
                        "model.vocab: the id of token \"b\" is not an integer in 0..1");
    check_json_rejected("{" PIPELINE "\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, "
                        "\"b\": 0}, \"merges\": []}}",
                        "model.vocab: id 0 is used by two tokens");
    check_json_rejected("{" PIPELINE "\"model\": {\"type\": \"BPE\", \"vocab\": " SMALL_VOCAB
                        ", \"merges\": [\"a c\"]}}",
                        "model.merges[0]: token \"c\" is not in the vocabulary");
    check_json_rejected("{" PIPELINE "\"model\": {\"type\": \"BPE\", \"vocab\": " SMALL_VOCAB
                        ", \"merges\": [\"a b\", \"b a\"]}}",
                        "model.merges[1]: the merged token \"ba\" is not in the vocabulary");
    check_json_rejected("{" PIPELINE "\"model\": {\"type\": \"BPE\", \"vocab\": " SMALL_VOCAB
                        ", \"merges\": [\"ab\"]}}",
                        "model.merges[0]: expected two tokens separated by one space");
    check_json_rejected("{" PIPELINE "\"model\": {\"type\": \"BPE\", \"vocab\": " SMALL_VOCAB
                        ", \"merges\": [[\"a\"]]}}",
                        "model.merges[0]: expected \"left right\" or [\"left\", \"right\"]");

    /* Added tokens. */
    check_json_rejected("{" PIPELINE "\"added_tokens\": [{\"id\": 5, \"content\": \"<x>\"}], "
                        "\"model\": {\"type\": \"BPE\", \"vocab\": " SMALL_VOCAB
                        ", \"merges\": []}}",
                        "id 3 is neither in model.vocab nor in added_tokens");
    check_json_rejected("{" PIPELINE "\"added_tokens\": [{\"id\": 3, \"content\": \"\"}], "
                        "\"model\": {\"type\": \"BPE\"}}",
                        "added_tokens[0].content is missing or empty");
    check_json_rejected("{" PIPELINE "\"added_tokens\": [{\"id\": 3, \"content\": \"<x>\", "
                        "\"lstrip\": true}], \"model\": {\"type\": \"BPE\"}}",
                        "added_tokens[0].lstrip: only false is supported");
}

/* The real tokenizer.json cut short at several points. */
TEST(bpe_json_truncated)
{
    size_t len = 0;
    char *text = read_shared(GPT2_JSON, &len);
    if (!text)
        return;
    size_t cuts[] = {1, 100, len / 3, len / 2, len - 2};
    for (size_t i = 0; i < sizeof cuts / sizeof cuts[0]; i++) {
        char *path = test_write_file(test_tmpdir(), "tokenizer.json", text, cuts[i]);
        check_rejected_at(path, path, "invalid JSON");
        free(path);
    }
    free(text);
}

TEST(bpe_vocab_and_merges_rejections)
{
    check_pair_rejected("{\"a\": 0,", "", "vocab.json", "invalid JSON");
    check_pair_rejected("{}", "", "vocab.json", "the vocabulary has 0 tokens");
    check_pair_rejected("{\"a\": \"x\"}", "", "vocab.json",
                        "the vocabulary: the id of token \"a\" is not an integer");
    check_pair_rejected(SMALL_VOCAB, "#version: 0.2\na b\nb c\n", "merges.txt",
                        "line 3: token \"c\" is not in the vocabulary");
    check_pair_rejected(SMALL_VOCAB, "a b\n\n", "merges.txt",
                        "line 2: expected two tokens separated by one space");
    check_pair_rejected(SMALL_VOCAB, "a b c\n", "merges.txt",
                        "line 1: expected two tokens separated by one space");
    check_pair_rejected(SMALL_VOCAB, "a", "merges.txt", "line 1: expected two tokens");

    /* The real merges.txt cut just after the space of its last line. */
    size_t len = 0;
    char *merges = read_shared(GPT2_DIR "/merges.txt", &len);
    char *vocab = read_shared(GPT2_DIR "/vocab.json", NULL);
    if (merges && vocab) {
        merges[len - 6] = '\0'; /* the last line is "\xc4\xa0 gazed\n" */
        check_pair_rejected(vocab, merges, "merges.txt", "line 50001: expected two tokens");
    }
    free(merges);
    free(vocab);

    const char *empty = test_tmpdir();
    check_rejected_at(empty, empty, "no tokenizer.model, tokenizer.json or vocab.json");
}

/* A folder with both files prefers tokenizer.json, which is checked here
 * by making it the broken one. */
TEST(bpe_folder_prefers_tokenizer_json)
{
    const char *dir = test_tmpdir();
    free(test_write_file(dir, "vocab.json", SMALL_VOCAB, strlen(SMALL_VOCAB)));
    free(test_write_file(dir, "merges.txt", "a b\n", 4));
    char *json = test_write_file(dir, "tokenizer.json", "{", 1);
    check_rejected_at(dir, json, "invalid JSON");
    free(json);
}
