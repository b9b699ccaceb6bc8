/*
 * The training utilities: AdamW, gradient clipping and the learning-rate
 * schedules against PyTorch and transformers' formulas
 * (tests/fixtures/optim_reference.json, written by tools/ref_optim.py), and
 * the dataset's tokenization, held-out split, record errors and shuffle with
 * the stories260K tokenizer. Every test name starts with "train_".
 */
#include <cJSON.h>
#include <stdlib.h>

#include "core/file.h"
#include "test.h"
#include "train/dataset.h"
#include "train/optimizer.h"
#include "train/schedule.h"

#define FIXTURE "tests/fixtures/optim_reference.json"

/* The fixtures store float32 results; 1e-6 relative is a few float32 ulps. */
#define REL_TOL 1e-6

static const cJSON *field(const cJSON *obj, const char *name)
{
    const cJSON *f = cJSON_GetObjectItemCaseSensitive(obj, name);
    if (!f) {
        fprintf(stderr, "%s: missing \"%s\"; regenerate it with tools/ref_optim.py\n", FIXTURE,
                name);
        abort();
    }
    return f;
}

/* Copies a JSON number array into a malloc'd float array of *n values. */
static float *json_floats(const cJSON *array, size_t *n)
{
    *n = (size_t)cJSON_GetArraySize(array);
    float *out = malloc((*n + 1) * sizeof *out);
    size_t i = 0;
    const cJSON *el;
    cJSON_ArrayForEach(el, array) out[i++] = (float)el->valuedouble;
    return out;
}

/* |got - want| <= tol * |want|, or both exactly equal (zero included). */
static int close_rel(double got, double want, double tol)
{
    return got == want || fabs(got - want) <= tol * fabs(want);
}

/* Checks got (n,) against a JSON array, reporting the first mismatch. With
 * per_element 1 each element is compared relative to itself; with 0,
 * relative to the largest magnitude in want. The moments need the second
 * form: an element of m where beta1 * m and (1 - beta1) * g nearly cancel
 * keeps only a few significant bits, and torch 1.13 rounds that sum once (a
 * fused multiply-add) where this code rounds twice. */
static void check_floats_tol(const float *got, size_t n, const cJSON *want, const char *label,
                             int step, int per_element)
{
    CHECK_EQ_INT(cJSON_GetArraySize(want), n);
    double scale = 0.0;
    for (size_t i = 0; i < n; i++)
        scale = fmax(scale, fabs(cJSON_GetArrayItem(want, (int)i)->valuedouble));
    for (size_t i = 0; i < n; i++) {
        double w = cJSON_GetArrayItem(want, (int)i)->valuedouble;
        int ok = per_element ? close_rel(got[i], w, REL_TOL)
                             : fabs(got[i] - w) <= REL_TOL * scale;
        if (!ok) {
            cp_test_fail(__FILE__, __LINE__, "%s after step %d, element %zu: %.9g, expected %.9g",
                         label, step, i, (double)got[i], w);
            return;
        }
    }
}

static void check_floats(const float *got, size_t n, const cJSON *want, const char *label, int step)
{
    check_floats_tol(got, n, want, label, step, 1);
}

/* ---- AdamW -------------------------------------------------------------- */

/* The tensors of one AdamW fixture case, with their arrays. */
typedef struct adamw_case {
    int n_tensors;
    cp_param_ref refs[2];
    float *grads_all[2]; /* (steps, n) per tensor */
    const cJSON *tensors;
    const cJSON *lrs;
    int steps;
    cp_adamw_config cfg;
} adamw_case;

static void adamw_case_load(adamw_case *c, const cJSON *json)
{
    memset(c, 0, sizeof *c);
    c->tensors = field(json, "tensors");
    c->lrs = field(json, "lr");
    c->steps = cJSON_GetArraySize(c->lrs);
    c->n_tensors = cJSON_GetArraySize(c->tensors);
    CP_ASSERT(c->n_tensors == 2);
    c->cfg = (cp_adamw_config){
        .beta1 = field(json, "beta1")->valuedouble,
        .beta2 = field(json, "beta2")->valuedouble,
        .eps = field(json, "eps")->valuedouble,
        .weight_decay = field(json, "weight_decay")->valuedouble,
    };
    for (int i = 0; i < c->n_tensors; i++) {
        const cJSON *t = cJSON_GetArrayItem(c->tensors, i);
        size_t n;
        c->refs[i].param = json_floats(field(t, "init"), &n);
        c->refs[i].n = n;
        c->refs[i].decay = field(t, "decay")->valueint;
        c->refs[i].name = i == 0 ? "decayed" : "plain";
        c->refs[i].grad = calloc(n, sizeof(float));
        c->grads_all[i] = malloc((size_t)c->steps * n * sizeof(float));
        for (int s = 0; s < c->steps; s++) {
            size_t m;
            float *g = json_floats(cJSON_GetArrayItem(field(t, "grads"), s), &m);
            CP_ASSERT(m == n);
            memcpy(c->grads_all[i] + (size_t)s * n, g, n * sizeof *g);
            free(g);
        }
    }
}

