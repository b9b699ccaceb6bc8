/*
 * Hugging Face `config.json` for llama and mistral decoders.
 *
 * Keys that change the math and are not implemented are rejected by name.
 * Keys that only describe training or serving (torch_dtype, use_cache,
 * pretraining_tp, architectures, ...) are ignored.
 */
#include "io/hf_config.h"

#include <cJSON.h>
#include <math.h>
#include <string.h>

#include "core/file.h"

static const char *const supported_types[] = {"gpt2", "llama", "mistral", "qwen2"};

/* Reads an integer key. Absent: *out = dflt, or an error when required. */
static cp_status get_int(const cJSON *root, const char *key, int required, int dflt, int *out,
                         const char *path, cp_error *err)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!item || cJSON_IsNull(item)) {
        if (required)
            return cp_error_set(err, CP_ERR_INPUT,
                                "%s: missing key \"%s\"; a Hugging Face config.json for this "
                                "model type must set it",
                                path, key);
        *out = dflt;
        return CP_OK;
    }
    double v = item->valuedouble;
    if (!cJSON_IsNumber(item) || v != floor(v) || v < -2147483648.0 || v > 2147483647.0)
        return cp_error_set(err, CP_ERR_INPUT, "%s: key \"%s\" must be an integer", path, key);
    *out = (int)v;
    return CP_OK;
}

static cp_status get_float(const cJSON *root, const char *key, int required, float dflt,
                           float *out, const char *path, cp_error *err)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!item || cJSON_IsNull(item)) {
        if (required)
            return cp_error_set(err, CP_ERR_INPUT, "%s: missing key \"%s\"", path, key);
        *out = dflt;
        return CP_OK;
    }
    if (!cJSON_IsNumber(item) || !isfinite(item->valuedouble))
        return cp_error_set(err, CP_ERR_INPUT, "%s: key \"%s\" must be a finite number", path,
                            key);
    *out = (float)item->valuedouble;
    return CP_OK;
}

/* Reads a boolean key; absent means dflt. */
static cp_status get_bool(const cJSON *root, const char *key, int dflt, int *out,
                          const char *path, cp_error *err)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!item || cJSON_IsNull(item)) {
        *out = dflt;
        return CP_OK;
    }
    if (!cJSON_IsBool(item))
        return cp_error_set(err, CP_ERR_INPUT, "%s: key \"%s\" must be true or false", path, key);
    *out = cJSON_IsTrue(item);
    return CP_OK;
}

static cp_status parse_model_type(const cJSON *root, cp_model_config *cfg, const char *path,
                                  cp_error *err)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(root, "model_type");
    if (!cJSON_IsString(item))
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: missing string key \"model_type\"; supported: gpt2, llama, "
                            "mistral, qwen2",
                            path);
    for (size_t i = 0; i < sizeof supported_types / sizeof *supported_types; i++) {
        if (strcmp(item->valuestring, supported_types[i]) == 0) {
            snprintf(cfg->model_type, sizeof cfg->model_type, "%s", supported_types[i]);
            return CP_OK;
        }
    }
    return cp_error_set(err, CP_ERR_INPUT,
                        "%s: model_type \"%.64s\" is not supported; supported: gpt2, llama, "
                        "mistral, qwen2",
                        path, item->valuestring);
}

/* eos_token_id is an integer or, in Llama 3 configs, a list of integers. */
static cp_status parse_eos(const cJSON *root, cp_model_config *cfg, const char *path,
                           cp_error *err)
{
    const cJSON *item = cJSON_GetObjectItemCaseSensitive(root, "eos_token_id");
    cfg->n_eos_ids = 0;
    if (!item || cJSON_IsNull(item))
        return CP_OK;
    if (cJSON_IsNumber(item)) {
        cfg->eos_ids[cfg->n_eos_ids++] = item->valueint;
        return CP_OK;
    }
    const cJSON *el;
    if (!cJSON_IsArray(item))
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: key \"eos_token_id\" must be an integer or a list of integers",
                            path);
    cJSON_ArrayForEach(el, item)
    {
        if (!cJSON_IsNumber(el) || cfg->n_eos_ids == CP_MAX_EOS_IDS)
            return cp_error_set(err, CP_ERR_INPUT,
                                "%s: key \"eos_token_id\" must list at most %d integers", path,
                                CP_MAX_EOS_IDS);
        cfg->eos_ids[cfg->n_eos_ids++] = el->valueint;
    }
    return CP_OK;
}

