/* LoRA: parameters, initialization, and the forward and backward passes at
 * one adapted projection. */
#include "peft/lora.h"

#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "ops/matmul.h"

cp_lora_params cp_lora_default_params(void)
{
    return (cp_lora_params){
        .r = 8,
        .alpha = 16.0f,
        .dropout = 0.0f,
        .use_rslora = 0,
        .targets = (1u << CP_PROJ_Q) | (1u << CP_PROJ_V), /* Llama's default; GPT-2's is c_attn */
        .seed = 42,
    };
}

/* Lays every targeted slot's A and B, then their gradients, into two arrays. */
static cp_status allocate_slots(cp_lora *lora, const cp_model_config *cfg, cp_error *err)
{
    int r = lora->params.r;
    size_t total = 0;
    for (int l = 0; l < cfg->n_layers; l++) {
        for (int p = 0; p < CP_PROJ_COUNT; p++) {
            cp_lora_slot *s = cp_lora_slot_at(lora, l, (cp_proj)p);
            cp_proj_shape(cfg, (cp_proj)p, &s->in, &s->out);
            if (lora->params.targets & (1u << p))
                total += (size_t)r * (s->in + s->out);
        }
    }
    lora->n_weights = total;
    lora->weights = calloc(total ? total : 1, sizeof(float));
    lora->grads = calloc(total ? total : 1, sizeof(float));
    if (!lora->weights || !lora->grads)
        return cp_error_nomem(err, "LoRA weights", 2 * total * sizeof(float));

    size_t offset = 0;
    for (int l = 0; l < cfg->n_layers; l++) {
        for (int p = 0; p < CP_PROJ_COUNT; p++) {
            cp_lora_slot *s = cp_lora_slot_at(lora, l, (cp_proj)p);
            if (!(lora->params.targets & (1u << p)))
                continue;
            s->A = lora->weights + offset;
            s->dA = lora->grads + offset;
            offset += (size_t)r * s->in;
            s->B = lora->weights + offset;
            s->dB = lora->grads + offset;
            offset += (size_t)r * s->out;
        }
    }
    return CP_OK;
}

cp_status cp_lora_init(cp_lora *lora, const cp_model_config *cfg, const cp_lora_params *p,
                       cp_error *err)
{
    memset(lora, 0, sizeof *lora);
    if (p->r <= 0 || !(p->alpha > 0) || !(p->dropout >= 0 && p->dropout < 1) || !p->targets)
        return cp_error_set(err, CP_ERR_INPUT,
                            "invalid LoRA settings: r must be positive, alpha positive, dropout "
                            "in [0, 1), and at least one target module given");
    if (p->targets & ~cp_proj_all(cfg))
        return cp_error_set(err, CP_ERR_INPUT,
                            "LoRA targets include a projection that model_type %s does not have",
                            cfg->model_type);
    lora->cfg = *cfg;
    lora->params = *p;
    lora->n_layers = cfg->n_layers;
    lora->scaling = p->use_rslora ? p->alpha / sqrtf((float)p->r) : p->alpha / (float)p->r;
    lora->slots = calloc((size_t)cfg->n_layers * CP_PROJ_COUNT, sizeof *lora->slots);
    if (!lora->slots)
        return cp_error_nomem(err, "LoRA slots", 0);
    cp_status st = allocate_slots(lora, cfg, err);
    if (st != CP_OK) {
        cp_lora_free(lora);
        return st;
    }

    /* Kaiming-uniform with a = sqrt(5), as nn.Linear and PEFT initialize A:
     * the bound gain * sqrt(3 / fan_in) with gain sqrt(2 / (1 + a²)) is
     * 1 / sqrt(in). B stays zero, so the adapted model starts as the base. */
    cp_rng_seed(&lora->rng, p->seed);
    for (int l = 0; l < cfg->n_layers; l++) {
        for (int q = 0; q < CP_PROJ_COUNT; q++) {
            cp_lora_slot *s = cp_lora_slot_at(lora, l, (cp_proj)q);
            if (!s->A)
                continue;
            float bound = 1.0f / sqrtf((float)s->in);
            for (size_t i = 0; i < (size_t)p->r * s->in; i++)
                s->A[i] = (2.0f * cp_rng_uniform(&lora->rng) - 1.0f) * bound;
        }
    }
    return CP_OK;
}

void cp_lora_free(cp_lora *lora)
{
    free(lora->slots);
    free(lora->weights);
    free(lora->grads);
    free(lora->h);
    free(lora->h_eval);
    free(lora->keep);
    free(lora->scratch);
    memset(lora, 0, sizeof *lora);
}

cp_status cp_lora_reserve_eval(cp_lora *lora, int rows, cp_error *err)
{
    if (rows <= lora->eval_rows)
        return CP_OK;
    float *grown = realloc(lora->h_eval, (size_t)rows * lora->params.r * sizeof(float));
    if (!grown)
        return cp_error_nomem(err, "LoRA scratch", (size_t)rows * lora->params.r * sizeof(float));
    lora->h_eval = grown;
    lora->eval_rows = rows;
    return CP_OK;
}

