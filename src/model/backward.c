/*
 * The backward pass of the decoder, from the mean cross-entropy to the
 * attached adapter's gradients. Gradients flow through the frozen weights to
 * the activations only: a weight gets a gradient only where the model's
 * gradient table (dw, dbias, dembed, ... in model.h) points at a buffer,
 * which methods that train base tensors set.
 * It reads the activations a forward pass saved with save_all_layers.
 */
#include <stdlib.h>
#include <string.h>

#include "model/model.h"
#include "ops/activation.h"
#include "ops/attention.h"
#include "ops/cross_entropy.h"
#include "ops/embedding.h"
#include "ops/bf16_matmul.h"
#include "ops/matmul.h"
#include "ops/nf4.h"
#include "ops/norm.h"
#include "ops/rope.h"
#include "peft/method.h"

/* Sequences have T rows (virtual rows included), seen after P prefix positions. */
static cp_status backward_buffers_alloc(cp_backward_buffers *bb, const cp_model_config *cfg,
                                        int B, int T, int P, cp_error *err)
{
    memset(bb, 0, sizeof *bb);
    size_t BT = (size_t)B * T, C = cfg->hidden_size, F = cfg->intermediate_size;
    size_t qd = (size_t)cfg->n_heads * cfg->head_dim;
    size_t kvd = (size_t)cfg->n_kv_heads * cfg->head_dim;
    size_t wide = F > qd ? F : qd;
    size_t widest = wide > C ? wide : C; /* the widest projection input or output */
    if (qd + 2 * kvd > widest)
        widest = qd + 2 * kvd;
    struct {
        float **field;
        size_t count;
    } table[] = {
        {&bb->dres, BT * C},   {&bb->dnorm, BT * C}, {&bb->dbig1, BT * wide},
        {&bb->dbig2, BT * F},  {&bb->dbig3, BT * F}, {&bb->dq, BT * qd},
        {&bb->dk, BT * kvd},   {&bb->dv, BT * kvd},
        {&bb->dqkv, BT * (qd + 2 * kvd)},
        {&bb->scratch, BT * cfg->n_heads * (size_t)(P + T)},
        {&bb->dproj_out, BT * widest}, {&bb->dproj_in, BT * widest},
        {&bb->dprefix_k, (size_t)B * P * kvd}, {&bb->dprefix_v, (size_t)B * P * kvd},
    };
    size_t n_fields = sizeof table / sizeof *table, total = 0;
    for (size_t i = 0; i < n_fields; i++)
        total += table[i].count;
    bb->memory = malloc(total * sizeof(float));
    if (!bb->memory)
        return cp_error_nomem(err, "gradient buffers", total * sizeof(float));
    float *p = bb->memory;
    for (size_t i = 0; i < n_fields; i++) {
        *table[i].field = p;
        p += table[i].count;
    }
    return CP_OK;
}

cp_status cp_backward_buffers_init(cp_backward_buffers *bb, const cp_model_config *cfg, int B,
                                   int T, cp_error *err)
{
    return backward_buffers_alloc(bb, cfg, B, T, 0, err);
}

cp_status cp_backward_buffers_init_model(cp_backward_buffers *bb, const cp_model *m, int B,
                                         int T, cp_error *err)
{
    return backward_buffers_alloc(bb, &m->cfg, B, cp_model_virtual_tokens(m) + T,
                                  cp_model_prefix_tokens(m), err);
}

void cp_backward_buffers_free(cp_backward_buffers *bb)
{
    free(bb->memory);
    memset(bb, 0, sizeof *bb);
}

/* Backward of cp_model_project: dx (N, in) += the gradient of x, the
 * attached method's own gradients, and W's and b's where the gradient table
 * has them (a frozen W passes dweight NULL and gets none). dout is not
 * changed: a method that rewrites the output gradient gets a copy. */
