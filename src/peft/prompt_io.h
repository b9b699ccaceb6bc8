/*
 * PEFT's prompt-learning adapters on disk, shared by prompt tuning
 * (peft_type PROMPT_TUNING) and prefix tuning (PREFIX_TUNING): a flat
 * adapter_config.json and one tensor, prompt_embeddings, in
 * adapter_model.safetensors.
 *
 * Only causal language models with one transformer stack are read
 * (task_type CAUSAL_LM, num_transformer_submodules 1); encoder-decoder
 * configurations are rejected by name.
 */
#ifndef CP_PROMPT_IO_H
#define CP_PROMPT_IO_H

#include "core/error.h"
#include "core/rng.h"
#include "io/hf_config.h"

/* The fields of a prompt-learning adapter_config.json that cpeft uses. A
 * count of 0 means the key was missing or null. */
typedef struct cp_prompt_config {
    const char *peft_type;   /* "PROMPT_TUNING" or "PREFIX_TUNING" */
    int n_virtual_tokens;
    int token_dim;           /* prompt: hidden size; prefix: KVH * head_dim per layer */
    int num_attention_heads; /* prefix: KVH, the heads the prefixes are sized by */
    int num_layers;
    const char *init;        /* prompt tuning: "RANDOM", "SAMPLE_VOCAB" or "TEXT"; not loaded */
    const char *init_text;   /* prompt tuning: the TEXT init's text, or NULL; not loaded */
    int prefix_projection;   /* prefix tuning: trained through an MLP */
    int encoder_hidden_size; /* prefix tuning: that MLP's hidden size */
} cp_prompt_config;

/* Writes c as dir/adapter_config.json, atomically, with base_model as
 * base_model_name_or_path. */
cp_status cp_prompt_config_save(const cp_prompt_config *c, const char *dir,
                                const char *base_model, cp_error *err);

/* Parses adapter_config.json's text (read from path, for messages) into c,
 * requiring c->peft_type, which the caller sets. Checks the counts against
 * the base model cfg: num_layers, and the head size token_dim /
 * num_attention_heads. */
cp_status cp_prompt_config_parse(const char *text, const char *path, const cp_model_config *cfg,
                                 cp_prompt_config *c, cp_error *err);

/* Reads dir/adapter_config.json into c as cp_prompt_config_parse does. */
cp_status cp_prompt_config_load(const char *dir, const cp_model_config *cfg,
                                cp_prompt_config *c, cp_error *err);

/* Writes data (rows, cols) as the F32 tensor prompt_embeddings into
 * dir/adapter_model.safetensors, atomically. */
cp_status cp_prompt_embeddings_save(const char *dir, const float *data, int rows, int cols,
                                    cp_error *err);

/* Reads prompt_embeddings (rows, cols; F32, F16 or BF16) from
 * dir/adapter_model.safetensors into dst, rejecting any other tensor. */
cp_status cp_prompt_embeddings_load(const char *dir, float *dst, int rows, int cols,
                                    cp_error *err);

/* Fills x (n) from the standard normal distribution (Box-Muller over rng),
 * as torch.nn.Embedding initializes its weight. */
void cp_prompt_fill_normal(float *x, size_t n, cp_rng *rng);

#endif
