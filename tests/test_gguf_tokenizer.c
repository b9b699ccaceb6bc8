/*
 * Tests for the GGUF writer and for tokenizers built from GGUF metadata.
 *
 * The copies of llama.cpp's vocab files that the tests read are damaged, so
 * the GGUF vocabularies here are written by cp_gguf_writer from the real Llama 2
 * tokenizer.model and GPT-2 tokenizer.json, with the keys and values that
 * llama.cpp's convert_hf_to_gguf.py writes. They must reproduce llama.cpp's
 * test vectors (the .inp/.out pairs) through `cpeft tokenize`. Small
 * synthetic vocabularies cover the rejections.
 */
#include "test.h"

#include <cJSON.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "core/dtype.h"
#include "core/file.h"
#include "io/gguf.h"
#include "io/gguf_write.h"
#include "tokenizer/sentencepiece.h"
#include "tokenizer/tokenizer.h"

#define LLAMA2_MODEL "tokenizers/llama2/tokenizer.model"
#define GPT2_JSON "tokenizers/gpt2/tokenizer.json"
#define SPM_VECTORS "tokenizers/gguf-vocab/ggml-vocab-llama-spm.gguf"
#define GPT2_VECTORS "tokenizers/gguf-vocab/ggml-vocab-gpt-2.gguf"

/* ---------------------------------------------------------------------- */
/* Helpers                                                                */
/* ---------------------------------------------------------------------- */

static cp_gguf_writer *new_writer(void)
{
    cp_gguf_writer *w = NULL;
    cp_error err = {0};
    CHECK_MSG(cp_gguf_writer_init(&w, &err) == CP_OK, "%s", err.msg);
    return w;
}

/* Writes w to dir/name and frees w. Returns the malloc'd path. */
static char *write_gguf(cp_gguf_writer *w, const char *dir, const char *name)
{
    char *path = cp_path_join(dir, name);
    cp_error err = {0};
    CHECK_MSG(cp_gguf_writer_write(w, path, &err) == CP_OK, "writing %s: %s", path, err.msg);
    cp_gguf_writer_free(w);
    return path;
}

/* Fails the test when a writer call failed. */
static void check_ok(cp_status st, const cp_error *err)
{
    CHECK_MSG(st == CP_OK, "%s", err->msg);
}

static char *read_shared(const char *relative, size_t *len)
{
    char *path = test_shared(relative);
    char *text = NULL;
    cp_error err = {0};
    CHECK_MSG(cp_file_read(path, &text, len, &err) == CP_OK, "%s", err.msg);
    free(path);
    return text;
}

static cp_tokenizer *load_tokenizer(const char *path)
{
    cp_tokenizer *tok = NULL;
    cp_error err = {0};
    CHECK_MSG(cp_tokenizer_load(path, &tok, &err) == CP_OK, "loading %s: %s", path, err.msg);
    return tok;
}

/* Checks that loading path fails with CP_ERR_INPUT and a one-line message
 * that starts with path and contains fragment and fragment2 (unless NULL). */
static void check_rejected(const char *path, const char *fragment, const char *fragment2)
{
    cp_tokenizer *tok = NULL;
    cp_error err = {0};
    CHECK_EQ_INT(cp_tokenizer_load(path, &tok, &err), CP_ERR_INPUT);
    CHECK(tok == NULL);
    CHECK_MSG(strncmp(err.msg, path, strlen(path)) == 0, "message does not start with %s: %s",
              path, err.msg);
    CHECK_MSG(strstr(err.msg, fragment), "message lacks \"%s\": %s", fragment, err.msg);
    CHECK_MSG(!fragment2 || strstr(err.msg, fragment2), "message lacks \"%s\": %s", fragment2,
              err.msg);
    CHECK_MSG(!strchr(err.msg, '\n'), "message spans lines: %s", err.msg);
    cp_tokenizer_free(tok);
}

/* ---------------------------------------------------------------------- */
/* GGUF vocabularies from the real tokenizers                             */
/* ---------------------------------------------------------------------- */

/* Writes Llama 2's tokenizer.model as llama.cpp's converter does for a
 * SentencePiece model: tokens, scores, SentencePiece piece types, the
 * special ids and add_bos_token / add_eos_token from tokenizer_config. */
static char *write_llama_spm_gguf(const char *dir)
{
    char *model_path = test_shared(LLAMA2_MODEL);
    cp_sp_model *m = NULL;
    cp_error err = {0};
    CHECK_MSG(cp_sp_load(model_path, &m, &err) == CP_OK, "%s", err.msg);
    free(model_path);
    if (!m)
        return NULL;
    /* The loader's defaults for the absent add_space_prefix and
     * remove_extra_whitespaces keys must be this model's settings. */
    CHECK(m->add_dummy_prefix);
    CHECK(!m->remove_extra_whitespaces);

    size_t n = (size_t)m->n_pieces;
    const char **texts = malloc(n * sizeof *texts);
    float *scores = malloc(n * sizeof *scores);
    int32_t *types = malloc(n * sizeof *types);
    for (size_t i = 0; i < n; i++) {
        texts[i] = m->pieces[i].text;
        scores[i] = m->pieces[i].score;
        types[i] = (int32_t)m->pieces[i].type;
    }

    cp_gguf_writer *w = new_writer();
    check_ok(cp_gguf_writer_set_str(w, "general.architecture", "llama", &err), &err);
    check_ok(cp_gguf_writer_set_str(w, "tokenizer.ggml.model", "llama", &err), &err);
    check_ok(cp_gguf_writer_set_str(w, "tokenizer.ggml.pre", "default", &err), &err);
    check_ok(cp_gguf_writer_set_str_array(w, "tokenizer.ggml.tokens", texts, NULL, n, &err), &err);
    check_ok(cp_gguf_writer_set_f32_array(w, "tokenizer.ggml.scores", scores, n, &err), &err);
    check_ok(cp_gguf_writer_set_i32_array(w, "tokenizer.ggml.token_type", types, n, &err), &err);
    check_ok(cp_gguf_writer_set_u32(w, "tokenizer.ggml.bos_token_id", (uint32_t)m->bos_id, &err),
             &err);
    check_ok(cp_gguf_writer_set_u32(w, "tokenizer.ggml.eos_token_id", (uint32_t)m->eos_id, &err),
             &err);
    check_ok(cp_gguf_writer_set_u32(w, "tokenizer.ggml.unknown_token_id", (uint32_t)m->unk_id,
                                    &err), &err);
    check_ok(cp_gguf_writer_set_bool(w, "tokenizer.ggml.add_bos_token", true, &err), &err);
    check_ok(cp_gguf_writer_set_bool(w, "tokenizer.ggml.add_eos_token", false, &err), &err);
    char *path = write_gguf(w, dir, "llama-spm.gguf");
    free(texts);
    free(scores);
    free(types);
    cp_sp_free(m);
    return path;
}

