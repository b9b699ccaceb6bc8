/*
 * Hugging Face `config.json` for decoder-only models.
 *
 * Supported model_type values: gpt2, llama, mistral, qwen2; all four are
 * settings of one decoder (the switches below). Every setting that changes the
 * computation and that cpeft does not implement (another rope_scaling type,
 * attention biases, another activation) is an error naming the key and value,
 * so a checkpoint never runs with silently different math.
 */
#ifndef CP_HF_CONFIG_H
#define CP_HF_CONFIG_H

#include "core/error.h"

typedef enum cp_rope_scaling {
    CP_ROPE_SCALING_NONE = 0,
    CP_ROPE_SCALING_LINEAR,
    CP_ROPE_SCALING_LLAMA3,
} cp_rope_scaling;

#define CP_MAX_EOS_IDS 8

typedef enum cp_norm_kind {
    CP_NORM_RMS = 0, /* RMSNorm, weight only (Llama family) */
    CP_NORM_LAYER,   /* LayerNorm with weight and bias (GPT-2) */
} cp_norm_kind;

typedef enum cp_mlp_kind {
    CP_MLP_SWIGLU = 0, /* down(silu(gate(x)) * up(x)) */
    CP_MLP_GELU_TANH,  /* down(gelu_tanh(up(x))), GPT-2's c_fc and c_proj */
} cp_mlp_kind;

typedef struct cp_model_config {
    char model_type[32];
    int hidden_size;       /* C */
    int intermediate_size; /* F, the MLP width */
    int n_layers;
    int n_heads;
    int n_kv_heads;
    int head_dim;          /* from config when given, else C / n_heads */
    int vocab_size;        /* V */
    int max_position_embeddings;
    float rms_norm_eps;
    float rope_theta;
    int tie_word_embeddings;
    int bos_id;            /* -1 if the config names none */
    int eos_ids[CP_MAX_EOS_IDS];
    int n_eos_ids;
    int sliding_window;    /* 0: full causal attention (always for llama and qwen2) */
    int qkv_bias;          /* q, k and v projections have biases (qwen2, attention_bias) */
    int o_bias;            /* o_proj has a bias (llama's attention_bias) */
    int mlp_bias;          /* gate, up and down have biases (llama's mlp_bias) */

    /* Architecture switches: Llama, Mistral and Qwen2 use the defaults. */
    cp_norm_kind norm;
    cp_mlp_kind mlp;
    int use_rope;          /* 0: learned absolute positions (GPT-2's wpe) */
    int fused_qkv;         /* one q/k/v projection (GPT-2's c_attn) */
    int conv1d;            /* linear weights stored (in, out), GPT-2's Conv1D */

    cp_rope_scaling rope_scaling;
    float rope_factor;
    float rope_low_freq_factor;  /* llama3 only */
    float rope_high_freq_factor; /* llama3 only */
    int rope_original_max_position; /* llama3 only */
} cp_model_config;

/* Parses and validates config.json at path. */
cp_status cp_config_load(const char *path, cp_model_config *cfg, cp_error *err);

/* Parses and validates config text; path is used in messages only. */
cp_status cp_config_parse(const char *json, const char *path, cp_model_config *cfg,
                          cp_error *err);

#endif