static void adamw_case_free(adamw_case *c)
{
    for (int i = 0; i < c->n_tensors; i++) {
        free(c->refs[i].param);
        free(c->refs[i].grad);
        free(c->grads_all[i]);
    }
}

/* Loads step s's gradients into the tensors' grad arrays. */
static void adamw_case_set_grads(adamw_case *c, int s)
{
    for (int i = 0; i < c->n_tensors; i++)
        memcpy(c->refs[i].grad, c->grads_all[i] + (size_t)s * c->refs[i].n,
               c->refs[i].n * sizeof(float));
}

static void check_after_step(adamw_case *c, int s)
{
    for (int i = 0; i < c->n_tensors; i++) {
        const cJSON *after = field(cJSON_GetArrayItem(c->tensors, i), "after");
        check_floats(c->refs[i].param, c->refs[i].n, cJSON_GetArrayItem(after, s),
                     c->refs[i].name, s);
    }
}

TEST(train_adamw_matches_torch)
{
    cJSON *ref = test_read_json(FIXTURE);
    if (!ref)
        return;
    const cJSON *json;
    cJSON_ArrayForEach(json, field(ref, "adamw"))
    {
        adamw_case c;
        adamw_case_load(&c, json);
        cp_adamw opt;
        cp_error err = {0};
        CHECK_MSG(cp_adamw_init(&opt, c.refs, c.n_tensors, &c.cfg, &err) == CP_OK, "%s", err.msg);
        for (int s = 0; s < c.steps; s++) {
            adamw_case_set_grads(&c, s);
            cp_adamw_step(&opt, cJSON_GetArrayItem(c.lrs, s)->valuedouble);
            check_after_step(&c, s);
        }
        CHECK_EQ_INT(cp_adamw_step_count(&opt), c.steps);

        /* The moments, which a checkpoint stores, match torch's state too. */
        cp_adamw_state st = cp_adamw_export(&opt);
        CHECK_EQ_INT(st.n, c.refs[0].n + c.refs[1].n);
        CHECK_EQ_INT(st.step, c.steps);
        size_t offset = 0;
        for (int i = 0; i < c.n_tensors; i++) {
            const cJSON *t = cJSON_GetArrayItem(c.tensors, i);
            check_floats_tol(st.m + offset, c.refs[i].n, field(t, "exp_avg"), "exp_avg",
                             c.steps - 1, 0);
            check_floats_tol(st.v + offset, c.refs[i].n, field(t, "exp_avg_sq"), "exp_avg_sq",
                             c.steps - 1, 0);
            offset += c.refs[i].n;
        }
        cp_adamw_free(&opt);
        adamw_case_free(&c);
    }
    cJSON_Delete(ref);
}

/* Runs every step of case c on a fresh optimizer. */
static void adamw_case_run(adamw_case *c)
{
    cp_adamw opt;
    cp_error err = {0};
    CHECK(cp_adamw_init(&opt, c->refs, c->n_tensors, &c->cfg, &err) == CP_OK);
    for (int s = 0; s < c->steps; s++) {
        adamw_case_set_grads(c, s);
        cp_adamw_step(&opt, cJSON_GetArrayItem(c->lrs, s)->valuedouble);
    }
    cp_adamw_free(&opt);
}

/* Half the steps, export, import into a fresh optimizer, the other half: the
 * parameters equal those of an uninterrupted run bit for bit. The case with
 * the cosine schedule changes lr across the break. */
TEST(train_adamw_export_import_resumes)
{
    cJSON *ref = test_read_json(FIXTURE);
    if (!ref)
        return;
    const cJSON *json = cJSON_GetArrayItem(field(ref, "adamw"), 1);
    adamw_case c, whole;
    adamw_case_load(&c, json);
    adamw_case_load(&whole, json);
    adamw_case_run(&whole);

    cp_error err = {0};
    cp_adamw first, second;
    CHECK(cp_adamw_init(&first, c.refs, c.n_tensors, &c.cfg, &err) == CP_OK);
    int half = c.steps / 2;
    for (int s = 0; s < half; s++) {
        adamw_case_set_grads(&c, s);
        cp_adamw_step(&first, cJSON_GetArrayItem(c.lrs, s)->valuedouble);
    }

    cp_adamw_state st = cp_adamw_export(&first);
    size_t n = st.n;
    int64_t step = st.step;
    float *m = malloc(n * sizeof *m), *v = malloc(n * sizeof *v);
    memcpy(m, st.m, n * sizeof *m);
    memcpy(v, st.v, n * sizeof *v);
    cp_adamw_free(&first);

    CHECK(cp_adamw_init(&second, c.refs, c.n_tensors, &c.cfg, &err) == CP_OK);
    CHECK_MSG(cp_adamw_import(&second, m, v, n, step, &err) == CP_OK, "%s", err.msg);
    CHECK_EQ_INT(cp_adamw_step_count(&second), half);
    for (int s = half; s < c.steps; s++) {
        adamw_case_set_grads(&c, s);
        cp_adamw_step(&second, cJSON_GetArrayItem(c.lrs, s)->valuedouble);
    }
    CHECK_EQ_INT(cp_adamw_step_count(&second), c.steps);
    for (int i = 0; i < c.n_tensors; i++)
        CHECK_MSG(memcmp(c.refs[i].param, whole.refs[i].param, c.refs[i].n * sizeof(float)) == 0,
                  "tensor %d differs from the uninterrupted run", i);
    check_after_step(&c, c.steps - 1);

    cp_adamw_free(&second);
    free(m);
    free(v);
    adamw_case_free(&c);
    adamw_case_free(&whole);
    cJSON_Delete(ref);
}

