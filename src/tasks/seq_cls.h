/*
 * Sequence classification head: class logits (L) = W h + b, where h (C) is
 * the final normalized hidden state of a sequence's last token. This is how
 * transformers' GPT2ForSequenceClassification and the Llama, Mistral and
 * Qwen2 variants pool a sequence (their `score` is a Linear without bias).
 *
 * The head owns float32 copies of its weights and zeroed gradients, so a
 * trainer can hand them to the optimizer. Loading reads the head that PEFT
 * saves in a task_type SEQ_CLS adapter. Only a single linear layer is
 * supported, not the dense + out_proj heads of encoder models.
 */
#ifndef CP_SEQ_CLS_H
#define CP_SEQ_CLS_H

#include <stdint.h>

#include "core/error.h"
#include "model/model.h"
#include "train/optimizer.h"

typedef struct cp_seq_cls {
    int num_labels;     /* L */
    int hidden;         /* C, the base model's hidden size */
    float *weight;      /* (L, C) */
    float *bias;        /* (L), or NULL for a head without bias */
    float *grad_weight; /* (L, C), zero after init */
    float *grad_bias;   /* (L), or NULL */
    float *memory;      /* the single allocation behind the four arrays */
} cp_seq_cls;

/* Allocates a head of num_labels x hidden zero weights (and a zero bias when
 * has_bias). Release with cp_seq_cls_free. */
cp_status cp_seq_cls_init(cp_seq_cls *head, int num_labels, int hidden, int has_bias,
                          cp_error *err);
void cp_seq_cls_free(cp_seq_cls *head);

/* Fills params (room for 2) with the weight and, when present, the bias;
 * returns how many it filled. The arrays stay the head's. */
int cp_seq_cls_params(cp_seq_cls *head, cp_param_ref *params);

/* Computes logits (B, L) from the final hidden states (B, T, C). Row b reads
 * position lengths[b] - 1 of sequence b, or T - 1 when lengths is NULL.
 * With right padding and causal attention, position lengths[b] - 1 does not
 * see the padding, so lengths gives the unpadded result. */
void cp_seq_cls_forward(const cp_seq_cls *head, float *logits, const float *hidden, int B, int T,
                        const int *lengths);

/* Runs the model (with its attached adapter, if any) on ids (B, T) and
 * writes the class logits (B, L). final_hidden, when not NULL, receives
 * the final normalized hidden states (B, T, C). Rejects T outside
 * [1, context length], ids outside the vocabulary and lengths outside [1, T]. */
cp_status cp_seq_cls_classify(cp_model *m, const cp_seq_cls *head, const int32_t *ids, int B,
                              int T, const int *lengths, float *logits, float *final_hidden,
                              cp_error *err);

/* Reads the head of the PEFT adapter in dir for model m into a fresh head.
 * adapter_config.json must have task_type SEQ_CLS. adapter_model.safetensors
 * must contain base_model.model.score.weight (L, C), with C the model's
 * hidden size, or one of the other names seq_cls_io.c lists. The adapter's
 * LoRA weights are loaded separately, by cp_model_load_adapter. */
cp_status cp_seq_cls_load(cp_seq_cls *head, const char *dir, const cp_model *m, cp_error *err);

/* Returns 1 if module is the name of a classification head module ("score"
 * or "classifier"), which PEFT lists in modules_to_save for SEQ_CLS. */
int cp_seq_cls_is_head_module(const char *module);

/* Returns 1 if an adapter tensor name belongs to a classification head
 * module: base_model.model.score.* or base_model.model.classifier.*. */
int cp_seq_cls_is_head_tensor(const char *name);

#endif
