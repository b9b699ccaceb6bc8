/*
 * The decoder against independent references: llama2.c's greedy output for
 * stories260K, PyTorch logits for small random checkpoints that exercise
 * GQA, sliding windows, explicit head_dim, untied heads, RoPE scaling and
 * bias terms (tools/ref_llama.py make-tiny), and GPT-2's LayerNorm, learned
 * positions, GELU and fused Conv1D q/k/v (tools/ref_gpt2.py make-tiny), and PyTorch's eval loss on tinyshakespeare.
 */
#include <cJSON.h>
#include <stdlib.h>

#include "core/dtype.h"
#include "core/file.h"
#include "io/safetensors.h"
#include "io/hf_config.h"
#include "model/kv_cache.h"
#include "model/model.h"
#include "test.h"

static int32_t *json_ids(const cJSON *array, size_t *n)
{
    *n = (size_t)cJSON_GetArraySize(array);
    int32_t *ids = malloc((*n + 1) * sizeof *ids);
    size_t i = 0;
    const cJSON *el;
    cJSON_ArrayForEach(el, array) ids[i++] = el->valueint;
    return ids;
}

/* Writes the model in src_dir with every tensor stored as dtype into a new
 * folder, with its config.json and tokenizer.model (when it has one). */
static const char *narrowed_copy(const char *src_dir, cp_dtype dtype)
{
    const char *dir = test_tmpdir();
    cp_safetensors *src = NULL;
    cp_error err = {0};
    CHECK(cp_safetensors_open(src_dir, &src, &err) == CP_OK);
    if (!src)
        return dir;
    size_t n = cp_safetensors_count(src);
    cp_st_tensor *out = calloc(n, sizeof *out);
    for (size_t i = 0; i < n; i++) {
        const cp_st_tensor *t = cp_safetensors_at(src, i);
        size_t count = cp_st_tensor_numel(t);
        uint16_t *half = malloc(count * sizeof *half);
        const float *f = t->data;
        for (size_t j = 0; j < count; j++)
            half[j] = dtype == CP_DTYPE_BF16 ? cp_f32_to_bf16(f[j]) : cp_f32_to_f16(f[j]);
        out[i] = *t;
        out[i].dtype = dtype;
        out[i].data = half;
        out[i].nbytes = count * sizeof *half;
    }
    char *path = NULL, *cmd = NULL;
    if (asprintf(&path, "%s/model.safetensors", dir) < 0 ||
        asprintf(&cmd, "cp '%s/config.json' '%s' && (cp '%s/tokenizer.model' '%s' 2>/dev/null || true)",
                 src_dir, dir, src_dir, dir) < 0 ||
        system(cmd) != 0)
        abort();
    CHECK_MSG(cp_safetensors_write(path, out, n, NULL, 0, &err) == CP_OK, "%s", err.msg);
    for (size_t i = 0; i < n; i++)
        free((void *)out[i].data);
    free(out), free(path), free(cmd);
    cp_safetensors_close(src);
    return dir;
}

/* Checks the forward pass and the KV-cache decoder of the model at
 * model_path against the logits under key in the JSON file expected_path. */
static void check_logits(const char *name, const char *model_path, const char *expected_path,
                         const char *key)
{
    cJSON *expected = test_read_json(expected_path);
    if (!expected)
        return;
    cp_model *m = NULL;
    cp_error err = {0};
    CHECK_MSG(cp_model_load(model_path, &m, &err) == CP_OK, "%s", err.msg);
    if (!m) {
        cJSON_Delete(expected);
        return;
    }
    size_t T;
    int32_t *ids = json_ids(cJSON_GetObjectItem(expected, "input_ids"), &T);
    const cJSON *logits = cJSON_GetObjectItem(expected, key);
    CHECK_MSG(cJSON_GetArraySize(logits) == (int)T, "%s has no %s", expected_path, key);
    int V = m->cfg.vocab_size;

    cp_forward_buffers fb;
    CHECK(cp_forward_buffers_init(&fb, &m->cfg, 1, (int)T, 0, &err) == CP_OK);
    cp_model_forward(m, &fb, ids);
    cp_kv_cache kv;
    CHECK(cp_kv_cache_init(&kv, &m->cfg, (int)T, &err) == CP_OK);

    int bad = 0, bad_cached = 0;
    for (size_t t = 0; t < T && cJSON_GetArraySize(logits) == (int)T; t++) {
        cp_kv_cache_step(m, &kv, ids[t]);
        const cJSON *row = cJSON_GetArrayItem(logits, (int)t);
        for (int v = 0; v < V; v++) {
            double want = cJSON_GetArrayItem(row, v)->valuedouble;
            double tol = 1e-4 * (fabs(want) > 1 ? fabs(want) : 1);
            if (fabs(fb.logits[t * V + v] - want) > tol && bad++ < 3)
                cp_test_fail(__FILE__, __LINE__, "%s: logits[%zu][%d] = %.7g, expected %.7g",
                             name, t, v, fb.logits[t * V + v], want);
            if (fabs(kv.logits[v] - want) > tol && bad_cached++ < 3)
                cp_test_fail(__FILE__, __LINE__, "%s: cached logits[%zu][%d] = %.7g, expected %.7g",
                             name, t, v, kv.logits[v], want);
        }
    }
    cp_kv_cache_free(&kv);
    cp_forward_buffers_free(&fb);
    free(ids);
    cp_model_free(m);
    cJSON_Delete(expected);
}

