/*
 * Loading a model from a GGUF file written by llama.cpp's converter.
 *
 * The converter renames every tensor. It permutes the rows of llama's q and
 * k projections so that each head's RoPE pairs sit side by side, because
 * llama.cpp rotates adjacent pairs. It transposes GPT-2's Conv1D weights to
 * (out, in) and stores llama3 RoPE scaling as a tensor of frequency
 * divisors. This file undoes each step, so a GGUF model computes what its
 * Hugging Face checkpoint computes, and adapters trained on it use PEFT's
 * names and layouts. F32 tensors are used in place; F16, BF16, Q8_0 and Q4_0 tensors
 * and the permuted q/k weights are widened into float32 copies at load.
 */
#include "model/model.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/file.h"
#include "io/gguf.h"
#include "io/gguf_config.h"

/* Writes "[d0, d1]" in ggml's order (contiguous dimension first). */
static void format_dims(char *buf, size_t size, const uint64_t *dims, int n_dims)
{
    int n = snprintf(buf, size, "[");
    for (int i = 0; i < n_dims && n < (int)size; i++)
        n += snprintf(buf + n, size - (size_t)n, i ? ", %llu" : "%llu", (unsigned long long)dims[i]);
    if (n < (int)size)
        snprintf(buf + n, size - (size_t)n, "]");
}

/* Reverses llama.cpp's q/k permutation in place. Within each of n_heads
 * heads of D = rows_per_head rows, GGUF row 2 j + i is Hugging Face row
 * i * D/2 + j. Each row has cols values. */
static cp_status unpermute_heads(float *w, int n_heads, int rows_per_head, int64_t cols,
                                 cp_error *err)
{
    size_t head_size = (size_t)rows_per_head * (size_t)cols;
    float *tmp = malloc(head_size * sizeof *tmp);
    if (!tmp)
        return cp_error_nomem(err, "a q/k head", head_size * sizeof *tmp);
    int half = rows_per_head / 2;
    for (int h = 0; h < n_heads; h++) {
        float *head = w + (size_t)h * head_size;
        memcpy(tmp, head, head_size * sizeof *tmp);
        for (int j = 0; j < half; j++)
            for (int i = 0; i < 2; i++)
                memcpy(head + (size_t)(i * half + j) * cols, tmp + (size_t)(2 * j + i) * cols,
                       (size_t)cols * sizeof *tmp);
    }
    free(tmp);
    return CP_OK;
}

/* Binds *out to tensor name as float32 of shape (rows, cols), or (rows)
 * when cols is 0. permute_heads > 0 undoes the q/k permutation over that
 * many heads. */
static cp_status bind(cp_model *m, const char *name, int64_t rows, int64_t cols,
                      int permute_heads, const float **out, cp_error *err)
{
    const cp_gguf_tensor *t = cp_gguf_find_tensor(m->gguf, name);
    if (!t)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: missing tensor \"%s\"; the tensors do not match the metadata "
                            "(general.architecture %s)",
                            m->dir, name, m->cfg.model_type);
    uint64_t want[2] = {(uint64_t)(cols ? cols : rows), (uint64_t)rows};
    int want_dims = cols ? 2 : 1;
    if (t->n_dims != want_dims || t->dims[0] != want[0] || (cols && t->dims[1] != want[1])) {
        char got_s[128], want_s[64];
        format_dims(got_s, sizeof got_s, t->dims, t->n_dims);
        format_dims(want_s, sizeof want_s, want, want_dims);
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: tensor \"%s\" has dims %s but the metadata implies %s (ggml "
                            "order, contiguous dimension first)",
                            m->dir, name, got_s, want_s);
    }
    if (t->type == CP_GGML_TYPE_F32 && ((uintptr_t)t->data % sizeof(float)) == 0 &&
        !permute_heads) {
        *out = t->data;
        return CP_OK;
    }
    float *buf = malloc(t->n_elements * sizeof *buf);
    if (!buf)
        return cp_error_nomem(err, name, t->n_elements * sizeof *buf);
    cp_gguf_dequantize(t, buf);
    cp_file_release_pages(t->data, t->n_bytes);
    cp_status st = CP_OK;
    if (permute_heads)
        st = unpermute_heads(buf, permute_heads, (int)(rows / permute_heads), cols ? cols : 1, err);
    if (st != CP_OK) {
        free(buf);
        return st;
    }
    *out = buf;
    return cp_model_keep_owned(m, buf, err);
}

/* llama.cpp's tensor name of each projection, by cp_proj. */
static const char *const proj_names[CP_PROJ_COUNT] = {
    [CP_PROJ_Q] = "attn_q",        [CP_PROJ_K] = "attn_k",     [CP_PROJ_V] = "attn_v",
    [CP_PROJ_O] = "attn_output",   [CP_PROJ_GATE] = "ffn_gate", [CP_PROJ_UP] = "ffn_up",
    [CP_PROJ_DOWN] = "ffn_down",   [CP_PROJ_QKV] = "attn_qkv",
};

