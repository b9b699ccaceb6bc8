/*
 * QLoRA's frozen base: every linear projection quantized to NF4 in place of
 * its float32 weight, which is then released. The norms stay in float32, and
 * the embeddings and head in float32 or bfloat16.
 */
#include "model/model.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/dtype.h"
#include "core/file.h"
#include "ops/nf4.h"

/* Frees w if the model owns it (a widened or reordered copy), else drops the
 * pages of the read-only map behind it. */
static void release_weight(cp_model *m, const float *w, size_t n)
{
    for (int i = 0; i < m->n_owned; i++) {
        if (m->owned[i] == w) {
            free(m->owned[i]);
            m->owned[i] = m->owned[--m->n_owned];
            return;
        }
    }
    cp_file_release_pages(w, n * sizeof *w);
}

/* Quantizes projection p of layer l, (out, in), transposing weights stored
 * (in, out) first. */
static cp_status quantize_one(cp_model *m, int l, cp_proj p, int double_quant, cp_error *err)
{
    cp_layer_weights *lw = &m->layers[l];
    int in, out;
    cp_proj_shape(&m->cfg, p, &in, &out);
    const float *w = lw->w[p];
    float *transposed = NULL;
    if (m->weights_in_out) {
        transposed = malloc((size_t)in * out * sizeof *transposed);
        if (!transposed)
            return cp_error_nomem(err, "a transposed projection", (size_t)in * out * sizeof(float));
        for (int i = 0; i < in; i++)
            for (int o = 0; o < out; o++)
                transposed[(size_t)o * in + i] = w[(size_t)i * out + o];
    }
    cp_nf4_matrix *q = calloc(1, sizeof *q);
    cp_status st = q ? cp_nf4_quantize(q, transposed ? transposed : w, out, in, double_quant, err)
                     : cp_error_nomem(err, "an NF4 matrix", sizeof *q);
    free(transposed);
    if (st != CP_OK) {
        if (q)
            cp_nf4_free(q);
        free(q);
        return cp_error_prefix(err, "layer %d %s", l, cp_proj_name(&m->cfg, p));
    }
    lw->nf4[p] = q;
    lw->w[p] = NULL;
    release_weight(m, w, (size_t)in * out);
    return CP_OK;
}

cp_status cp_model_quantize_nf4(cp_model *m, int double_quant, cp_error *err)
{
    for (int l = 0; l < m->cfg.n_layers; l++) {
        for (int p = 0; p < CP_PROJ_COUNT; p++) {
            if (!cp_proj_exists(&m->cfg, (cp_proj)p) || m->layers[l].nf4[p])
                continue;
            cp_status st = quantize_one(m, l, (cp_proj)p, double_quant, err);
            if (st != CP_OK)
                return st;
        }
    }
    return CP_OK;
}

void cp_model_nf4_stats(const cp_model *m, cp_nf4_stats *stats)
{
    memset(stats, 0, sizeof *stats);
    size_t blocks = 0;
    for (int l = 0; l < m->cfg.n_layers; l++) {
        for (int p = 0; p < CP_PROJ_COUNT; p++) {
            const cp_nf4_matrix *q = m->layers[l].nf4[p];
            if (!q)
                continue;
            stats->n_matrices++;
            stats->bytes += cp_nf4_bytes(q);
            stats->float32_bytes += (size_t)q->rows * q->cols * sizeof(float);
            stats->scale_rms_error += q->scale_rms_error * q->scale_rms_error * (double)q->n_blocks;
            if (q->scale_max_rel_error > stats->scale_max_rel_error)
                stats->scale_max_rel_error = q->scale_max_rel_error;
            blocks += q->n_blocks;
        }
    }
    if (blocks)
        stats->scale_rms_error = sqrt(stats->scale_rms_error / (double)blocks);
}

/* Returns a bfloat16 copy of n float32 values, or NULL. */
static uint16_t *narrow_copy(const float *src, size_t n)
{
    uint16_t *dst = malloc(n * sizeof *dst);
    if (!dst)
        return NULL;
#pragma omp parallel for schedule(static) if (n > 65536)
    for (size_t i = 0; i < n; i++)
        dst[i] = cp_f32_to_bf16(src[i]);
    return dst;
}

cp_status cp_model_embeddings_to_bf16(cp_model *m, cp_error *err)
{
    size_t n = (size_t)m->cfg.vocab_size * m->cfg.hidden_size;
    if (!m->embed)
        return CP_OK; /* already converted */
    int tied = m->lm_head == m->embed;
    uint16_t *embed = narrow_copy(m->embed, n);
    uint16_t *head = tied || !embed ? embed : narrow_copy(m->lm_head, n);
    if (!embed || !head) {
        free(embed);
        return cp_error_nomem(err, "the bfloat16 embeddings", n * sizeof *embed);
    }
    release_weight(m, m->embed, n);
    if (!tied)
        release_weight(m, m->lm_head, n);
    m->bf16_owned[0] = embed;
    m->bf16_owned[1] = tied ? NULL : head;
    m->embed_bf16 = embed;
    m->lm_head_bf16 = head;
    m->embed = m->lm_head = NULL;
    return CP_OK;
}
