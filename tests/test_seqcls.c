/*
 * Sequence classification: a PEFT LoRA adapter with task_type SEQ_CLS
 * (LoRA on c_attn plus a trained score head) on a GPT-2 124M-shaped base,
 * against PyTorch's final hidden states and class logits
 * (tools/ref_seqcls.py make-fixture), through the library and through
 * `cpeft classify`. The base weights come from a counter-based hash that
 * this file and the script both implement, so the 500 MB checkpoint is
 * written to a temporary folder instead of being stored. The error cases
 * use small adapters written here for tests/fixtures/tiny-gpt2.
 */
#include <cJSON.h>
#include <stdlib.h>
#include <unistd.h>

#include "core/file.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "tasks/seq_cls.h"
#include "test.h"

#define FIXTURE "tests/fixtures/seqcls/expected.json"
#define ADAPTER "adapters/peft-gpt2-lora-seqcls"
#define TINY_MODEL "tests/fixtures/tiny-gpt2"

/* Relative tolerance of the float32 pass against the float64 reference. */
#define TOLERANCE 1e-4

/* ---- the hashed GPT-2 124M base (tools/ref_seqcls.py's docstring) ------- */

#define C 768
#define LAYERS 12
#define VOCAB 50257
#define POSITIONS 1024
#define HASH_SEED 0x5EC0C1A5ull
#define GOLDEN 0x9E3779B97F4A7C15ull
#define MATRIX_SCALE (1.0 / 32)
#define BIAS_SCALE (1.0 / 128)
#define NORM_WEIGHT_SCALE (1.0 / 8)
#define NORM_BIAS_SCALE (1.0 / 32)
#define N_TENSORS (4 + 12 * LAYERS)

