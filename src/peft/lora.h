/*
 * LoRA: a trainable low-rank update beside a frozen linear projection,
 * y = W x + scaling · B A dropout(x), with A (r, in) Kaiming-uniform,
 * B (out, r) zero at initialization, and scaling alpha / r (alpha / sqrt(r)
 * with rsLoRA), as Hugging Face PEFT defines it.
 *
 * The module owns its parameters, their gradients, and the activations its
 * backward pass needs (the low-rank projection h = A x and the dropout mask
 * of each adapted projection). DoRA is not implemented yet.
 */
#ifndef CP_LORA_H
#define CP_LORA_H

#include <stdint.h>

#include "core/rng.h"
#include "io/hf_config.h"
#include "model/projection.h"

typedef struct cp_lora_params {
    int r;
    float alpha;
    float dropout;      /* probability of zeroing an input element, in [0, 1) */
    int use_rslora;     /* scaling alpha / sqrt(r) instead of alpha / r */
    int use_dora;       /* weight-decomposed LoRA: a learned magnitude per output row */
    unsigned targets;   /* bit mask of (1 << cp_proj); cp_proj_parse_list builds it */
    uint64_t seed;      /* initialization and dropout */
} cp_lora_params;

cp_lora_params cp_lora_default_params(void);

/* The adapter of one (layer, projection) pair; A and B are NULL when the
 * projection is not a target. */
typedef struct cp_lora_slot {
    float *A, *B;   /* (r, in), (out, r) */
    float *dA, *dB; /* gradients, same shapes */
    int in, out;
} cp_lora_slot;

typedef struct cp_lora {
    cp_model_config cfg; /* the base model's, for names and shapes */
    cp_lora_params params;
    float scaling;
    int n_layers;
    cp_lora_slot *slots; /* (n_layers, CP_PROJ_COUNT) */
    float *weights;      /* every A and B, one allocation of n_weights */
    float *grads;        /* their gradients, same layout */
    size_t n_weights;

    /* Activations for the backward pass, sized by cp_lora_reserve. */
    int training;       /* 1: dropout on and h saved per slot */
    int max_rows;       /* rows (B * T) the buffers hold */
    float *h;           /* (n_layers, CP_PROJ_COUNT, max_rows, r), saved for backward */
    float *h_eval;      /* (eval_rows, r) scratch when not training */
    int eval_rows;
    uint8_t *keep;      /* dropout masks per slot (max_rows, in), or NULL without dropout */
    size_t keep_stride; /* bytes per slot in keep */
    float *scratch;     /* (max_rows, max in + r): dropped input or its gradient, then dh */
    cp_rng rng;
} cp_lora;

/* Creates the adapter for a model config: A Kaiming-uniform from the seed,
 * B zero. Release with cp_lora_free. */
cp_status cp_lora_init(cp_lora *lora, const cp_model_config *cfg, const cp_lora_params *p,
                       cp_error *err);
void cp_lora_free(cp_lora *lora);

/* Sizes the training buffers for passes of up to max_rows rows and turns
 * training on: dropout applies and the forward keeps what cp_lora_backward
 * needs. lora->training may be cleared and set again around evaluations. */
cp_status cp_lora_reserve(cp_lora *lora, int max_rows, cp_error *err);

/* Sizes the scratch of passes that are not training to at least rows rows. */
cp_status cp_lora_reserve_eval(cp_lora *lora, int rows, cp_error *err);

/* Adds scaling · B A dropout(x) to out (N, out) for x (N, in) at one slot.
 * A no-op for a slot that is not a target. */
void cp_lora_forward(cp_lora *lora, int layer, cp_proj p, float *out, const float *x, int N);

/* Backward of cp_lora_forward at one slot: accumulates (+=) dA and dB, and
 * dx (N, in) from dout (N, out). x is the same input the forward saw. */
void cp_lora_backward(cp_lora *lora, int layer, cp_proj p, float *dx, const float *dout,
                      const float *x, int N);

/* The slot of (layer, p). */
static inline cp_lora_slot *cp_lora_slot_at(const cp_lora *lora, int layer, cp_proj p)
{
    return &lora->slots[(size_t)layer * CP_PROJ_COUNT + p];
}

#endif