static cp_status parse_rope_scaling(const cJSON *root, cp_model_config *cfg, const char *path,
                                    cp_error *err)
{
    const cJSON *rs = cJSON_GetObjectItemCaseSensitive(root, "rope_scaling");
    cfg->rope_scaling = CP_ROPE_SCALING_NONE;
    if (!rs || cJSON_IsNull(rs))
        return CP_OK;
    if (!cJSON_IsObject(rs))
        return cp_error_set(err, CP_ERR_INPUT, "%s: key \"rope_scaling\" must be an object or null",
                            path);

    /* Newer configs name the key rope_type, older ones type. */
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(rs, "rope_type");
    if (!type)
        type = cJSON_GetObjectItemCaseSensitive(rs, "type");
    if (!cJSON_IsString(type))
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: rope_scaling has no string \"rope_type\" (or \"type\")", path);

    cp_status st;
    char where[600]; /* messages read "config.json: rope_scaling: ..." */
    snprintf(where, sizeof where, "%s: rope_scaling", path);
    const char *t = type->valuestring;
    if (strcmp(t, "default") == 0)
        return CP_OK;
    if (strcmp(t, "linear") == 0) {
        cfg->rope_scaling = CP_ROPE_SCALING_LINEAR;
    } else if (strcmp(t, "llama3") == 0) {
        cfg->rope_scaling = CP_ROPE_SCALING_LLAMA3;
        if ((st = get_float(rs, "low_freq_factor", 1, 0, &cfg->rope_low_freq_factor, where,
                            err)) ||
            (st = get_float(rs, "high_freq_factor", 1, 0, &cfg->rope_high_freq_factor, where,
                            err)) ||
            (st = get_int(rs, "original_max_position_embeddings", 1, 0,
                          &cfg->rope_original_max_position, where, err)))
            return st;
        if (cfg->rope_high_freq_factor <= cfg->rope_low_freq_factor ||
            cfg->rope_original_max_position <= 0)
            return cp_error_set(err, CP_ERR_INPUT,
                                "%s: rope_scaling llama3 needs high_freq_factor > low_freq_factor "
                                "and original_max_position_embeddings > 0",
                                path);
    } else {
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: rope_scaling type \"%.64s\" is not supported; supported: "
                            "linear, llama3",
                            path, t);
    }
    if ((st = get_float(rs, "factor", 1, 0, &cfg->rope_factor, where, err)))
        return st;
    if (cfg->rope_factor <= 0)
        return cp_error_set(err, CP_ERR_INPUT, "%s: rope_scaling factor must be positive", path);
    return CP_OK;
}

/* Bias terms and the sliding window, which depend on the model type, as in
 * transformers: Qwen2 gives q, k and v a bias, Llama's attention_bias adds
 * one to all four attention projections and mlp_bias to the MLP's three.
 * Only Mistral applies sliding_window (Llama has none; Qwen2 only with
 * use_sliding_window, which is not implemented). */
static cp_status parse_type_specific(const cJSON *root, cp_model_config *cfg, const char *path,
                                     cp_error *err)
{
    cp_status st;
    int attention_bias = 0, mlp_bias = 0, use_sliding_window = 0;
    if ((st = get_bool(root, "attention_bias", 0, &attention_bias, path, err)) ||
        (st = get_bool(root, "mlp_bias", 0, &mlp_bias, path, err)) ||
        (st = get_bool(root, "use_sliding_window", 0, &use_sliding_window, path, err)))
        return st;
    int qwen2 = strcmp(cfg->model_type, "qwen2") == 0;
    cfg->qkv_bias = qwen2 || attention_bias;
    cfg->o_bias = !qwen2 && attention_bias;
    cfg->mlp_bias = !qwen2 && mlp_bias;
    if (qwen2 && use_sliding_window)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: \"use_sliding_window\": true is not supported for qwen2", path);
    if (strcmp(cfg->model_type, "mistral") != 0)
        cfg->sliding_window = 0;
    return CP_OK;
}

/* Rejects keys whose non-default values would change the math. */
static cp_status reject_unsupported(const cJSON *root, const char *path, cp_error *err)
{
    const cJSON *act = cJSON_GetObjectItemCaseSensitive(root, "hidden_act");
    if (act && (!cJSON_IsString(act) || strcmp(act->valuestring, "silu") != 0))
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: hidden_act \"%.64s\" is not supported; supported: silu", path,
                            cJSON_IsString(act) ? act->valuestring : "(not a string)");
    return CP_OK;
}