static uint64_t splitmix64_mix(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Element i of tensor number k: center + scale * u, u uniform in [-1, 1)
 * from the top 24 bits of the hash, rounded once to float32. */
static float hashed_value(uint64_t k, uint64_t i, double center, double scale)
{
    uint64_t z = splitmix64_mix(HASH_SEED + ((k << 32) + i + 1) * GOLDEN);
    double u = ((double)(z >> 40) - 8388608.0) / 8388608.0;
    return (float)(center + scale * u);
}

typedef struct hashed_tensor {
    char name[64];
    int64_t rows, cols; /* cols 0: a vector of rows elements */
    double center, scale;
} hashed_tensor;

/* The tensors in hash order, named as the original gpt2 checkpoint names them. */
static int hashed_tensor_list(hashed_tensor *list)
{
    static const struct {
        const char *suffix;
        int64_t rows, cols;
        double center, scale;
    } layer[] = {
        {"ln_1.weight", C, 0, 1, NORM_WEIGHT_SCALE},
        {"ln_1.bias", C, 0, 0, NORM_BIAS_SCALE},
        {"attn.c_attn.weight", C, 3 * C, 0, MATRIX_SCALE},
        {"attn.c_attn.bias", 3 * C, 0, 0, BIAS_SCALE},
        {"attn.c_proj.weight", C, C, 0, MATRIX_SCALE},
        {"attn.c_proj.bias", C, 0, 0, BIAS_SCALE},
        {"ln_2.weight", C, 0, 1, NORM_WEIGHT_SCALE},
        {"ln_2.bias", C, 0, 0, NORM_BIAS_SCALE},
        {"mlp.c_fc.weight", C, 4 * C, 0, MATRIX_SCALE},
        {"mlp.c_fc.bias", 4 * C, 0, 0, BIAS_SCALE},
        {"mlp.c_proj.weight", 4 * C, C, 0, MATRIX_SCALE},
        {"mlp.c_proj.bias", C, 0, 0, BIAS_SCALE},
    };
    int n = 0;
    list[n++] = (hashed_tensor){"wte.weight", VOCAB, C, 0, MATRIX_SCALE};
    list[n++] = (hashed_tensor){"wpe.weight", POSITIONS, C, 0, MATRIX_SCALE};
    for (int l = 0; l < LAYERS; l++)
        for (size_t p = 0; p < sizeof layer / sizeof *layer; p++) {
            hashed_tensor *t = &list[n++];
            snprintf(t->name, sizeof t->name, "h.%d.%s", l, layer[p].suffix);
            t->rows = layer[p].rows;
            t->cols = layer[p].cols;
            t->center = layer[p].center;
            t->scale = layer[p].scale;
        }
    list[n++] = (hashed_tensor){"ln_f.weight", C, 0, 1, NORM_WEIGHT_SCALE};
    list[n++] = (hashed_tensor){"ln_f.bias", C, 0, 0, NORM_BIAS_SCALE};
    return n;
}

/* Compares a generated tensor with the fixture's probe of it, if any: its
 * first values exactly and its float64 sum. */
static void check_probe(const cJSON *probes, const char *name, const float *data, size_t n)
{
    const cJSON *probe = cJSON_GetObjectItemCaseSensitive(probes, name);
    if (!probe)
        return;
    const cJSON *first = cJSON_GetObjectItemCaseSensitive(probe, "first");
    size_t i = 0;
    const cJSON *el;
    cJSON_ArrayForEach(el, first)
    {
        CHECK_MSG((double)data[i] == el->valuedouble,
                  "%s[%zu] is %.9g, the reference generator gives %.9g", name, i, data[i],
                  el->valuedouble);
        i++;
    }
    double sum = 0;
    for (i = 0; i < n; i++)
        sum += data[i];
    double want = cJSON_GetObjectItemCaseSensitive(probe, "sum")->valuedouble;
    CHECK_MSG(fabs(sum - want) <= 1e-9 * fmax(1.0, fabs(want)),
              "%s sums to %.12g, the reference generator's to %.12g", name, sum, want);
}

/* Writes config.json and model.safetensors of the hashed base into dir and
 * returns the malloc'd path of model.safetensors. */
static char *write_hashed_gpt2(const char *dir, const cJSON *probes)
{
    static const char config[] =
        "{\"architectures\": [\"GPT2LMHeadModel\"], \"model_type\": \"gpt2\", \"n_embd\": 768, "
        "\"n_layer\": 12, \"n_head\": 12, \"n_positions\": 1024, \"n_ctx\": 1024, "
        "\"n_inner\": null, \"vocab_size\": 50257, \"layer_norm_epsilon\": 1e-05, "
        "\"activation_function\": \"gelu_new\", \"bos_token_id\": 50256, "
        "\"eos_token_id\": 50256, \"tie_word_embeddings\": true}";
    free(test_write_file(dir, "config.json", config, sizeof config - 1));

    hashed_tensor list[N_TENSORS];
    int n = hashed_tensor_list(list);
    CHECK_EQ_INT(n, N_TENSORS);
    cp_st_tensor tensors[N_TENSORS];
    for (int k = 0; k < n; k++) {
        size_t count = (size_t)list[k].rows * (list[k].cols ? list[k].cols : 1);
        float *data = malloc(count * sizeof *data);
        if (!data)
            abort();
        for (size_t i = 0; i < count; i++)
            data[i] = hashed_value((uint64_t)k, i, list[k].center, list[k].scale);
        check_probe(probes, list[k].name, data, count);
        tensors[k] = (cp_st_tensor){.name = list[k].name,
                                    .dtype = CP_DTYPE_F32,
                                    .ndim = list[k].cols ? 2 : 1,
                                    .shape = {list[k].rows, list[k].cols},
                                    .data = data,
                                    .nbytes = count * sizeof *data};
    }
    char *path = cp_path_join(dir, "model.safetensors");
    cp_error err = {0};
    CHECK_MSG(cp_safetensors_write(path, tensors, (size_t)n, NULL, 0, &err) == CP_OK, "%s",
              err.msg);
    for (int k = 0; k < n; k++)
        free((void *)tensors[k].data);
    return path;
}

/* ---- comparisons with the fixture --------------------------------------- */

/* |got - want| / max(|want|, 1): relative for values of magnitude 1 and
 * more, absolute below, which CHECK_CLOSE's tolerance also means. */
static double relative_diff(double got, double want)
{
    return fabs(got - want) / fmax(fabs(want), 1.0);
}

/* Compares got (n) with a JSON array of n numbers; returns the largest
 * relative difference and records a failure past TOLERANCE. */
static double compare_array(const char *label, const float *got, const cJSON *want, int n)
{
    CHECK_EQ_INT(cJSON_GetArraySize(want), n);
    double worst = 0;
    int i = 0;
    const cJSON *el;
    cJSON_ArrayForEach(el, want)
    {
        if (i == n)
            break;
        double d = relative_diff(got[i], el->valuedouble);
        CHECK_MSG(d <= TOLERANCE, "%s[%d]: %.9g vs reference %.9g (relative difference %.3g)",
                  label, i, got[i], el->valuedouble, d);
        worst = fmax(worst, d);
        i++;
    }
    return worst;
}

static int32_t *fixture_ids(const cJSON *fixture, int *B, int *T)
{
    const cJSON *rows = cJSON_GetObjectItemCaseSensitive(fixture, "input_ids");
    *B = cJSON_GetArraySize(rows);
    *T = cJSON_GetArraySize(cJSON_GetArrayItem(rows, 0));
    int32_t *ids = malloc((size_t)*B * *T * sizeof *ids);
    for (int b = 0; b < *B; b++)
        for (int t = 0; t < *T; t++)
            ids[b * *T + t] = cJSON_GetArrayItem(cJSON_GetArrayItem(rows, b), t)->valueint;
    return ids;
}

/* Largest relative difference of the fixture's hidden-state entries: every
 * column of the last token, and the sampled columns of every position. */
static double compare_hidden(const cJSON *fixture, const float *hidden, int B, int T)
{
    double worst = 0;
    const cJSON *last = cJSON_GetObjectItemCaseSensitive(fixture, "hidden_last");
    for (int b = 0; b < B; b++)
        worst = fmax(worst, compare_array("hidden_last", hidden + ((size_t)b * T + T - 1) * C,
                                          cJSON_GetArrayItem(last, b), C));

    const cJSON *columns = cJSON_GetObjectItemCaseSensitive(fixture, "hidden_sample_columns");
    const cJSON *sample = cJSON_GetObjectItemCaseSensitive(fixture, "hidden_sample");
    int n_cols = cJSON_GetArraySize(columns);
    float *row = malloc((size_t)n_cols * sizeof *row);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            for (int j = 0; j < n_cols; j++)
                row[j] = hidden[((size_t)b * T + t) * C + cJSON_GetArrayItem(columns, j)->valueint];
            const cJSON *want = cJSON_GetArrayItem(cJSON_GetArrayItem(sample, b), t);
            worst = fmax(worst, compare_array("hidden_sample", row, want, n_cols));
        }
    free(row);
    return worst;
}