/* Returns a merge of tokenizer.json (a "left right" string or a
 * [left, right] pair) as one malloc'd "left right" string. */
static char *merge_string(const cJSON *item)
{
    if (cJSON_IsString(item))
        return strdup(item->valuestring);
    const cJSON *left = cJSON_GetArrayItem(item, 0), *right = cJSON_GetArrayItem(item, 1);
    size_t n = strlen(left->valuestring) + strlen(right->valuestring) + 2;
    char *s = malloc(n);
    snprintf(s, n, "%s %s", left->valuestring, right->valuestring);
    return s;
}

/* Writes GPT-2's tokenizer.json as llama.cpp's converter does: tokens in
 * vocab-file spelling by id, the special added tokens as control (3),
 * merges as "left right" strings, pre-tokenizer "gpt-2", and
 * <|endoftext|> as BOS, EOS and unknown token. */
static char *write_gpt2_gguf(const char *dir)
{
    size_t len;
    char *text = read_shared(GPT2_JSON, &len);
    cJSON *root = text ? cJSON_ParseWithLength(text, len) : NULL;
    free(text);
    CHECK(root != NULL);
    if (!root)
        return NULL;
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(model, "vocab");
    const cJSON *merges = cJSON_GetObjectItemCaseSensitive(model, "merges");
    const cJSON *added = cJSON_GetObjectItemCaseSensitive(root, "added_tokens");

    size_t n = (size_t)cJSON_GetArraySize(vocab);
    const cJSON *item;
    cJSON_ArrayForEach(item, added)
    {
        size_t id = (size_t)cJSON_GetObjectItemCaseSensitive(item, "id")->valueint;
        if (id >= n)
            n = id + 1;
    }
    const char **tokens = calloc(n, sizeof *tokens);
    int32_t *types = malloc(n * sizeof *types);
    for (size_t i = 0; i < n; i++)
        types[i] = 1;
    cJSON_ArrayForEach(item, vocab)
    {
        tokens[item->valueint] = item->string;
    }
    uint32_t eos = 0;
    cJSON_ArrayForEach(item, added)
    {
        int id = cJSON_GetObjectItemCaseSensitive(item, "id")->valueint;
        tokens[id] = cJSON_GetObjectItemCaseSensitive(item, "content")->valuestring;
        bool special = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(item, "special"));
        types[id] = special ? 3 : 4;
        if (strcmp(tokens[id], "<|endoftext|>") == 0)
            eos = (uint32_t)id;
    }
    for (size_t i = 0; i < n; i++)
        CHECK_MSG(tokens[i] != NULL, "token %zu has no text in %s", i, GPT2_JSON);

    size_t n_merges = (size_t)cJSON_GetArraySize(merges);
    char **merge_strings = malloc(n_merges * sizeof *merge_strings);
    size_t k = 0;
    cJSON_ArrayForEach(item, merges)
    {
        merge_strings[k++] = merge_string(item);
    }

    cp_error err = {0};
    cp_gguf_writer *w = new_writer();
    check_ok(cp_gguf_writer_set_str(w, "general.architecture", "gpt2", &err), &err);
    check_ok(cp_gguf_writer_set_str(w, "tokenizer.ggml.model", "gpt2", &err), &err);
    check_ok(cp_gguf_writer_set_str(w, "tokenizer.ggml.pre", "gpt-2", &err), &err);
    check_ok(cp_gguf_writer_set_str_array(w, "tokenizer.ggml.tokens", tokens, NULL, n, &err),
             &err);
    check_ok(cp_gguf_writer_set_i32_array(w, "tokenizer.ggml.token_type", types, n, &err), &err);
    check_ok(cp_gguf_writer_set_str_array(w, "tokenizer.ggml.merges",
                                          (const char *const *)merge_strings, NULL, n_merges,
                                          &err), &err);
    check_ok(cp_gguf_writer_set_u32(w, "tokenizer.ggml.bos_token_id", eos, &err), &err);
    check_ok(cp_gguf_writer_set_u32(w, "tokenizer.ggml.eos_token_id", eos, &err), &err);
    check_ok(cp_gguf_writer_set_u32(w, "tokenizer.ggml.unknown_token_id", eos, &err), &err);
    char *path = write_gguf(w, dir, "gpt-2.gguf");

    for (size_t i = 0; i < n_merges; i++)
        free(merge_strings[i]);
    free(merge_strings);
    free(tokens);
    free(types);
    cJSON_Delete(root);
    return path;
}

/* Decodes ids with tok and checks that the text comes back unchanged. */
static void check_round_trip(const cp_tokenizer *tok, const char *what, const char *text,
                             size_t len, const int32_t *ids, size_t n_ids)
{
    char *out = NULL;
    size_t out_len = 0;
    cp_error err = {0};
    CHECK_MSG(cp_tokenizer_decode(tok, ids, n_ids, &out, &out_len, &err) == CP_OK, "%s: %s",
              what, err.msg);
    CHECK_MSG(out && out_len == len && memcmp(out, text, len) == 0,
              "%s: decoding gave \"%.60s\" (%zu bytes), expected %zu bytes", what,
              out ? out : "(null)", out_len, len);
    free(out);
}

/* Runs `cpeft tokenize --tokenizer gguf --no-bos` on every case of the
 * vectors' .inp file and compares with the .out line. llama.cpp's
 * test-tokenizer-0 splits the .inp file at "\n__ggml_vocab_test__\n" and
 * encodes without BOS. Each case must also decode back to its text.
 * Returns the number of cases whose ids match. */
