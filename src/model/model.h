/*
 * The Llama-family decoder: weights bound from a Hugging Face folder, and the
 * buffers of one batched forward pass.
 *
 * Llama, Mistral and Qwen2 are configurations of this one decoder (Qwen2
 * adds q/k/v biases). Weights are borrowed from the read-only safetensors map when stored as
 * aligned F32; F16/BF16 or misaligned tensors are widened into owned float
 * copies. The model owns the map, the copies and the RoPE table.
 */
#ifndef CP_MODEL_H
#define CP_MODEL_H

#include <stdint.h>

#include "cpeft.h"
#include "io/hf_config.h"
#include "io/safetensors.h"
#include "model/projection.h"

/* One decoder layer's frozen weights. Projections are stored (out, in) as
 * nn.Linear keeps them, or (in, out) when cfg.conv1d (GPT-2). */
typedef struct cp_layer_weights {
    const float *attn_norm;      /* (C) */
    const float *attn_norm_bias; /* (C), LayerNorm only, else NULL */
    const float *mlp_norm;       /* (C) */
    const float *mlp_norm_bias;  /* (C), LayerNorm only, else NULL */
    const float *w[CP_PROJ_COUNT];    /* NULL for projections the architecture lacks,
                                       * and for those quantized to NF4 */
    struct cp_nf4_matrix *nf4[CP_PROJ_COUNT]; /* (out, in) NF4 weights, or NULL (float32) */
    const float *bias[CP_PROJ_COUNT]; /* (out) each; NULL where the model has none */

    /* Weight gradients, each shaped as its weight (dw in the stored layout),
     * accumulated (+=) by cp_model_backward. NULL, the default, for a frozen
     * tensor, which then gets no gradient. A method that trains base tensors
     * points them into its own buffers (see bind_base in peft/method.h). */
    float *dattn_norm, *dattn_norm_bias, *dmlp_norm, *dmlp_norm_bias;
    float *dw[CP_PROJ_COUNT];
    float *dbias[CP_PROJ_COUNT];
} cp_layer_weights;

struct cp_model {
    cp_model_config cfg;
    char *dir;                /* the folder it was loaded from */
    cp_safetensors *weights;  /* the mapped checkpoint, or NULL for GGUF */
    struct cp_gguf *gguf;     /* the mapped GGUF file, or NULL */
    int weights_in_out;       /* projections stored (in, out): GPT-2's Conv1D in safetensors */
    const float *embed;       /* (V, C) */
    const float *pos_embed;   /* (max positions, C) learned positions, or NULL (RoPE) */
    cp_layer_weights *layers; /* (n_layers) */
    const float *final_norm;  /* (C) */
    const float *final_norm_bias; /* (C), LayerNorm only */
    const float *lm_head;     /* (V, C); equals embed when tied */
    const uint16_t *embed_bf16;   /* (V, C) bfloat16 embeddings in place of embed, or NULL */
    const uint16_t *lm_head_bf16; /* (V, C) bfloat16 head in place of lm_head, or NULL */
    uint16_t *bf16_owned[2];      /* the bfloat16 tables, freed with the model */
    float *inv_freq;          /* (D/2) RoPE frequencies */
    float **owned;            /* widened copies, freed with the model */
    int n_owned;
    struct cp_method *method; /* the attached fine-tuning method, or NULL */
    int owns_method;          /* 1 when cp_model_load_adapter created it */

    /* Gradients of the model-level tensors, as those of the layers: NULL
     * unless a method trains the tensor. A tied head shares the embedding's
     * gradient (dlm_head == dembed). */
    float *dembed;            /* (V, C) */
    float *dpos_embed;        /* (max positions, C) */
    float *dfinal_norm;       /* (C) */
    float *dfinal_norm_bias;  /* (C) */
    float *dlm_head;          /* (V, C) */
};

/* Loads a GGUF file (llama, qwen2 or gpt2 architecture): see model_gguf.c. */
cp_status cp_model_load_gguf(const char *path, cp_model **out, cp_error *err);

struct cp_lora;

/* Attaches lora, which the caller owns and keeps alive, as the model's
 * method (a "lora" wrapper the model frees). */
cp_status cp_model_attach_lora(cp_model *m, struct cp_lora *lora, cp_error *err);

/* Removes the attached method, freeing it if the model owns it. */
void cp_model_detach_method(cp_model *m);

/* Quantizes every linear projection to NF4 (QLoRA's base), releasing its
 * float32 weight; embeddings, the head and the norms stay float32. With
 * double_quant the block scales are quantized again to 8 bits. */
cp_status cp_model_quantize_nf4(cp_model *m, int double_quant, cp_error *err);

/* Stores the token embeddings and the head in bfloat16 (QLoRA's base keeps
 * them unquantized but need not keep them in float32), releasing the
 * float32 tables: embed and lm_head become NULL, embed_bf16 and
 * lm_head_bf16 take their place. Not for tensors a method trains. */
cp_status cp_model_embeddings_to_bf16(cp_model *m, cp_error *err);