static double compare_logits(const char *label, const float *logits, const cJSON *want, int B,
                             int L)
{
    double worst = 0;
    for (int b = 0; b < B; b++)
        worst = fmax(worst, compare_array(label, logits + (size_t)b * L, cJSON_GetArrayItem(want, b), L));
    return worst;
}

/* ---- the library on the hashed base ------------------------------------- */

/* Classifies the fixture's ids with the head on the base alone, then with
 * the adapter's LoRA weights, and compares both with the reference. */
static void check_library(const char *model_dir, const char *adapter, const cJSON *fixture)
{
    int B, T;
    int32_t *ids = fixture_ids(fixture, &B, &T);
    cp_error err = {0};
    cp_model *m = NULL;
    cp_seq_cls head;
    CHECK_MSG(cp_model_load(model_dir, &m, &err) == CP_OK, "%s", err.msg);
    CHECK_MSG(cp_seq_cls_load(&head, adapter, m, &err) == CP_OK, "%s", err.msg);
    if (!m || !head.weight)
        return;
    int L = head.num_labels;
    CHECK_EQ_INT(L, cJSON_GetObjectItemCaseSensitive(fixture, "num_labels")->valueint);
    CHECK(head.bias == NULL);

    /* The head alone on the base gives the reference's logits without LoRA. */
    float *base_logits = malloc((size_t)B * L * sizeof(float));
    CHECK_MSG(cp_seq_cls_classify(m, &head, ids, B, T, NULL, base_logits, NULL, &err) == CP_OK,
              "%s", err.msg);
    double base_diff = compare_logits("logits_without_lora", base_logits,
                                      cJSON_GetObjectItemCaseSensitive(fixture,
                                                                       "logits_without_lora"),
                                      B, L);

    float *logits = malloc((size_t)B * L * sizeof(float));
    float *hidden = malloc((size_t)B * T * C * sizeof(float));
    CHECK_MSG(cp_model_load_adapter(m, adapter, &err) == CP_OK, "%s", err.msg);
    CHECK_MSG(cp_seq_cls_classify(m, &head, ids, B, T, NULL, logits, hidden, &err) == CP_OK, "%s",
              err.msg);
    double hidden_diff = compare_hidden(fixture, hidden, B, T);
    double logits_diff =
        compare_logits("logits", logits, cJSON_GetObjectItemCaseSensitive(fixture, "logits"), B, L);

    /* The LoRA weights must matter far beyond the tolerance, or the match
     * above could hold without them. */
    double lora_effect = 0;
    for (int i = 0; i < B * L; i++)
        lora_effect = fmax(lora_effect, relative_diff(base_logits[i], logits[i]));
    CHECK_MSG(lora_effect > 1000 * TOLERANCE,
              "the adapter's LoRA weights change the logits by only %.3g", lora_effect);

    fprintf(stderr,
            "    max relative difference: final hidden %.2g, logits %.2g, logits without LoRA "
            "%.2g; LoRA changes the logits by up to %.3g\n",
            hidden_diff, logits_diff, base_diff, lora_effect);
    free(hidden), free(logits), free(base_logits), free(ids);
    cp_seq_cls_free(&head);
    cp_model_free(m);
}

