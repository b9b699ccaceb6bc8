/* Incremental decoding with a key/value cache, after the attached method's
 * prefix and virtual rows. */
#include "model/kv_cache.h"

#include <stdlib.h>
#include <string.h>

#include "ops/activation.h"
#include "ops/attention.h"
#include "ops/matmul.h"
#include "ops/norm.h"
#include "ops/rope.h"
#include "peft/method.h"

cp_status cp_kv_cache_init(cp_kv_cache *kv, const cp_model_config *cfg, int n_ctx,
                           cp_error *err)
{
    memset(kv, 0, sizeof *kv);
    size_t C = cfg->hidden_size, F = cfg->intermediate_size, V = cfg->vocab_size;
    size_t qd = (size_t)cfg->n_heads * cfg->head_dim;
    size_t kvd = (size_t)cfg->n_kv_heads * cfg->head_dim;
    size_t cache = (size_t)cfg->n_layers * n_ctx * kvd;

    struct {
        float **field;
        size_t count;
    } table[] = {
        {&kv->k, cache}, {&kv->v, cache},    {&kv->x, C},     {&kv->xn, C},
        {&kv->q, qd},    {&kv->attn_out, qd}, {&kv->proj, C}, {&kv->gate, F},
        {&kv->up, F},    {&kv->hidden, F},    {&kv->qkv, qd + 2 * kvd},
        {&kv->scores, (size_t)cfg->n_heads * n_ctx}, {&kv->logits, V},
    };
    size_t n_fields = sizeof table / sizeof *table, total = 0;
    for (size_t i = 0; i < n_fields; i++)
        total += table[i].count;
    kv->memory = malloc(total * sizeof(float));
    if (!kv->memory)
        return cp_error_nomem(err, "the KV cache", total * sizeof(float));
    float *p = kv->memory;
    for (size_t i = 0; i < n_fields; i++) {
        *table[i].field = p;
        p += table[i].count;
    }
    kv->n_ctx = n_ctx;
    return CP_OK;
}

void cp_kv_cache_free(cp_kv_cache *kv)
{
    free(kv->memory);
    memset(kv, 0, sizeof *kv);
}

/* Runs the row in kv->x through every layer at position kv->len, appends
 * its keys and values, and leaves the next-token logits in kv->logits. */
static void step_row(const cp_model *m, cp_kv_cache *kv)
{
    const cp_model_config *c = &m->cfg;
    int C = c->hidden_size, H = c->n_heads, KVH = c->n_kv_heads, D = c->head_dim;
    int pos = kv->len;
    size_t kvd = (size_t)KVH * D;
    CP_ASSERT(pos < kv->n_ctx);

    for (int l = 0; l < c->n_layers; l++) {
        const cp_layer_weights *w = &m->layers[l];
        float *k_cache = kv->k + (size_t)l * kv->n_ctx * kvd;
        float *v_cache = kv->v + (size_t)l * kv->n_ctx * kvd;

        cp_model_norm(m, kv->xn, NULL, NULL, kv->x, w->attn_norm, w->attn_norm_bias, 1);
        cp_model_qkv(m, l, kv->q, k_cache + (size_t)pos * kvd, v_cache + (size_t)pos * kvd,
                     kv->xn, kv->qkv, &pos, 1);
        cp_attention_decode(kv->attn_out, kv->scores, kv->q, k_cache, v_cache, pos + 1, H, KVH,
                            D, c->sliding_window);
        cp_model_project(m, l, CP_PROJ_O, kv->proj, kv->attn_out, 1);
        cp_add_inplace(kv->x, kv->proj, (size_t)C);

        cp_model_norm(m, kv->xn, NULL, NULL, kv->x, w->mlp_norm, w->mlp_norm_bias, 1);
        cp_model_mlp_hidden(m, l, kv->hidden, kv->gate, kv->up, kv->xn, 1);
        cp_model_project(m, l, CP_PROJ_DOWN, kv->proj, kv->hidden, 1);
        cp_add_inplace(kv->x, kv->proj, (size_t)C);
    }
    cp_model_norm(m, kv->xn, NULL, NULL, kv->x, m->final_norm, m->final_norm_bias, 1);
    cp_model_head(m, kv->logits, kv->xn, 1);
    kv->len = pos + 1;
}

void cp_kv_cache_step(const cp_model *m, cp_kv_cache *kv, int32_t token)
{
    int pos = kv->len;
    cp_model_embed(m, kv->x, &token, &pos, 1);
    step_row(m, kv);
}

/* Copies every layer's prefix keys and values into cache rows 0..P-1, where
 * decoding reads them as it reads earlier tokens'. */
static void fill_prefix(const cp_model *m, cp_kv_cache *kv, int P)
{
    const cp_model_config *c = &m->cfg;
    size_t rows = (size_t)P * c->n_kv_heads * c->head_dim;
    size_t layer = (size_t)kv->n_ctx * c->n_kv_heads * c->head_dim;
    for (int l = 0; l < c->n_layers; l++) {
        const float *k = NULL, *v = NULL;
        m->method->ops->attention_prefix(m->method, l, &k, &v);
        memcpy(kv->k + l * layer, k, rows * sizeof(float));
        memcpy(kv->v + l * layer, v, rows * sizeof(float));
    }
    kv->len = P;
}

cp_status cp_kv_cache_start(const cp_model *m, cp_kv_cache *kv, cp_error *err)
{
    int P = cp_model_prefix_tokens(m), n_virtual = cp_model_virtual_tokens(m);
    size_t C = m->cfg.hidden_size;
    CP_ASSERT(kv->len == 0 && P + n_virtual <= kv->n_ctx);
    if (P)
        fill_prefix(m, kv, P);
    if (n_virtual == 0)
        return CP_OK;

    float *rows = malloc((size_t)n_virtual * C * sizeof *rows);
    if (!rows)
        return cp_error_nomem(err, "the virtual tokens", (size_t)n_virtual * C * sizeof *rows);
    m->method->ops->embed_virtual(m->method, rows);
    for (int i = 0; i < n_virtual; i++) {
        int pos = kv->len;
        memcpy(kv->x, rows + i * C, C * sizeof(float));
        cp_model_add_positions(m, kv->x, &pos, 1);
        step_row(m, kv);
    }
    free(rows);
    return CP_OK;
}