/* logits (N, V) = x (N, C) · headᵀ, from the float32 or bfloat16 head. */
void cp_model_head(const cp_model *m, float *logits, const float *x, int N);

/* Sizes and scale errors of the NF4 projections, for reports. */
typedef struct cp_nf4_stats {
    int n_matrices;
    size_t bytes;               /* NF4 codes and scales */
    size_t float32_bytes;       /* what the same matrices take in float32 */
    double scale_rms_error;     /* double quantization: RMS error of the block scales */
    double scale_max_rel_error; /* double quantization: max error / scale */
} cp_nf4_stats;

void cp_model_nf4_stats(const cp_model *m, cp_nf4_stats *stats);

/* Keeps buf, a widened or reordered weight copy, until the model is freed;
 * on failure frees buf. */
cp_status cp_model_keep_owned(cp_model *m, float *buf, cp_error *err);

/* Allocates the layer table and fills the RoPE frequencies from m->cfg. */
cp_status cp_model_alloc_tables(cp_model *m, cp_error *err);

/* The frozen weight (out, in) of projection proj (a cp_proj) in layer l. */
const float *cp_model_proj_weight(const cp_model *m, int l, int proj);

/* Normalizes N rows of inp (RMSNorm or LayerNorm, by cfg.norm); mean
 * and rstd (N) may be NULL, bias is NULL for RMSNorm. */
void cp_model_norm(const cp_model *m, float *out, float *mean, float *rstd, const float *inp,
                   const float *weight, const float *bias, int N);

/* Token embeddings of ids (N), plus learned position embeddings at pos (N)
 * when the model has them. */
void cp_model_embed(const cp_model *m, float *out, const int32_t *ids, const int *pos, int N);

/* Adds the learned position embeddings at pos (N) to x (N, C); does nothing
 * for a model without them (RoPE). */
void cp_model_add_positions(const cp_model *m, float *x, const int *pos, int N);

/* The attached method's virtual rows before every sequence (its embedding
 * hook) and key/value prefix positions before every layer's keys (its
 * attention hook); 0 without a method or hook. */
int cp_model_virtual_tokens(const cp_model *m);
int cp_model_prefix_tokens(const cp_model *m);

/* Layer l's queries (N, H, D), keys and values (N, KVH, D) of x (N, C), with
 * RoPE applied where the model uses it. qkv is scratch of (N, (H + 2 KVH) D)
 * for a fused projection. */
void cp_model_qkv(const cp_model *m, int l, float *q, float *k, float *v, const float *x,
                  float *qkv, const int *pos, int N);

/* Layer l's MLP hidden activation (N, F) of x (N, C); gate and up (N, F)
 * keep the pre-activations (gate only for SwiGLU). */
void cp_model_mlp_hidden(const cp_model *m, int l, float *hidden, float *gate, float *up,
                         const float *x, int N);

/* One projection of layer l: out (N, out) = x Wᵀ plus the attached
 * adapter's contribution, if any. */
void cp_model_project(const cp_model *m, int l, int proj, float *out, const float *x, int N);

/* Activations of one forward pass over B sequences of T tokens. Buffers
 * marked "per layer" hold n_saved_layers blocks: n_layers when the pass
 * keeps what a backward pass needs, 1 when each layer overwrites the last.
 * Each sequence has S = n_virtual + T rows: the method's virtual rows, then
 * its tokens. Every layer also attends to n_prefix key/value positions before
 * them (P below), so S rows sit at positions P..P+S-1. */
typedef struct cp_forward_buffers {
    int B, T, n_saved_layers;
    int n_virtual;    /* virtual rows per sequence, before the tokens */
    int n_prefix;     /* key/value prefix positions per layer (P) */
    int S;            /* rows per sequence: n_virtual + T */
    float *residual;  /* per layer: (B, T, C) input of the layer */
    float *norm1;     /* per layer: (B, T, C) after the attention RMSNorm */
    float *mean1;     /* per layer: (B, T), LayerNorm only */
    float *rstd1;     /* per layer: (B, T) */
    float *q;         /* per layer: (B, T, H, D) after RoPE */
    float *k;         /* per layer: (B, T, KVH, D) after RoPE */
    float *v;         /* per layer: (B, T, KVH, D) */
    float *att;       /* per layer: (B, H, S, P + S) softmax probabilities */
    float *attn_out;  /* per layer: (B, T, H, D) before o_proj */
    float *mid;       /* per layer: (B, T, C) residual after attention */
    float *norm2;     /* per layer: (B, T, C) after the MLP RMSNorm */
    float *mean2;     /* per layer: (B, T), LayerNorm only */
    float *rstd2;     /* per layer: (B, T) */
    float *gate;      /* per layer: (B, T, F), SwiGLU only */
    float *up;        /* per layer: (B, T, F) */
    float *swiglu;    /* per layer: (B, T, F) the MLP's hidden activation:
                       * silu(gate) * up, or gelu_tanh(up) */
    float *scratch;   /* (B, T, C) projection outputs before the residual add */
    float *final;     /* (B, T, C) output of the last layer */
    float *norm_f;    /* (B, T, C) after the final RMSNorm */
    float *mean_f;    /* (B, T), LayerNorm only */
    float *rstd_f;    /* (B, T) */
    float *qkv;       /* (B, T, (H + 2 KVH) D) scratch of a fused q/k/v product */
    float *logits;    /* (B, T, V), the tokens' rows only */
    int *pos;         /* (B, S) positions P..P+S-1 */
    const int32_t *ids; /* (B, T) the last pass's token ids, borrowed for the
                         * embedding gradient */
    const float **prefix_k; /* (n_layers) each layer's prefix keys (P, KVH, D), or NULL */
    const float **prefix_v; /* (n_layers) its prefix values */
    float *memory;    /* the single allocation behind every buffer above */
} cp_forward_buffers;