/* ---- cpeft classify on the hashed base ---------------------------------- */

/* Runs classify --json on sequence b of the fixture and compares the logits
 * and argmax. */
static void check_cli_json(const char *model_dir, const char *adapter, const cJSON *fixture, int b)
{
    int B, T;
    int32_t *ids = fixture_ids(fixture, &B, &T);
    char args[1024], list[256] = "";
    for (int t = 0; t < T; t++)
        snprintf(list + strlen(list), sizeof list - strlen(list), t ? " %d" : "%d", ids[b * T + t]);
    snprintf(args, sizeof args, "classify --model '%s' --adapter '%s' --ids '%s' --json", model_dir,
             adapter, list);
    char *out = NULL, *err_text = NULL;
    CHECK_EQ_INT(test_run_cli(args, NULL, &out, &err_text), 0);
    cJSON *root = cJSON_Parse(out);
    CHECK_MSG(root != NULL, "classify --json printed \"%s\" (stderr \"%s\")", out, err_text);

    const cJSON *want = cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(fixture, "logits"), b);
    const cJSON *got = cJSON_GetObjectItemCaseSensitive(root, "logits");
    int L = cJSON_GetArraySize(want), best = 0;
    CHECK_EQ_INT(cJSON_GetArraySize(got), L);
    for (int j = 0; j < L && j < cJSON_GetArraySize(got); j++) {
        CHECK_CLOSE(cJSON_GetArrayItem(got, j)->valuedouble, cJSON_GetArrayItem(want, j)->valuedouble,
                    TOLERANCE);
        if (cJSON_GetArrayItem(want, j)->valuedouble > cJSON_GetArrayItem(want, best)->valuedouble)
            best = j;
    }
    const cJSON *argmax = cJSON_GetObjectItemCaseSensitive(root, "argmax");
    CHECK(cJSON_IsNumber(argmax));
    CHECK_EQ_INT(argmax ? argmax->valueint : -1, best);
    CHECK_EQ_INT(cJSON_GetObjectItemCaseSensitive(root, "tokens")->valueint, T);
    cJSON_Delete(root);
    free(out), free(err_text), free(ids);
}

