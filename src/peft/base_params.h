/*
 * The decoder's own tensors as trainable parameters, shared by the methods
 * that train them: full fine-tuning, BitFit and PEFT's modules_to_save.
 *
 * Each tensor has its Hugging Face checkpoint name (model.layers.0.self_attn.
 * q_proj.weight, or GPT-2's transformer.h.0.attn.c_attn.weight) and its
 * stored layout, (in, out) for GPT-2's Conv1D. A trained set owns float32
 * master copies and gradients. Binding points the model's weight pointers
 * and gradient table at them, so the mapped base is never written.
 */
#ifndef CP_BASE_PARAMS_H
#define CP_BASE_PARAMS_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "train/optimizer.h"

typedef enum cp_base_kind {
    CP_BASE_EMBED = 0,
    CP_BASE_POS_EMBED,
    CP_BASE_LM_HEAD,
    CP_BASE_FINAL_NORM,
    CP_BASE_FINAL_NORM_BIAS,
    CP_BASE_ATTN_NORM,
    CP_BASE_ATTN_NORM_BIAS,
    CP_BASE_MLP_NORM,
    CP_BASE_MLP_NORM_BIAS,
    CP_BASE_PROJ_WEIGHT,
    CP_BASE_PROJ_BIAS,
} cp_base_kind;

/* One tensor of the base model. */
typedef struct cp_base_tensor {
    char name[96];    /* the checkpoint name */
    cp_base_kind kind;
    int layer;        /* -1 for the embeddings, the final norm and the head */
    cp_proj proj;     /* projection tensors only */
    int ndim;         /* 1 or 2 */
    int64_t shape[2]; /* as stored */
    size_t n;         /* elements */
} cp_base_tensor;

/* Returns 1 for the bias vectors (projections' and LayerNorms'). */
int cp_base_kind_is_bias(cp_base_kind kind);

/* Lists m's float tensors in checkpoint order into a fresh array (free it
 * with free). A head tied to the embedding is listed only with
 * with_tied_head, as a tensor of its own. */
cp_status cp_base_tensors_list(const cp_model *m, int with_tied_head, cp_base_tensor **out,
                               int *n, cp_error *err);

/* The tensor's current values in m. */
const float *cp_base_tensor_data(const cp_model *m, const cp_base_tensor *t);

/* Trained base tensors: master copies and gradients in one allocation. */
typedef struct cp_base_params {
    cp_base_tensor *tensors; /* (n) */
    int n;
    float **values;          /* (n) master copy of each tensor */
    float **grads;           /* (n) its gradient, zero after init */
    float *memory;           /* values then gradients */
    size_t n_values;         /* elements in all tensors together */
    int follow_tie;          /* 1: a trained embedding also drives its tied head */
} cp_base_params;

/* Copies the n tensors sel of m into a fresh bp. Rejects NF4 weights and
 * GPT-2 projection weights that a GGUF file stored transposed. */
cp_status cp_base_params_init(cp_base_params *bp, const cp_model *m, const cp_base_tensor *sel,
                              int n, int follow_tie, cp_error *err);
void cp_base_params_free(cp_base_params *bp);

/* Appends one optimizer entry per tensor to *params (a malloc'd array of
 * *n_params entries, grown with realloc). Matrices decay; biases and norm
 * weights do not, as the Hugging Face Trainer groups them. */
cp_status cp_base_params_append_refs(const cp_base_params *bp, cp_param_ref **params,
                                     int *n_params, cp_error *err);

/* Points m's weight pointers and gradient table at bp's copies. A tensor
 * whose gradient pointer is already set is trained by something else and
 * rejected, naming option. */
cp_status cp_base_params_bind(const cp_base_params *bp, cp_model *m, const char *option,
                              cp_error *err);

/* Fills tensors (room for bp->n) and names (bp->n strings of 160 bytes) to
 * write bp under prefix + each checkpoint name. */
void cp_base_params_describe(const cp_base_params *bp, const char *prefix, cp_st_tensor *tensors,
                             char (*names)[160]);

/* Reads the values of every tensor of bp from file, stored under prefix +
 * its checkpoint name with its shape in any float dtype. */
cp_status cp_base_params_read(cp_base_params *bp, const cp_safetensors *file, const char *prefix,
                              const char *path, cp_error *err);

/* Finds the base tensor called name (without prefix) in list; NULL if none. */
const cp_base_tensor *cp_base_tensor_find(const cp_base_tensor *list, int n, const char *name);

/* Writes adapter_model.safetensors (bp under prefix) and adapter_config.json
 * with cpeft_method and base_model_name_or_path, plus extra_key: extra_value
 * when extra_key is not NULL, into dir, each atomically. */
cp_status cp_base_params_save(const cp_base_params *bp, const char *dir, const char *method,
                              const char *base_model, const char *extra_key,
                              const char *extra_value, cp_error *err);

/* Reads the tensors of run folder dir, written by cp_base_params_save,
 * into a fresh bp. Every tensor of adapter_model.safetensors without PEFT's
 * "base_model.model." prefix must be a tensor of m (a tied head is stored as
 * the embedding), and a bias when only_biases is set. */
cp_status cp_base_params_load(cp_base_params *bp, const cp_model *m, const char *dir,
                              int only_biases, cp_error *err);

#endif