static int check_vectors_cli(const char *gguf, const char *vectors)
{
    char inp_name[256], out_name[256];
    snprintf(inp_name, sizeof inp_name, "%s.inp", vectors);
    snprintf(out_name, sizeof out_name, "%s.out", vectors);
    size_t inp_len = 0, out_len = 0;
    char *inp = read_shared(inp_name, &inp_len);
    char *out = read_shared(out_name, &out_len);
    cp_tokenizer *tok = load_tokenizer(gguf);
    int n_pass = 0;
    if (!inp || !out || !tok)
        goto done;

    char args[1024];
    snprintf(args, sizeof args, "tokenize --tokenizer '%s' --no-bos", gguf);
    static const char sep[] = "\n__ggml_vocab_test__\n";
    size_t pos = 0, line_start = 0, n_cases = 0;
    while (pos < inp_len && line_start < out_len) {
        const char *found = memmem(inp + pos, inp_len - pos, sep, sizeof sep - 1);
        size_t case_end = found ? (size_t)(found - inp) : inp_len;
        const char *nl = memchr(out + line_start, '\n', out_len - line_start);
        size_t line_end = nl ? (size_t)(nl - out) : out_len;

        char *text = strndup(inp + pos, case_end - pos);
        char *stdout_text = NULL, *stderr_text = NULL;
        int rc = test_run_cli(args, text, &stdout_text, &stderr_text);
        char what[128];
        snprintf(what, sizeof what, "%s case %zu \"%.40s\"", vectors, n_cases, text);
        CHECK_MSG(rc == 0, "%s: exit %d: %s", what, rc, stderr_text ? stderr_text : "");

        size_t n_want = 0, n_got = 0;
        int32_t *want = test_parse_id_line(out + line_start, line_end - line_start, &n_want);
        size_t stdout_len = stdout_text ? strlen(stdout_text) : 0;
        if (stdout_len > 0 && stdout_text[stdout_len - 1] == '\n')
            stdout_len--; /* the CLI ends the id line with a newline */
        int32_t *got = stdout_text ? test_parse_id_line(stdout_text, stdout_len, &n_got) : NULL;
        int failures = cp_test_failures;
        test_check_ids(what, got, n_got, want, n_want);
        n_pass += cp_test_failures == failures && rc == 0;
        check_round_trip(tok, what, text, case_end - pos, want, n_want);

        free(got);
        free(want);
        free(stdout_text);
        free(stderr_text);
        free(text);
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
    return n_pass;
}

TEST(gguf_tok_llama_spm_vectors)
{
    char *gguf = write_llama_spm_gguf(test_tmpdir());
    if (!gguf)
        return;
    int n_pass = check_vectors_cli(gguf, SPM_VECTORS);
    CHECK_EQ_INT(n_pass, 46);
    fprintf(stderr, "    llama-spm from GGUF: %d of 46 test vectors match\n", n_pass);
    free(gguf);
}

TEST(gguf_tok_gpt2_vectors)
{
    char *gguf = write_gpt2_gguf(test_tmpdir());
    if (!gguf)
        return;
    int n_pass = check_vectors_cli(gguf, GPT2_VECTORS);
    CHECK_EQ_INT(n_pass, 46);
    fprintf(stderr, "    gpt-2 from GGUF: %d of 46 test vectors match\n", n_pass);
    free(gguf);
}

/* llama.cpp's own vocab files, when the shared copies are intact: the
 * shared ones are damaged (tests/test_gguf.c checks that they are
 * rejected), so this runs only once they are restored. */
TEST(gguf_tok_llama_cpp_vocab_files)
{
    const char *vectors[] = {SPM_VECTORS, GPT2_VECTORS};
    for (int i = 0; i < 2; i++) {
        char *path = test_shared(vectors[i]);
        cp_gguf *g = NULL;
        cp_error err = {0};
        if (cp_gguf_open(path, &g, &err) != CP_OK) {
            fprintf(stderr, "    NOTE: %s does not open (%s); its vectors are checked only on the "
                    "GGUF this file writes\n", vectors[i], err.msg);
            continue;
        }
        cp_gguf_close(g);
        int n_pass = check_vectors_cli(path, vectors[i]);
        CHECK_EQ_INT(n_pass, 46);
        fprintf(stderr, "    %s: %d of 46 test vectors match\n", vectors[i], n_pass);
    }
}

/* The GGUF vocabulary must agree with the file it was made from on every
 * property the interface shows, and the CLI must take add_bos from the
 * GGUF: BOS for Llama (add_bos_token true), none for GPT-2. */
TEST(gguf_tok_matches_source)
{
    const char *dir = test_tmpdir();
    char *spm = write_llama_spm_gguf(dir);
    char *gpt2 = write_gpt2_gguf(dir);
    char *llama_model = test_shared(LLAMA2_MODEL);
    char *gpt2_json = test_shared(GPT2_JSON);
    const char *pairs[2][2] = {{spm, llama_model}, {gpt2, gpt2_json}};
    static const char text[] = "Hello  world,\n\tthe 1234 caf\xc3\xa9s <|endoftext|> \xf0\x9f\x98\x81";
    for (int k = 0; k < 2; k++) {
        cp_tokenizer *a = pairs[k][0] ? load_tokenizer(pairs[k][0]) : NULL;
        cp_tokenizer *b = load_tokenizer(pairs[k][1]);
        if (!a || !b) {
            cp_tokenizer_free(a);
            cp_tokenizer_free(b);
            continue;
        }
        CHECK_EQ_INT(cp_tokenizer_vocab_size(a), cp_tokenizer_vocab_size(b));
        CHECK_EQ_INT(cp_tokenizer_bos_id(a), cp_tokenizer_bos_id(b));
        CHECK_EQ_INT(cp_tokenizer_eos_id(a), cp_tokenizer_eos_id(b));
        int32_t *ids_a = NULL, *ids_b = NULL;
        size_t n_a = 0, n_b = 0;
        cp_error err = {0};
        CHECK(cp_tokenizer_encode(a, text, sizeof text - 1, 0, &ids_a, &n_a, &err) == CP_OK);
        CHECK(cp_tokenizer_encode(b, text, sizeof text - 1, 0, &ids_b, &n_b, &err) == CP_OK);
        test_check_ids(pairs[k][0], ids_a, n_a, ids_b, n_b);
        free(ids_a);
        free(ids_b);
        cp_tokenizer_free(a);
        cp_tokenizer_free(b);
    }

    char args[1024], *out = NULL;
    snprintf(args, sizeof args, "tokenize --tokenizer '%s'", spm);
    CHECK_EQ_INT(test_run_cli(args, "Hello world", &out, NULL), 0);
    CHECK_EQ_STR(out, "1 15043 3186\n");
    free(out);
    snprintf(args, sizeof args, "tokenize --tokenizer '%s'", gpt2);
    CHECK_EQ_INT(test_run_cli(args, "Hello world", &out, NULL), 0);
    CHECK_EQ_STR(out, "15496 995\n");
    free(out);
    snprintf(args, sizeof args, "tokenize --tokenizer '%s' --decode", spm);
    CHECK_EQ_INT(test_run_cli(args, "1 15043 3186 2", &out, NULL), 0);
    CHECK_EQ_STR(out, "Hello world");
    free(out);
    free(spm);
    free(gpt2);
    free(llama_model);
    free(gpt2_json);
}

/* ---------------------------------------------------------------------- */
/* Synthetic vocabularies and their rejections                            */
/* ---------------------------------------------------------------------- */

#define TINY_N 8
static const char *const tiny_sp_tokens[TINY_N] = {"<unk>", "<s>", "</s>", "\xe2\x96\x81",
                                                   "a",     "b",   "\xe2\x96\x81" "a", "ab"};
static const float tiny_sp_scores[TINY_N] = {0, 0, 0, -1, -2, -3, -0.5f, -0.25f};
static const int32_t tiny_sp_types[TINY_N] = {2, 3, 3, 1, 1, 1, 1, 1};

/* A valid SentencePiece vocabulary of 8 pieces. Every key except skip is
 * set, so a test can drop one key or replace one value. */
static cp_gguf_writer *tiny_spm(const char *skip)
{
    cp_gguf_writer *w = new_writer();
    cp_error err = {0};
    struct { const char *key; cp_status st; } steps[9];
    int n = 0;
#define STEP(k, call) steps[n].key = (k), steps[n++].st = strcmp((k), skip) ? (call) : CP_OK
    STEP("tokenizer.ggml.model", cp_gguf_writer_set_str(w, "tokenizer.ggml.model", "llama", &err));
    STEP("tokenizer.ggml.tokens", cp_gguf_writer_set_str_array(w, "tokenizer.ggml.tokens",
                                                               tiny_sp_tokens, NULL, TINY_N, &err));
    STEP("tokenizer.ggml.scores", cp_gguf_writer_set_f32_array(w, "tokenizer.ggml.scores",
                                                               tiny_sp_scores, TINY_N, &err));
    STEP("tokenizer.ggml.token_type", cp_gguf_writer_set_i32_array(w, "tokenizer.ggml.token_type",
                                                                   tiny_sp_types, TINY_N, &err));
    STEP("tokenizer.ggml.bos_token_id", cp_gguf_writer_set_u32(w, "tokenizer.ggml.bos_token_id",
                                                               1, &err));
    STEP("tokenizer.ggml.eos_token_id", cp_gguf_writer_set_u32(w, "tokenizer.ggml.eos_token_id",
                                                               2, &err));
    STEP("tokenizer.ggml.unknown_token_id",
         cp_gguf_writer_set_u32(w, "tokenizer.ggml.unknown_token_id", 0, &err));
    STEP("tokenizer.ggml.add_bos_token",
         cp_gguf_writer_set_bool(w, "tokenizer.ggml.add_bos_token", false, &err));
#undef STEP
    for (int i = 0; i < n; i++)
        CHECK_MSG(steps[i].st == CP_OK, "%s: %s", steps[i].key, err.msg);
    return w;
}

static const char *const tiny_bpe_tokens[] = {"a", "b", "c", "\xc4\xa0", "ab", "\xc4\xa0" "a",
                                              "<|endoftext|>"};
static const int32_t tiny_bpe_types[] = {1, 1, 1, 1, 1, 1, 3};
static const char *const tiny_bpe_merges[] = {"a b", "\xc4\xa0 a"};

/* A valid byte-level BPE vocabulary of 7 tokens and 2 merges. */
static cp_gguf_writer *tiny_bpe(const char *skip)
{
    cp_gguf_writer *w = new_writer();
    cp_error err = {0};
    cp_status st = CP_OK;
    if (strcmp(skip, "tokenizer.ggml.model") && !st)
        st = cp_gguf_writer_set_str(w, "tokenizer.ggml.model", "gpt2", &err);
    if (strcmp(skip, "tokenizer.ggml.pre") && !st)
        st = cp_gguf_writer_set_str(w, "tokenizer.ggml.pre", "gpt-2", &err);
    if (strcmp(skip, "tokenizer.ggml.tokens") && !st)
        st = cp_gguf_writer_set_str_array(w, "tokenizer.ggml.tokens", tiny_bpe_tokens, NULL, 7,
                                          &err);
    if (strcmp(skip, "tokenizer.ggml.token_type") && !st)
        st = cp_gguf_writer_set_i32_array(w, "tokenizer.ggml.token_type", tiny_bpe_types, 7, &err);
    if (strcmp(skip, "tokenizer.ggml.merges") && !st)
        st = cp_gguf_writer_set_str_array(w, "tokenizer.ggml.merges", tiny_bpe_merges, NULL, 2,
                                          &err);
    if (strcmp(skip, "tokenizer.ggml.eos_token_id") && !st)
        st = cp_gguf_writer_set_u32(w, "tokenizer.ggml.eos_token_id", 6, &err);
    check_ok(st, &err);
    return w;
}

/* Encodes text with the tokenizer in path, compares the ids and checks
 * that they decode to decoded. */
static void check_encode(const char *path, const char *text, const int32_t *want, size_t n_want,
                         const char *decoded)
{
    cp_tokenizer *tok = load_tokenizer(path);
    if (!tok)
        return;
    int32_t *ids = NULL;
    size_t n = 0;
    cp_error err = {0};
    CHECK_MSG(cp_tokenizer_encode(tok, text, strlen(text), 0, &ids, &n, &err) == CP_OK, "%s",
              err.msg);
    test_check_ids(text, ids, n, want, n_want);
    check_round_trip(tok, text, decoded, strlen(decoded), ids, n);
    free(ids);
    cp_tokenizer_free(tok);
}

TEST(gguf_tok_tiny_vocabularies)
{
    const char *dir = test_tmpdir();
    char *spm = write_gguf(tiny_spm(""), dir, "spm.gguf");
    /* The best-scoring pair merges first, so "ab" (-0.25) beats "▁a" (-0.5). */
    static const int32_t spm_ids[] = {3, 7, 6, 7}; /* "▁" "ab" "▁a" "ab" */
    check_encode(spm, "ab aab", spm_ids, 4, "ab aab");
    cp_tokenizer *tok = load_tokenizer(spm);
    if (tok) {
        CHECK_EQ_INT(cp_tokenizer_vocab_size(tok), TINY_N);
        CHECK_EQ_INT(cp_tokenizer_bos_id(tok), 1);
        CHECK_EQ_INT(cp_tokenizer_eos_id(tok), 2);
    }
    cp_tokenizer_free(tok);

    /* add_space_prefix false drops the leading "▁". */
    cp_gguf_writer *w = tiny_spm("");
    cp_error err = {0};
    check_ok(cp_gguf_writer_set_bool(w, "tokenizer.ggml.add_space_prefix", false, &err), &err);
    char *no_prefix = write_gguf(w, dir, "no-prefix.gguf");
    static const int32_t no_prefix_ids[] = {7, 6}; /* "ab" "▁a" */
    check_encode(no_prefix, "ab a", no_prefix_ids, 2, "ab a");

    char *bpe = write_gguf(tiny_bpe(""), dir, "bpe.gguf");
    static const int32_t bpe_ids[] = {4, 5, 3, 2, 6}; /* "ab" "Ġa" "Ġ" "c" <|endoftext|> */
    check_encode(bpe, "ab a c<|endoftext|>", bpe_ids, 5, "ab a c"); /* control: no text */

    /* add_bos_token false in the GGUF turns BOS off in the CLI. */
    char args[1024], *out = NULL;
    snprintf(args, sizeof args, "tokenize --tokenizer '%s'", spm);
    CHECK_EQ_INT(test_run_cli(args, "ab", &out, NULL), 0);
    CHECK_EQ_STR(out, "3 7\n");
    free(out);
    free(spm);
    free(no_prefix);
    free(bpe);
}

/* Writes w as dir/bad.gguf and checks the rejection. */
static void check_writer_rejected(cp_gguf_writer *w, const char *fragment, const char *fragment2)
{
    char *path = write_gguf(w, test_tmpdir(), "bad.gguf");
    check_rejected(path, fragment, fragment2);
    free(path);
}

TEST(gguf_tok_rejects_missing_and_mismatched)
{
    cp_error err = {0};
    check_writer_rejected(tiny_spm("tokenizer.ggml.tokens"), "'tokenizer.ggml.tokens' not found",
                          NULL);
    check_writer_rejected(tiny_spm("tokenizer.ggml.model"), "'tokenizer.ggml.model' not found",
                          NULL);
    check_writer_rejected(tiny_spm("tokenizer.ggml.scores"), "'tokenizer.ggml.scores' not found",
                          NULL);
    check_writer_rejected(tiny_bpe("tokenizer.ggml.merges"), "'tokenizer.ggml.merges' not found",
                          NULL);

    cp_gguf_writer *w = tiny_spm("");
    check_ok(cp_gguf_writer_set_f32_array(w, "tokenizer.ggml.scores", tiny_sp_scores, TINY_N - 1,
                                          &err), &err);
    check_writer_rejected(w, "tokenizer.ggml.scores has 7 entries, expected 8", "re-export");

    w = tiny_spm("");
    check_ok(cp_gguf_writer_set_i32_array(w, "tokenizer.ggml.token_type", tiny_sp_types, 3, &err),
             &err);
    check_writer_rejected(w, "tokenizer.ggml.token_type has 3 entries, expected 8", NULL);

    w = tiny_bpe("");
    check_ok(cp_gguf_writer_set_i32_array(w, "tokenizer.ggml.token_type", tiny_bpe_types, 6, &err),
             &err);
    check_writer_rejected(w, "tokenizer.ggml.token_type has 6 entries, expected 7", NULL);

    w = tiny_spm("");
    check_ok(cp_gguf_writer_set_str_array(w, "tokenizer.ggml.tokens", tiny_sp_tokens, NULL, 0,
                                          &err), &err);
    check_writer_rejected(w, "tokenizer.ggml.tokens has 0 entries, expected 1", NULL);
}

TEST(gguf_tok_rejects_unknown_kinds)
{
    cp_error err = {0};
    cp_gguf_writer *w = tiny_spm("");
    check_ok(cp_gguf_writer_set_str(w, "tokenizer.ggml.model", "bert", &err), &err);
    check_writer_rejected(w, "tokenizer.ggml.model is \"bert\"", "\"llama\" (SentencePiece)");

    w = tiny_bpe("");
    check_ok(cp_gguf_writer_set_str(w, "tokenizer.ggml.pre", "deepseek-llm", &err), &err);
    check_writer_rejected(w, "tokenizer.ggml.pre is \"deepseek-llm\", expected \"gpt-2\"", NULL);

    w = tiny_bpe("");
    check_ok(cp_gguf_writer_set_str(w, "tokenizer.ggml.pre", "default", &err), &err);
    check_writer_rejected(w, "tokenizer.ggml.pre is \"default\"", "not GPT-2's");

    check_writer_rejected(tiny_bpe("tokenizer.ggml.pre"), "tokenizer.ggml.pre is absent", NULL);

    w = tiny_spm("");
    check_ok(cp_gguf_writer_set_str(w, "tokenizer.ggml.pre", "llama3", &err), &err);
    check_writer_rejected(w, "tokenizer.ggml.pre is \"llama3\", expected \"default\"", NULL);
}

TEST(gguf_tok_rejects_bad_values)
{
    cp_error err = {0};
    static const char *const bad_merges[] = {"a b", "a z"};
    cp_gguf_writer *w = tiny_bpe("");
    check_ok(cp_gguf_writer_set_str_array(w, "tokenizer.ggml.merges", bad_merges, NULL, 2, &err),
             &err);
    check_writer_rejected(w, "tokenizer.ggml.merges[1]: token \"z\" is not in the vocabulary",
                          "re-export");

    static const char *const one_sided[] = {"ab"};
    w = tiny_bpe("");
    check_ok(cp_gguf_writer_set_str_array(w, "tokenizer.ggml.merges", one_sided, NULL, 1, &err),
             &err);
    check_writer_rejected(w, "tokenizer.ggml.merges[0]: expected two tokens", NULL);

    w = tiny_spm("");
    check_ok(cp_gguf_writer_set_u32(w, "tokenizer.ggml.bos_token_id", 100, &err), &err);
    check_writer_rejected(w, "tokenizer.ggml.bos_token_id is 100, expected a token id below 8",
                          NULL);

    w = tiny_bpe("");
    check_ok(cp_gguf_writer_set_u32(w, "tokenizer.ggml.eos_token_id", 7, &err), &err);
    check_writer_rejected(w, "tokenizer.ggml.eos_token_id is 7, expected a token id below 7",
                          NULL);

    w = tiny_spm("");
    check_ok(cp_gguf_writer_set_u32(w, "tokenizer.ggml.unknown_token_id", 4, &err), &err);
    check_writer_rejected(w, "tokenizer.ggml.unknown_token_id is 4", "expected 2 (unknown)");

    int32_t types[TINY_N];
    memcpy(types, tiny_sp_types, sizeof types);
    types[5] = 9;
    w = tiny_spm("");
    check_ok(cp_gguf_writer_set_i32_array(w, "tokenizer.ggml.token_type", types, TINY_N, &err),
             &err);
    check_writer_rejected(w, "tokenizer.ggml.token_type[5] is 9", NULL);

    types[5] = 2; /* a second unknown piece */
    w = tiny_spm("");
    check_ok(cp_gguf_writer_set_i32_array(w, "tokenizer.ggml.token_type", types, TINY_N, &err),
             &err);
    check_writer_rejected(w, "tokenizer.ggml.tokens[5]: piece 5 is a second UNKNOWN piece", NULL);

    const char *repeated[TINY_N];
    memcpy(repeated, tiny_sp_tokens, sizeof repeated);
    repeated[7] = "a";
    w = tiny_spm("");
    check_ok(cp_gguf_writer_set_str_array(w, "tokenizer.ggml.tokens", repeated, NULL, TINY_N,
                                          &err), &err);
    check_writer_rejected(w, "tokenizer.ggml.tokens[7]: piece 7 \"a\" repeats piece 4", NULL);

    static const int32_t bpe_byte_type[] = {1, 1, 1, 1, 1, 6, 3};
    w = tiny_bpe("");
    check_ok(cp_gguf_writer_set_i32_array(w, "tokenizer.ggml.token_type", bpe_byte_type, 7, &err),
             &err);
    check_writer_rejected(w, "tokenizer.ggml.token_type[5] is 6", "\"gpt2\" vocabulary");

    const char *bpe_repeated[7];
    memcpy(bpe_repeated, tiny_bpe_tokens, sizeof bpe_repeated);
    bpe_repeated[2] = "a";
    w = tiny_bpe("");
    check_ok(cp_gguf_writer_set_str_array(w, "tokenizer.ggml.tokens", bpe_repeated, NULL, 7, &err),
             &err);
    check_writer_rejected(w, "tokenizer.ggml.tokens[2]: token \"a\" repeats token 0", NULL);
}

TEST(gguf_tok_rejects_wrong_types)
{
    cp_error err = {0};
    cp_gguf_writer *w = tiny_spm("");
    check_ok(cp_gguf_writer_set_i32(w, "tokenizer.ggml.bos_token_id", 1, &err), &err);
    check_writer_rejected(w, "'tokenizer.ggml.bos_token_id' has type int32, expected uint32",
                          NULL);

    w = tiny_spm("");
    check_ok(cp_gguf_writer_set_i32_array(w, "tokenizer.ggml.scores", tiny_sp_types, TINY_N, &err),
             &err);
    check_writer_rejected(w, "'tokenizer.ggml.scores' is an array of int32, expected an array of "
                          "float32", NULL);

    w = tiny_spm("");
    check_ok(cp_gguf_writer_set_u32(w, "tokenizer.ggml.model", 1, &err), &err);
    check_writer_rejected(w, "'tokenizer.ggml.model' has type uint32, expected string", NULL);

    w = tiny_spm("");
    check_ok(cp_gguf_writer_set_u32(w, "tokenizer.ggml.add_bos_token", 1, &err), &err);
    char *path = write_gguf(w, test_tmpdir(), "bad-add-bos.gguf");
    char args[1024], *stderr_text = NULL;
    snprintf(args, sizeof args, "tokenize --tokenizer '%s'", path);
    CHECK_EQ_INT(test_run_cli(args, "ab", NULL, &stderr_text), 2);
    CHECK_MSG(stderr_text && strstr(stderr_text, "'tokenizer.ggml.add_bos_token' has type uint32"),
              "stderr: %s", stderr_text ? stderr_text : "(null)");
    free(stderr_text);
    free(path);

    w = tiny_spm("");
    check_ok(cp_gguf_writer_set_str(w, "tokenizer.ggml.add_eos_token", "no", &err), &err);
    check_writer_rejected(w, "'tokenizer.ggml.add_eos_token' has type string, expected bool",
                          NULL);
}

/* ---------------------------------------------------------------------- */
/* The writer                                                             */
/* ---------------------------------------------------------------------- */

/* Opens path with the reader; fails the test and returns NULL on error. */
static cp_gguf *open_gguf(const char *path)
{
    cp_gguf *g = NULL;
    cp_error err = {0};
    CHECK_MSG(cp_gguf_open(path, &g, &err) == CP_OK, "%s", err.msg);
    return g;
}

TEST(gguf_write_metadata_round_trip)
{
    cp_error err = {0};
    cp_gguf_writer *w = new_writer();
    static const char *const strings[] = {"one", "", "t\0wo"};
    static const size_t lens[] = {3, 0, 4};
    static const float floats[] = {1.5f, -0.0f, 3.25e-8f};
    static const int32_t ints[] = {-7, 0, INT32_MAX, INT32_MIN};
    check_ok(cp_gguf_writer_set_str(w, "general.name", "first", &err), &err);
    check_ok(cp_gguf_writer_set_u32(w, "a.u32", 4000000000u, &err), &err);
    check_ok(cp_gguf_writer_set_i32(w, "a.i32", -123456, &err), &err);
    check_ok(cp_gguf_writer_set_f32(w, "a.f32", 0.1f, &err), &err);
    check_ok(cp_gguf_writer_set_bool(w, "a.bool", true, &err), &err);
    check_ok(cp_gguf_writer_set_str_array(w, "a.strings", strings, lens, 3, &err), &err);
    check_ok(cp_gguf_writer_set_f32_array(w, "a.floats", floats, 3, &err), &err);
    check_ok(cp_gguf_writer_set_i32_array(w, "a.ints", ints, 4, &err), &err);
    check_ok(cp_gguf_writer_set_i32_array(w, "a.empty", NULL, 0, &err), &err);
    check_ok(cp_gguf_writer_set_str(w, "general.name", "second", &err), &err); /* replaces */
    char *path = write_gguf(w, test_tmpdir(), "meta.gguf");
    cp_gguf *g = open_gguf(path);
    free(path);
    if (!g)
        return;

    CHECK_EQ_INT(cp_gguf_version(g), 3);
    CHECK_EQ_INT(cp_gguf_alignment(g), 32);
    CHECK_EQ_INT(cp_gguf_kv_count(g), 9);
    CHECK_EQ_INT(cp_gguf_tensor_count(g), 0);
    cp_gguf_str key = cp_gguf_kv_key(cp_gguf_kv_at(g, 0));
    CHECK_EQ_INT(key.len, 12); /* the replaced key kept its place */
    if (key.len == 12)
        CHECK(memcmp(key.data, "general.name", 12) == 0);

    cp_gguf_str s;
    uint32_t u;
    int32_t i;
    float f;
    int b;
    CHECK(cp_gguf_get_str(g, "general.name", &s, &err) == CP_OK);
    CHECK_EQ_INT(s.len, 6);
    if (s.len == 6)
        CHECK(memcmp(s.data, "second", 6) == 0);
    CHECK(cp_gguf_get_u32(g, "a.u32", &u, &err) == CP_OK);
    CHECK_EQ_INT(u, 4000000000u);
    CHECK(cp_gguf_get_i32(g, "a.i32", &i, &err) == CP_OK);
    CHECK_EQ_INT(i, -123456);
    CHECK(cp_gguf_get_f32(g, "a.f32", &f, &err) == CP_OK);
    CHECK(f == 0.1f);
    CHECK(cp_gguf_get_bool(g, "a.bool", &b, &err) == CP_OK);
    CHECK_EQ_INT(b, 1);

    const cp_gguf_kv *kv;
    uint64_t n;
    CHECK(cp_gguf_get_array(g, "a.strings", CP_GGUF_TYPE_STRING, &kv, &n, &err) == CP_OK);
    CHECK_EQ_INT(n, 3);
    for (uint64_t k = 0; k < n && k < 3; k++) {
        cp_gguf_str e = cp_gguf_array_str(kv, k);
        CHECK_EQ_INT(e.len, lens[k]);
        if (e.len == lens[k])
            CHECK(memcmp(e.data, strings[k], lens[k]) == 0);
    }
    CHECK(cp_gguf_get_array(g, "a.floats", CP_GGUF_TYPE_FLOAT32, &kv, &n, &err) == CP_OK);
    CHECK_EQ_INT(n, 3);
    for (uint64_t k = 0; k < n && k < 3; k++)
        CHECK((float)cp_gguf_array_number(kv, k) == floats[k]);
    CHECK(signbit(cp_gguf_array_number(kv, 1)));
    CHECK(cp_gguf_get_array(g, "a.ints", CP_GGUF_TYPE_INT32, &kv, &n, &err) == CP_OK);
    CHECK_EQ_INT(n, 4);
    for (uint64_t k = 0; k < n && k < 4; k++)
        CHECK_EQ_INT(cp_gguf_array_number(kv, k), ints[k]);
    CHECK(cp_gguf_get_array(g, "a.empty", CP_GGUF_TYPE_INT32, &kv, &n, &err) == CP_OK);
    CHECK_EQ_INT(n, 0);
    cp_gguf_close(g);
}

/* Fills a Q8_0 block: an f16 scale and 32 int8 codes. */
static void fill_q8_block(uint8_t *block, float scale, int first)
{
    uint16_t h = cp_f32_to_f16(scale);
    memcpy(block, &h, 2);
    for (int k = 0; k < 32; k++)
        block[2 + k] = (uint8_t)(int8_t)(first + k);
}

/* Writes F32, F16 and Q8_0 tensors with the given alignment (0: unset) and
 * checks offsets, bytes and values after reading them back. */
static void check_tensor_round_trip(uint32_t alignment)
{
    static const float f32[6] = {1, -2, 3.5f, 0, 1e-3f, -7};
    uint16_t f16[5];
    for (int k = 0; k < 5; k++)
        f16[k] = cp_f32_to_f16(0.5f * (float)k - 1);
    uint8_t q8[2 * 34];
    fill_q8_block(q8, 0.5f, -16);
    fill_q8_block(q8 + 34, 2.0f, 0);

    cp_error err = {0};
    cp_gguf_writer *w = new_writer();
    if (alignment)
        check_ok(cp_gguf_writer_set_u32(w, "general.alignment", alignment, &err), &err);
    check_ok(cp_gguf_writer_add_tensor(w, "w.f32", CP_GGML_TYPE_F32, 2, (uint64_t[]){3, 2}, f32,
                                       &err), &err);
    check_ok(cp_gguf_writer_add_tensor(w, "w.f16", CP_GGML_TYPE_F16, 1, (uint64_t[]){5}, f16,
                                       &err), &err);
    check_ok(cp_gguf_writer_add_tensor(w, "w.q8_0", CP_GGML_TYPE_Q8_0, 3,
                                       (uint64_t[]){32, 2, 1}, q8, &err), &err);
    char *path = write_gguf(w, test_tmpdir(), "tensors.gguf");
    cp_gguf *g = open_gguf(path);
    cp_mapped_file map = {0};
    CHECK(cp_file_map(path, &map, &err) == CP_OK);
    free(path);
    if (!g)
        return;

    uint32_t a = alignment ? alignment : 32;
    CHECK_EQ_INT(cp_gguf_alignment(g), a);
    CHECK_EQ_INT(cp_gguf_tensor_count(g), 3);
    const void *sources[3] = {f32, f16, q8};
    static const size_t sizes[3] = {24, 10, 68};
    static const cp_ggml_type types[3] = {CP_GGML_TYPE_F32, CP_GGML_TYPE_F16, CP_GGML_TYPE_Q8_0};
    uint64_t expected_offset = 0;
    for (size_t k = 0; k < 3; k++) {
        const cp_gguf_tensor *t = cp_gguf_tensor_at(g, k);
        CHECK_EQ_INT(t->type, types[k]);
        CHECK_EQ_INT(t->n_bytes, sizes[k]);
        CHECK_EQ_INT(t->offset, expected_offset);
        CHECK_EQ_INT(t->offset % a, 0);
        CHECK_EQ_INT((uintptr_t)t->data % a, 0); /* the map starts on a page boundary */
        CHECK(memcmp(t->data, sources[k], sizes[k]) == 0);
        expected_offset += (sizes[k] + a - 1) / a * a;
    }
    const cp_gguf_tensor *t = cp_gguf_find_tensor(g, "w.q8_0");
    CHECK(t != NULL);
    if (t) {
        CHECK_EQ_INT(t->n_dims, 3);
        CHECK_EQ_INT(t->dims[0], 32);
        CHECK_EQ_INT(t->dims[1], 2);
        CHECK_EQ_INT(t->dims[2], 1);
    }
    /* The data section starts aligned and ends with the last tensor's padding. */
    CHECK(map.size >= expected_offset);
    CHECK_EQ_INT((map.size - expected_offset) % a, 0);
    float values[64];
    if (t) {
        cp_gguf_dequantize(t, values);
        CHECK_CLOSE(values[0], -8.0, 0);
        CHECK_CLOSE(values[31], 7.5, 0);
        CHECK_CLOSE(values[32], 0.0, 0);
        CHECK_CLOSE(values[63], 62.0, 0);
    }
    t = cp_gguf_find_tensor(g, "w.f16");
    if (t) {
        cp_gguf_dequantize(t, values);
        CHECK_CLOSE(values[0], -1.0, 0);
        CHECK_CLOSE(values[4], 1.0, 0);
    }
    cp_mapped_file_free(&map);
    cp_gguf_close(g);
}

TEST(gguf_write_tensors_default_alignment)
{
    check_tensor_round_trip(0);
}

TEST(gguf_write_tensors_alignment_64)
{
    check_tensor_round_trip(64);
}

/* Checks that a writer call failed with CP_ERR_INPUT and a message
 * containing fragment. */
static void check_writer_error(cp_status st, const cp_error *err, const char *fragment)
{
    CHECK_EQ_INT(st, CP_ERR_INPUT);
    CHECK_MSG(strstr(err->msg, fragment), "message lacks \"%s\": %s", fragment, err->msg);
    CHECK_MSG(!strchr(err->msg, '\n'), "message spans lines: %s", err->msg);
}

TEST(gguf_write_rejects_bad_input)
{
    static const float data[64] = {0};
    cp_error err = {0};
    cp_gguf_writer *w = new_writer();
    check_ok(cp_gguf_writer_add_tensor(w, "x", CP_GGML_TYPE_F32, 1, (uint64_t[]){4}, data, &err),
             &err);
    check_writer_error(cp_gguf_writer_add_tensor(w, "x", CP_GGML_TYPE_F32, 1, (uint64_t[]){4},
                                                 data, &err), &err, "tensor 'x' was added twice");
    check_writer_error(cp_gguf_writer_add_tensor(w, "q", CP_GGML_TYPE_Q8_0, 1, (uint64_t[]){33},
                                                 data, &err), &err,
                       "has 33 elements per row (dims[0]), expected a multiple");
    check_writer_error(cp_gguf_writer_add_tensor(w, "k", (cp_ggml_type)12, 1, (uint64_t[]){256},
                                                 data, &err), &err, "ggml type Q4_K (id 12)");
    check_writer_error(cp_gguf_writer_add_tensor(w, "d", CP_GGML_TYPE_F32, 5,
                                                 (uint64_t[]){1, 1, 1, 1, 1}, data, &err),
                       &err, "has 5 dimensions, expected 1 to 4");
    check_writer_error(cp_gguf_writer_add_tensor(w, "", CP_GGML_TYPE_F32, 1, (uint64_t[]){1},
                                                 data, &err), &err, "tensor name is empty");
    check_writer_error(cp_gguf_writer_set_u32(w, "", 1, &err), &err, "metadata key is empty");

    /* A bad alignment fails the write and leaves no file behind. */
    const char *dir = test_tmpdir();
    char *path = cp_path_join(dir, "aligned.gguf");
    check_ok(cp_gguf_writer_set_u32(w, "general.alignment", 48, &err), &err);
    check_writer_error(cp_gguf_writer_write(w, path, &err), &err,
                       "general.alignment is 48, expected a power of two");
    CHECK(strncmp(err.msg, path, strlen(path)) == 0);
    CHECK(!cp_file_exists(path));
    check_ok(cp_gguf_writer_set_i32(w, "general.alignment", 64, &err), &err);
    check_writer_error(cp_gguf_writer_write(w, path, &err), &err,
                       "general.alignment has type int32, expected uint32");
    CHECK(!cp_file_exists(path));

    /* The writer stays usable after a failed write. */
    check_ok(cp_gguf_writer_set_u32(w, "general.alignment", 16, &err), &err);
    check_ok(cp_gguf_writer_write(w, path, &err), &err);
    cp_gguf *g = open_gguf(path);
    if (g) {
        CHECK_EQ_INT(cp_gguf_alignment(g), 16);
        CHECK_EQ_INT(cp_gguf_tensor_count(g), 1);
    }
    cp_gguf_close(g);

    char *missing = cp_path_join(dir, "no-such-folder/x.gguf");
    CHECK_EQ_INT(cp_gguf_writer_write(w, missing, &err), CP_ERR_INPUT);
    CHECK_MSG(strstr(err.msg, "no-such-folder"), "%s", err.msg);
    free(missing);
    free(path);
    cp_gguf_writer_free(w);
}
