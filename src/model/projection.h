/*
 * The linear projections of a decoder layer, named as Hugging Face names
 * them in Llama-family checkpoints and as PEFT's target_modules list them.
 */
#ifndef CP_PROJECTION_H
#define CP_PROJECTION_H

#include "io/hf_config.h"

/* The linear projections of a decoder layer, in PEFT's module names. */
typedef enum cp_proj {
    CP_PROJ_Q = 0,
    CP_PROJ_K,
    CP_PROJ_V,
    CP_PROJ_O,
    CP_PROJ_GATE,
    CP_PROJ_UP,
    CP_PROJ_DOWN,
    CP_PROJ_COUNT,
} cp_proj;

/* "q_proj", "k_proj", ... "down_proj". */
const char *cp_proj_name(cp_proj p);

/* Module path inside a layer, e.g. "self_attn.q_proj" or "mlp.down_proj". */
const char *cp_proj_path(cp_proj p);

/* Input and output widths of projection p under cfg. */
void cp_proj_shape(const cp_model_config *cfg, cp_proj p, int *in, int *out);

/* Parses "q_proj,v_proj" or "all-linear" into a bit mask of (1 << cp_proj). */
cp_status cp_proj_parse_list(const char *list, unsigned *mask, cp_error *err);

#endif