/* A fixture's float32 checkpoint, or a BF16 copy of it against the logits
 * PyTorch computed with the rounded weights. */
static void check_fixture_logits(const char *name, int bf16)
{
    char fixture[256], path[300], label[300];
    snprintf(fixture, sizeof fixture, "tests/fixtures/%s", name);
    snprintf(path, sizeof path, "%s/expected.json", fixture);
    snprintf(label, sizeof label, "%s%s", name, bf16 ? " (BF16)" : "");
    const char *dir = bf16 ? narrowed_copy(fixture, CP_DTYPE_BF16) : fixture;
    check_logits(label, dir, path, bf16 ? "logits_bf16_weights" : "logits");
}

TEST(forward_mistral_sliding_window) { check_fixture_logits("tiny-mistral", 0); }
TEST(forward_llama3_rope_scaling) { check_fixture_logits("tiny-llama3", 0); }
TEST(forward_linear_rope_scaling) { check_fixture_logits("tiny-linear", 0); }
TEST(forward_qwen2_qkv_bias) { check_fixture_logits("tiny-qwen2", 0); }
TEST(forward_llama_all_biases) { check_fixture_logits("tiny-llama-bias", 0); }
TEST(forward_gpt2_layernorm_conv1d) { check_fixture_logits("tiny-gpt2", 0); }

TEST(forward_from_bf16_checkpoints)
{
    const char *names[] = {"tiny-mistral", "tiny-llama3", "tiny-qwen2", "tiny-llama-bias",
                           "tiny-gpt2"};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++)
        check_fixture_logits(names[i], 1);
}

/* The same checkpoints converted to GGUF as llama.cpp does it (renamed
 * tensors, llama's q/k rows permuted, GPT-2's Conv1D transposed, llama3
 * scaling as rope_freqs) by tools/make_gguf.py: the same logits. */
TEST(gguf_models_match_pytorch_logits)
{
    const char *names[] = {"tiny-llama3", "tiny-linear", "tiny-qwen2", "tiny-llama-bias",
                           "tiny-gpt2"};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        char model[256], expected[256], label[256];
        snprintf(model, sizeof model, "tests/fixtures/gguf/%s.gguf", names[i]);
        snprintf(expected, sizeof expected, "tests/fixtures/%s/expected.json", names[i]);
        snprintf(label, sizeof label, "%s (GGUF)", names[i]);
        check_logits(label, model, expected, "logits");
    }
}

/* F16, Q8_0 and Q4_0 files against PyTorch's logits from the values each
 * file stores, dequantized in Python. */
TEST(gguf_quantized_models_match_pytorch_logits)
{
    const char *kinds[] = {"f16", "q8_0", "q4_0"};
    for (size_t i = 0; i < sizeof kinds / sizeof *kinds; i++) {
        char model[256], key[64];
        snprintf(model, sizeof model, "tests/fixtures/gguf/tiny-llama-q.%s.gguf", kinds[i]);
        snprintf(key, sizeof key, "logits_%s", kinds[i]);
        check_logits(model, model, "tests/fixtures/gguf/tiny-llama-q.json", key);
    }
}

TEST(generate_matches_llama2c_golden)
{
    cJSON *golden = test_read_json(test_shared("models/stories260K/golden.json"));
    if (!golden)
        return;
    const cJSON *c;
    cJSON_ArrayForEach(c, cJSON_GetObjectItem(golden, "cases"))
    {
        const char *prompt = cJSON_GetObjectItem(c, "prompt")->valuestring;
        const cJSON *greedy = cJSON_GetObjectItem(c, "greedy_ids");
        char *args = NULL, *out = NULL, *err = NULL;
        if (asprintf(&args, "generate --model '%s' --prompt '%s' --max-new-tokens %d "
                            "--temperature 0 --ids",
                     test_shared("models/stories260K"), prompt, cJSON_GetArraySize(greedy)) < 0)
            abort();
        CHECK_EQ_INT(test_run_cli(args, NULL, &out, &err), 0);

        /* Expected: the golden text, then every id joined by commas. */
        char ids_line[8192];
        size_t len = 0;
        const cJSON *id;
        cJSON_ArrayForEach(id, cJSON_GetObjectItem(c, "prompt_ids"))
            len += (size_t)snprintf(ids_line + len, sizeof ids_line - len, "%s%d",
                                    len ? "," : "", id->valueint);
        cJSON_ArrayForEach(id, greedy)
            len += (size_t)snprintf(ids_line + len, sizeof ids_line - len, ",%d", id->valueint);
        char *want = NULL;
        if (asprintf(&want, "%s%s\n", cJSON_GetObjectItem(c, "greedy_text")->valuestring,
                     ids_line) < 0)
            abort();
        CHECK_EQ_STR(out, want);
        free(want), free(args), free(out), free(err);
    }
    cJSON_Delete(golden);
}