static void project_backward(const cp_model *m, cp_backward_buffers *bb, int l, cp_proj p,
                             float *dx, const float *dout, const float *x, int N)
{
    int in, out;
    cp_proj_shape(&m->cfg, p, &in, &out);
    cp_method *method = m->method;
    const float *dbase = dout;
    if (method && method->ops->project_backward) {
        float *dhook = (float *)dout;
        if (method->ops->rewrites_output_grad) {
            memcpy(bb->dproj_out, dout, (size_t)N * out * sizeof(float));
            dhook = bb->dproj_out;
        }
        method->ops->project_backward(method, l, p, dx, dhook, x, N);
        dbase = dhook;
    }

    /* With an input hook, the product's input gradient goes to the method. */
    int input_hook = method && method->ops->project_input_backward;
    float *dprod = dx;
    if (input_hook) {
        dprod = bb->dproj_in;
        memset(dprod, 0, (size_t)N * in * sizeof(float));
    }
    const float *w = cp_model_proj_weight(m, l, p);
    const cp_nf4_matrix *q = m->layers[l].nf4[p];
    float *dw = m->layers[l].dw[p], *db = m->layers[l].dbias[p];
    /* NOTE: W's gradient needs the product's input, which an input hook
     * (IA³) changes and does not keep, so the two do not combine. */
    CP_ASSERT(!(input_hook && dw));
    cp_error err;
    if (q) {
        /* NF4 weights are frozen: methods reject training them. */
        CP_ASSERT(!dw);
        /* Without memory for its tiles, the NF4 kernel leaves dprod alone. */
        if (cp_nf4_matmul_backward(dprod, dbase, q, N, &err) != CP_OK)
            cp_nf4_matmul_backward_ref(dprod, dbase, q, N);
        if (db)
            cp_matmul_backward(NULL, NULL, db, dbase, x, NULL, N, in, out);
    } else if (m->weights_in_out) {
        cp_matmul_kn_backward(dprod, dw, db, dbase, x, w, N, in, out);
    } else {
        cp_matmul_backward(dprod, dw, db, dbase, x, w, N, in, out);
    }
    if (input_hook)
        method->ops->project_input_backward(method, l, p, dx, dprod, x, N);
}

/* Backward of cp_model_head: dx (N, C) += dlogits · head, and the head's
 * gradient where a method trains it (only a float32 head is trained). */
static void head_backward(const cp_model *m, float *dx, const float *dlogits, const float *x,
                          int N)
{
    int C = m->cfg.hidden_size, V = m->cfg.vocab_size;
    if (m->lm_head)
        cp_matmul_backward(dx, m->dlm_head, NULL, dlogits, x, m->lm_head, N, C, V);
    else
        cp_bf16_matmul_backward(dx, dlogits, m->lm_head_bf16, V, C, N);
}

/* Backward of cp_model_norm: accumulates into dinp, and into dweight and
 * dbias (C) unless NULL (a frozen norm). */
static void norm_backward(const cp_model *m, float *dinp, float *dweight, float *dbias,
                          const float *dout, const float *inp, const float *weight,
                          const float *mean, const float *rstd, int N)
{
    int C = m->cfg.hidden_size;
    if (m->cfg.norm == CP_NORM_LAYER)
        cp_layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, N, C);
    else
        cp_rmsnorm_backward(dinp, dweight, dout, inp, weight, rstd, N, C);
}

/* MLP block: x_out = mid + down(act(n2)), n2 = norm2(mid), where act is
 * silu(gate(n2)) * up(n2) or gelu_tanh(up(n2)). */
static void mlp_backward(const cp_model *m, cp_backward_buffers *bb, const cp_layer_acts *a,
                         int l, int N)
{
    const cp_layer_weights *w = &m->layers[l];
    size_t NF = (size_t)N * m->cfg.intermediate_size;
    float *dhidden = bb->dbig1, *dgate = bb->dbig2, *dup = bb->dbig3;

    memset(dhidden, 0, NF * sizeof(float));
    project_backward(m, bb, l, CP_PROJ_DOWN, dhidden, bb->dres, a->swiglu, N);
    memset(dup, 0, NF * sizeof(float));
    memset(bb->dnorm, 0, (size_t)N * m->cfg.hidden_size * sizeof(float));
    if (m->cfg.mlp == CP_MLP_GELU_TANH) {
        cp_gelu_tanh_backward(dup, dhidden, a->up, NF);
    } else {
        memset(dgate, 0, NF * sizeof(float));
        cp_swiglu_backward(dgate, dup, dhidden, a->gate, a->up, NF);
        project_backward(m, bb, l, CP_PROJ_GATE, bb->dnorm, dgate, a->norm2, N);
    }
    project_backward(m, bb, l, CP_PROJ_UP, bb->dnorm, dup, a->norm2, N);
    norm_backward(m, bb->dres, w->dmlp_norm, w->dmlp_norm_bias, bb->dnorm, a->mid, w->mlp_norm,
                  a->mean2, a->rstd2, N);
}