/* Runs classify --text with GPT-2's tokenizer, and checks it against
 * classify --ids on the ids `cpeft tokenize` gives for the same text. */
static void check_cli_text(const char *model_dir, const char *adapter)
{
    const char *tokenizer = test_shared("tokenizers/gpt2");
    char args[1024], *out = NULL, *err_text = NULL;
    snprintf(args, sizeof args, "classify --model '%s' --adapter '%s' --tokenizer '%s' --text "
             "'The movie was great'", model_dir, adapter, tokenizer);
    CHECK_EQ_INT(test_run_cli(args, NULL, &out, &err_text), 0);
    CHECK_MSG(test_count_lines(out) == 7, "expected 6 label lines and the argmax, got \"%s\" (%s)",
              out, err_text);
    CHECK_MSG(strncmp(out, "label 0: ", 9) == 0, "%s", out);
    CHECK_MSG(strstr(out, "\nargmax: ") != NULL, "%s", out);
    char *text_out = out;
    free(err_text);

    snprintf(args, sizeof args, "tokenize --tokenizer '%s'", tokenizer);
    char *ids = NULL;
    CHECK_EQ_INT(test_run_cli(args, "The movie was great", &ids, NULL), 0);
    ids[strcspn(ids, "\n")] = '\0';
    snprintf(args, sizeof args, "classify --model '%s' --adapter '%s' --ids '%s'", model_dir,
             adapter, ids);
    CHECK_EQ_INT(test_run_cli(args, NULL, &out, NULL), 0);
    CHECK_EQ_STR(out, text_out);
    free(out), free(ids), free(text_out);
}

TEST(seqcls_gpt2_124m_matches_reference)
{
    cJSON *fixture = test_read_json(FIXTURE);
    if (!fixture)
        return;
    const char *adapter = test_shared(ADAPTER);
    const char *dir = test_tmpdir();
    char *weights = write_hashed_gpt2(dir, cJSON_GetObjectItemCaseSensitive(fixture,
                                                                            "weight_probes"));

    check_library(dir, adapter, fixture);
    check_cli_json(dir, adapter, fixture, 0);
    check_cli_json(dir, adapter, fixture, 1);
    check_cli_text(dir, adapter);

    CHECK(unlink(weights) == 0);
    free(weights);
    cJSON_Delete(fixture);
}

/* ---- small adapters for tests/fixtures/tiny-gpt2 ------------------------ */

#define TINY_C 16
#define TINY_LAYERS 2
#define TINY_R 2
#define TINY_LABELS 3

/* Writes a SEQ_CLS-style adapter into a new folder: LoRA r 2 on c_attn of
 * both layers, and head tensors named heads[i] of shape
 * (TINY_LABELS, head_cols[i]). config_extra is spliced into
 * adapter_config.json, after task_type. */
