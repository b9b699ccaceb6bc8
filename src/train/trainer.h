/*
 * Fine-tuning of a frozen base model with any registered method: the training loop, periodic
 * evaluation, metrics.jsonl, and the run folder.
 *
 * The run folder is built beside its final path and renamed into place only
 * when training succeeded, so a failed or interrupted run leaves no
 * half-written folder. A callback can stop a run (on Ctrl-C, say) with the
 * same guarantee. Checkpoints and resume are not implemented yet.
 */
#ifndef CP_TRAINER_H
#define CP_TRAINER_H

#include <stdint.h>

#include "model/model.h"
#include "peft/method.h"
#include "train/schedule.h"

typedef struct cp_train_params {
    const char *model_dir;
    const char *tokenizer_path; /* NULL: the model's own (its folder or GGUF file) */
    const char *data_path;
    const char *eval_path;  /* NULL: hold out the last eval_split of the data */
    const char *out_dir;
    const char *method_name; /* a registered method (cp_method_find); NULL: "lora" */
    cp_method_settings method;
    const char *targets;    /* module names or "all-linear", parsed against the model;
                             * NULL: the method's default */
    int steps;              /* optimizer steps */
    int batch_size;         /* windows per micro-batch */
    int seq_len;            /* inputs per window */
    int grad_accum;         /* micro-batches per optimizer step */
    double lr;              /* peak learning rate */
    double weight_decay;
    int64_t warmup_steps;   /* > 0 overrides warmup_ratio */
    double warmup_ratio;
    cp_schedule_kind schedule;
    double max_grad_norm;   /* 0: no clipping */
    double eval_split;
    int eval_every;         /* steps between evaluations; 0: only before and after */
    uint64_t seed;          /* data order; the method's seed is method.seed */
} cp_train_params;

cp_train_params cp_train_default_params(void);

/* What the loop reports after each optimizer step (eval_loss < 0 when the
 * step did not evaluate). */
typedef struct cp_train_progress {
    int step, total_steps;
    double loss, lr, grad_norm, tokens_per_s, eta_s;
    double eval_loss;
} cp_train_progress;

/* Returns 0 to go on, anything else to stop the run: then nothing is
 * written and cp_train_run returns CP_ERR_INPUT. */
typedef int (*cp_train_callback)(const cp_train_progress *p, void *ctx);

typedef struct cp_train_result {
    double eval_loss_before; /* base model, before any step */
    double eval_loss_after;
    double final_train_loss;
    size_t trainable_params;
    size_t base_params;
    cp_nf4_stats nf4;        /* the NF4 base of QLoRA (n_matrices 0 otherwise) */
} cp_train_result;

/* Trains, writes the run folder (adapter_config.json,
 * adapter_model.safetensors, metrics.jsonl) and fills *result. callback
 * (may be NULL) is called after every step and before the first. */
cp_status cp_train_run(const cp_train_params *p, cp_train_callback callback, void *ctx,
                       cp_train_result *result, cp_error *err);

#endif