/* Checks the sizes against each other. */
static cp_status check_shapes(const cp_model_config *c, const char *path, cp_error *err)
{
    struct {
        const char *key;
        int value;
    } positive[] = {
        {"hidden_size", c->hidden_size},
        {"intermediate_size", c->intermediate_size},
        {"num_hidden_layers", c->n_layers},
        {"num_attention_heads", c->n_heads},
        {"num_key_value_heads", c->n_kv_heads},
        {"head_dim", c->head_dim},
        {"vocab_size", c->vocab_size},
        {"max_position_embeddings", c->max_position_embeddings},
    };
    for (size_t i = 0; i < sizeof positive / sizeof *positive; i++)
        if (positive[i].value <= 0)
            return cp_error_set(err, CP_ERR_INPUT, "%s: \"%s\" must be positive, found %d", path,
                                positive[i].key, positive[i].value);
    if (c->n_heads % c->n_kv_heads != 0)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: num_attention_heads (%d) must be a multiple of "
                            "num_key_value_heads (%d)",
                            path, c->n_heads, c->n_kv_heads);
    if (c->head_dim % 2 != 0)
        return cp_error_set(err, CP_ERR_INPUT, "%s: head_dim (%d) must be even for RoPE", path,
                            c->head_dim);
    if (!(c->rms_norm_eps > 0) || !(c->rope_theta > 0))
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: rms_norm_eps and rope_theta must be positive", path);
    if (c->sliding_window < 0)
        return cp_error_set(err, CP_ERR_INPUT, "%s: sliding_window must be positive or null",
                            path);
    if (c->bos_id >= c->vocab_size)
        return cp_error_set(err, CP_ERR_INPUT, "%s: bos_token_id %d is outside vocab_size %d",
                            path, c->bos_id, c->vocab_size);
    for (int i = 0; i < c->n_eos_ids; i++)
        if (c->eos_ids[i] < 0 || c->eos_ids[i] >= c->vocab_size)
            return cp_error_set(err, CP_ERR_INPUT,
                                "%s: eos_token_id %d is outside vocab_size %d", path,
                                c->eos_ids[i], c->vocab_size);
    return CP_OK;
}

/* GPT-2's own key names (GPT2Config in transformers): LayerNorm, learned
 * positions, the tanh GELU, a fused q/k/v Conv1D and biases everywhere. */
static cp_status parse_gpt2(const cJSON *root, cp_model_config *cfg, const char *path,
                            cp_error *err)
{
    cp_status st;
    int inner = 0;
    if ((st = get_int(root, "n_embd", 1, 0, &cfg->hidden_size, path, err)) ||
        (st = get_int(root, "n_layer", 1, 0, &cfg->n_layers, path, err)) ||
        (st = get_int(root, "n_head", 1, 0, &cfg->n_heads, path, err)) ||
        (st = get_int(root, "vocab_size", 1, 0, &cfg->vocab_size, path, err)) ||
        (st = get_int(root, "n_positions", 0, 1024, &cfg->max_position_embeddings, path, err)) ||
        (st = get_int(root, "n_inner", 0, 0, &inner, path, err)) ||
        (st = get_float(root, "layer_norm_epsilon", 0, 1e-5f, &cfg->rms_norm_eps, path, err)) ||
        (st = get_bool(root, "tie_word_embeddings", 1, &cfg->tie_word_embeddings, path, err)) ||
        (st = get_int(root, "bos_token_id", 0, 50256, &cfg->bos_id, path, err)) ||
        (st = parse_eos(root, cfg, path, err)))
        return st;

    const cJSON *act = cJSON_GetObjectItemCaseSensitive(root, "activation_function");
    if (act && (!cJSON_IsString(act) || (strcmp(act->valuestring, "gelu_new") != 0 &&
                                         strcmp(act->valuestring, "gelu_pytorch_tanh") != 0)))
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: activation_function \"%.64s\" is not supported; supported: "
                            "gelu_new, gelu_pytorch_tanh",
                            path, cJSON_IsString(act) ? act->valuestring : "(not a string)");
    static const char *const changes_math[] = {"scale_attn_by_inverse_layer_idx",
                                               "add_cross_attention"};
    for (size_t i = 0; i < 2; i++)
        if (cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(root, changes_math[i])))
            return cp_error_set(err, CP_ERR_INPUT, "%s: \"%s\": true is not supported", path,
                                changes_math[i]);
    if (cJSON_IsFalse(cJSON_GetObjectItemCaseSensitive(root, "scale_attn_weights")))
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: \"scale_attn_weights\": false is not supported", path);

    if (cfg->n_eos_ids == 0)
        cfg->eos_ids[cfg->n_eos_ids++] = 50256;
    cfg->n_kv_heads = cfg->n_heads;
    cfg->head_dim = cfg->n_heads > 0 ? cfg->hidden_size / cfg->n_heads : 0;
    cfg->intermediate_size = inner > 0 ? inner : 4 * cfg->hidden_size;
    cfg->rope_theta = 10000.0f; /* unused: GPT-2 has no RoPE */
    cfg->norm = CP_NORM_LAYER;
    cfg->mlp = CP_MLP_GELU_TANH;
    cfg->use_rope = 0;
    cfg->fused_qkv = 1;
    cfg->conv1d = 1;
    cfg->qkv_bias = cfg->o_bias = cfg->mlp_bias = 1;
    if (cfg->n_heads > 0 && cfg->hidden_size % cfg->n_heads != 0)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: n_embd (%d) is not a multiple of n_head (%d)", path,
                            cfg->hidden_size, cfg->n_heads);
    return check_shapes(cfg, path, err);
}