/* A norm's weight and, for LayerNorm, its bias. */
static cp_status bind_norm(cp_model *m, const char *module, const float **weight,
                           const float **bias, cp_error *err)
{
    char name[128];
    snprintf(name, sizeof name, "%s.weight", module);
    cp_status st = bind(m, name, m->cfg.hidden_size, 0, 0, weight, err);
    if (st != CP_OK || m->cfg.norm != CP_NORM_LAYER)
        return st;
    snprintf(name, sizeof name, "%s.bias", module);
    return bind(m, name, m->cfg.hidden_size, 0, 0, bias, err);
}

static cp_status bind_layer(cp_model *m, int l, cp_error *err)
{
    const cp_model_config *c = &m->cfg;
    cp_layer_weights *w = &m->layers[l];
    int permuted = strcmp(c->model_type, "llama") == 0;
    char name[128];
    cp_status st;

    snprintf(name, sizeof name, "blk.%d.attn_norm", l);
    if ((st = bind_norm(m, name, &w->attn_norm, &w->attn_norm_bias, err)))
        return st;
    snprintf(name, sizeof name, "blk.%d.ffn_norm", l);
    if ((st = bind_norm(m, name, &w->mlp_norm, &w->mlp_norm_bias, err)))
        return st;

    for (int p = 0; p < CP_PROJ_COUNT; p++) {
        if (!cp_proj_exists(c, (cp_proj)p))
            continue;
        int in, out;
        cp_proj_shape(c, (cp_proj)p, &in, &out);
        int heads = 0;
        if (permuted && p == CP_PROJ_Q)
            heads = c->n_heads;
        if (permuted && p == CP_PROJ_K)
            heads = c->n_kv_heads;
        snprintf(name, sizeof name, "blk.%d.%s.weight", l, proj_names[p]);
        if ((st = bind(m, name, out, in, heads, &w->w[p], err)))
            return st;
        int has_bias = p == CP_PROJ_O ? c->o_bias
                       : (p == CP_PROJ_GATE || p == CP_PROJ_UP || p == CP_PROJ_DOWN) ? c->mlp_bias
                                                                                     : c->qkv_bias;
        snprintf(name, sizeof name, "blk.%d.%s.bias", l, proj_names[p]);
        if (has_bias && (st = bind(m, name, out, 0, heads, &w->bias[p], err)))
            return st;
    }
    return CP_OK;
}

/* llama3 RoPE scaling: rope_freqs.weight divides each frequency. */
static cp_status apply_rope_divisors(cp_model *m, cp_error *err)
{
    const float *div;
    int half = m->cfg.head_dim / 2;
    cp_status st = bind(m, "rope_freqs.weight", half, 0, 0, &div, err);
    if (st != CP_OK)
        return st;
    for (int i = 0; i < half; i++) {
        if (!(div[i] > 0))
            return cp_error_set(err, CP_ERR_INPUT,
                                "%s: rope_freqs.weight[%d] is %g; RoPE frequency divisors must be "
                                "positive",
                                m->dir, i, div[i]);
        m->inv_freq[i] /= div[i];
    }
    return CP_OK;
}

static cp_status bind_all(cp_model *m, cp_error *err)
{
    const cp_model_config *c = &m->cfg;
    cp_status st;
    if ((st = bind(m, "token_embd.weight", c->vocab_size, c->hidden_size, 0, &m->embed, err)))
        return st;
    if (!c->use_rope && (st = bind(m, "position_embd.weight", c->max_position_embeddings,
                                   c->hidden_size, 0, &m->pos_embed, err)))
        return st;
    if ((st = bind_norm(m, "output_norm", &m->final_norm, &m->final_norm_bias, err)))
        return st;
    if (c->tie_word_embeddings)
        m->lm_head = m->embed;
    else if ((st = bind(m, "output.weight", c->vocab_size, c->hidden_size, 0, &m->lm_head, err)))
        return st;

    if ((st = cp_model_alloc_tables(m, err)))
        return st;
    if (c->use_rope && cp_gguf_find_tensor(m->gguf, "rope_freqs.weight") &&
        (st = apply_rope_divisors(m, err)))
        return st;
    for (int l = 0; l < c->n_layers; l++)
        if ((st = bind_layer(m, l, err)))
            return st;
    return CP_OK;
}

cp_status cp_model_load_gguf(const char *path, cp_model **out, cp_error *err)
{
    *out = NULL;
    cp_model *m = calloc(1, sizeof *m);
    if (m)
        m->dir = strdup(path);
    if (!m || !m->dir) {
        free(m);
        return cp_error_nomem(err, "the model", sizeof *m);
    }
    cp_status st = cp_gguf_open(path, &m->gguf, err);
    if (st == CP_OK)
        st = cp_config_from_gguf(m->gguf, path, &m->cfg, err);
    if (st == CP_OK)
        st = bind_all(m, err);
    if (st != CP_OK) {
        cp_model_free(m);
        return st;
    }
    *out = m;
    return CP_OK;
}