TEST(train_adamw_import_rejects_bad_state)
{
    float p[3] = {1, 2, 3}, g[3] = {0};
    cp_param_ref ref = {.name = "w", .param = p, .grad = g, .n = 3, .decay = 1};
    cp_adamw_config cfg = cp_adamw_default_config();
    cp_adamw opt;
    cp_error err = {0};
    CHECK(cp_adamw_init(&opt, &ref, 1, &cfg, &err) == CP_OK);

    float m[4] = {0.1f, 0.2f, 0.3f, 0.4f}, v[4] = {0.1f, 0.2f, 0.3f, 0.4f};
    CHECK(cp_adamw_import(&opt, m, v, 4, 1, &err) == CP_ERR_INPUT);
    CHECK_MSG(strstr(err.msg, "4 values") && strstr(err.msg, "have 3"), "%s", err.msg);
    CHECK(cp_adamw_import(&opt, m, v, 3, -1, &err) == CP_ERR_INPUT);
    v[1] = -0.5f;
    CHECK(cp_adamw_import(&opt, m, v, 3, 2, &err) == CP_ERR_INPUT);
    CHECK_MSG(strstr(err.msg, "second moment 1"), "%s", err.msg);
    v[1] = 0.2f;
    m[2] = NAN;
    CHECK(cp_adamw_import(&opt, m, v, 3, 2, &err) == CP_ERR_INPUT);
    CHECK_MSG(strstr(err.msg, "first moment 2"), "%s", err.msg);

    /* The failed imports left the zero state alone. */
    cp_adamw_state st = cp_adamw_export(&opt);
    CHECK_EQ_INT(st.step, 0);
    CHECK(st.m[0] == 0.0f);
    CHECK(st.v[1] == 0.0f);
    cp_adamw_free(&opt);
}

TEST(train_adamw_rejects_bad_config)
{
    float p[1] = {1}, g[1] = {0};
    cp_param_ref ref = {.param = p, .grad = g, .n = 1, .decay = 1};
    cp_adamw opt;
    cp_error err = {0};
    cp_adamw_config cfg = cp_adamw_default_config();
    cfg.beta2 = 1.0;
    CHECK(cp_adamw_init(&opt, &ref, 1, &cfg, &err) == CP_ERR_INPUT);
    CHECK_MSG(strstr(err.msg, "betas"), "%s", err.msg);
    cfg = cp_adamw_default_config();
    cfg.eps = 0.0;
    CHECK(cp_adamw_init(&opt, &ref, 1, &cfg, &err) == CP_ERR_INPUT);
    cfg = cp_adamw_default_config();
    cfg.weight_decay = -0.1;
    CHECK(cp_adamw_init(&opt, &ref, 1, &cfg, &err) == CP_ERR_INPUT);
    CHECK(opt.m == NULL);
}

/* ---- gradient clipping -------------------------------------------------- */

TEST(train_grad_clip_matches_torch)
{
    cJSON *ref = test_read_json(FIXTURE);
    if (!ref)
        return;
    const cJSON *c;
    cJSON_ArrayForEach(c, field(ref, "clip"))
    {
        size_t na, nb;
        float *a = json_floats(cJSON_GetArrayItem(field(c, "grads"), 0), &na);
        float *b = json_floats(cJSON_GetArrayItem(field(c, "grads"), 1), &nb);
        cp_param_ref refs[2] = {{.name = "a", .grad = a, .n = na}, {.name = "b", .grad = b, .n = nb}};
        double norm = 0;
        cp_error err = {0};
        double max_norm = field(c, "max_norm")->valuedouble;
        CHECK(cp_grad_clip_norm(refs, 2, max_norm, &norm, &err) == CP_OK);
        double want = field(c, "norm")->valuedouble;
        CHECK_MSG(close_rel(norm, want, REL_TOL), "max_norm %g: norm %.9g, expected %.9g",
                  max_norm, norm, want);
        check_floats(a, na, cJSON_GetArrayItem(field(c, "clipped"), 0), "clipped a", 0);
        check_floats(b, nb, cJSON_GetArrayItem(field(c, "clipped"), 1), "clipped b", 0);
        free(a);
        free(b);
    }
    cJSON_Delete(ref);
}