static cp_status parse_fields(const cJSON *root, cp_model_config *cfg, const char *path,
                              cp_error *err)
{
    cp_status st;
    if ((st = parse_model_type(root, cfg, path, err)))
        return st;
    if (strcmp(cfg->model_type, "gpt2") == 0)
        return parse_gpt2(root, cfg, path, err);
    cfg->use_rope = 1;
    if ((st = parse_model_type(root, cfg, path, err)) ||
        (st = get_int(root, "hidden_size", 1, 0, &cfg->hidden_size, path, err)) ||
        (st = get_int(root, "intermediate_size", 1, 0, &cfg->intermediate_size, path, err)) ||
        (st = get_int(root, "num_hidden_layers", 1, 0, &cfg->n_layers, path, err)) ||
        (st = get_int(root, "num_attention_heads", 1, 0, &cfg->n_heads, path, err)) ||
        (st = get_int(root, "vocab_size", 1, 0, &cfg->vocab_size, path, err)) ||
        (st = get_int(root, "max_position_embeddings", 0, 2048, &cfg->max_position_embeddings,
                      path, err)) ||
        (st = get_int(root, "num_key_value_heads", 0, cfg->n_heads, &cfg->n_kv_heads, path,
                      err)) ||
        (st = get_float(root, "rms_norm_eps", 0, 1e-6f, &cfg->rms_norm_eps, path, err)) ||
        (st = get_float(root, "rope_theta", 0, 10000.0f, &cfg->rope_theta, path, err)) ||
        (st = get_bool(root, "tie_word_embeddings", 0, &cfg->tie_word_embeddings, path, err)) ||
        (st = get_int(root, "bos_token_id", 0, -1, &cfg->bos_id, path, err)) ||
        (st = get_int(root, "sliding_window", 0, 0, &cfg->sliding_window, path, err)) ||
        (st = parse_eos(root, cfg, path, err)) || (st = parse_rope_scaling(root, cfg, path, err)) ||
        (st = parse_type_specific(root, cfg, path, err)) ||
        (st = reject_unsupported(root, path, err)))
        return st;

    int default_head_dim = cfg->n_heads > 0 ? cfg->hidden_size / cfg->n_heads : 0;
    if ((st = get_int(root, "head_dim", 0, default_head_dim, &cfg->head_dim, path, err)))
        return st;
    if (!cJSON_GetObjectItemCaseSensitive(root, "head_dim") && cfg->n_heads > 0 &&
        cfg->hidden_size % cfg->n_heads != 0)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: hidden_size (%d) is not a multiple of num_attention_heads (%d) "
                            "and no head_dim is given",
                            path, cfg->hidden_size, cfg->n_heads);
    return check_shapes(cfg, path, err);
}

cp_status cp_config_parse(const char *json, const char *path, cp_model_config *cfg,
                          cp_error *err)
{
    memset(cfg, 0, sizeof *cfg);
    cJSON *root = cJSON_Parse(json);
    if (!root) {
        const char *where = cJSON_GetErrorPtr();
        long offset = where ? (long)(where - json) : -1;
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: byte %ld: invalid JSON; expected a Hugging Face config.json", path,
                            offset);
    }
    cp_status st = CP_OK;
    if (!cJSON_IsObject(root))
        st = cp_error_set(err, CP_ERR_INPUT, "%s: expected a JSON object at the top level", path);
    else
        st = parse_fields(root, cfg, path, err);
    cJSON_Delete(root);
    return st;
}

cp_status cp_config_load(const char *path, cp_model_config *cfg, cp_error *err)
{
    char *text = NULL;
    cp_status st = cp_file_read(path, &text, NULL, err);
    if (st != CP_OK)
        return st;
    st = cp_config_parse(text, path, cfg, err);
    free(text);
    return st;
}
