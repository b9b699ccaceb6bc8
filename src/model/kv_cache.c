/* Incremental decoding with a key/value cache. */
#include "model/kv_cache.h"

#include <stdlib.h>
#include <string.h>

#include "ops/activation.h"
#include "ops/attention.h"
#include "ops/matmul.h"
#include "ops/norm.h"
#include "ops/rope.h"

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

void cp_kv_cache_step(const cp_model *m, cp_kv_cache *kv, int32_t token)
{
    const cp_model_config *c = &m->cfg;
    int C = c->hidden_size, H = c->n_heads, KVH = c->n_kv_heads, D = c->head_dim;
    int pos = kv->len;
    size_t kvd = (size_t)KVH * D;
    CP_ASSERT(pos < kv->n_ctx);

    cp_model_embed(m, kv->x, &token, &pos, 1);
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
    cp_matmul_forward(kv->logits, kv->xn, m->lm_head, NULL, 1, C, c->vocab_size);
    kv->len = pos + 1;
}