TEST(train_grad_clip_reports_nonfinite)
{
    const float bad_values[2] = {NAN, INFINITY};
    for (int k = 0; k < 2; k++) {
        float a[3] = {1, 2, 3}, b[4] = {4, 5, 6, 7};
        b[2] = bad_values[k];
        cp_param_ref refs[2] = {{.name = "lora_A", .grad = a, .n = 3},
                                {.name = "lora_B", .grad = b, .n = 4}};
        double norm = 0;
        cp_error err = {0};
        CHECK(cp_grad_clip_norm(refs, 2, 1.0, &norm, &err) == CP_ERR_INPUT);
        CHECK(!isfinite(norm));
        CHECK_MSG(strstr(err.msg, "tensor 1 (lora_B)") && strstr(err.msg, "element 2"), "%s",
                  err.msg);
        /* Nothing was scaled. */
        CHECK(a[0] == 1.0f);
        CHECK(a[2] == 3.0f);
        CHECK(b[3] == 7.0f);
    }
}

TEST(train_grad_clip_zero_max_only_measures)
{
    float a[2] = {3, 4};
    cp_param_ref ref = {.grad = a, .n = 2};
    double norm = 0;
    cp_error err = {0};
    CHECK(cp_grad_clip_norm(&ref, 1, 0.0, &norm, &err) == CP_OK);
    CHECK_CLOSE(norm, 5.0, 1e-12);
    CHECK(a[0] == 3.0f);
    CHECK(a[1] == 4.0f);
    CHECK(cp_grad_clip_norm(&ref, 1, 1.0, &norm, &err) == CP_OK);
    CHECK_CLOSE(a[0], 3.0 / (5.0 + 1e-6), 1e-7);
}

/* ---- schedules ---------------------------------------------------------- */

TEST(train_schedule_warmup_matches_transformers)
{
    cJSON *ref = test_read_json(FIXTURE);
    if (!ref)
        return;
    const cJSON *c;
    cJSON_ArrayForEach(c, field(ref, "warmup"))
    {
        int64_t got = cp_schedule_warmup_steps(field(c, "warmup_steps")->valueint,
                                               field(c, "warmup_ratio")->valuedouble,
                                               field(c, "total_steps")->valueint);
        CHECK_EQ_INT(got, field(c, "resolved_warmup")->valueint);
    }
    cJSON_Delete(ref);
}

TEST(train_schedule_matches_transformers)
{
    cJSON *ref = test_read_json(FIXTURE);
    if (!ref)
        return;
    const cJSON *c;
    cJSON_ArrayForEach(c, field(ref, "schedules"))
    {
        const char *name = field(c, "schedule")->valuestring;
        cp_schedule_kind kind;
        cp_schedule s;
        cp_error err = {0};
        CHECK(cp_schedule_parse(name, &kind, &err) == CP_OK);
        CHECK_MSG(cp_schedule_init(&s, kind, field(c, "peak_lr")->valuedouble,
                                   field(c, "warmup_steps")->valueint,
                                   field(c, "warmup_ratio")->valuedouble,
                                   field(c, "total_steps")->valueint, &err) == CP_OK,
                  "%s", err.msg);
        CHECK_EQ_INT(s.warmup, field(c, "resolved_warmup")->valueint);
        int step = 0;
        const cJSON *lr;
        cJSON_ArrayForEach(lr, field(c, "lr"))
        {
            double got = cp_schedule_lr(&s, step);
            CHECK_MSG(close_rel(got, lr->valuedouble, REL_TOL),
                      "%s, warmup %lld of %lld: step %d has lr %.12g, expected %.12g", name,
                      (long long)s.warmup, (long long)s.total_steps, step, got, lr->valuedouble);
            step++;
        }
        CHECK_EQ_INT(step, s.total_steps);
    }
    cJSON_Delete(ref);
}

TEST(train_schedule_parse_names)
{
    const cp_schedule_kind kinds[] = {CP_SCHEDULE_COSINE, CP_SCHEDULE_LINEAR, CP_SCHEDULE_CONSTANT};
    cp_error err = {0};
    for (int i = 0; i < 3; i++) {
        cp_schedule_kind k = (cp_schedule_kind)-1;
        CHECK(cp_schedule_parse(cp_schedule_name(kinds[i]), &k, &err) == CP_OK);
        CHECK_EQ_INT(k, kinds[i]);
    }
    cp_schedule_kind k = CP_SCHEDULE_COSINE;
    CHECK(cp_schedule_parse("constant_with_warmup", &k, &err) == CP_OK);
    CHECK_EQ_INT(k, CP_SCHEDULE_CONSTANT);
    CHECK(cp_schedule_parse("Cosine", &k, &err) == CP_ERR_INPUT);
    CHECK(cp_schedule_parse("polynomial", &k, &err) == CP_ERR_INPUT);
    CHECK_MSG(strstr(err.msg, "\"polynomial\"") && strstr(err.msg, "cosine, linear or constant"),
              "%s", err.msg);
}