static const char *tiny_adapter(const char *task_type, const char *config_extra,
                                const char *const *heads, const int *head_cols, int n_heads)
{
    const char *dir = test_tmpdir();
    char config[1024];
    snprintf(config, sizeof config,
             "{\"peft_type\": \"LORA\", \"r\": %d, \"lora_alpha\": 4, \"lora_dropout\": 0.0, "
             "\"fan_in_fan_out\": true, \"target_modules\": [\"c_attn\"], \"bias\": \"none\", "
             "\"task_type\": \"%s\"%s}",
             TINY_R, task_type, config_extra);
    free(test_write_file(dir, "adapter_config.json", config, strlen(config)));

    cp_st_tensor tensors[2 * TINY_LAYERS + 4];
    char names[2 * TINY_LAYERS + 4][128];
    int n = 0;
    for (int l = 0; l < TINY_LAYERS; l++)
        for (int which = 0; which < 2; which++, n++) {
            snprintf(names[n], sizeof names[n],
                     "base_model.model.transformer.h.%d.attn.c_attn.lora_%c.weight", l, "AB"[which]);
            tensors[n] = (cp_st_tensor){.name = names[n], .dtype = CP_DTYPE_F32, .ndim = 2,
                                        .shape = {which ? 3 * TINY_C : TINY_R,
                                                  which ? TINY_R : TINY_C}};
        }
    for (int h = 0; h < n_heads; h++, n++)
        tensors[n] = (cp_st_tensor){.name = heads[h], .dtype = CP_DTYPE_F32, .ndim = 2,
                                    .shape = {TINY_LABELS, head_cols[h]}};

    /* Fixed values in [-0.2, 0.3], different in every tensor. */
    for (int t = 0; t < n; t++) {
        size_t count = (size_t)tensors[t].shape[0] * tensors[t].shape[1];
        float *data = malloc(count * sizeof *data);
        for (size_t i = 0; i < count; i++)
            data[i] = 0.2f * sinf(0.7f * (float)i + (float)t) + 0.1f * (float)(t % 2);
        tensors[t].data = data;
        tensors[t].nbytes = count * sizeof *data;
    }
    char *path = cp_path_join(dir, "adapter_model.safetensors");
    cp_error err = {0};
    CHECK_MSG(cp_safetensors_write(path, tensors, (size_t)n, NULL, 0, &err) == CP_OK, "%s",
              err.msg);
    for (int t = 0; t < n; t++)
        free((void *)tensors[t].data);
    free(path);
    return dir;
}

static const char *const SCORE[] = {"base_model.model.score.weight"};
static const int COLS_OK[] = {TINY_C, TINY_C};

/* Runs classify on the tiny model and returns its exit status; *out and
 * *err_text receive stdout and stderr. */
static int tiny_classify(const char *adapter, const char *extra, char **out, char **err_text)
{
    char args[1024];
    snprintf(args, sizeof args, "classify --model %s --adapter '%s' %s", TINY_MODEL, adapter,
             extra);
    return test_run_cli(args, NULL, out, err_text);
}

/* Expects exit status 2 and one line on stderr that contains needle. */
static void check_rejected(const char *case_name, const char *adapter, const char *extra,
                           const char *needle)
{
    char *out = NULL, *err_text = NULL;
    int rc = tiny_classify(adapter, extra, &out, &err_text);
    CHECK_MSG(rc == 2, "%s: exit status %d, expected 2 (stderr \"%s\")", case_name, rc,
              err_text);
    CHECK_MSG(test_count_lines(err_text) == 1, "%s: expected one line on stderr, got \"%s\"",
              case_name, err_text);
    CHECK_MSG(strstr(err_text, needle) != NULL, "%s: \"%s\" does not mention \"%s\"",
              case_name, err_text, needle);
    CHECK_MSG(*out == '\0', "%s: printed \"%s\" on stdout", case_name, out);
    free(out), free(err_text);
}

