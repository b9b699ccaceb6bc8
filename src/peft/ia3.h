/*
 * (IA)³: a learned vector per adapted projection, initialized to ones, that
 * scales the projection's output, y = (x Wᵀ + b) ⊙ l, or for a feed-forward
 * module its input, y = (x ⊙ l) Wᵀ + b, as Hugging Face PEFT defines it.
 *
 * The module owns its vectors, their gradients, and the activations its
 * backward pass needs (each output-scaled projection's unscaled output).
 * ia3_io.c reads and writes PEFT's adapter_config.json and
 * adapter_model.safetensors (tensors named ...k_proj.ia3_l).
 */
#ifndef CP_IA3_H
#define CP_IA3_H

#include <stddef.h>

#include "io/hf_config.h"
#include "model/projection.h"

typedef struct cp_ia3 {
    cp_model_config cfg;  /* the base model's, for names and shapes */
    unsigned targets;     /* bit mask of (1 << cp_proj): the adapted projections */
    unsigned feedforward; /* the targets whose input is scaled; the others scale their output */
    int n_layers;
    float **vec;          /* (n_layers, CP_PROJ_COUNT) each target's vector: (in) for a
                           * feed-forward target, else (out); NULL elsewhere */
    float **grad;         /* their gradients, same layout */
    float *weights;       /* every vector, one allocation of n_weights */
    float *grads;
    size_t n_weights;

    /* Activations, sized by cp_ia3_reserve. */
    int training;         /* 1: the forward keeps what cp_ia3_output_backward needs */
    int max_rows;         /* rows (B * T) the saved outputs hold */
    float *saved;         /* each output-scaled slot's unscaled output (max_rows, out) */
    size_t *saved_offset; /* (n_layers, CP_PROJ_COUNT) offsets into saved */
    float *scaled_input;  /* (scratch_rows, widest feed-forward input) */
    int scratch_rows;
} cp_ia3;

/* PEFT's default targets and feed-forward modules for the architecture
 * (peft/utils/constants.py, 2025): llama and mistral k_proj, v_proj,
 * down_proj; qwen2 q_proj, v_proj, down_proj; gpt2 c_attn, mlp.c_proj. The
 * feed-forward module is down_proj (GPT-2: mlp.c_proj). */
unsigned cp_ia3_default_targets(const cp_model_config *cfg);
unsigned cp_ia3_default_feedforward(const cp_model_config *cfg);

/* Creates the vectors, all ones, for the targets of a model config; the
 * feed-forward mask is reduced to the targets. Release with cp_ia3_free. */
cp_status cp_ia3_init(cp_ia3 *ia3, const cp_model_config *cfg, unsigned targets,
                      unsigned feedforward, cp_error *err);
void cp_ia3_free(cp_ia3 *ia3);

/* Sizes the activation buffers for passes of up to rows rows; training
 * passes also keep the unscaled outputs. */
cp_status cp_ia3_reserve(cp_ia3 *ia3, int rows, int training, cp_error *err);

/* The vector of (layer, p) and its length, or NULL and 0 for a non-target. */
float *cp_ia3_vector(const cp_ia3 *ia3, int layer, cp_proj p, int *len);

/* out (N, out) *= l for an output-scaled target; a no-op elsewhere. */
void cp_ia3_scale_output(cp_ia3 *ia3, int layer, cp_proj p, float *out, int N);

/* Backward of cp_ia3_scale_output: accumulates dl and turns dout (N, out)
 * into the gradient of the unscaled output, in place. */
void cp_ia3_output_backward(cp_ia3 *ia3, int layer, cp_proj p, float *dout, int N);

/* Returns x ⊙ l (N, in) for a feed-forward target, or x itself elsewhere. */
const float *cp_ia3_scale_input(cp_ia3 *ia3, int layer, cp_proj p, const float *x, int N);

/* Backward of cp_ia3_scale_input: dxin (N, in) is the gradient of the input
 * the product used; adds the gradient of x to dx and accumulates dl. */
void cp_ia3_input_backward(cp_ia3 *ia3, int layer, cp_proj p, float *dx, const float *dxin,
                           const float *x, int N);

/* PEFT's name of one vector, e.g.
 * base_model.model.model.layers.0.self_attn.k_proj.ia3_l, or for GPT-2
 * base_model.model.transformer.h.0.attn.c_attn.ia3_l. */
void cp_ia3_tensor_name(const cp_model_config *cfg, char *buf, size_t size, int layer, cp_proj p);

/* Writes adapter_config.json and adapter_model.safetensors into dir (which
 * exists), each atomically. */
cp_status cp_ia3_save(const cp_ia3 *ia3, const char *dir, const char *base_model, cp_error *err);

/* Reads the IA3 adapter in dir for a model of config cfg into a fresh ia3. */
cp_status cp_ia3_load(cp_ia3 *ia3, const char *dir, const cp_model_config *cfg, cp_error *err);

#endif
