/* LoRA and DoRA: parameters, initialization, and the forward and backward
 * passes at one adapted projection. */
#include "peft/lora.h"

#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "model/model.h"
#include "ops/matmul.h"

cp_lora_params cp_lora_default_params(void)
{
    return (cp_lora_params){
        .r = 8,
        .alpha = 16.0f,
        .dropout = 0.0f,
        .use_rslora = 0,
        .use_dora = 0,
        .targets = (1u << CP_PROJ_Q) | (1u << CP_PROJ_V), /* Llama's default; GPT-2's is c_attn */
        .seed = 42,
    };
}

/* Lays every targeted slot's A, B (and DoRA magnitude), then their
 * gradients, into two arrays. With DoRA a third array has each slot's norm
 * and the copy of A and B the norm was computed from. */
static cp_status allocate_slots(cp_lora *lora, const cp_model_config *cfg, cp_error *err)
{
    int r = lora->params.r, dora = lora->params.use_dora;
    size_t total = 0, norm_total = 0;
    for (int l = 0; l < cfg->n_layers; l++) {
        for (int p = 0; p < CP_PROJ_COUNT; p++) {
            cp_lora_slot *s = cp_lora_slot_at(lora, l, (cp_proj)p);
            cp_proj_shape(cfg, (cp_proj)p, &s->in, &s->out);
            if (!(lora->params.targets & (1u << p)))
                continue;
            total += (size_t)r * (s->in + s->out) + (dora ? (size_t)s->out : 0);
            norm_total += dora ? (size_t)r * (s->in + s->out) + s->out : 0;
        }
    }
    lora->n_weights = total;
    lora->weights = calloc(total ? total : 1, sizeof(float));
    lora->grads = calloc(total ? total : 1, sizeof(float));
    if (dora)
        lora->norms = calloc(norm_total ? norm_total : 1, sizeof(float));
    if (!lora->weights || !lora->grads || (dora && !lora->norms))
        return cp_error_nomem(err, "LoRA weights", (2 * total + norm_total) * sizeof(float));

    size_t offset = 0, norm_offset = 0;
    for (int l = 0; l < cfg->n_layers; l++) {
        for (int p = 0; p < CP_PROJ_COUNT; p++) {
            cp_lora_slot *s = cp_lora_slot_at(lora, l, (cp_proj)p);
            if (!(lora->params.targets & (1u << p)))
                continue;
            /* B follows A directly: the DoRA norm cache compares both at once. */
            s->A = lora->weights + offset;
            s->dA = lora->grads + offset;
            offset += (size_t)r * s->in;
            s->B = lora->weights + offset;
            s->dB = lora->grads + offset;
            offset += (size_t)r * s->out;
            if (!dora)
                continue;
            s->magnitude = lora->weights + offset;
            s->dmagnitude = lora->grads + offset;
            offset += (size_t)s->out;
            s->weight_norm = lora->norms + norm_offset;
            s->norm_of = s->weight_norm + s->out;
            norm_offset += (size_t)r * (s->in + s->out) + s->out;
        }
    }
    return CP_OK;
}

/* The scratch in which threads form rows of W + scaling B A for the norms. */
static cp_status allocate_norm_scratch(cp_lora *lora, cp_error *err)
{
    int max_in = 0;
    for (int p = 0; p < CP_PROJ_COUNT; p++) {
        const cp_lora_slot *s = cp_lora_slot_at(lora, 0, (cp_proj)p);
        if (s->A && s->in > max_in)
            max_in = s->in;
    }
    lora->norm_threads = omp_get_max_threads();
    lora->norm_stride = (size_t)CP_LORA_NORM_ROWS * max_in;
    size_t bytes = (size_t)lora->norm_threads * lora->norm_stride * sizeof(float);
    lora->norm_scratch = malloc(bytes ? bytes : 1);
    return lora->norm_scratch ? CP_OK : cp_error_nomem(err, "DoRA norm scratch", bytes);
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
    if (st == CP_OK && p->use_dora)
        st = allocate_norm_scratch(lora, err);
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
    free(lora->norms);
    free(lora->dora_y);
    free(lora->dora_rows);
    free(lora->norm_scratch);
    memset(lora, 0, sizeof *lora);
}