/* cpeft eval on all of tinyshakespeare against tools/ref_llama.py eval. */
static void check_eval(int seq_len)
{
    cJSON *ref = test_read_json("tests/fixtures/stories260K_tinyshakespeare_eval.json");
    if (!ref)
        return;
    const cJSON *r, *match = NULL;
    cJSON_ArrayForEach(r, cJSON_GetObjectItem(ref, "results"))
        if (cJSON_GetObjectItem(r, "seq_len")->valueint == seq_len)
            match = r;
    CHECK(match != NULL);

    char *args = NULL, *out = NULL, *err = NULL;
    if (asprintf(&args, "eval --model '%s' --data '%s' --seq-len %d",
                 test_shared("models/stories260K"), test_shared("data/tinyshakespeare/input.txt"),
                 seq_len) < 0)
        abort();
    CHECK_EQ_INT(test_run_cli(args, NULL, &out, &err), 0);
    cJSON *got = cJSON_Parse(out);
    CHECK_MSG(got != NULL, "eval printed no JSON: %s %s", out, err);
    if (got && match) {
        CHECK_CLOSE(cJSON_GetObjectItem(got, "loss")->valuedouble,
                    cJSON_GetObjectItem(match, "loss")->valuedouble, 1e-4);
        CHECK_CLOSE(cJSON_GetObjectItem(got, "perplexity")->valuedouble / 
                    cJSON_GetObjectItem(match, "perplexity")->valuedouble, 1.0, 1e-4);
        CHECK_EQ_INT(cJSON_GetObjectItem(got, "tokens")->valueint,
                     cJSON_GetObjectItem(match, "tokens")->valueint);
    }
    cJSON_Delete(got);
    cJSON_Delete(ref);
    free(args), free(out), free(err);
}

TEST(eval_tinyshakespeare_seq128) { check_eval(128); }
TEST(eval_tinyshakespeare_seq512) { check_eval(512); }

TEST(half_precision_checkpoints_load)
{
    cp_model *ref = NULL;
    cp_error err = {0};
    CHECK(cp_model_load(test_shared("models/stories260K"), &ref, &err) == CP_OK);
    if (!ref)
        return;
    cp_dtype dtypes[] = {CP_DTYPE_BF16, CP_DTYPE_F16};
    for (int d = 0; d < 2; d++) {
        cp_model *m = NULL;
        const char *dir = narrowed_copy(test_shared("models/stories260K"), dtypes[d]);
        CHECK_MSG(cp_model_load(dir, &m, &err) == CP_OK, "%s", err.msg);
        if (!m)
            continue;
        /* Widened weights equal the original rounded to the stored dtype. */
        size_t bad = 0, n = (size_t)ref->cfg.vocab_size * ref->cfg.hidden_size;
        for (size_t i = 0; i < n; i++) {
            float want = dtypes[d] == CP_DTYPE_BF16 ? cp_bf16_to_f32(cp_f32_to_bf16(ref->embed[i]))
                                                    : cp_f16_to_f32(cp_f32_to_f16(ref->embed[i]));
            bad += m->embed[i] != want;
        }
        CHECK_MSG(bad == 0, "%s: %zu embedding values differ", cp_dtype_name(dtypes[d]), bad);

        /* The loss moves by no more than half-precision rounding explains. */
        int32_t ids[257];
        for (int i = 0; i < 257; i++)
            ids[i] = (int32_t)((i * 37 + 11) % 512);
        cp_eval_result a, b;
        CHECK(cp_model_evaluate(ref, ids, 257, 256, &a, &err) == CP_OK);
        CHECK(cp_model_evaluate(m, ids, 257, 256, &b, &err) == CP_OK);
        CHECK_MSG(fabs(a.loss - b.loss) < 2e-2 * a.loss, "%s: loss %g vs float32 %g",
                  cp_dtype_name(dtypes[d]), b.loss, a.loss);
        CHECK_MSG(a.loss != b.loss, "%s: rounding changed nothing", cp_dtype_name(dtypes[d]));
        cp_model_free(m);
    }
    cp_model_free(ref);
}

