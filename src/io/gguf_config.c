/*
 * The decoder settings of a GGUF model, read from llama.cpp's metadata keys
 * ("{arch}.embedding_length" and the like) instead of config.json.
 */
#include "io/gguf_config.h"

#include <stdio.h>
#include <string.h>

/* An integer setting "{arch}.{key}". Absent keys give dflt unless required;
 * llama.cpp writes them as uint32, some tools as int32. */
static cp_status get_int(const cp_gguf *g, const char *path, const char *arch, const char *key,
                         int required, int dflt, int *out, cp_error *err)
{
    char full[128];
    snprintf(full, sizeof full, "%s.%s", arch, key);
    const cp_gguf_kv *kv = cp_gguf_find_kv(g, full);
    *out = dflt;
    if (!kv && !required)
        return CP_OK;
    if (kv && cp_gguf_kv_type(kv) == CP_GGUF_TYPE_INT32) {
        int32_t v;
        cp_status st = cp_gguf_get_i32(g, full, &v, err);
        *out = v;
        return st;
    }
    uint32_t v;
    cp_status st = cp_gguf_get_u32(g, full, &v, err);
    if (st == CP_OK && v > (1u << 30))
        return cp_error_set(err, CP_ERR_INPUT, "%s: metadata \"%s\" is %u, too large for a model size",
                            path, full, v);
    *out = (int)v;
    return st;
}

static cp_status get_float(const cp_gguf *g, const char *arch, const char *key, float dflt,
                           float *out, cp_error *err)
{
    char full[128];
    snprintf(full, sizeof full, "%s.%s", arch, key);
    *out = dflt;
    return cp_gguf_find_kv(g, full) ? cp_gguf_get_f32(g, full, out, err) : CP_OK;
}

/* The special token ids of the embedded tokenizer, when it names them. */
static cp_status read_special_ids(const cp_gguf *g, cp_model_config *cfg, cp_error *err)
{
    uint32_t id;
    cfg->bos_id = -1;
    cfg->n_eos_ids = 0;
    if (cp_gguf_find_kv(g, "tokenizer.ggml.bos_token_id")) {
        if (cp_gguf_get_u32(g, "tokenizer.ggml.bos_token_id", &id, err) != CP_OK)
            return CP_ERR_INPUT;
        cfg->bos_id = id < (uint32_t)cfg->vocab_size ? (int)id : -1;
    }
    if (cp_gguf_find_kv(g, "tokenizer.ggml.eos_token_id")) {
        if (cp_gguf_get_u32(g, "tokenizer.ggml.eos_token_id", &id, err) != CP_OK)
            return CP_ERR_INPUT;
        if (id < (uint32_t)cfg->vocab_size)
            cfg->eos_ids[cfg->n_eos_ids++] = (int)id;
    }
    return CP_OK;
}

/* RoPE: the rotated width must be the whole head, and only linear scaling
 * is stored as metadata (llama3 scaling comes as the rope_freqs tensor). */
static cp_status read_rope(const cp_gguf *g, const char *path, const char *arch,
                           cp_model_config *cfg, cp_error *err)
{
    int rot;
    cp_status st = get_int(g, path, arch, "rope.dimension_count", 0, cfg->head_dim, &rot, err);
    if (st == CP_OK)
        st = get_float(g, arch, "rope.freq_base", 10000.0f, &cfg->rope_theta, err);
    if (st != CP_OK)
        return st;
    if (rot != cfg->head_dim)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: %s.rope.dimension_count is %d but the head size is %d; partial "
                            "rotary embeddings are not supported",
                            path, arch, rot, cfg->head_dim);

    char key[128];
    snprintf(key, sizeof key, "%s.rope.scaling.type", arch);
    cp_gguf_str type = {"none", 4};
    if (cp_gguf_find_kv(g, key) && cp_gguf_get_str(g, key, &type, err) != CP_OK)
        return CP_ERR_INPUT;
    if (type.len == 4 && memcmp(type.data, "none", 4) == 0)
        return CP_OK;
    if (type.len != 6 || memcmp(type.data, "linear", 6) != 0)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: %s is \"%.*s\"; supported RoPE scaling: none, linear (llama3 "
                            "scaling is read from the rope_freqs tensor)",
                            path, key, (int)type.len, type.data);
    cfg->rope_scaling = CP_ROPE_SCALING_LINEAR;
    if ((st = get_float(g, arch, "rope.scaling.factor", 0.0f, &cfg->rope_factor, err)))
        return st;
    if (!(cfg->rope_factor > 0))
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: linear RoPE scaling needs a positive %s.rope.scaling.factor", path,
                            arch);
    return CP_OK;
}

/* The architecture switches: gpt2 is GPT-2; llama and qwen2 are the Llama
 * decoder, with biases where the file has the tensors. */