/* Backward of cp_model_qkv: dq, dk and dv (RoPE undone in place) into
 * bb->dnorm through the q/k/v projections, fused or separate. */
static void qkv_backward(const cp_model *m, const cp_forward_buffers *fb, cp_backward_buffers *bb,
                         const float *x, int l, int N)
{
    const cp_model_config *c = &m->cfg;
    int H = c->n_heads, KVH = c->n_kv_heads, D = c->head_dim;
    if (c->use_rope) {
        cp_rope_backward(bb->dq, fb->pos, N, H, D, m->inv_freq);
        cp_rope_backward(bb->dk, fb->pos, N, KVH, D, m->inv_freq);
    }
    memset(bb->dnorm, 0, (size_t)N * c->hidden_size * sizeof(float));
    if (!c->fused_qkv) {
        project_backward(m, bb, l, CP_PROJ_Q, bb->dnorm, bb->dq, x, N);
        project_backward(m, bb, l, CP_PROJ_K, bb->dnorm, bb->dk, x, N);
        project_backward(m, bb, l, CP_PROJ_V, bb->dnorm, bb->dv, x, N);
        return;
    }
    /* Rows of the fused output are [q | k | v], so their gradient is assembled the same way. */
    size_t qd = (size_t)H * D, kvd = (size_t)KVH * D, row = qd + 2 * kvd;
    for (int n = 0; n < N; n++) {
        memcpy(bb->dqkv + n * row, bb->dq + n * qd, qd * sizeof(float));
        memcpy(bb->dqkv + n * row + qd, bb->dk + n * kvd, kvd * sizeof(float));
        memcpy(bb->dqkv + n * row + qd + kvd, bb->dv + n * kvd, kvd * sizeof(float));
    }
    project_backward(m, bb, l, CP_PROJ_QKV, bb->dnorm, bb->dqkv, x, N);
}

/* Sums the B sequences' gradients of layer l's prefix into the first and
 * hands them to the method. */
static void prefix_backward(const cp_model *m, cp_backward_buffers *bb, int l, int B, size_t n)
{
    for (int b = 1; b < B; b++) {
        cp_add_inplace(bb->dprefix_k, bb->dprefix_k + b * n, n);
        cp_add_inplace(bb->dprefix_v, bb->dprefix_v + b * n, n);
    }
    m->method->ops->attention_prefix_backward(m->method, l, bb->dprefix_k, bb->dprefix_v);
}

/* Backward of the method's virtual rows: gathers their gradients (B, n, C)
 * from bb->dres, the gradient of the first residual, into bb->dnorm. */
static void virtual_backward(const cp_model *m, const cp_forward_buffers *fb,
                             cp_backward_buffers *bb)
{
    size_t C = m->cfg.hidden_size, rows = (size_t)fb->n_virtual * C;
    for (int b = 0; b < fb->B; b++)
        memcpy(bb->dnorm + b * rows, bb->dres + (size_t)b * fb->S * C, rows * sizeof(float));
    m->method->ops->embed_virtual_backward(m->method, bb->dnorm, fb->B);
}

/* Backward of the first residual's embeddings, where the gradient table
 * has them: the token rows' gradients (bb->dres) into dembed at fb->ids, and
 * every row's, virtual rows included, into dpos_embed at its position. */
static void embeddings_backward(const cp_model *m, const cp_forward_buffers *fb,
                                const cp_backward_buffers *bb)
{
    size_t C = m->cfg.hidden_size;
    if (m->dembed) {
        for (int b = 0; b < fb->B; b++)
            cp_embedding_backward(m->dembed, bb->dres + ((size_t)b * fb->S + fb->n_virtual) * C,
                                  fb->ids + (size_t)b * fb->T, fb->T, (int)C);
    }
    if (m->dpos_embed && m->pos_embed) {
        int rows = fb->B * fb->S;
        for (int n = 0; n < rows; n++)
            cp_add_inplace(m->dpos_embed + (size_t)fb->pos[n] * C, bb->dres + (size_t)n * C, C);
    }
}

/* Layer l backward: bb->dres contains d(layer output) on entry and d(layer
 * input) on return. */
