/*
 * The batched forward pass of the decoder over B sequences of T tokens,
 * keeping the activations a backward pass needs when asked to.
 */
#include "model/model.h"

#include <stdlib.h>
#include <string.h>

#include "core/dtype.h"
#include "ops/activation.h"
#include "ops/bf16_matmul.h"
#include "ops/attention.h"
#include "ops/embedding.h"
#include "ops/matmul.h"
#include "ops/nf4.h"
#include "ops/norm.h"
#include "ops/rope.h"
#include "peft/method.h"

/* Points every buffer into one allocation, in the order of the size table.
 * Sequences have S = n_virtual + T rows, seen after P prefix positions. */
static cp_status forward_buffers_alloc(cp_forward_buffers *fb, const cp_model_config *cfg, int B,
                                       int T, int n_virtual, int P, int save_all_layers,
                                       cp_error *err)
{
    memset(fb, 0, sizeof *fb);
    int S = n_virtual + T;
    size_t BS = (size_t)B * S, C = cfg->hidden_size, F = cfg->intermediate_size;
    size_t H = cfg->n_heads, KVH = cfg->n_kv_heads, D = cfg->head_dim, V = cfg->vocab_size;
    size_t L = save_all_layers ? (size_t)cfg->n_layers : 1;

    struct {
        float **field;
        size_t count;
    } table[] = {
        {&fb->residual, L * BS * C},   {&fb->norm1, L * BS * C},
        {&fb->rstd1, L * BS},          {&fb->mean1, L * BS},
        {&fb->mean2, L * BS},          {&fb->mean_f, BS},
        {&fb->qkv, BS * (H + 2 * KVH) * D}, {&fb->q, L * BS * H * D},
        {&fb->k, L * BS * KVH * D},    {&fb->v, L * BS * KVH * D},
        {&fb->att, L * BS * H * (P + S)}, {&fb->attn_out, L * BS * H * D},
        {&fb->mid, L * BS * C},        {&fb->norm2, L * BS * C},
        {&fb->rstd2, L * BS},          {&fb->gate, L * BS * F},
        {&fb->up, L * BS * F},         {&fb->swiglu, L * BS * F},
        {&fb->scratch, BS * C},        {&fb->final, BS * C},
        {&fb->norm_f, BS * C},         {&fb->rstd_f, BS},
        {&fb->logits, (size_t)B * T * V},
    };
    size_t n_fields = sizeof table / sizeof *table, total = 0;
    for (size_t i = 0; i < n_fields; i++)
        total += table[i].count;

    fb->memory = malloc(total * sizeof(float));
    fb->pos = malloc(BS * sizeof *fb->pos);
    fb->prefix_k = calloc((size_t)cfg->n_layers, sizeof *fb->prefix_k);
    fb->prefix_v = calloc((size_t)cfg->n_layers, sizeof *fb->prefix_v);
    if (!fb->memory || !fb->pos || !fb->prefix_k || !fb->prefix_v) {
        cp_forward_buffers_free(fb);
        return cp_error_nomem(err, "activations", total * sizeof(float));
    }
    float *p = fb->memory;
    for (size_t i = 0; i < n_fields; i++) {
        *table[i].field = p;
        p += table[i].count;
    }
    for (size_t i = 0; i < BS; i++)
        fb->pos[i] = P + (int)(i % (size_t)S);
    fb->B = B;
    fb->T = T;
    fb->S = S;
    fb->n_virtual = n_virtual;
    fb->n_prefix = P;
    fb->n_saved_layers = (int)L;
    return CP_OK;
}

cp_status cp_forward_buffers_init(cp_forward_buffers *fb, const cp_model_config *cfg, int B,
                                  int T, int save_all_layers, cp_error *err)
{
    return forward_buffers_alloc(fb, cfg, B, T, 0, 0, save_all_layers, err);
}

