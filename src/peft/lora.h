/*
 * LoRA: a trainable low-rank update beside a frozen linear projection,
 * y = W x + scaling · B A dropout(x), with A (r, in) Kaiming-uniform,
 * B (out, r) zero at initialization, and scaling alpha / r (alpha / sqrt(r)
 * with rsLoRA), as Hugging Face PEFT defines it.
 *
 * DoRA (weight-decomposed LoRA, PEFT's use_dora) adds a magnitude m (out)
 * per adapted projection, initialized to the row norms of W + scaling B A,
 * and outputs, with g = m / ||W + scaling B A|| per output feature,
 *     y = W x + b + (g - 1) W dropout(x) + g scaling B A dropout(x).
 * The norm is treated as a constant in the backward pass (PEFT and the DoRA
 * paper detach it), and the bias is not scaled. DoRA reads the frozen W, so
 * an adapter must be bound to its model (cp_lora_bind_model) before use.
 *
 * The module owns its parameters, their gradients, and the activations its
 * backward pass needs (the low-rank projection h = A x and the dropout mask
 * of each adapted projection; with DoRA also dropout(x) (W + scaling B A)ᵀ).
 */
#ifndef CP_LORA_H
#define CP_LORA_H

#include <stdint.h>

#include "core/rng.h"
#include "io/hf_config.h"
#include "model/projection.h"

struct cp_model;

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

    /* DoRA only, else NULL. */
    float *magnitude, *dmagnitude; /* (out) m and its gradient */
    float *weight_norm;   /* (out) ||W + scaling B A|| per row, as of the last forward */
    float *norm_of;       /* the A and B (r (in + out)) that weight_norm was computed from */
    float norm_scaling;   /* and the scaling */
    int norm_valid;       /* 1 once weight_norm has been computed */
    const float *w;       /* the frozen W: (out, in), or (in, out) when lora->base_in_out */
    const float *bias;    /* (out) the projection's bias, or NULL */
    float *y;             /* (max_rows, out) saved dropout(x) (W + scaling B A)ᵀ */
} cp_lora_slot;

typedef struct cp_lora {
    cp_model_config cfg; /* the base model's, for names and shapes */
    cp_lora_params params;
    float scaling;
    int n_layers;
    cp_lora_slot *slots; /* (n_layers, CP_PROJ_COUNT) */
    float *weights;      /* every A and B (and DoRA magnitude), one allocation of n_weights */
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

    /* DoRA state (params.use_dora). */
    int bound;            /* 1 once cp_lora_bind_model gave every slot its W */
    int base_in_out;      /* the bound model stores W (in, out) (GPT-2's Conv1D) */
    int norm_frozen;      /* 1: forwards reuse each slot's last weight_norm even after A or
                           * B changed (finite-difference checks of the detached norm) */
    float *norms;         /* every slot's weight_norm and norm_of, one allocation */
    float *dora_y;        /* every slot's y (training), one allocation */
    float *dora_rows;     /* (2, dora_rows_cap, max out) scratch: products or their gradients */
    int dora_rows_cap;    /* the rows each block of dora_rows has room for */
    float *norm_scratch;  /* (norm_threads, norm_stride) rows of W + scaling B A */
    int norm_threads;
    size_t norm_stride;   /* CP_LORA_NORM_ROWS · the widest slot input */
} cp_lora;

/* Rows of W + scaling B A that one thread forms at a time for the norm. */
#define CP_LORA_NORM_ROWS 32

/* Creates the adapter for a model config: A Kaiming-uniform from the seed,
 * B zero (and with DoRA, m zero until cp_lora_bind_model). Release with
 * cp_lora_free. */
cp_status cp_lora_init(cp_lora *lora, const cp_model_config *cfg, const cp_lora_params *p,
                       cp_error *err);
void cp_lora_free(cp_lora *lora);

/* DoRA: points every adapted slot at model m's frozen W and bias, which must
 * outlive the adapter, and with init_magnitude sets m to the row norms of
 * W + scaling B A, as PEFT initializes it. A no-op without use_dora. Fails
 * for a model of another shape or with NF4 weights. */
cp_status cp_lora_bind_model(cp_lora *lora, const struct cp_model *m, int init_magnitude,
                             cp_error *err);

/* Sizes the training buffers for passes of up to max_rows rows and turns
 * training on: dropout applies and the forward keeps what cp_lora_backward
 * needs. lora->training may be cleared and set again around evaluations. */
cp_status cp_lora_reserve(cp_lora *lora, int max_rows, cp_error *err);

/* Sizes the scratch of passes that are not training to at least rows rows. */
cp_status cp_lora_reserve_eval(cp_lora *lora, int rows, cp_error *err);

/* Adds scaling · B A dropout(x) to out (N, out) for x (N, in) at one slot,
 * or with DoRA the terms in g above to out = x Wᵀ + b. A no-op for a slot
 * that is not a target. */
void cp_lora_forward(cp_lora *lora, int layer, cp_proj p, float *out, const float *x, int N);

/* Backward of cp_lora_forward at one slot: accumulates (+=) dA and dB, and
 * dx (N, in) from dout (N, out). x is the same input the forward saw. With
 * DoRA it also accumulates dm, and rewrites dout into the gradient of
 * x Wᵀ + b (the caller passes a copy). */
void cp_lora_backward(cp_lora *lora, int layer, cp_proj p, float *dx, float *dout,
                      const float *x, int N);

/* The slot of (layer, p). */
static inline cp_lora_slot *cp_lora_slot_at(const cp_lora *lora, int layer, cp_proj p)
{
    return &lora->slots[(size_t)layer * CP_PROJ_COUNT + p];
}

#endif