/* Pointers to layer l's slice of each per-layer buffer of fb. */
typedef struct cp_layer_acts {
    float *residual, *norm1, *mean1, *rstd1, *q, *k, *v, *att, *attn_out;
    float *mid, *norm2, *mean2, *rstd2, *gate, *up, *swiglu;
} cp_layer_acts;

cp_layer_acts cp_forward_layer(const cp_forward_buffers *fb, const cp_model_config *cfg, int l);

/* Buffers for a model without virtual rows or prefixes. Per-layer and
 * per-row sizes in the comments above count S rows per sequence where the
 * method adds rows: (B, T, ...) means (B, S, ...) there, except logits. */
cp_status cp_forward_buffers_init(cp_forward_buffers *fb, const cp_model_config *cfg, int B,
                                  int T, int save_all_layers, cp_error *err);

/* Buffers sized for model m with its attached method's virtual rows and
 * prefix. Rejects T when those rows push the last token past the context
 * length. */
cp_status cp_forward_buffers_init_model(cp_forward_buffers *fb, const cp_model *m, int B, int T,
                                        int save_all_layers, cp_error *err);
void cp_forward_buffers_free(cp_forward_buffers *fb);

/* Runs the decoder on ids (B, T), each sequence's tokens at positions
 * P + n_virtual onwards (0..T-1 without a method's rows), and leaves the
 * tokens' logits in fb->logits. Ids must be inside the vocabulary, and fb
 * must be sized for the attached method (cp_forward_buffers_init_model). */
void cp_model_forward(const cp_model *m, cp_forward_buffers *fb, const int32_t *ids);

/* Backward pass buffers for B sequences of T tokens. */
typedef struct cp_backward_buffers {
    float *dres;    /* (B, T, C) gradient of the residual stream */
    float *dnorm;   /* (B, T, C) gradient of a normalized input */
    float *dbig1;   /* (B, T, max(F, H*D)) */
    float *dbig2;   /* (B, T, F) */
    float *dbig3;   /* (B, T, F) */
    float *dq;      /* (B, T, H*D) */
    float *dk;      /* (B, T, KVH*D) */
    float *dv;      /* (B, T, KVH*D) */
    float *dqkv;    /* (B, T, (H + 2 KVH) D), a fused q/k/v projection's gradient */
    float *scratch; /* (B, H, T, T) */
    float *dproj_out; /* (B, T, widest projection) a method's rewritten output gradient */
    float *dproj_in;  /* (B, T, widest projection) the gradient of a hooked input */
    float *dprefix_k; /* (B, P, KVH*D) each sequence's gradient of a layer's prefix keys */
    float *dprefix_v; /* (B, P, KVH*D) */
    float *memory;
} cp_backward_buffers;

/* As with the forward buffers, T counts S rows per sequence where a method
 * adds virtual rows, and scratch is (B, H, S, P + S). */
cp_status cp_backward_buffers_init(cp_backward_buffers *bb, const cp_model_config *cfg, int B,
                                   int T, cp_error *err);
cp_status cp_backward_buffers_init_model(cp_backward_buffers *bb, const cp_model *m, int B,
                                         int T, cp_error *err);
void cp_backward_buffers_free(cp_backward_buffers *bb);

/* Mean cross-entropy of the forward pass in fb against targets (B, T), and
 * its backward pass to the attached adapter's gradients, which accumulate
 * (+=) scaled by loss_scale (1 / grad-accumulation steps). Weights get a
 * gradient only where their gradient pointer is set; the embedding gradient
 * reads fb->ids, so the ids of the forward pass must still be alive.
 * Overwrites fb->logits. Returns the mean loss. */
double cp_model_backward(const cp_model *m, cp_forward_buffers *fb, cp_backward_buffers *bb,
                         const int32_t *targets, float loss_scale);

/* dst (n) += src (n), the residual additions of the forward passes. */
void cp_add_inplace(float *dst, const float *src, size_t n);

/* Returns 0 if every id is in [0, V), else the index of the first bad one + 1. */
size_t cp_model_find_bad_id(const cp_model *m, const int32_t *ids, size_t n);

#endif