TEST(train_schedule_past_end_stays_zero)
{
    cp_schedule s;
    cp_error err = {0};
    CHECK(cp_schedule_init(&s, CP_SCHEDULE_COSINE, 1e-3, 2, 0.0, 10, &err) == CP_OK);
    CHECK(cp_schedule_lr(&s, 0) == 0.0);
    CHECK_CLOSE(cp_schedule_lr(&s, 2), 1e-3, 1e-15);
    CHECK(cp_schedule_lr(&s, 10) <= 1e-18);
    CHECK(cp_schedule_lr(&s, 15) <= 1e-18);
    CHECK(cp_schedule_init(&s, CP_SCHEDULE_LINEAR, 1e-3, 2, 0.0, 10, &err) == CP_OK);
    CHECK(cp_schedule_lr(&s, 10) == 0.0);
    CHECK(cp_schedule_lr(&s, 15) == 0.0);
    CHECK(cp_schedule_init(&s, CP_SCHEDULE_CONSTANT, 1e-3, 2, 0.0, 10, &err) == CP_OK);
    CHECK(cp_schedule_lr(&s, 15) == 1e-3);

    /* A warmup longer than the run never reaches the peak, as in transformers. */
    CHECK(cp_schedule_init(&s, CP_SCHEDULE_COSINE, 1e-3, 20, 0.0, 10, &err) == CP_OK);
    CHECK_CLOSE(cp_schedule_lr(&s, 9), 1e-3 * 9 / 20, 1e-15);
}

TEST(train_schedule_init_rejects)
{
    cp_schedule s;
    cp_error err = {0};
    CHECK(cp_schedule_init(&s, CP_SCHEDULE_COSINE, 1e-3, 0, 0.0, 0, &err) == CP_ERR_INPUT);
    CHECK_MSG(strstr(err.msg, "0 optimizer steps"), "%s", err.msg);
    CHECK(cp_schedule_init(&s, CP_SCHEDULE_COSINE, 1e-3, -1, 0.0, 10, &err) == CP_ERR_INPUT);
    CHECK(cp_schedule_init(&s, CP_SCHEDULE_COSINE, 1e-3, 0, 1.5, 10, &err) == CP_ERR_INPUT);
    CHECK(cp_schedule_init(&s, CP_SCHEDULE_COSINE, -1e-3, 0, 0.0, 10, &err) == CP_ERR_INPUT);
    CHECK(cp_schedule_init(&s, CP_SCHEDULE_COSINE, NAN, 0, 0.0, 10, &err) == CP_ERR_INPUT);
}

/* ---- dataset ------------------------------------------------------------ */

static const char STORY[] =
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the "
    "sun. One day, she saw a big red ball in the park. She ran to the ball and kicked it very "
    "hard. The ball flew over the fence and into the garden of an old man. Lily was sad, but "
    "the old man smiled and gave the ball back to her. They became good friends.\n";

static cp_tokenizer *load_tokenizer(void)
{
    char *dir = test_shared("models/stories260K");
    cp_tokenizer *tok = NULL;
    cp_error err = {0};
    CHECK_MSG(cp_tokenizer_load(dir, &tok, &err) == CP_OK, "%s", err.msg);
    free(dir);
    return tok;
}

static int32_t *encode(const cp_tokenizer *tok, const char *text, int add_bos, size_t *n)
{
    int32_t *ids = NULL;
    cp_error err = {0};
    CHECK_MSG(cp_tokenizer_encode(tok, text, strlen(text), add_bos, &ids, n, &err) == CP_OK,
              "%s", err.msg);
    return ids;
}

static cp_dataset_params params_for(const char *path, int seq_len, double eval_split)
{
    cp_dataset_params p = cp_dataset_default_params();
    p.train_path = path;
    p.seq_len = seq_len;
    p.context_length = 256;
    p.eval_split = eval_split;
    return p;
}

/* Returns cp_dataset_init's status and leaves its message in err; frees the
 * dataset. */
static cp_status init_status(const cp_tokenizer *tok, const cp_dataset_params *p, cp_error *err)
{
    cp_dataset ds;
    cp_status st = cp_dataset_init(&ds, tok, p, err);
    if (st == CP_OK)
        cp_dataset_free(&ds);
    return st;
}