/* The widest output of an adapted slot. */
static int max_slot_out(const cp_lora *lora)
{
    int max_out = 0;
    for (int p = 0; p < CP_PROJ_COUNT; p++) {
        const cp_lora_slot *s = cp_lora_slot_at(lora, 0, (cp_proj)p);
        if (s->A && s->out > max_out)
            max_out = s->out;
    }
    return max_out;
}

/* Grows DoRA's row scratch (two blocks of (rows, max out)) to hold rows. */
static cp_status reserve_dora_rows(cp_lora *lora, int rows, cp_error *err)
{
    if (!lora->params.use_dora || rows <= lora->dora_rows_cap)
        return CP_OK;
    size_t bytes = 2 * (size_t)rows * max_slot_out(lora) * sizeof(float);
    float *grown = realloc(lora->dora_rows, bytes);
    if (!grown)
        return cp_error_nomem(err, "DoRA scratch", bytes);
    lora->dora_rows = grown;
    lora->dora_rows_cap = rows;
    return CP_OK;
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
    return reserve_dora_rows(lora, rows, err);
}

/* DoRA's saved products: (max_rows, out) per adapted slot. */
static cp_status reserve_dora_y(cp_lora *lora, int max_rows, cp_error *err)
{
    if (!lora->params.use_dora)
        return CP_OK;
    size_t total = 0;
    for (size_t i = 0; i < (size_t)lora->n_layers * CP_PROJ_COUNT; i++)
        total += lora->slots[i].A ? (size_t)max_rows * lora->slots[i].out : 0;
    free(lora->dora_y);
    lora->dora_y = malloc((total ? total : 1) * sizeof(float));
    if (!lora->dora_y)
        return cp_error_nomem(err, "DoRA activations", total * sizeof(float));
    size_t offset = 0;
    for (size_t i = 0; i < (size_t)lora->n_layers * CP_PROJ_COUNT; i++) {
        if (!lora->slots[i].A)
            continue;
        lora->slots[i].y = lora->dora_y + offset;
        offset += (size_t)max_rows * lora->slots[i].out;
    }
    return reserve_dora_rows(lora, max_rows, err);
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
    cp_status st = reserve_dora_y(lora, max_rows, err);
    if (st != CP_OK)
        return st;
    lora->training = 1;
    lora->max_rows = max_rows;
    lora->keep_stride = keep_stride;
    return CP_OK;
}

/* weight_norm (out) = the row norms of W + scaling B A, formed
 * CP_LORA_NORM_ROWS rows at a time per thread. Row j of W is row j of the
 * stored (out, in) matrix, or column j when it is stored (in, out). */
static void compute_weight_norm(cp_lora *lora, cp_lora_slot *s)
{
    int in = s->in, out = s->out, r = lora->params.r, rows = CP_LORA_NORM_ROWS;
    int n_blocks = (out + rows - 1) / rows;
    cp_blas_single_threaded();
#pragma omp parallel for schedule(static) num_threads(lora->norm_threads) \
    if ((size_t)out * in * r > 65536)
    for (int block = 0; block < n_blocks; block++) {
        float *d = lora->norm_scratch + (size_t)omp_get_thread_num() * lora->norm_stride;
        int j0 = block * rows, nj = out - j0 < rows ? out - j0 : rows;
        if (lora->base_in_out) {
            for (int i = 0; i < in; i++)
                for (int jj = 0; jj < nj; jj++)
                    d[(size_t)jj * in + i] = s->w[(size_t)i * out + j0 + jj];
        } else {
            memcpy(d, s->w + (size_t)j0 * in, (size_t)nj * in * sizeof(float));
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, nj, in, r, lora->scaling,
                    s->B + (size_t)j0 * r, r, s->A, in, 1.0f, d, in);
        for (int jj = 0; jj < nj; jj++) {
            double sum = 0;
            for (int i = 0; i < in; i++)
                sum += (double)d[(size_t)jj * in + i] * d[(size_t)jj * in + i];
            s->weight_norm[j0 + jj] = (float)sqrt(sum);
        }
    }
}

/* Brings weight_norm up to date with A, B and the scaling. The norm depends
 * only on them, so evaluation, generation and gradient accumulation reuse
 * it; a changed A or B (an optimizer step) recomputes it. */