/* Replaces the first occurrence of from (n bytes) with to in a copy of the
 * fixture file and returns the copy's path, or NULL if from is absent. */
static char *patched_gguf(const char *fixture, const void *from, const void *to, size_t n)
{
    char *data = NULL;
    size_t len = 0;
    cp_error err = {0};
    CHECK_MSG(cp_file_read(fixture, &data, &len, &err) == CP_OK, "%s", err.msg);
    char *at = data ? memmem(data, len, from, n) : NULL;
    CHECK_MSG(at != NULL, "%s lacks the bytes to patch", fixture);
    char *path = NULL;
    if (at) {
        memcpy(at, to, n);
        path = test_write_file(test_tmpdir(), "patched.gguf", data, len);
    }
    free(data);
    return path;
}

/* Sets the uint32 value of metadata key in a copy of fixture. */
static char *patched_gguf_u32(const char *fixture, const char *key, uint32_t value)
{
    char *data = NULL;
    size_t len = 0;
    cp_error err = {0};
    CHECK(cp_file_read(fixture, &data, &len, &err) == CP_OK);
    char *at = data ? memmem(data, len, key, strlen(key)) : NULL;
    CHECK_MSG(at != NULL, "%s lacks %s", fixture, key);
    char *path = NULL;
    if (at) {
        memcpy(at + strlen(key) + 4, &value, 4); /* after the key comes its type, then the value */
        path = test_write_file(test_tmpdir(), "patched.gguf", data, len);
    }
    free(data);
    return path;
}

static void check_load_fails(const char *path, const char *label, const char *want)
{
    cp_model *m = NULL;
    cp_error err = {0};
    cp_status st = path ? cp_model_load(path, &m, &err) : CP_ERR_INPUT;
    CHECK_MSG(st == CP_ERR_INPUT, "%s: loaded", label);
    CHECK_MSG(!path || strstr(err.msg, want), "%s: message \"%s\" lacks \"%s\"", label, err.msg,
              want);
    CHECK_MSG(!strchr(err.msg, '\n'), "%s: message spans lines", label);
    cp_model_free(m);
}

TEST(gguf_model_rejections)
{
    const char *qwen = "tests/fixtures/gguf/tiny-qwen2.gguf";
    char *p;
    p = patched_gguf(qwen, "\x05\0\0\0\0\0\0\0qwen2", "\x05\0\0\0\0\0\0\0qwen3", 13);
    check_load_fails(p, "unknown architecture", "general.architecture is \"qwen3\"; supported:");
    free(p);
    p = patched_gguf(qwen, "blk.1.attn_k.weight", "blk.1.attn_k.weighX", 19);
    check_load_fails(p, "missing tensor", "missing tensor \"blk.1.attn_k.weight\"");
    free(p);
    p = patched_gguf(qwen, "qwen2.block_count", "qwen2.block_counX", 17);
    check_load_fails(p, "missing key", "qwen2.block_count");
    free(p);
    p = patched_gguf_u32(qwen, "qwen2.feed_forward_length", 32);
    check_load_fails(p, "wrong width", "\"blk.0.ffn_gate.weight\" has dims [16, 24] but the "
                                        "metadata implies [16, 32]");
    free(p);
    p = patched_gguf_u32(qwen, "qwen2.attention.head_count_kv", 3);
    check_load_fails(p, "bad head ratio", "must be a multiple of qwen2.attention.head_count_kv (3)");
    free(p);
    p = patched_gguf_u32(qwen, "qwen2.rope.dimension_count", 2);
    check_load_fails(p, "partial rotary", "partial rotary embeddings are not supported");
    free(p);
    p = patched_gguf(qwen, "token_embd.weight", "token_embd.weighX", 17);
    check_load_fails(p, "no embeddings", "no 2-D tensor \"token_embd.weight\"");
    free(p);
    p = patched_gguf("tests/fixtures/gguf/tiny-linear.gguf", "linear", "yarn__", 6);
    check_load_fails(p, "rope scaling", "llama.rope.scaling.type is \"yarn__\"");
    free(p);

    /* A truncated file: the reader's own message, with the byte offset. */
    char *data = NULL;
    size_t len = 0;
    cp_error err = {0};
    CHECK(cp_file_read(qwen, &data, &len, &err) == CP_OK);
    p = test_write_file(test_tmpdir(), "short.gguf", data, len / 2);
    check_load_fails(p, "truncated", "short.gguf");
    free(p);
    free(data);

    /* Neither a folder nor GGUF. */
    p = test_write_file(test_tmpdir(), "model.bin", "not a model", 11);
    check_load_fails(p, "plain file", "not a model folder or GGUF file");
    free(p);
}