TEST(train_dataset_txt_windows_match_encode)
{
    cp_tokenizer *tok = load_tokenizer();
    if (!tok)
        return;
    char *path = test_write_file(test_tmpdir(), "story.txt", STORY, strlen(STORY));
    size_t n;
    int32_t *ids = encode(tok, STORY, 1, &n);
    const int N = 16;

    cp_dataset ds;
    cp_error err = {0};
    cp_dataset_params p = params_for(path, N, 0.0);
    CHECK_MSG(cp_dataset_init(&ds, tok, &p, &err) == CP_OK, "%s", err.msg);
    CHECK_EQ_INT(ds.n_train, n);
    CHECK_EQ_INT(ds.n_eval, 0);
    CHECK(ds.eval_ids == NULL);
    CHECK_EQ_INT(cp_dataset_n_windows(&ds), (n - 1) / N);
    CHECK(cp_dataset_n_windows(&ds) >= 5);

    /* Window k is ids[kN, kN + N + 1): the last id of one window is the
     * first of the next. */
    for (size_t k = 0; k < ds.n_windows; k++)
        CHECK_MSG(memcmp(cp_dataset_window(&ds, k), ids + k * N, (N + 1) * sizeof *ids) == 0,
                  "window %zu differs from the direct encode", k);
    CHECK(ds.train_ids[0] == cp_tokenizer_bos_id(tok));

    /* Batches copy the windows they name. */
    int32_t batch[3 * 17];
    size_t windows[3];
    for (int b = 0; b < 4; b++) {
        cp_dataset_next_batch(&ds, batch, 3, windows);
        for (int r = 0; r < 3; r++)
            CHECK(memcmp(batch + r * (N + 1), ids + windows[r] * N, (N + 1) * sizeof *ids) == 0);
    }
    cp_dataset_free(&ds);
    free(ids);
    free(path);
    cp_tokenizer_free(tok);
}

TEST(train_dataset_eval_split_boundary)
{
    cp_tokenizer *tok = load_tokenizer();
    if (!tok)
        return;
    char *path = test_write_file(test_tmpdir(), "story.txt", STORY, strlen(STORY));
    size_t n;
    int32_t *ids = encode(tok, STORY, 1, &n);
    const int N = 8;

    cp_dataset ds;
    cp_error err = {0};
    cp_dataset_params p = params_for(path, N, 0.2);
    CHECK_MSG(cp_dataset_init(&ds, tok, &p, &err) == CP_OK, "%s", err.msg);
    size_t n_eval = (size_t)floor(0.2 * (double)n);
    CHECK_EQ_INT(ds.n_eval, n_eval);
    CHECK_EQ_INT(ds.n_train, n - n_eval);
    CHECK(memcmp(ds.train_ids, ids, ds.n_train * sizeof *ids) == 0);
    CHECK(memcmp(ds.eval_ids, ids + ds.n_train, n_eval * sizeof *ids) == 0);

    /* Every training window ends inside the training part. */
    CHECK_EQ_INT(ds.n_windows, (ds.n_train - 1) / N);
    CHECK(ds.n_windows * N + 1 <= ds.n_train);
    cp_dataset_free(&ds);

    /* A separate eval file replaces the split: all of train_path trains. */
    static const char EVAL_TEXT[] = "The cat sat on the mat and looked at the little bird.";
    char *eval_path = test_write_file(test_tmpdir(), "eval.txt", EVAL_TEXT, strlen(EVAL_TEXT));
    p.eval_path = eval_path;
    CHECK_MSG(cp_dataset_init(&ds, tok, &p, &err) == CP_OK, "%s", err.msg);
    size_t n_e;
    int32_t *eval_ids = encode(tok, EVAL_TEXT, 1, &n_e);
    CHECK_EQ_INT(ds.n_train, n);
    CHECK_EQ_INT(ds.n_eval, n_e);
    CHECK(memcmp(ds.eval_ids, eval_ids, n_e * sizeof *eval_ids) == 0);
    cp_dataset_free(&ds);

    free(eval_ids);
    free(eval_path);
    free(ids);
    free(path);
    cp_tokenizer_free(tok);
}

TEST(train_dataset_jsonl_records)
{
    cp_tokenizer *tok = load_tokenizer();
    if (!tok)
        return;
    static const char JSONL[] = "{\"text\": \"Lily saw a cat.\"}\n"
                                "\n"
                                "{\"id\": 7, \"text\": \"The sun was hot.\"}\r\n"
                                "   \n"
                                "{\"text\": \"Tom ran \\\"fast\\\".\\nHe won.\"}";
    const char *texts[] = {"Lily saw a cat.", "The sun was hot.", "Tom ran \"fast\".\nHe won."};
    char *path = test_write_file(test_tmpdir(), "data.jsonl", JSONL, strlen(JSONL));

    /* Expected: each record with BOS, then EOS, one after another. */
    int32_t want[512];
    size_t n_want = 0;
    for (int i = 0; i < 3; i++) {
        size_t n;
        int32_t *ids = encode(tok, texts[i], 1, &n);
        memcpy(want + n_want, ids, n * sizeof *ids);
        n_want += n;
        want[n_want++] = cp_tokenizer_eos_id(tok);
        free(ids);
    }

    int32_t *got = NULL;
    size_t n_got = 0;
    cp_error err = {0};
    CHECK_MSG(cp_dataset_tokenize_file(tok, path, 1, &got, &n_got, &err) == CP_OK, "%s", err.msg);
    CHECK_EQ_INT(n_got, n_want);
    CHECK(got != NULL);
    if (got)
        CHECK(memcmp(got, want, n_want * sizeof *want) == 0);
    free(got);
    free(path);
    cp_tokenizer_free(tok);
}