TEST(seqcls_tiny_head_names_load_alike)
{
    const char *plain = tiny_adapter("SEQ_CLS", "", SCORE, COLS_OK, 1);
    static const char *const saved[] = {"base_model.model.score.modules_to_save.default.weight"};
    const char *wrapped =
        tiny_adapter("SEQ_CLS", ", \"modules_to_save\": [\"score\"]", saved, COLS_OK, 1);
    static const char *const classifier[] = {"base_model.model.classifier.weight"};
    const char *named_classifier =
        tiny_adapter("SEQ_CLS", ", \"modules_to_save\": [\"classifier\"]", classifier, COLS_OK, 1);

    char *a = NULL, *b = NULL, *c = NULL, *err_text = NULL;
    CHECK_EQ_INT(tiny_classify(plain, "--ids '1 2 3 4' --json", &a, &err_text), 0);
    CHECK_MSG(strstr(a, "\"logits\": [") != NULL, "%s %s", a, err_text);
    CHECK_EQ_INT(tiny_classify(wrapped, "--ids '1 2 3 4' --json", &b, NULL), 0);
    CHECK_EQ_INT(tiny_classify(named_classifier, "--ids '1,2,3,4' --json", &c, NULL), 0);
    CHECK_EQ_STR(b, a);
    CHECK_EQ_STR(c, a);
    free(a), free(b), free(c), free(err_text);

    /* The plain output: one line per label and the argmax. */
    char *out = NULL;
    CHECK_EQ_INT(tiny_classify(plain, "--ids '1 2 3 4'", &out, NULL), 0);
    CHECK_EQ_INT(test_count_lines(out), TINY_LABELS + 1);
    CHECK_MSG(strncmp(out, "label 0: ", 9) == 0, "%s", out);
    CHECK_MSG(strstr(out, "\nargmax: ") != NULL, "%s", out);
    free(out);

    /* The LoRA weights of a SEQ_CLS adapter load for the other commands too. */
    cp_error err = {0};
    cp_model *m = NULL;
    CHECK_MSG(cp_model_load(TINY_MODEL, &m, &err) == CP_OK, "%s", err.msg);
    CHECK_MSG(cp_model_load_adapter(m, wrapped, &err) == CP_OK, "%s", err.msg);
    cp_model_free(m);
}

TEST(seqcls_tiny_rejects_bad_adapters)
{
    check_rejected("missing head", tiny_adapter("SEQ_CLS", "", NULL, NULL, 0), "--ids '1 2 3'",
                   "no classification head");

    static const int narrow[] = {12};
    check_rejected("head of another hidden size", tiny_adapter("SEQ_CLS", "", SCORE, narrow, 1),
                   "--ids '1 2 3'", "[3, 12], expected [num_labels, 16]");

    check_rejected("CAUSAL_LM adapter", "tests/fixtures/lora_arch/tiny-gpt2", "--ids '1 2 3'",
                   "task_type is CAUSAL_LM, expected \"SEQ_CLS\"");

    static const char *const both[] = {"base_model.model.score.weight",
                                       "base_model.model.classifier.weight"};
    check_rejected("two heads", tiny_adapter("SEQ_CLS", "", both, COLS_OK, 2), "--ids '1 2 3'",
                   "both");

    static const char *const two_layer[] = {"base_model.model.score.weight",
                                            "base_model.model.classifier.dense.weight"};
    check_rejected("two-layer head", tiny_adapter("SEQ_CLS", "", two_layer, COLS_OK, 2),
                   "--ids '1 2 3'", "classifier.dense.weight");

    check_rejected("modules_to_save beyond the head",
                   tiny_adapter("SEQ_CLS", ", \"modules_to_save\": [\"score\", \"wte\"]", SCORE,
                                COLS_OK, 1),
                   "--ids '1 2 3'", "modules_to_save lists wte");

    const char *good = tiny_adapter("SEQ_CLS", "", SCORE, COLS_OK, 1);
    check_rejected("id outside the vocabulary", good, "--ids '1 40'", "outside the vocabulary");
    check_rejected("malformed ids", good, "--ids '1 x'", "invalid token id");
    check_rejected("text and ids", good, "--ids '1' --text hi", "exactly one of --text and --ids");
    check_rejected("too long", good,
                   "--ids '1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 "
                   "27 28 29 30 31 32 33'",
                   "context length of 32");
}