static void layer_backward(const cp_model *m, const cp_forward_buffers *fb,
                           cp_backward_buffers *bb, int l)
{
    const cp_model_config *c = &m->cfg;
    const cp_layer_weights *w = &m->layers[l];
    cp_layer_acts a = cp_forward_layer(fb, c, l);
    int B = fb->B, S = fb->S, N = B * S, P = fb->n_prefix;
    int H = c->n_heads, KVH = c->n_kv_heads, D = c->head_dim;

    mlp_backward(m, bb, &a, l, N);

    /* Attention block: mid = x + o(attn(q, k, v)), with q, k, v from n1 = norm1(x). */
    float *dattn = bb->dbig1;
    memset(dattn, 0, (size_t)N * H * D * sizeof(float));
    project_backward(m, bb, l, CP_PROJ_O, dattn, bb->dres, a.attn_out, N);
    memset(bb->dq, 0, (size_t)N * H * D * sizeof(float));
    memset(bb->dk, 0, (size_t)N * KVH * D * sizeof(float));
    memset(bb->dv, 0, (size_t)N * KVH * D * sizeof(float));
    if (P) {
        memset(bb->dprefix_k, 0, (size_t)B * P * KVH * D * sizeof(float));
        memset(bb->dprefix_v, 0, (size_t)B * P * KVH * D * sizeof(float));
    }
    cp_attention_backward_prefix(bb->dq, bb->dk, bb->dv, bb->dprefix_k, bb->dprefix_v,
                                 bb->scratch, dattn, a.att, a.q, a.k, a.v, fb->prefix_k[l],
                                 fb->prefix_v[l], B, S, P, H, KVH, D, c->sliding_window);
    if (P)
        prefix_backward(m, bb, l, B, (size_t)P * KVH * D);
    qkv_backward(m, fb, bb, a.norm1, l, N);
    norm_backward(m, bb->dres, w->dattn_norm, w->dattn_norm_bias, bb->dnorm, a.residual,
                  w->attn_norm, a.mean1, a.rstd1, N);
}

double cp_model_backward(const cp_model *m, cp_forward_buffers *fb, cp_backward_buffers *bb,
                         const int32_t *targets, float loss_scale)
{
    const cp_model_config *c = &m->cfg;
    int N = fb->B * fb->T, C = c->hidden_size, V = c->vocab_size;
    int rows = fb->B * fb->S; /* with the virtual rows */
    CP_ASSERT(fb->n_saved_layers == c->n_layers);

    /* Loss, then dlogits in place of the logits. */
    float *losses = bb->dnorm; /* N floats, free until the final norm's backward */
    cp_cross_entropy_forward(losses, fb->logits, targets, N, V);
    double total = 0.0;
    int counted = 0;
    for (int n = 0; n < N; n++)
        if (targets[n] >= 0) {
            total += losses[n];
            counted++;
        }
    float *dloss = bb->dbig1; /* N floats */
    for (int n = 0; n < N; n++)
        dloss[n] = counted ? loss_scale / (float)counted : 0.0f;
    cp_cross_entropy_backward(fb->logits, fb->logits, targets, dloss, N, V);

    /* Head and final norm: logits = norm_f(final) · lm_headᵀ, the tokens' rows only. */
    memset(bb->dnorm, 0, (size_t)rows * C * sizeof(float));
    if (fb->n_virtual == 0) {
        head_backward(m, bb->dnorm, fb->logits, fb->norm_f, N);
    } else {
        for (int b = 0; b < fb->B; b++) {
            size_t token_rows = (size_t)b * fb->S + fb->n_virtual;
            head_backward(m, bb->dnorm + token_rows * C, fb->logits + (size_t)b * fb->T * V,
                          fb->norm_f + token_rows * C, fb->T);
        }
    }
    memset(bb->dres, 0, (size_t)rows * C * sizeof(float));
    norm_backward(m, bb->dres, m->dfinal_norm, m->dfinal_norm_bias, bb->dnorm, fb->final,
                  m->final_norm, fb->mean_f, fb->rstd_f, rows);

    for (int l = c->n_layers - 1; l >= 0; l--)
        layer_backward(m, fb, bb, l);
    /* Frozen embeddings stop the gradient at the first residual, except for
     * the method's virtual rows. */
    if (fb->n_virtual)
        virtual_backward(m, fb, bb);
    embeddings_backward(m, fb, bb);
    return counted ? total / counted : 0.0;
}
