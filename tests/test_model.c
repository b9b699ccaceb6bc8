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

/* Checks the forward pass and the KV-cache decoder against the fixture's
 * logits: from the float32 checkpoint, or from a BF16 copy against the
 * logits PyTorch computed with the rounded weights. */
static void check_fixture_logits(const char *name, int bf16)
{
    char fixture[256], path[300];
    snprintf(fixture, sizeof fixture, "tests/fixtures/%s", name);
    snprintf(path, sizeof path, "%s/expected.json", fixture);
    cJSON *expected = test_read_json(path);
    if (!expected)
        return;
    const char *dir = bf16 ? narrowed_copy(fixture, CP_DTYPE_BF16) : fixture;
    cp_model *m = NULL;
    cp_error err = {0};
    CHECK_MSG(cp_model_load(dir, &m, &err) == CP_OK, "%s", err.msg);
    if (!m) {
        cJSON_Delete(expected);
        return;
    }
    size_t T;
    int32_t *ids = json_ids(cJSON_GetObjectItem(expected, "input_ids"), &T);
    const cJSON *logits = cJSON_GetObjectItem(expected, bf16 ? "logits_bf16_weights" : "logits");
    CHECK_MSG(cJSON_GetArraySize(logits) == (int)T, "%s: expected.json has no %s", name,
              bf16 ? "logits_bf16_weights" : "logits");
    int V = m->cfg.vocab_size;

    cp_forward_buffers fb;
    CHECK(cp_forward_buffers_init(&fb, &m->cfg, 1, (int)T, 0, &err) == CP_OK);
    cp_model_forward(m, &fb, ids);
    cp_kv_cache kv;
    CHECK(cp_kv_cache_init(&kv, &m->cfg, (int)T, &err) == CP_OK);

    int bad = 0, bad_cached = 0;
    for (size_t t = 0; t < T; t++) {
        cp_kv_cache_step(m, &kv, ids[t]);
        const cJSON *row = cJSON_GetArrayItem(logits, (int)t);
        for (int v = 0; v < V; v++) {
            double want = cJSON_GetArrayItem(row, v)->valuedouble;
            double tol = 1e-4 * (fabs(want) > 1 ? fabs(want) : 1);
            if (fabs(fb.logits[t * V + v] - want) > tol && bad++ < 3)
                cp_test_fail(__FILE__, __LINE__, "%s%s: logits[%zu][%d] = %.7g, expected %.7g",
                             name, bf16 ? " (BF16)" : "", t, v, fb.logits[t * V + v], want);
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
