/*
 * Decoder settings from a GGUF file's metadata, for the architectures
 * llama.cpp calls llama (Llama, Mistral, TinyLlama, SmolLM), qwen2 and gpt2.
 */
#ifndef CP_GGUF_CONFIG_H
#define CP_GGUF_CONFIG_H

#include "io/gguf.h"
#include "io/hf_config.h"

/* Fills cfg from g's metadata and the shape of token_embd.weight (the
 * vocabulary size). Biases follow the tensors the file holds; the head is
 * tied when output.weight is absent. Unknown architectures and RoPE
 * settings cpeft does not implement are CP_ERR_INPUT naming the key. */
cp_status cp_config_from_gguf(const cp_gguf *g, const char *path, cp_model_config *cfg,
                              cp_error *err);

#endif
