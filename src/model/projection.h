/*
 * The linear projections of a decoder layer, named as Hugging Face names
 * them in each architecture's checkpoints and as PEFT's target_modules list
 * them. Llama, Mistral and Qwen2 have seven (q, k, v, o, gate, up, down);
 * GPT-2 has four (a fused q/k/v c_attn, c_proj, c_fc and the MLP's c_proj).
 */
#ifndef CP_PROJECTION_H
#define CP_PROJECTION_H

#include "io/hf_config.h"

typedef enum cp_proj {
    CP_PROJ_Q = 0,
    CP_PROJ_K,
    CP_PROJ_V,
    CP_PROJ_O,
    CP_PROJ_GATE,
    CP_PROJ_UP,
    CP_PROJ_DOWN,
    CP_PROJ_QKV, /* q, k and v in one product (GPT-2's c_attn) */
    CP_PROJ_COUNT,
} cp_proj;

/* Returns 1 if layers of this architecture have projection p. */
int cp_proj_exists(const cp_model_config *cfg, cp_proj p);

/* PEFT's module name: "q_proj" ... "down_proj", or GPT-2's "c_attn", "c_proj", "c_fc". */
const char *cp_proj_name(const cp_model_config *cfg, cp_proj p);

/* Module path inside a layer, e.g. "self_attn.q_proj" or GPT-2's "attn.c_attn". */
const char *cp_proj_path(const cp_model_config *cfg, cp_proj p);

/* Input and output widths of projection p under cfg. */
void cp_proj_shape(const cp_model_config *cfg, cp_proj p, int *in, int *out);

/* Parses module names ("q_proj,v_proj"; for GPT-2 "c_attn,c_proj", where
 * c_proj names both c_proj modules) or "all-linear" into a bit mask of
 * (1 << cp_proj). A name the architecture does not have is an error. */
cp_status cp_proj_parse_list(const cp_model_config *cfg, const char *list, unsigned *mask,
                             cp_error *err);

/* The bit mask of every projection the architecture has. */
unsigned cp_proj_all(const cp_model_config *cfg);

#endif
