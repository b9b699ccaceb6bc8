/*
 * The backward pass of the decoder, from the mean cross-entropy to the
 * attached adapter's gradients. Gradients flow through the frozen weights to
 * the activations only: no weight gradient is computed or stored for them.
 * It reads the activations a forward pass saved with save_all_layers.
 */
#include <stdlib.h>
#include <string.h>

#include "model/model.h"
#include "ops/activation.h"
#include "ops/attention.h"
#include "ops/cross_entropy.h"
#include "ops/matmul.h"
#include "ops/norm.h"
#include "ops/rope.h"
#include "peft/method.h"

cp_status cp_backward_buffers_init(cp_backward_buffers *bb, const cp_model_config *cfg, int B,
                                   int T, cp_error *err)
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
        {&bb->scratch, (size_t)B * cfg->n_heads * T * T},
        {&bb->dproj_out, BT * widest}, {&bb->dproj_in, BT * widest},
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

void cp_backward_buffers_free(cp_backward_buffers *bb)
{
    free(bb->memory);
    memset(bb, 0, sizeof *bb);
}

/* Backward of cp_model_project: dx (N, in) += the gradient of x, and the
 * attached method's own gradients. The frozen W gets none (dweight NULL).
 * dout is not changed: a method that rewrites the output gradient gets a copy. */
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
    if (m->weights_in_out)
        cp_matmul_kn_backward(dprod, NULL, NULL, dbase, x, w, N, in, out);
    else
        cp_matmul_backward(dprod, NULL, NULL, dbase, x, w, N, in, out);
    if (input_hook)
        method->ops->project_input_backward(method, l, p, dx, dprod, x, N);
}

/* Backward of cp_model_norm: accumulates into dinp; the norm's own weights
 * are frozen. */
static void norm_backward(const cp_model *m, float *dinp, const float *dout, const float *inp,
                          const float *weight, const float *mean, const float *rstd, int N)
{
    int C = m->cfg.hidden_size;
    if (m->cfg.norm == CP_NORM_LAYER)
        cp_layernorm_backward(dinp, NULL, NULL, dout, inp, weight, mean, rstd, N, C);
    else
        cp_rmsnorm_backward(dinp, NULL, dout, inp, weight, rstd, N, C);
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
    norm_backward(m, bb->dres, bb->dnorm, a->mid, w->mlp_norm, a->mean2, a->rstd2, N);
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

/* Layer l backward: bb->dres contains d(layer output) on entry and d(layer
 * input) on return. */
static void layer_backward(const cp_model *m, const cp_forward_buffers *fb,
                           cp_backward_buffers *bb, int l)
{
    const cp_model_config *c = &m->cfg;
    const cp_layer_weights *w = &m->layers[l];
    cp_layer_acts a = cp_forward_layer(fb, c, l);
    int B = fb->B, T = fb->T, N = B * T;
    int H = c->n_heads, KVH = c->n_kv_heads, D = c->head_dim;

    mlp_backward(m, bb, &a, l, N);

    /* Attention block: mid = x + o(attn(q, k, v)), with q, k, v from n1 = norm1(x). */
    float *dattn = bb->dbig1;
    memset(dattn, 0, (size_t)N * H * D * sizeof(float));
    project_backward(m, bb, l, CP_PROJ_O, dattn, bb->dres, a.attn_out, N);
    memset(bb->dq, 0, (size_t)N * H * D * sizeof(float));
    memset(bb->dk, 0, (size_t)N * KVH * D * sizeof(float));
    memset(bb->dv, 0, (size_t)N * KVH * D * sizeof(float));
    cp_attention_backward(bb->dq, bb->dk, bb->dv, bb->scratch, dattn, a.att, a.q, a.k, a.v, B, T,
                          H, KVH, D, c->sliding_window);
    qkv_backward(m, fb, bb, a.norm1, l, N);
    norm_backward(m, bb->dres, bb->dnorm, a.residual, w->attn_norm, a.mean1, a.rstd1, N);
}

double cp_model_backward(const cp_model *m, cp_forward_buffers *fb, cp_backward_buffers *bb,
                         const int32_t *targets, float loss_scale)
{
    const cp_model_config *c = &m->cfg;
    int N = fb->B * fb->T, C = c->hidden_size, V = c->vocab_size;
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

    /* Head and final norm: logits = norm_f(final) · lm_headᵀ. */
    memset(bb->dnorm, 0, (size_t)N * C * sizeof(float));
    cp_matmul_backward(bb->dnorm, NULL, NULL, fb->logits, fb->norm_f, m->lm_head, N, C, V);
    memset(bb->dres, 0, (size_t)N * C * sizeof(float));
    norm_backward(m, bb->dres, bb->dnorm, fb->final, m->final_norm, fb->mean_f, fb->rstd_f, N);

    for (int l = c->n_layers - 1; l >= 0; l--)
        layer_backward(m, fb, bb, l);
    /* The embeddings are frozen: the gradient stops at the first residual. */
    return counted ? total / counted : 0.0;
}