static void set_switches(const cp_gguf *g, const char *arch, cp_model_config *cfg)
{
    snprintf(cfg->model_type, sizeof cfg->model_type, "%s", arch);
    if (strcmp(arch, "gpt2") == 0) {
        cfg->norm = CP_NORM_LAYER;
        cfg->mlp = CP_MLP_GELU_TANH;
        cfg->use_rope = 0;
        cfg->fused_qkv = 1;
        cfg->conv1d = 1; /* GPT-2's module names and PEFT's fan_in_fan_out */
        cfg->qkv_bias = cfg->o_bias = cfg->mlp_bias = 1;
        return;
    }
    cfg->norm = CP_NORM_RMS;
    cfg->mlp = CP_MLP_SWIGLU;
    cfg->use_rope = 1;
    cfg->qkv_bias = cp_gguf_find_tensor(g, "blk.0.attn_q.bias") != NULL;
    cfg->o_bias = cp_gguf_find_tensor(g, "blk.0.attn_output.bias") != NULL;
    cfg->mlp_bias = cp_gguf_find_tensor(g, "blk.0.ffn_up.bias") != NULL;
}

static cp_status check_sizes(const cp_model_config *c, const char *path, const char *arch,
                             cp_error *err)
{
    struct {
        const char *key;
        int value;
    } positive[] = {
        {"embedding_length", c->hidden_size},  {"feed_forward_length", c->intermediate_size},
        {"block_count", c->n_layers},          {"attention.head_count", c->n_heads},
        {"attention.head_count_kv", c->n_kv_heads}, {"context_length", c->max_position_embeddings},
    };
    for (size_t i = 0; i < sizeof positive / sizeof *positive; i++)
        if (positive[i].value <= 0)
            return cp_error_set(err, CP_ERR_INPUT, "%s: metadata \"%s.%s\" must be positive, found %d",
                                path, arch, positive[i].key, positive[i].value);
    if (c->n_heads % c->n_kv_heads != 0)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: %s.attention.head_count (%d) must be a multiple of "
                            "%s.attention.head_count_kv (%d)",
                            path, arch, c->n_heads, arch, c->n_kv_heads);
    if (c->head_dim <= 0 || c->head_dim % 2 != 0)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: the head size %d (%s.attention.key_length, or embedding_length / "
                            "head_count) must be positive and even",
                            path, c->head_dim, arch);
    if (!(c->rms_norm_eps > 0) || !(c->rope_theta > 0))
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: the norm epsilon and %s.rope.freq_base must be positive", path, arch);
    return CP_OK;
}

cp_status cp_config_from_gguf(const cp_gguf *g, const char *path, cp_model_config *cfg,
                              cp_error *err)
{
    memset(cfg, 0, sizeof *cfg);
    cp_gguf_str a;
    if (cp_gguf_get_str(g, "general.architecture", &a, err) != CP_OK)
        return CP_ERR_INPUT;
    char arch[32];
    snprintf(arch, sizeof arch, "%.*s", a.len < sizeof arch ? (int)a.len : 0, a.data);
    if (strcmp(arch, "llama") && strcmp(arch, "qwen2") && strcmp(arch, "gpt2"))
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: general.architecture is \"%.*s\"; supported: llama (also Mistral, "
                            "TinyLlama, SmolLM), qwen2, gpt2",
                            path, (int)(a.len > 64 ? 64 : a.len), a.data);
    set_switches(g, arch, cfg);

    const cp_gguf_tensor *embed = cp_gguf_find_tensor(g, "token_embd.weight");
    if (!embed || embed->n_dims != 2 || embed->dims[1] > (1u << 30))
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: no 2-D tensor \"token_embd.weight\"; the vocabulary size is read "
                            "from it, so this GGUF file holds no usable model",
                            path);
    cfg->vocab_size = (int)embed->dims[1];

    cp_status st;
    int is_gpt2 = cfg->conv1d;
    if ((st = get_int(g, path, arch, "embedding_length", 1, 0, &cfg->hidden_size, err)) ||
        (st = get_int(g, path, arch, "feed_forward_length", 1, 0, &cfg->intermediate_size, err)) ||
        (st = get_int(g, path, arch, "block_count", 1, 0, &cfg->n_layers, err)) ||
        (st = get_int(g, path, arch, "attention.head_count", 1, 0, &cfg->n_heads, err)) ||
        (st = get_int(g, path, arch, "attention.head_count_kv", 0, cfg->n_heads, &cfg->n_kv_heads,
                      err)) ||
        (st = get_int(g, path, arch, "context_length", 1, 0, &cfg->max_position_embeddings, err)) ||
        (st = get_float(g, arch,
                        is_gpt2 ? "attention.layer_norm_epsilon"
                                : "attention.layer_norm_rms_epsilon",
                        1e-5f, &cfg->rms_norm_eps, err)))
        return st;
    int by_heads = cfg->n_heads > 0 ? cfg->hidden_size / cfg->n_heads : 0;
    if ((st = get_int(g, path, arch, "attention.key_length", 0, by_heads, &cfg->head_dim, err)))
        return st;
    cfg->rope_theta = 10000.0f;
    if ((st = check_sizes(cfg, path, arch, err)))
        return st;
    if (!is_gpt2 && (st = read_rope(g, path, arch, cfg, err)))
        return st;
    cfg->tie_word_embeddings = cp_gguf_find_tensor(g, "output.weight") == NULL;
    return read_special_ids(g, cfg, err);
}
