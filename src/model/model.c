/*
 * Loading a Hugging Face GPT-2, Llama, Mistral or Qwen2 folder: config.json plus its
 * safetensors weights (one file or shards). Every tensor the config implies
 * must be present with the exact shape; tensors the decoder does not use
 * (a stored rotary inv_freq, say) are ignored. A path to a regular file
 * that starts with the GGUF magic goes to model_gguf.c instead.
 */
#include "model/model.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/file.h"
#include "io/gguf.h"
#include "ops/nf4.h"
#include "ops/rope.h"
#include "peft/method.h"

cp_status cp_model_keep_owned(cp_model *m, float *buf, cp_error *err)
{
    float **grown = realloc(m->owned, (size_t)(m->n_owned + 1) * sizeof *grown);
    if (!grown) {
        free(buf);
        return cp_error_nomem(err, "the weight list", (size_t)(m->n_owned + 1) * sizeof *grown);
    }
    m->owned = grown;
    m->owned[m->n_owned++] = buf;
    return CP_OK;
}

static void format_shape(char *buf, size_t size, const int64_t *shape, int ndim)
{
    int n = snprintf(buf, size, "[");
    for (int i = 0; i < ndim && n < (int)size; i++)
        n += snprintf(buf + n, size - (size_t)n, i ? ", %lld" : "%lld", (long long)shape[i]);
    if (n < (int)size)
        snprintf(buf + n, size - (size_t)n, "]");
}

/* Binds *out to the float32 data of tensor name, which must have shape
 * (rows, cols), or (rows) when cols is 0. */
static cp_status bind(cp_model *m, const char *name, int64_t rows, int64_t cols,
                      const float **out, cp_error *err)
{
    const cp_st_tensor *t = cp_safetensors_find(m->weights, name);
    if (!t)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: missing tensor \"%s\"; the weights do not match config.json "
                            "(model_type %s)",
                            m->dir, name, m->cfg.model_type);

    int64_t want[2] = {rows, cols};
    int want_ndim = cols ? 2 : 1;
    if (t->ndim != want_ndim || t->shape[0] != rows || (cols && t->shape[1] != cols)) {
        char got_s[128], want_s[64];
        format_shape(got_s, sizeof got_s, t->shape, t->ndim);
        format_shape(want_s, sizeof want_s, want, want_ndim);
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: tensor \"%s\" has shape %s but config.json implies %s", t->file,
                            name, got_s, want_s);
    }

    if (t->dtype == CP_DTYPE_F32 && cp_st_tensor_is_aligned(t)) {
        *out = t->data;
        return CP_OK;
    }
    /* NOTE: F16/BF16 weights are widened to float32 here, so they take
     * twice their file size in memory. Compute in the stored dtype is not
     * done yet. */
    size_t n = cp_st_tensor_numel(t);
    float *buf = malloc(n * sizeof *buf);
    if (!buf)
        return cp_error_nomem(err, name, n * sizeof *buf);
    if (cp_st_tensor_is_aligned(t)) {
        cp_dtype_to_f32(t->dtype, t->data, buf, n);
    } else {
        /* Widening reads elements one by one through memcpy into a bounce. */
        size_t esize = cp_dtype_size(t->dtype);
        for (size_t i = 0; i < n; i++) {
            uint32_t raw = 0;
            memcpy(&raw, (const uint8_t *)t->data + i * esize, esize);
            cp_dtype_to_f32(t->dtype, &raw, buf + i, 1);
        }
    }
    cp_file_release_pages(t->data, t->nbytes);
    *out = buf;
    return cp_model_keep_owned(m, buf, err);
}

/* Tensor names of one architecture: the prefix of every name, of a layer,
 * and the module names of the norms and embeddings. */
typedef struct layout {
    char prefix[32];       /* "model." (Llama), "transformer." or "" (GPT-2) */
    const char *layer;     /* "layers" or "h" */
    const char *norm1, *norm2, *final_norm, *embed, *pos_embed;
} layout;