TEST(seqcls_lora_io_task_types)
{
    cp_error err = {0};
    cp_model *m = NULL;
    CHECK_MSG(cp_model_load(TINY_MODEL, &m, &err) == CP_OK, "%s", err.msg);
    if (!m)
        return;

    /* Task types other than CAUSAL_LM and SEQ_CLS are rejected by name. */
    const char *token_cls = tiny_adapter("TOKEN_CLS", "", NULL, NULL, 0);
    CHECK(cp_model_load_adapter(m, token_cls, &err) == CP_ERR_INPUT);
    CHECK_MSG(strstr(err.msg, "task_type TOKEN_CLS is not supported"), "%s", err.msg);

    /* A CAUSAL_LM adapter may not carry a head or list modules_to_save. */
    const char *lm_with_head = tiny_adapter("CAUSAL_LM", "", SCORE, COLS_OK, 1);
    CHECK(cp_model_load_adapter(m, lm_with_head, &err) == CP_ERR_INPUT);
    CHECK_MSG(strstr(err.msg, "unexpected tensor \"base_model.model.score.weight\""), "%s",
              err.msg);
    const char *lm_saving =
        tiny_adapter("CAUSAL_LM", ", \"modules_to_save\": [\"score\"]", NULL, NULL, 0);
    CHECK(cp_model_load_adapter(m, lm_saving, &err) == CP_ERR_INPUT);
    CHECK_MSG(strstr(err.msg, "\"modules_to_save\" is set"), "%s", err.msg);
    cp_model_free(m);
}

TEST(seqcls_lengths_pick_last_real_token)
{
    cp_error err = {0};
    cp_model *m = NULL;
    cp_seq_cls head;
    CHECK_MSG(cp_model_load(TINY_MODEL, &m, &err) == CP_OK, "%s", err.msg);
    CHECK(cp_seq_cls_init(&head, TINY_LABELS, TINY_C, 1, &err) == CP_OK);
    if (!m || !head.weight)
        return;
    for (int i = 0; i < TINY_LABELS * TINY_C; i++)
        head.weight[i] = 0.1f * cosf((float)i);
    for (int j = 0; j < TINY_LABELS; j++)
        head.bias[j] = 0.5f * (float)j;

    cp_param_ref params[2];
    CHECK_EQ_INT(cp_seq_cls_params(&head, params), 2);
    CHECK(params[0].param == head.weight);
    CHECK_EQ_INT(params[0].n, TINY_LABELS * TINY_C);
    CHECK(params[1].param == head.bias);
    CHECK_EQ_INT(params[1].decay, 0);

    /* Two right-padded sequences of 5 and 3 real tokens, and each alone. */
    const int32_t padded[] = {3, 1, 4, 1, 5, 2, 7, 1, 0, 0};
    const int lengths[] = {5, 3};
    float batch[2 * TINY_LABELS], alone[TINY_LABELS];
    CHECK_MSG(cp_seq_cls_classify(m, &head, padded, 2, 5, lengths, batch, NULL, &err) == CP_OK,
              "%s", err.msg);
    CHECK(cp_seq_cls_classify(m, &head, padded, 1, 5, NULL, alone, NULL, &err) == CP_OK);
    for (int j = 0; j < TINY_LABELS; j++)
        CHECK_CLOSE(batch[j], alone[j], 1e-5);
    CHECK(cp_seq_cls_classify(m, &head, padded + 5, 1, 3, NULL, alone, NULL, &err) == CP_OK);
    for (int j = 0; j < TINY_LABELS; j++)
        CHECK_CLOSE(batch[TINY_LABELS + j], alone[j], 1e-5);

    /* Padding must not count: the last position differs from the last real one. */
    float unpadded_last[TINY_LABELS];
    CHECK(cp_seq_cls_classify(m, &head, padded + 5, 1, 5, NULL, unpadded_last, NULL, &err) ==
          CP_OK);
    CHECK(fabsf(unpadded_last[0] - alone[0]) > 1e-3f);

    const int bad_lengths[] = {5, 6};
    CHECK(cp_seq_cls_classify(m, &head, padded, 2, 5, bad_lengths, batch, NULL, &err) ==
          CP_ERR_INPUT);
    CHECK_MSG(strstr(err.msg, "sequence 1 has length 6"), "%s", err.msg);

    cp_seq_cls_free(&head);
    cp_model_free(m);
}