cp_status cp_forward_buffers_init_model(cp_forward_buffers *fb, const cp_model *m, int B, int T,
                                        int save_all_layers, cp_error *err)
{
    int n_virtual = cp_model_virtual_tokens(m), P = cp_model_prefix_tokens(m);
    int n_ctx = m->cfg.max_position_embeddings;
    memset(fb, 0, sizeof *fb);
    if ((long)P + n_virtual + T > n_ctx)
        return cp_error_set(err, CP_ERR_INPUT,
                            "sequence length %d plus the adapter's %d virtual tokens exceeds the "
                            "context length of %d; lower --seq-len or --num-virtual-tokens",
                            T, P + n_virtual, n_ctx);
    return forward_buffers_alloc(fb, &m->cfg, B, T, n_virtual, P, save_all_layers, err);
}

void cp_forward_buffers_free(cp_forward_buffers *fb)
{
    free(fb->memory);
    free(fb->pos);
    free(fb->prefix_k);
    free(fb->prefix_v);
    memset(fb, 0, sizeof *fb);
}

cp_layer_acts cp_forward_layer(const cp_forward_buffers *fb, const cp_model_config *c, int l)
{
    size_t slot = fb->n_saved_layers > 1 ? (size_t)l : 0;
    size_t BT = (size_t)fb->B * fb->S, C = c->hidden_size, F = c->intermediate_size;
    size_t qd = (size_t)c->n_heads * c->head_dim, kvd = (size_t)c->n_kv_heads * c->head_dim;
    size_t att = BT * c->n_heads * (size_t)(fb->n_prefix + fb->S);
    return (cp_layer_acts){
        .residual = fb->residual + slot * BT * C,
        .norm1 = fb->norm1 + slot * BT * C,
        .mean1 = fb->mean1 + slot * BT,
        .rstd1 = fb->rstd1 + slot * BT,
        .q = fb->q + slot * BT * qd,
        .k = fb->k + slot * BT * kvd,
        .v = fb->v + slot * BT * kvd,
        .att = fb->att + slot * att,
        .attn_out = fb->attn_out + slot * BT * qd,
        .mid = fb->mid + slot * BT * C,
        .norm2 = fb->norm2 + slot * BT * C,
        .mean2 = fb->mean2 + slot * BT,
        .rstd2 = fb->rstd2 + slot * BT,
        .gate = fb->gate + slot * BT * F,
        .up = fb->up + slot * BT * F,
        .swiglu = fb->swiglu + slot * BT * F,
    };
}

void cp_add_inplace(float *dst, const float *src, size_t n)
{
#pragma omp parallel for if (n > 65536)
    for (size_t i = 0; i < n; i++)
        dst[i] += src[i];
}

const float *cp_model_proj_weight(const cp_model *m, int l, int proj)
{
    return m->layers[l].w[proj];
}

void cp_model_project(const cp_model *m, int l, int proj, float *out, const float *x, int N)
{
    int in, outd;
    cp_proj_shape(&m->cfg, (cp_proj)proj, &in, &outd);
    const float *w = cp_model_proj_weight(m, l, proj), *b = m->layers[l].bias[proj];
    cp_method *method = m->method;
    const float *xin = x;
    if (method && method->ops->project_input)
        xin = method->ops->project_input(method, l, (cp_proj)proj, x, N);
    const cp_nf4_matrix *q = m->layers[l].nf4[proj];
    cp_error err;
    if (q) {
        /* Without memory for its tiles, the NF4 kernel leaves out alone. */
        if (cp_nf4_matmul_forward(out, xin, q, b, N, &err) != CP_OK)
            cp_nf4_matmul_forward_ref(out, xin, q, b, N);
    } else if (m->weights_in_out) {
        cp_matmul_kn_forward(out, xin, w, b, N, in, outd);
    } else {
        cp_matmul_forward(out, xin, w, b, N, in, outd);
    }
    if (method && method->ops->project)
        method->ops->project(method, l, (cp_proj)proj, out, x, N);
}

void cp_model_norm(const cp_model *m, float *out, float *mean, float *rstd, const float *inp,
                   const float *weight, const float *bias, int N)
{
    const cp_model_config *c = &m->cfg;
    if (c->norm == CP_NORM_LAYER)
        cp_layernorm_forward(out, mean, rstd, inp, weight, bias, N, c->hidden_size,
                             c->rms_norm_eps);
    else
        cp_rmsnorm_forward(out, rstd, inp, weight, N, c->hidden_size, c->rms_norm_eps);
}