static layout layout_for(const cp_model *m)
{
    layout lay = {"model.", "layers", "input_layernorm", "post_attention_layernorm", "norm",
                  "embed_tokens", NULL};
    if (!m->cfg.conv1d)
        return lay;
    /* GPT-2 checkpoints name tensors with or without the "transformer." prefix. */
    lay = (layout){"transformer.", "h", "ln_1", "ln_2", "ln_f", "wte", "wpe"};
    if (!cp_safetensors_find(m->weights, "transformer.wte.weight"))
        lay.prefix[0] = '\0';
    return lay;
}

/* Binds a norm's weight and, for LayerNorm, its bias. */
static cp_status bind_norm(cp_model *m, const char *module, const float **weight,
                           const float **bias, cp_error *err)
{
    char name[200];
    snprintf(name, sizeof name, "%s.weight", module);
    cp_status st = bind(m, name, m->cfg.hidden_size, 0, weight, err);
    if (st != CP_OK || m->cfg.norm != CP_NORM_LAYER)
        return st;
    snprintf(name, sizeof name, "%s.bias", module);
    return bind(m, name, m->cfg.hidden_size, 0, bias, err);
}

static cp_status bind_layer(cp_model *m, const layout *lay, int l, cp_error *err)
{
    const cp_model_config *c = &m->cfg;
    cp_layer_weights *w = &m->layers[l];
    char base[96], name[200];
    cp_status st;
    snprintf(base, sizeof base, "%s%s.%d.", lay->prefix, lay->layer, l);

    snprintf(name, sizeof name, "%s%s", base, lay->norm1);
    if ((st = bind_norm(m, name, &w->attn_norm, &w->attn_norm_bias, err)))
        return st;
    snprintf(name, sizeof name, "%s%s", base, lay->norm2);
    if ((st = bind_norm(m, name, &w->mlp_norm, &w->mlp_norm_bias, err)))
        return st;

    /* Projections: (out, in) as nn.Linear stores them, (in, out) for Conv1D;
     * biases where the config gives the projection one. */
    for (int p = 0; p < CP_PROJ_COUNT; p++) {
        if (!cp_proj_exists(c, (cp_proj)p))
            continue;
        int in, out;
        cp_proj_shape(c, (cp_proj)p, &in, &out);
        snprintf(name, sizeof name, "%s%s.weight", base, cp_proj_path(c, (cp_proj)p));
        if ((st = bind(m, name, m->weights_in_out ? in : out, m->weights_in_out ? out : in,
                       &w->w[p], err)))
            return st;
        int has_bias = p == CP_PROJ_O ? c->o_bias
                       : (p == CP_PROJ_GATE || p == CP_PROJ_UP || p == CP_PROJ_DOWN) ? c->mlp_bias
                                                                                     : c->qkv_bias;
        snprintf(name, sizeof name, "%s%s.bias", base, cp_proj_path(c, (cp_proj)p));
        if (has_bias && (st = bind(m, name, out, 0, &w->bias[p], err)))
            return st;
    }
    return CP_OK;
}

static cp_status bind_all(cp_model *m, cp_error *err)
{
    const cp_model_config *c = &m->cfg;
    layout lay = layout_for(m);
    char name[200];
    cp_status st;

    snprintf(name, sizeof name, "%s%s.weight", lay.prefix, lay.embed);
    if ((st = bind(m, name, c->vocab_size, c->hidden_size, &m->embed, err)))
        return st;
    snprintf(name, sizeof name, "%s%s.weight", lay.prefix, lay.pos_embed ? lay.pos_embed : "");
    if (lay.pos_embed && (st = bind(m, name, c->max_position_embeddings, c->hidden_size,
                                    &m->pos_embed, err)))
        return st;
    snprintf(name, sizeof name, "%s%s", lay.prefix, lay.final_norm);
    if ((st = bind_norm(m, name, &m->final_norm, &m->final_norm_bias, err)))
        return st;

    if (c->tie_word_embeddings) {
        m->lm_head = m->embed;
    } else if ((st = bind(m, "lm_head.weight", c->vocab_size, c->hidden_size, &m->lm_head,
                          err))) {
        return st;
    }

    if ((st = cp_model_alloc_tables(m, err)))
        return st;
    for (int l = 0; l < c->n_layers; l++)
        if ((st = bind_layer(m, &lay, l, err)))
            return st;
    return CP_OK;
}

