/*
 * Fine-tuning methods behind one interface, so that the model, the trainer
 * and the CLI never name a method.
 *
 * A method attaches to a frozen base model at hook points and owns only its
 * own parameters, their gradients and the activations its backward pass
 * needs. Each method is one file that defines a cp_method_ops table, plus
 * one line in registry.c. The hooks a method does not use stay NULL:
 *
 *   project                 after a projection's product (and bias) is added:
 *                           LoRA adds B A x, IA³ scales the output, a
 *                           bottleneck adapter adds f(out) to out
 *   project_input           before the product: IA³ scales the MLP's input
 *   embed_virtual           virtual rows before the token embeddings: prompt
 *                           tuning's soft prompt
 *   attention_prefix        key/value rows before every layer's own: prefix
 *                           tuning
 *
 * The model calls the hooks in cp_model_project and in its backward pass;
 * the trainer uses only params (what AdamW updates) and save.
 */
#ifndef CP_METHOD_H
#define CP_METHOD_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"
#include "peft/lora.h"
#include "train/optimizer.h"

struct cp_model;
typedef struct cp_method cp_method;

/* Settings of every method, filled from the command line. A method reads
 * the fields that concern it and ignores the rest. */
typedef struct cp_method_settings {
    cp_lora_params lora;       /* lora: rank, alpha, dropout, rsLoRA, DoRA, targets, seed */
    unsigned targets;          /* other methods' target projections (bit mask of 1 << cp_proj);
                                * 0: the method's default for the architecture */
    int targets_given;         /* 1 when --target named the targets */
    int n_virtual_tokens;      /* prompt and prefix tuning */
    const char *prompt_init;   /* prompt tuning: "random", "vocab" or "text" */
    const char *prompt_init_text;
    int prefix_projection;     /* prefix tuning: MLP re-parameterization while training */
    const char *adapter_config; /* bottleneck adapters: "houlsby" or "pfeiffer" */
    int reduction_factor;      /* bottleneck adapters: hidden size / bottleneck size */
    const char *non_linearity; /* bottleneck adapters: "relu", "swish" or "gelu" */
    const char *trainable;     /* full fine-tuning: glob of the weights to train, NULL: all */
    const char *modules_to_save; /* comma-separated modules trained fully next to the method */
    int double_quant;          /* qlora: quantize the NF4 scales again */
    uint64_t seed;             /* initialization and dropout */
} cp_method_settings;

cp_method_settings cp_method_default_settings(void);