static void update_weight_norm(cp_lora *lora, cp_lora_slot *s)
{
    size_t ab = (size_t)lora->params.r * (s->in + s->out) * sizeof(float);
    CP_ASSERT(s->B == s->A + (size_t)lora->params.r * s->in);
    if (s->norm_valid &&
        (lora->norm_frozen ||
         (s->norm_scaling == lora->scaling && memcmp(s->norm_of, s->A, ab) == 0)))
        return;
    compute_weight_norm(lora, s);
    memcpy(s->norm_of, s->A, ab);
    s->norm_scaling = lora->scaling;
    s->norm_valid = 1;
}

cp_status cp_lora_bind_model(cp_lora *lora, const cp_model *m, int init_magnitude,
                             cp_error *err)
{
    if (!lora->params.use_dora)
        return CP_OK;
    if (m->cfg.n_layers != lora->n_layers)
        return cp_error_set(err, CP_ERR_INPUT,
                            "the DoRA adapter has %d layers but the model has %d; use the base "
                            "model the adapter was trained on",
                            lora->n_layers, m->cfg.n_layers);
    for (int l = 0; l < lora->n_layers; l++) {
        for (int p = 0; p < CP_PROJ_COUNT; p++) {
            cp_lora_slot *s = cp_lora_slot_at(lora, l, (cp_proj)p);
            if (!s->A)
                continue;
            int in = 0, out = 0;
            cp_proj_shape(&m->cfg, (cp_proj)p, &in, &out);
            const float *w = cp_model_proj_weight(m, l, p);
            if (in != s->in || out != s->out)
                return cp_error_set(err, CP_ERR_INPUT,
                                    "layer %d %s: the DoRA adapter expects %d -> %d features, the "
                                    "model has %d -> %d; use the base model the adapter was "
                                    "trained on",
                                    l, cp_proj_name(&m->cfg, (cp_proj)p), s->in, s->out, in, out);
            if (!w)
                return cp_error_set(err, CP_ERR_INPUT,
                                    "layer %d %s: DoRA needs the float weights of the projection, "
                                    "which are quantized; drop --dora or load the model unquantized",
                                    l, cp_proj_name(&m->cfg, (cp_proj)p));
            s->w = w;
            s->bias = m->layers[l].bias[p];
            s->norm_valid = 0;
        }
    }
    lora->base_in_out = m->weights_in_out;
    lora->bound = 1;
    for (size_t i = 0; init_magnitude && i < (size_t)lora->n_layers * CP_PROJ_COUNT; i++) {
        cp_lora_slot *s = &lora->slots[i];
        if (!s->A)
            continue;
        update_weight_norm(lora, s);
        memcpy(s->magnitude, s->weight_norm, (size_t)s->out * sizeof(float));
    }
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

/* xw (N, out) = x Wᵀ for the bound W, without the bias. */
static void base_product(const cp_lora *lora, const cp_lora_slot *s, float *xw, const float *x,
                         int N)
{
    if (lora->base_in_out)
        cp_matmul_kn_forward(xw, x, s->w, NULL, N, s->in, s->out);
    else
        cp_matmul_forward(xw, x, s->w, NULL, N, s->in, s->out);
}

/* DoRA's output at one slot, given h = dropout(x) Aᵀ and out = x Wᵀ + b:
 * out += (g - 1) dropout(x) Wᵀ + g scaling h Bᵀ with g = m / ||W + scaling B A||,
 * keeping y = dropout(x) Wᵀ + scaling h Bᵀ for the gradient of m. Without
 * dropout, x Wᵀ is out - b, as PEFT takes it; with dropout it is a product. */
static void dora_forward(cp_lora *lora, cp_lora_slot *s, float *out, const float *xin,
                         const float *h, int N)
{
    CP_ASSERT(lora->bound);
    int r = lora->params.r, od = s->out;
    int dropout = lora->training && lora->keep;
    update_weight_norm(lora, s);
    float *lr = lora->training ? s->y : lora->dora_rows;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, od, r, lora->scaling, h, r, s->B, r,
                0.0f, lr, od);
    float *xw = lora->dora_rows + (size_t)lora->dora_rows_cap * od;
    if (dropout)
        base_product(lora, s, xw, xin, N);

    const float *m = s->magnitude, *norm = s->weight_norm, *bias = s->bias;
    int keep_y = lora->training;
#pragma omp parallel for if ((size_t)N * od > 65536)
    for (int n = 0; n < N; n++) {
        for (int j = 0; j < od; j++) {
            size_t i = (size_t)n * od + j;
            float base = dropout ? xw[i] : out[i] - (bias ? bias[j] : 0.0f);
            float g = m[j] / norm[j], low_rank = lr[i];
            out[i] += (g - 1.0f) * base + g * low_rank;
            if (keep_y)
                s->y[i] = base + low_rank;
        }
    }
}