void cp_model_add_positions(const cp_model *m, float *x, const int *pos, int N)
{
    int C = m->cfg.hidden_size;
    if (!m->pos_embed)
        return;
    for (int n = 0; n < N; n++)
        for (int i = 0; i < C; i++)
            x[(size_t)n * C + i] += m->pos_embed[(size_t)pos[n] * C + i];
}

void cp_model_embed(const cp_model *m, float *out, const int32_t *ids, const int *pos, int N)
{
    int C = m->cfg.hidden_size;
    if (m->embed)
        cp_embedding_forward(out, ids, m->embed, N, C);
    else
        for (int n = 0; n < N; n++)
            cp_dtype_to_f32(CP_DTYPE_BF16, m->embed_bf16 + (size_t)ids[n] * C,
                            out + (size_t)n * C, (size_t)C);
    cp_model_add_positions(m, out, pos, N);
}

int cp_model_virtual_tokens(const cp_model *m)
{
    const cp_method *method = m->method;
    return method && method->ops->virtual_tokens ? method->ops->virtual_tokens(method) : 0;
}

int cp_model_prefix_tokens(const cp_model *m)
{
    const cp_method *method = m->method;
    return method && method->ops->prefix_tokens ? method->ops->prefix_tokens(method) : 0;
}

/* Fills the first residual: per sequence, the method's virtual rows, then
 * the tokens' embeddings, each plus its learned position embedding. */
static void embed_inputs(const cp_model *m, cp_forward_buffers *fb, const int32_t *ids)
{
    int nv = fb->n_virtual, S = fb->S, T = fb->T;
    size_t C = m->cfg.hidden_size;
    if (nv == 0) {
        cp_model_embed(m, fb->residual, ids, fb->pos, fb->B * T);
        return;
    }
    cp_method *method = m->method;
    for (int b = 0; b < fb->B; b++) {
        float *rows = fb->residual + (size_t)b * S * C;
        const int *pos = fb->pos + (size_t)b * S;
        method->ops->embed_virtual(method, rows);
        cp_model_add_positions(m, rows, pos, nv);
        cp_model_embed(m, rows + nv * C, ids + (size_t)b * T, pos + nv, T);
    }
}

/* logits (B, T, V) of the tokens' rows of x (B, S, C), skipping the
 * virtual rows before each sequence's tokens. */
static void tokens_logits(const cp_model *m, const cp_forward_buffers *fb, const float *x)
{
    int C = m->cfg.hidden_size, V = m->cfg.vocab_size, T = fb->T;
    if (fb->n_virtual == 0) {
        cp_model_head(m, fb->logits, x, fb->B * T);
        return;
    }
    for (int b = 0; b < fb->B; b++)
        cp_model_head(m, fb->logits + (size_t)b * T * V, x + ((size_t)b * fb->S + fb->n_virtual) * C,
                      T);
}

void cp_model_head(const cp_model *m, float *logits, const float *x, int N)
{
    int C = m->cfg.hidden_size, V = m->cfg.vocab_size;
    if (m->lm_head)
        cp_matmul_forward(logits, x, m->lm_head, NULL, N, C, V);
    else
        cp_bf16_matmul_forward(logits, x, m->lm_head_bf16, V, C, N);
}

void cp_model_qkv(const cp_model *m, int l, float *q, float *k, float *v, const float *x,
                  float *qkv, const int *pos, int N)
{
    const cp_model_config *c = &m->cfg;
    int H = c->n_heads, KVH = c->n_kv_heads, D = c->head_dim;
    if (c->fused_qkv) {
        /* One product, then each row's [q | k | v] split into the three buffers. */
        size_t qd = (size_t)H * D, kvd = (size_t)KVH * D, row = qd + 2 * kvd;
        cp_model_project(m, l, CP_PROJ_QKV, qkv, x, N);
        for (int n = 0; n < N; n++) {
            memcpy(q + n * qd, qkv + n * row, qd * sizeof(float));
            memcpy(k + n * kvd, qkv + n * row + qd, kvd * sizeof(float));
            memcpy(v + n * kvd, qkv + n * row + qd + kvd, kvd * sizeof(float));
        }
    } else {
        cp_model_project(m, l, CP_PROJ_Q, q, x, N);
        cp_model_project(m, l, CP_PROJ_K, k, x, N);
        cp_model_project(m, l, CP_PROJ_V, v, x, N);
    }
    if (c->use_rope) {
        cp_rope_forward(q, pos, N, H, D, m->inv_freq);
        cp_rope_forward(k, pos, N, KVH, D, m->inv_freq);
    }
}