typedef struct cp_method_ops {
    const char *name;      /* --method NAME */
    const char *peft_type; /* adapter_config.json "peft_type" this method reads, or NULL */
    const char *summary;   /* one line for cpeft train --help */
    int rewrites_output_grad; /* project_backward changes dout, so it needs a copy */
    int nf4_base;          /* the trainer quantizes the base's projections to NF4 first */
    int saves_modules;     /* its files can carry --modules-to-save copies and load them back */

    /* Sets up self->state and self->params for model m, freshly initialized. */
    cp_status (*create)(cp_method *self, const struct cp_model *m, const cp_method_settings *s,
                        cp_error *err);
    /* Reads the saved method in run folder dir for model m. */
    cp_status (*load)(cp_method *self, const struct cp_model *m, const char *dir, cp_error *err);
    /* Writes the method's files into dir (which exists), each atomically. */
    cp_status (*save)(const cp_method *self, const struct cp_model *m, const char *dir,
                      const char *base_model, cp_error *err);
    void (*destroy)(cp_method *self);

    /* Sizes the activation buffers for passes of up to rows rows: training
     * passes keep what the backward pass needs, others only scratch. */
    cp_status (*reserve)(cp_method *self, int rows, int training, cp_error *err);

    /* Output hook: out (N, out) contains x Wᵀ + b of projection p in layer l
     * for input x (N, in). The method changes it in place. */
    void (*project)(cp_method *self, int l, cp_proj p, float *out, const float *x, int N);
    /* Backward of project: dout (N, out) arrives as the gradient of the hooked
     * output and must leave as that of x Wᵀ + b. The method accumulates its
     * parameter gradients and adds its own path to dx (N, in). */
    void (*project_backward)(cp_method *self, int l, cp_proj p, float *dx, float *dout,
                             const float *x, int N);

    /* Input hook: returns the input the product uses instead of x (N, in),
     * or x itself where the method leaves projection p of layer l alone. */
    const float *(*project_input)(cp_method *self, int l, cp_proj p, const float *x, int N);
    /* Backward of project_input, called for every projection when set:
     * dxin (N, in) is the gradient of the input project_input returned. Adds
     * the gradient of x to dx (dxin itself where the input was x) and
     * accumulates the parameter gradients. */
    void (*project_input_backward)(cp_method *self, int l, cp_proj p, float *dx,
                                   const float *dxin, const float *x, int N);

    /* Embedding hook: the number n of virtual rows placed before every
     * sequence's token embeddings (prompt tuning's soft prompt). They take
     * positions 0..n-1, the tokens follow, and only the tokens get logits. */
    int (*virtual_tokens)(const cp_method *self);
    /* Writes the n virtual rows (n, C) into out; the model adds learned
     * position embeddings where it has them. */
    void (*embed_virtual)(cp_method *self, float *out);
    /* Backward of embed_virtual: dout (B, n, C) is the gradient of the
     * virtual rows of B sequences; the method accumulates its gradients. */
    void (*embed_virtual_backward)(cp_method *self, const float *dout, int B);

    /* Attention prefix hook: the number P of key/value positions placed
     * before every layer's own keys and values (prefix tuning). They take
     * positions 0..P-1 and the real tokens' positions start at P. */
    int (*prefix_tokens)(const cp_method *self);
    /* Points *k and *v at layer l's prefix keys and values, each (P, KVH, D),
     * which attention uses as given (no RoPE) and every query attends to. A pass
     * requests layer 0 first, so the method may compute every layer's
     * prefixes then; the arrays stay valid until the next call for layer 0. */
    void (*attention_prefix)(cp_method *self, int l, const float **k, const float **v);
    /* Backward of attention_prefix: dk and dv (P, KVH, D) are the gradients
     * of layer l's prefixes, summed over the batch. A backward pass calls it
     * for every layer, layer 0 last; the method accumulates its gradients. */
    void (*attention_prefix_backward)(cp_method *self, int l, const float *dk,
                                      const float *dv);

    /* Base-tensor hook, for methods that train the model's own tensors (full,
     * BitFit): called once after create or load with the model made mutable.
     * It points m's weight pointers at the method's float32 master copies
     * (so the mapped base is never written) and m's gradient table (dw,
     * dbias, dembed, ... in model/model.h) at the method's gradients. The
     * pointers stay valid until the method is destroyed. */
    cp_status (*bind_base)(cp_method *self, struct cp_model *m, cp_error *err);
} cp_method_ops;

/* An attached method: what the model's hooks and the trainer use. */
struct cp_method {
    const cp_method_ops *ops;
    void *state;            /* the method's own data */
    cp_param_ref *params;   /* every trainable tensor, for the optimizer */
    int n_params;
    int training;           /* 1: dropout on and activations kept for backward */
};

/* Looks a method up by its --method name; NULL when there is none. */
const cp_method_ops *cp_method_find(const char *name);

/* Writes the registered names, comma-separated ("lora, ia3"), into buf. */
void cp_method_list(char *buf, size_t size);

/* Returns the number of registered methods and the i-th one. */
int cp_method_count(void);
const cp_method_ops *cp_method_at(int i);

/* Creates method ops for model m with settings s into a fresh *out
 * (release with cp_method_free). */
cp_status cp_method_create(const cp_method_ops *ops, const struct cp_model *m,
                           const cp_method_settings *s, cp_method **out, cp_error *err);

/* Reads the method saved in run folder dir: adapter_config.json's
 * "peft_type", or "cpeft_method" for formats PEFT does not define, picks it.
 * A method with bind_base, and PEFT's modules_to_save tensors, change m's
 * weight pointers and gradient table (see bind_base). */
cp_status cp_method_load(const char *dir, struct cp_model *m, cp_method **out, cp_error *err);

void cp_method_free(cp_method *method);

/* Wraps an adapter the caller owns and keeps alive as a "lora" method, for
 * code that builds a cp_lora itself (tests, tools). */
cp_status cp_lora_method_wrap(cp_lora *lora, cp_method **out, cp_error *err);

/* The number of trainable values. */
size_t cp_method_param_count(const cp_method *method);

/* Sets every gradient to zero. */
void cp_method_zero_grads(cp_method *method);

#endif