cp_status cp_model_alloc_tables(cp_model *m, cp_error *err)
{
    const cp_model_config *c = &m->cfg;
    m->layers = calloc((size_t)c->n_layers, sizeof *m->layers);
    if (!m->layers)
        return cp_error_nomem(err, "layer table", (size_t)c->n_layers * sizeof *m->layers);
    m->inv_freq = malloc((size_t)(c->head_dim / 2 + 1) * sizeof *m->inv_freq);
    if (!m->inv_freq)
        return cp_error_nomem(err, "RoPE table", (size_t)c->head_dim * sizeof(float));
    cp_rope_inv_freq(m->inv_freq, c);
    return CP_OK;
}

cp_status cp_model_load(const char *dir, cp_model **out, cp_error *err)
{
    *out = NULL;
    if (cp_file_is_gguf(dir))
        return cp_model_load_gguf(dir, out, err);
    if (!cp_file_is_dir(dir))
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: not a model folder or GGUF file; expected a Hugging Face folder "
                            "with config.json and model.safetensors, or a .gguf file",
                            dir);

    cp_model *m = calloc(1, sizeof *m);
    char *config_path = cp_path_join(dir, "config.json");
    if (m)
        m->dir = strdup(dir);
    if (!m || !config_path || !m->dir) {
        cp_model_free(m);
        free(config_path);
        return cp_error_nomem(err, "the model", sizeof *m);
    }

    cp_status st = cp_config_load(config_path, &m->cfg, err);
    free(config_path);
    m->weights_in_out = m->cfg.conv1d;
    if (st == CP_OK)
        st = cp_safetensors_open(dir, &m->weights, err);
    if (st == CP_OK)
        st = bind_all(m, err);
    if (st != CP_OK) {
        cp_model_free(m);
        return st;
    }
    *out = m;
    return CP_OK;
}

void cp_model_free(cp_model *m)
{
    if (!m)
        return;
    for (int i = 0; i < m->n_owned; i++)
        free(m->owned[i]);
    free(m->owned);
    for (int l = 0; m->layers && l < m->cfg.n_layers; l++) {
        for (int p = 0; p < CP_PROJ_COUNT; p++) {
            if (m->layers[l].nf4[p])
                cp_nf4_free(m->layers[l].nf4[p]);
            free(m->layers[l].nf4[p]);
        }
    }
    free(m->layers);
    free(m->bf16_owned[0]);
    free(m->bf16_owned[1]);
    free(m->inv_freq);
    free(m->dir);
    cp_model_detach_method(m);
    cp_safetensors_close(m->weights);
    cp_gguf_close(m->gguf);
    free(m);
}

int cp_model_vocab_size(const cp_model *m) { return m->cfg.vocab_size; }

int cp_model_context_length(const cp_model *m) { return m->cfg.max_position_embeddings; }

size_t cp_model_find_bad_id(const cp_model *m, const int32_t *ids, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= m->cfg.vocab_size)
            return i + 1;
    return 0;
}

cp_status cp_model_attach_lora(cp_model *m, cp_lora *lora, cp_error *err)
{
    cp_method *method = NULL;
    cp_status st = cp_lora_method_wrap(lora, &method, err);
    if (st != CP_OK)
        return st;
    cp_model_detach_method(m);
    m->method = method;
    m->owns_method = 1;
    return CP_OK;
}

void cp_model_detach_method(cp_model *m)
{
    if (m->owns_method)
        cp_method_free(m->method);
    m->method = NULL;
    m->owns_method = 0;
}

cp_status cp_model_load_adapter(cp_model *m, const char *dir, cp_error *err)
{
    cp_method *method = NULL;
    cp_status st = cp_method_load(dir, m, &method, err);
    if (st != CP_OK)
        return st;
    cp_model_detach_method(m);
    m->method = method;
    m->owns_method = 1;
    return CP_OK;
}