void cp_model_mlp_hidden(const cp_model *m, int l, float *hidden, float *gate, float *up,
                         const float *x, int N)
{
    size_t n = (size_t)N * m->cfg.intermediate_size;
    cp_model_project(m, l, CP_PROJ_UP, up, x, N);
    if (m->cfg.mlp == CP_MLP_GELU_TANH) {
        cp_gelu_tanh_forward(hidden, up, n);
        return;
    }
    cp_model_project(m, l, CP_PROJ_GATE, gate, x, N);
    cp_swiglu_forward(hidden, gate, up, n);
}

/* One decoder layer: x_out = mid + mlp(norm2(mid)), mid = x_in + attn(norm1(x_in)). */
static void layer_forward(const cp_model *m, cp_forward_buffers *fb, int l, float *x_out)
{
    const cp_model_config *c = &m->cfg;
    const cp_layer_weights *w = &m->layers[l];
    cp_layer_acts a = cp_forward_layer(fb, c, l);
    int B = fb->B, S = fb->S, N = B * S, C = c->hidden_size;
    int H = c->n_heads, KVH = c->n_kv_heads, D = c->head_dim;

    /* Attention block. */
    cp_model_norm(m, a.norm1, a.mean1, a.rstd1, a.residual, w->attn_norm, w->attn_norm_bias, N);
    cp_model_qkv(m, l, a.q, a.k, a.v, a.norm1, fb->qkv, fb->pos, N);
    cp_attention_forward_prefix(a.attn_out, a.att, a.q, a.k, a.v, fb->prefix_k[l],
                                fb->prefix_v[l], B, S, fb->n_prefix, H, KVH, D,
                                c->sliding_window);
    cp_model_project(m, l, CP_PROJ_O, fb->scratch, a.attn_out, N);
    memcpy(a.mid, a.residual, (size_t)N * C * sizeof(float));
    cp_add_inplace(a.mid, fb->scratch, (size_t)N * C);

    /* MLP block. */
    cp_model_norm(m, a.norm2, a.mean2, a.rstd2, a.mid, w->mlp_norm, w->mlp_norm_bias, N);
    cp_model_mlp_hidden(m, l, a.swiglu, a.gate, a.up, a.norm2, N);
    cp_model_project(m, l, CP_PROJ_DOWN, fb->scratch, a.swiglu, N);
    memcpy(x_out, a.mid, (size_t)N * C * sizeof(float));
    cp_add_inplace(x_out, fb->scratch, (size_t)N * C);
}

void cp_model_forward(const cp_model *m, cp_forward_buffers *fb, const int32_t *ids)
{
    const cp_model_config *c = &m->cfg;
    int N = fb->B * fb->S;
    CP_ASSERT(fb->n_virtual == cp_model_virtual_tokens(m));
    CP_ASSERT(fb->n_prefix == cp_model_prefix_tokens(m));

    fb->ids = ids;
    embed_inputs(m, fb, ids);
    for (int l = 0; l < c->n_layers; l++) {
        /* Layer 0 first: the method may compute every layer's prefix then. */
        if (fb->n_prefix)
            m->method->ops->attention_prefix(m->method, l, &fb->prefix_k[l], &fb->prefix_v[l]);
        /* The output of layer l is the input of layer l + 1, or the final state. */
        float *x_out = fb->final;
        if (l + 1 < c->n_layers)
            x_out = cp_forward_layer(fb, c, l + 1).residual;
        layer_forward(m, fb, l, x_out);
    }
    cp_model_norm(m, fb->norm_f, fb->mean_f, fb->rstd_f, fb->final, m->final_norm,
                  m->final_norm_bias, N);
    tokens_logits(m, fb, fb->norm_f);
}