TEST(train_dataset_jsonl_bad_lines)
{
    cp_tokenizer *tok = load_tokenizer();
    if (!tok)
        return;
    static const struct {
        const char *content;
        const char *where; /* "data.jsonl:LINE:" */
        const char *what;
    } cases[] = {
        {"{\"text\": \"a\"}\n\n{bad\n", "data.jsonl:3:", "invalid JSON"},
        {"{\"text\": \"a\"} trailing\n", "data.jsonl:1:", "invalid JSON"},
        {"{\"text\": \"a\"}\n[1, 2]\n", "data.jsonl:2:", "found an array"},
        {"\"just a string\"\n", "data.jsonl:1:", "found a string"},
        {"\n\n{\"txt\": \"a\"}\n", "data.jsonl:3:", "missing field \"text\""},
        {"{\"text\": 5}\n", "data.jsonl:1:", "\"text\" is a number; expected a string"},
        {"{\"text\": \"ok\"}\r\n{\"text\": null}\r\n", "data.jsonl:2:", "\"text\" is null"},
        {"{\"text\": [\"a\"]}", "data.jsonl:1:", "\"text\" is an array"},
        {"\n  \n\n", "data.jsonl:", "no records"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char *path = test_write_file(test_tmpdir(), "data.jsonl", cases[i].content,
                                     strlen(cases[i].content));
        int32_t *ids = NULL;
        size_t n = 0;
        cp_error err = {0};
        cp_status st = cp_dataset_tokenize_file(tok, path, 1, &ids, &n, &err);
        CHECK_MSG(st == CP_ERR_INPUT, "case %zu: status %d", i, (int)st);
        CHECK(ids == NULL);
        CHECK_MSG(strstr(err.msg, cases[i].where), "case %zu: \"%s\" lacks \"%s\"", i, err.msg,
                  cases[i].where);
        CHECK_MSG(strstr(err.msg, cases[i].what), "case %zu: \"%s\" lacks \"%s\"", i, err.msg,
                  cases[i].what);
        free(path);
    }
    cp_tokenizer_free(tok);
}

TEST(train_dataset_input_errors)
{
    cp_tokenizer *tok = load_tokenizer();
    if (!tok)
        return;
    const char *dir = test_tmpdir();
    char *empty = test_write_file(dir, "empty.txt", "", 0);
    char *tiny = test_write_file(dir, "tiny.txt", "Hi.", 3);
    char *story = test_write_file(dir, "story.txt", STORY, strlen(STORY));
    char *json = test_write_file(dir, "data.json", "{}", 2);
    size_t n_tiny;
    free(encode(tok, "Hi.", 1, &n_tiny));
    cp_error err = {0};

    cp_dataset_params p = params_for(empty, 8, 0.0);
    CHECK(init_status(tok, &p, &err) == CP_ERR_INPUT);
    CHECK_MSG(strstr(err.msg, "empty.txt: the file is empty"), "%s", err.msg);

    /* Too short: the message gives the token count and what one window needs. */
    p = params_for(tiny, 8, 0.0);
    CHECK(init_status(tok, &p, &err) == CP_ERR_INPUT);
    char want[128];
    snprintf(want, sizeof want, "tiny.txt: the file has %zu tokens", n_tiny);
    CHECK_MSG(strstr(err.msg, want) && strstr(err.msg, "needs 9"), "%s", err.msg);

    p = params_for(story, 300, 0.0);
    CHECK(init_status(tok, &p, &err) == CP_ERR_INPUT);
    CHECK_MSG(strstr(err.msg, "sequence length 300 (--seq-len) is outside [1, 256]"), "%s", err.msg);
    p = params_for(story, 0, 0.0);
    CHECK(init_status(tok, &p, &err) == CP_ERR_INPUT);
    p = params_for(story, 8, 1.0);
    CHECK(init_status(tok, &p, &err) == CP_ERR_INPUT);
    CHECK_MSG(strstr(err.msg, "eval split 1"), "%s", err.msg);

    /* 5% of the story is a handful of tokens: too few for a window of 64. */
    p = params_for(story, 64, 0.05);
    CHECK(init_status(tok, &p, &err) == CP_ERR_INPUT);
    CHECK_MSG(strstr(err.msg, "story.txt: the held-out last 5%") && strstr(err.msg, "needs 65"),
              "%s", err.msg);

    /* The training part left after the split is too short. */
    size_t n_story;
    free(encode(tok, STORY, 1, &n_story));
    int N = (int)((double)n_story * 0.45);
    p = params_for(story, N, 0.6);
    CHECK(init_status(tok, &p, &err) == CP_ERR_INPUT);
    CHECK_MSG(strstr(err.msg, "the part before the held-out split"), "%s", err.msg);

    p = params_for(story, 8, 0.0);
    p.eval_path = tiny;
    CHECK(init_status(tok, &p, &err) == CP_ERR_INPUT);
    CHECK_MSG(strstr(err.msg, "tiny.txt: the evaluation file has"), "%s", err.msg);

    p = params_for(json, 8, 0.0);
    CHECK(init_status(tok, &p, &err) == CP_ERR_INPUT);
    CHECK_MSG(strstr(err.msg, ".jsonl"), "%s", err.msg);

    char *missing = cp_path_join(dir, "missing.txt");
    p = params_for(missing, 8, 0.0);
    CHECK(init_status(tok, &p, &err) != CP_OK);
    CHECK_MSG(strstr(err.msg, "missing.txt"), "%s", err.msg);

    free(missing);
    free(empty);
    free(tiny);
    free(story);
    free(json);
    cp_tokenizer_free(tok);
}

/* Draws `count` window indices through batches of B. */
static void draw_windows(cp_dataset *ds, int B, size_t count, size_t *out)
{
    int32_t *batch = malloc((size_t)B * (ds->seq_len + 1) * sizeof *batch);
    size_t *w = malloc((size_t)B * sizeof *w);
    for (size_t got = 0; got < count;) {
        cp_dataset_next_batch(ds, batch, B, w);
        for (int b = 0; b < B && got < count; b++)
            out[got++] = w[b];
    }
    free(w);
    free(batch);
}

/* Checks that order (n,) is a permutation of 0 .. n-1. */
static void check_permutation(const size_t *order, size_t n, const char *what)
{
    int *seen = calloc(n, sizeof *seen);
    for (size_t i = 0; i < n; i++) {
        CHECK_MSG(order[i] < n, "%s: window %zu out of range", what, order[i]);
        if (order[i] < n)
            seen[order[i]]++;
    }
    for (size_t k = 0; k < n; k++)
        CHECK_MSG(seen[k] == 1, "%s: window %zu visited %d times", what, k, seen[k]);
    free(seen);
}

TEST(train_dataset_shuffle_is_seeded)
{
    cp_tokenizer *tok = load_tokenizer();
    if (!tok)
        return;
    char *path = test_write_file(test_tmpdir(), "story.txt", STORY, strlen(STORY));
    cp_dataset_params p = params_for(path, 4, 0.0);
    cp_dataset a, b, c;
    cp_error err = {0};
    CHECK_MSG(cp_dataset_init(&a, tok, &p, &err) == CP_OK, "%s", err.msg);
    CHECK(cp_dataset_init(&b, tok, &p, &err) == CP_OK);
    p.seed = 43;
    CHECK(cp_dataset_init(&c, tok, &p, &err) == CP_OK);
    size_t n = a.n_windows;
    CHECK(n >= 20);

    /* Three epochs through batches of a size B that does not divide n, so
     * some batches span two epochs. */
    int B = 3;
    while (n % (size_t)B == 0)
        B++;
    size_t *wa = malloc(3 * n * sizeof *wa), *wb = malloc(3 * n * sizeof *wb);
    size_t *wc = malloc(3 * n * sizeof *wc);
    draw_windows(&a, B, 3 * n, wa);
    draw_windows(&b, B, 3 * n, wb);
    draw_windows(&c, B, 3 * n, wc);
    CHECK(memcmp(wa, wb, 3 * n * sizeof *wa) == 0);
    CHECK(memcmp(wa, wc, n * sizeof *wa) != 0);
    for (int e = 0; e < 3; e++) {
        char what[32];
        snprintf(what, sizeof what, "epoch %d", e);
        check_permutation(wa + e * n, n, what);
        check_permutation(wc + e * n, n, what);
    }
    CHECK(memcmp(wa, wa + n, n * sizeof *wa) != 0);
    CHECK(memcmp(wa + n, wa + 2 * n, n * sizeof *wa) != 0);
    CHECK(a.epoch >= 2);

    /* The first epoch is shuffled, not the identity. */
    size_t in_place = 0;
    for (size_t i = 0; i < n; i++)
        in_place += wa[i] == i;
    CHECK(in_place < n);

    free(wa);
    free(wb);
    free(wc);
    cp_dataset_free(&a);
    cp_dataset_free(&b);
    cp_dataset_free(&c);
    free(path);
    cp_tokenizer_free(tok);
}