cp_status cp_lora_reserve(cp_lora *lora, int max_rows, cp_error *err)
{
    int r = lora->params.r, max_in = 0;
    size_t keep_stride = 0;
    for (int p = 0; p < CP_PROJ_COUNT; p++) {
        const cp_lora_slot *s = cp_lora_slot_at(lora, 0, (cp_proj)p);
        if (s->in > max_in)
            max_in = s->in;
    }
    size_t slots = (size_t)lora->n_layers * CP_PROJ_COUNT;
    size_t h_count = slots * (size_t)max_rows * r;
    int dropout = lora->params.dropout > 0;
    if (dropout)
        keep_stride = (size_t)max_rows * max_in;

    free(lora->h);
    free(lora->keep);
    free(lora->scratch);
    lora->h = malloc(h_count * sizeof(float));
    lora->keep = dropout ? malloc(slots * keep_stride) : NULL;
    /* Scratch: the dropped input (or its gradient), then dh. */
    lora->scratch = malloc((size_t)max_rows * (max_in + r) * sizeof(float));
    if (!lora->h || (dropout && !lora->keep) || !lora->scratch)
        return cp_error_nomem(err, "LoRA activations", h_count * sizeof(float));
    lora->training = 1;
    lora->max_rows = max_rows;
    lora->keep_stride = keep_stride;
    return CP_OK;
}

/* The input the low-rank path reads: x itself, or x with dropout applied
 * (drawing a fresh mask when draw is set, reusing the saved one otherwise). */
static const float *dropped_input(cp_lora *lora, size_t slot, const float *x, int N, int in,
                                  int draw)
{
    if (!lora->keep)
        return x;
    uint8_t *keep = lora->keep + slot * lora->keep_stride;
    float p = lora->params.dropout, inv_keep = 1.0f / (1.0f - p);
    float *xd = lora->scratch;
    for (size_t i = 0; i < (size_t)N * in; i++) {
        if (draw)
            keep[i] = cp_rng_uniform(&lora->rng) >= p;
        xd[i] = keep[i] ? x[i] * inv_keep : 0.0f;
    }
    return xd;
}

void cp_lora_forward(cp_lora *lora, int layer, cp_proj p, float *out, const float *x, int N)
{
    const cp_lora_slot *s = cp_lora_slot_at(lora, layer, p);
    if (!s->A)
        return;
    CP_ASSERT(N <= (lora->training ? lora->max_rows : lora->eval_rows));
    int r = lora->params.r;
    size_t slot = (size_t)layer * CP_PROJ_COUNT + p;
    float *h = lora->training ? lora->h + slot * lora->max_rows * r : lora->h_eval;

    /* h (N, r) = dropout(x) Aᵀ, then out (N, out) += scaling · h Bᵀ. */
    const float *xin = lora->training ? dropped_input(lora, slot, x, N, s->in, 1) : x;
    cp_matmul_forward(h, xin, s->A, NULL, N, s->in, r);
    cp_blas_single_threaded();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, s->out, r, lora->scaling, h, r, s->B,
                r, 1.0f, out, s->out);
}

void cp_lora_backward(cp_lora *lora, int layer, cp_proj p, float *dx, const float *dout,
                      const float *x, int N)
{
    cp_lora_slot *s = cp_lora_slot_at(lora, layer, p);
    if (!s->A)
        return;
    CP_ASSERT(lora->training && N <= lora->max_rows);
    int r = lora->params.r, in = s->in, outd = s->out;
    size_t slot = (size_t)layer * CP_PROJ_COUNT + p;
    const float *h = lora->h + slot * lora->max_rows * r;
    float *dh = lora->scratch + (size_t)lora->max_rows * in;
    cp_blas_single_threaded();

    /* Undoes out += scaling · h Bᵀ: dB += scaling · doutᵀ h, dh = scaling · dout B. */
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, outd, r, N, lora->scaling, dout, outd,
                h, r, 1.0f, s->dB, r);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, r, outd, lora->scaling, dout, outd,
                s->B, r, 0.0f, dh, r);

    /* Undoes h = dropout(x) Aᵀ: dA += dhᵀ dropout(x), dx += dropout'(dh A). */
    const float *xin = dropped_input(lora, slot, x, N, in, 0);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, r, in, N, 1.0f, dh, r, xin, in, 1.0f,
                s->dA, in);
    if (!lora->keep) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, in, r, 1.0f, dh, r, s->A, in,
                    1.0f, dx, in);
        return;
    }
    float *dxd = lora->scratch; /* the dropped input is no longer needed */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, in, r, 1.0f, dh, r, s->A, in, 0.0f,
                dxd, in);
    const uint8_t *keep = lora->keep + slot * lora->keep_stride;
    float inv_keep = 1.0f / (1.0f - lora->params.dropout);
    for (size_t i = 0; i < (size_t)N * in; i++)
        dx[i] += keep[i] ? dxd[i] * inv_keep : 0.0f;
}
