/*
 * Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020): a small
 * MLP on a sublayer's output before the residual add,
 *     out = h + up(act(down(h) + b_down)) + b_up,
 * where h is the attention output projection's result (o_proj, GPT-2's
 * attn.c_proj) or the MLP's (down_proj, mlp.c_proj). "houlsby" adapts both
 * sublayers, "pfeiffer" only the MLP. down is (C / reduction_factor, C) and
 * starts Kaiming-uniform, up starts at zero, so the adapted model starts as
 * the base (AdapterHub's "mam_adapter" initialization).
 *
 * NOTE: AdapterHub's own Pfeiffer configuration (original_ln_before true)
 * feeds the adapter h plus the residual stream. cpeft's "pfeiffer" feeds it
 * h alone, so it writes original_ln_before false to describe that.
 *
 * bottleneck_io.c writes AdapterHub's layout: adapter_config.json and
 * adapter.safetensors (safetensors, never a pickle).
 */
#ifndef CP_BOTTLENECK_H
#define CP_BOTTLENECK_H

#include <stddef.h>

#include "core/rng.h"
#include "io/hf_config.h"

typedef enum cp_bn_activation {
    CP_BN_RELU = 0,
    CP_BN_SWISH, /* x · sigmoid(x), transformers' "swish" */
    CP_BN_GELU,  /* the exact x · Φ(x), transformers' "gelu" */
} cp_bn_activation;

/* The two places an adapter can sit in a layer. */
typedef enum cp_bn_site {
    CP_BN_SITE_ATTENTION = 0, /* after the attention output projection: "mh_adapter" */
    CP_BN_SITE_OUTPUT,        /* after the MLP's down projection: "output_adapter" */
    CP_BN_SITE_COUNT,
} cp_bn_site;

/* One adapter's weights; all NULL where the site has none. */
typedef struct cp_bn_slot {
    float *down, *down_bias; /* (R, C), (R) */
    float *up, *up_bias;     /* (C, R), (C) */
    float *d_down, *d_down_bias, *d_up, *d_up_bias;
} cp_bn_slot;

typedef struct cp_bottleneck {
    cp_model_config cfg;
    int sites[CP_BN_SITE_COUNT]; /* 1 where the layers have an adapter */
    int reduction_factor;
    int R;                       /* the bottleneck width, C / reduction_factor */
    cp_bn_activation act;
    int n_layers;
    cp_bn_slot *slots;           /* (n_layers, CP_BN_SITE_COUNT) */
    float *weights, *grads;      /* one allocation each, n_weights */
    size_t n_weights;

    /* Activations, sized by cp_bottleneck_reserve. */
    int training;
    int max_rows;  /* rows (B * T) the saved activations hold */
    float *saved;  /* per adapted slot: h (max_rows, C), then z = down(h) + b (max_rows, R) */
    float *scratch; /* (scratch_rows, 2 R + C): z, act(z) or their gradients, and up's output */
    int scratch_rows;
} cp_bottleneck;

/* Parses "houlsby" or "pfeiffer", "relu", "swish" or "gelu" (CP_ERR_INPUT
 * naming the option otherwise). */
cp_status cp_bottleneck_parse_config(const char *name, int sites[CP_BN_SITE_COUNT],
                                     cp_error *err);
cp_status cp_bottleneck_parse_activation(const char *name, cp_bn_activation *act, cp_error *err);
const char *cp_bottleneck_activation_name(cp_bn_activation act);

/* Creates the adapters of a model config, down from the seed and up zero.
 * Release with cp_bottleneck_free. */
cp_status cp_bottleneck_init(cp_bottleneck *bn, const cp_model_config *cfg,
                             const int sites[CP_BN_SITE_COUNT], int reduction_factor,
                             cp_bn_activation act, uint64_t seed, cp_error *err);
void cp_bottleneck_free(cp_bottleneck *bn);

cp_status cp_bottleneck_reserve(cp_bottleneck *bn, int rows, int training, cp_error *err);

static inline cp_bn_slot *cp_bottleneck_slot(const cp_bottleneck *bn, int layer, cp_bn_site s)
{
    return &bn->slots[(size_t)layer * CP_BN_SITE_COUNT + s];
}

/* out (N, C) = h + up(act(down(h) + b_down)) + b_up, in place, at one site. */
void cp_bottleneck_forward(cp_bottleneck *bn, int layer, cp_bn_site s, float *out, int N);

/* Backward of cp_bottleneck_forward: accumulates the weight gradients and
 * turns dout (N, C) into the gradient of h, in place. */
void cp_bottleneck_backward(cp_bottleneck *bn, int layer, cp_bn_site s, float *dout, int N);

/* AdapterHub's name of one tensor of a slot: which is "adapter_down.0.weight",
 * "adapter_down.0.bias", "adapter_up.weight" or "adapter_up.bias", e.g.
 * model.layers.0.attention_adapters.adapters.default.adapter_up.weight. */
void cp_bottleneck_tensor_name(const cp_model_config *cfg, char *buf, size_t size, int layer,
                               cp_bn_site s, const char *which);

cp_status cp_bottleneck_save(const cp_bottleneck *bn, const char *dir, const char *base_model,
                             cp_error *err);
cp_status cp_bottleneck_load(cp_bottleneck *bn, const char *dir, const cp_model_config *cfg,
                             cp_error *err);

#endif
