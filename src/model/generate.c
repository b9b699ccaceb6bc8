/*
 * Text generation: greedy decoding at temperature 0, otherwise sampling from
 * the temperature-scaled softmax restricted to the top-p nucleus.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/rng.h"
#include "model/kv_cache.h"
#include "peft/method.h"

cp_generate_params cp_generate_default_params(void)
{
    return (cp_generate_params){
        .max_new_tokens = 256,
        .temperature = 0.0f,
        .top_p = 1.0f,
        .seed = 0,
        .stop_at_eos = 1,
    };
}

/* The first index of the largest logit. */
static int argmax(const float *x, int n)
{
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best])
            best = i;
    return best;
}

typedef struct prob_index {
    float prob;
    int index;
} prob_index;

static int by_prob_desc(const void *a, const void *b)
{
    const prob_index *x = a, *y = b;
    if (x->prob != y->prob)
        return x->prob > y->prob ? -1 : 1;
    return x->index - y->index; /* ties by index, so the order is deterministic */
}

/* Samples from softmax(logits / temperature), keeping only the most likely
 * tokens whose total probability first reaches top_p. sorted is scratch (n). */
static int sample(const float *logits, int n, float temperature, float top_p, cp_rng *rng,
                  prob_index *sorted)
{
    float max = logits[argmax(logits, n)];
    double sum = 0.0;
    for (int i = 0; i < n; i++) {
        sorted[i].prob = expf((logits[i] - max) / temperature);
        sorted[i].index = i;
        sum += sorted[i].prob;
    }
    for (int i = 0; i < n; i++)
        sorted[i].prob = (float)(sorted[i].prob / sum);
    qsort(sorted, (size_t)n, sizeof *sorted, by_prob_desc);

    int keep = n;
    double mass = 0.0;
    for (int i = 0; i < n; i++) {
        mass += sorted[i].prob;
        if (mass >= top_p) {
            keep = i + 1;
            break;
        }
    }
    float r = cp_rng_uniform(rng) * (float)(keep < n ? mass : 1.0);
    double cdf = 0.0;
    for (int i = 0; i < keep; i++) {
        cdf += sorted[i].prob;
        if (r < cdf)
            return sorted[i].index;
    }
    return sorted[keep - 1].index;
}

static int is_eos(const cp_model_config *c, int token)
{
    for (int i = 0; i < c->n_eos_ids; i++)
        if (c->eos_ids[i] == token)
            return 1;
    return 0;
}

static cp_status check_request(const cp_model *m, const int32_t *prompt, size_t n_prompt,
                               const cp_generate_params *p, cp_error *err)
{
    int n_ctx = m->cfg.max_position_embeddings;
    int n_before = cp_model_prefix_tokens(m) + cp_model_virtual_tokens(m);
    if (n_prompt == 0)
        return cp_error_set(err, CP_ERR_INPUT, "the prompt has no tokens; add at least BOS");
    if (p->max_new_tokens < 0 || !(p->temperature >= 0) || !(p->top_p > 0 && p->top_p <= 1))
        return cp_error_set(err, CP_ERR_INPUT,
                            "invalid sampling settings: max-new-tokens must be >= 0, "
                            "temperature >= 0 and top-p in (0, 1]");
    if (n_prompt + (size_t)p->max_new_tokens + (size_t)n_before > (size_t)n_ctx)
        return cp_error_set(err, CP_ERR_INPUT,
                            "the prompt (%zu tokens) plus %d new tokens%s exceeds the context "
                            "length of %d; lower --max-new-tokens or shorten the prompt",
                            n_prompt, p->max_new_tokens,
                            n_before ? " plus the adapter's virtual tokens" : "", n_ctx);
    size_t bad = cp_model_find_bad_id(m, prompt, n_prompt);
    if (bad)
        return cp_error_set(err, CP_ERR_INPUT,
                            "prompt token %zu has id %d, outside the vocabulary of %d", bad - 1,
                            prompt[bad - 1], m->cfg.vocab_size);
    return CP_OK;
}

cp_status cp_generate(cp_model *m, const int32_t *prompt, size_t n_prompt,
                      const cp_generate_params *params, int32_t **out, size_t *n_out,
                      cp_error *err)
{
    *out = NULL;
    *n_out = 0;
    cp_status st = check_request(m, prompt, n_prompt, params, err);
    if (st != CP_OK)
        return st;

    int V = m->cfg.vocab_size, max_new = params->max_new_tokens;
    if (m->method && (st = m->method->ops->reserve(m->method, 1, 0, err)) != CP_OK)
        return st;
    cp_kv_cache kv;
    int n_before = cp_model_prefix_tokens(m) + cp_model_virtual_tokens(m);
    if ((st = cp_kv_cache_init(&kv, &m->cfg, n_before + (int)n_prompt + max_new, err)) != CP_OK)
        return st;
    int32_t *ids = malloc((size_t)(max_new > 0 ? max_new : 1) * sizeof *ids);
    prob_index *sorted = malloc((size_t)V * sizeof *sorted);
    if (!ids || !sorted) {
        free(ids);
        free(sorted);
        cp_kv_cache_free(&kv);
        return cp_error_nomem(err, "generation", (size_t)V * sizeof *sorted);
    }

    int was_training = m->method ? m->method->training : 0;
    if (m->method)
        m->method->training = 0; /* no dropout while generating */
    cp_rng rng;
    cp_rng_seed(&rng, params->seed);
    st = cp_kv_cache_start(m, &kv, err);
    for (size_t i = 0; st == CP_OK && i < n_prompt; i++)
        cp_kv_cache_step(m, &kv, prompt[i]);

    int n = 0;
    while (st == CP_OK && n < max_new) {
        int next = params->temperature == 0.0f
                       ? argmax(kv.logits, V)
                       : sample(kv.logits, V, params->temperature, params->top_p, &rng, sorted);
        ids[n++] = next;
        if (params->stop_at_eos && is_eos(&m->cfg, next))
            break;
        if (n < max_new)
            cp_kv_cache_step(m, &kv, next);
    }

    if (m->method)
        m->method->training = was_training;
    free(sorted);
    cp_kv_cache_free(&kv);
    if (st != CP_OK) {
        free(ids);
        return st;
    }
    *out = ids;
    *n_out = (size_t)n;
    return CP_OK;
}