void cp_lora_forward(cp_lora *lora, int layer, cp_proj p, float *out, const float *x, int N)
{
    cp_lora_slot *s = cp_lora_slot_at(lora, layer, p);
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
    if (lora->params.use_dora) {
        dora_forward(lora, s, out, xin, h, N);
        return;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, s->out, r, lora->scaling, h, r, s->B,
                r, 1.0f, out, s->out);
}

/* Backward of out += scaling · dropout(x) Aᵀ Bᵀ for the output gradient dout:
 * accumulates dA, dB and dx. With dbase (N, out), DoRA's gradient of
 * dropout(x) Wᵀ under dropout, that path's input gradient joins dx too. */
static void low_rank_backward(cp_lora *lora, cp_lora_slot *s, size_t slot, float *dx,
                              const float *dout, const float *dbase, const float *x, int N)
{
    int r = lora->params.r, in = s->in, outd = s->out;
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
        CP_ASSERT(!dbase);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, in, r, 1.0f, dh, r, s->A, in,
                    1.0f, dx, in);
        return;
    }
    float *dxd = lora->scratch; /* the dropped input is no longer needed */
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, in, r, 1.0f, dh, r, s->A, in, 0.0f,
                dxd, in);
    if (dbase && lora->base_in_out)
        cp_matmul_kn_backward(dxd, NULL, NULL, dbase, xin, s->w, N, in, outd);
    else if (dbase)
        cp_matmul_backward(dxd, NULL, NULL, dbase, xin, s->w, N, in, outd);
    const uint8_t *keep = lora->keep + slot * lora->keep_stride;
    float inv_keep = 1.0f / (1.0f - lora->params.dropout);
    for (size_t i = 0; i < (size_t)N * in; i++)
        dx[i] += keep[i] ? dxd[i] * inv_keep : 0.0f;
}

/* Backward of dora_forward with the norm held constant: dm += Σₙ dout y / norm,
 * and the low-rank path receives g dout. Without dropout, x Wᵀ + b and the
 * (g - 1) x Wᵀ term share x, so dout leaves scaled by g. With dropout, the
 * (g - 1) dropout(x) Wᵀ term gets its own input gradient and dout stays. */
static void dora_backward(cp_lora *lora, cp_lora_slot *s, size_t slot, float *dx, float *dout,
                          const float *x, int N)
{
    int od = s->out;
    const float *m = s->magnitude, *norm = s->weight_norm;
    for (int n = 0; n < N; n++)
        for (int j = 0; j < od; j++)
            s->dmagnitude[j] += dout[(size_t)n * od + j] * s->y[(size_t)n * od + j] / norm[j];

    if (!lora->keep) {
        for (int n = 0; n < N; n++)
            for (int j = 0; j < od; j++)
                dout[(size_t)n * od + j] *= m[j] / norm[j];
        low_rank_backward(lora, s, slot, dx, dout, NULL, x, N);
        return;
    }
    float *scaled = lora->dora_rows, *dbase = lora->dora_rows + (size_t)lora->dora_rows_cap * od;
    for (int n = 0; n < N; n++) {
        for (int j = 0; j < od; j++) {
            size_t i = (size_t)n * od + j;
            float g = m[j] / norm[j];
            scaled[i] = g * dout[i];
            dbase[i] = (g - 1.0f) * dout[i];
        }
    }
    low_rank_backward(lora, s, slot, dx, scaled, dbase, x, N);
}

void cp_lora_backward(cp_lora *lora, int layer, cp_proj p, float *dx, float *dout,
                      const float *x, int N)
{
    cp_lora_slot *s = cp_lora_slot_at(lora, layer, p);
    if (!s->A)
        return;
    CP_ASSERT(lora->training && N <= lora->max_rows);
    size_t slot = (size_t)layer * CP_PROJ_COUNT + p;
    if (lora->params.use_dora)
        dora_backward(lora, s, slot, dx, dout, x, N);
    else
        low_rank_backward(lora, s, slot, dx, dout, NULL, x, N);
}
