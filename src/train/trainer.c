/*
 * The training loop of every method: micro-batches through forward and backward,
 * gradient accumulation, clipping, AdamW under a learning-rate schedule,
 * evaluation before, during and after, metrics.jsonl, and the run folder.
 */
#include "train/trainer.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "model/model.h"
#include "peft/method.h"
#include "peft/modules_to_save.h"
#include "tokenizer/tokenizer.h"
#include "train/dataset.h"
#include "train/optimizer.h"
#include "train/run_folder.h"

cp_train_params cp_train_default_params(void)
{
    return (cp_train_params){
        .method = cp_method_default_settings(),
        .steps = 100,
        .batch_size = 8,
        .seq_len = 128,
        .grad_accum = 1,
        .lr = 2e-4,
        .weight_decay = 0.0,
        .warmup_steps = 0,
        .warmup_ratio = 0.0,
        .schedule = CP_SCHEDULE_COSINE,
        .max_grad_norm = 1.0,
        .eval_split = 0.05,
        .eval_every = 0,
        .seed = 42,
    };
}

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Everything a run owns, released together by trainer_free. */
typedef struct trainer {
    cp_model *model;
    cp_tokenizer *tok;
    cp_dataset data;
    cp_method *method;
    cp_forward_buffers fb;
    cp_backward_buffers bb;
    cp_adamw opt;
    cp_schedule sched;
    int32_t *batch;   /* (B, T + 1) */
    int32_t *inputs;  /* (B, T) */
    int32_t *targets; /* (B, T) */
    cp_run_folder run;
    FILE *metrics;
} trainer;

static void trainer_free(trainer *t)
{
    if (t->metrics)
        fclose(t->metrics);
    cp_run_folder_abort(&t->run);
    free(t->batch);
    free(t->inputs);
    free(t->targets);
    cp_adamw_free(&t->opt);
    cp_backward_buffers_free(&t->bb);
    cp_forward_buffers_free(&t->fb);
    cp_method_free(t->method);
    cp_dataset_free(&t->data);
    cp_tokenizer_free(t->tok);
    cp_model_free(t->model);
}

/* Checks each setting on its own, before any file is read, so that the
 * message names the option to change. */
static cp_status check_settings(const cp_train_params *p, cp_error *err)
{
    const struct {
        int bad;
        const char *option, *rule;
        double value;
    } checks[] = {
        {p->steps <= 0, "--steps", "must be positive", p->steps},
        {p->batch_size <= 0, "--batch-size", "must be positive", p->batch_size},
        {p->seq_len <= 0, "--seq-len", "must be positive", p->seq_len},
        {p->grad_accum <= 0, "--grad-accum", "must be positive", p->grad_accum},
        {!(p->lr > 0), "--lr", "must be positive", p->lr},
        {p->weight_decay < 0, "--weight-decay", "must be >= 0", p->weight_decay},
        {p->max_grad_norm < 0, "--max-grad-norm", "must be >= 0", p->max_grad_norm},
        {p->eval_every < 0, "--eval-every", "must be >= 0", p->eval_every},
        {!(p->eval_split >= 0 && p->eval_split < 1), "--eval-split", "must be in [0, 1)",
         p->eval_split},
        {!(p->warmup_ratio >= 0 && p->warmup_ratio <= 1), "--warmup-ratio", "must be in [0, 1]",
         p->warmup_ratio},
        {p->method.lora.r <= 0, "--r", "must be positive", p->method.lora.r},
        {!(p->method.lora.alpha > 0), "--alpha", "must be positive", p->method.lora.alpha},
        {!(p->method.lora.dropout >= 0 && p->method.lora.dropout < 1), "--lora-dropout",
         "must be in [0, 1)", p->method.lora.dropout},
    };
    const char *name = p->method_name ? p->method_name : "lora";
    const cp_method_ops *ops = cp_method_find(name);
    if (!ops) {
        char names[256];
        cp_method_list(names, sizeof names);
        return cp_error_set(err, CP_ERR_INPUT, "--method \"%s\" is not a method; available: %s",
                            name, names);
    }
    if (p->method.modules_to_save && !ops->saves_modules)
        return cp_error_set(err, CP_ERR_INPUT,
                            "--modules-to-save does not apply to --method %s, which trains whole "
                            "tensors itself; drop --modules-to-save",
                            name);
    for (size_t i = 0; i < sizeof checks / sizeof *checks; i++)
        if (checks[i].bad)
            return cp_error_set(err, CP_ERR_INPUT, "%s %s, got %g", checks[i].option,
                                checks[i].rule, checks[i].value);
    return CP_OK;
}

/* The model, its tokenizer, the targets named for its architecture, then
 * the data. */
static cp_status load_inputs(trainer *t, const cp_train_params *p, cp_method_settings *ms,
                             cp_error *err)
{
    cp_status st = cp_model_load(p->model_dir, &t->model, err);
    int add_bos = 1;
    if (st == CP_OK)
        st = cp_tokenizer_load_with_bos(p->tokenizer_path ? p->tokenizer_path : p->model_dir,
                                        &t->tok, &add_bos, err);
    if (st != CP_OK)
        return st;
    int n_tokens = cp_tokenizer_vocab_size(t->tok);
    if (n_tokens > t->model->cfg.vocab_size)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: the tokenizer has %d tokens but the model's vocabulary has %d; "
                            "pass the model's own tokenizer with --tokenizer",
                            p->tokenizer_path ? p->tokenizer_path : p->model_dir, n_tokens,
                            t->model->cfg.vocab_size);

    const cp_model_config *mc = &t->model->cfg;
    if (p->targets && (st = cp_proj_parse_list(mc, p->targets, &ms->targets, err)))
        return cp_error_prefix(err, "--target");
    ms->targets_given = p->targets != NULL;

    cp_dataset_params dp = cp_dataset_default_params();
    dp.train_path = p->data_path;
    dp.eval_path = p->eval_path;
    dp.seq_len = p->seq_len;
    dp.context_length = cp_model_context_length(t->model);
    dp.eval_split = p->eval_split;
    dp.add_bos = add_bos;
    dp.seed = p->seed;
    return cp_dataset_init(&t->data, t->tok, &dp, err);
}

/* Activation buffers sized by --batch-size and --seq-len: running out of
 * memory there is a setting to lower, not a failure of the machine. */
static cp_status allocate_activations(trainer *t, int B, int T, cp_error *err)
{
    cp_status st = t->method->ops->reserve(t->method, B * T, 1, err);
    t->method->training = 1;
    if (st == CP_OK)
        st = cp_forward_buffers_init_model(&t->fb, t->model, B, T, 1, err);
    if (st == CP_OK)
        st = cp_backward_buffers_init_model(&t->bb, t->model, B, T, err);
    if (st == CP_ERR_NOMEM) {
        char cause[CP_ERROR_MSG_MAX];
        snprintf(cause, sizeof cause, "%s", err->msg);
        return cp_error_set(err, CP_ERR_INPUT,
                            "batch size %d x sequence length %d: %s; lower --batch-size or "
                            "--seq-len",
                            B, T, cause);
    }
    return st;
}

static cp_status setup(trainer *t, const cp_train_params *p, cp_error *err)
{
    int B = p->batch_size, T = p->seq_len;
    cp_method_settings ms = p->method;
    cp_status st = check_settings(p, err);
    if (st == CP_OK)
        st = cp_run_folder_begin(&t->run, p->out_dir, err);
    if (st == CP_OK)
        st = load_inputs(t, p, &ms, err);
    const cp_method_ops *ops = cp_method_find(p->method_name ? p->method_name : "lora");
    if (st == CP_OK && ops->nf4_base)
        st = cp_model_quantize_nf4(t->model, ms.double_quant, err);
    /* QLoRA's base keeps its embeddings and head in bfloat16, unless
     * --modules-to-save trains them. */
    if (st == CP_OK && ops->nf4_base && !ms.modules_to_save)
        st = cp_model_embeddings_to_bf16(t->model, err);
    if (st == CP_OK)
        st = cp_method_create(ops, t->model, &ms, &t->method, err);
    /* Methods that train base tensors, and --modules-to-save, point the
     * model's weights at their float32 copies. */
    if (st == CP_OK && ops->bind_base)
        st = ops->bind_base(t->method, t->model, err);
    if (st == CP_OK && ms.modules_to_save)
        st = cp_modules_to_save_attach(t->method, t->model, ms.modules_to_save, err);
    if (st == CP_OK) {
        t->model->method = t->method;
        st = allocate_activations(t, B, T, err);
    }
    if (st == CP_OK) {
        cp_adamw_config oc = cp_adamw_default_config();
        oc.weight_decay = p->weight_decay;
        st = cp_adamw_init(&t->opt, t->method->params, t->method->n_params, &oc, err);
    }
    if (st == CP_OK)
        st = cp_schedule_init(&t->sched, p->schedule, p->lr, p->warmup_steps, p->warmup_ratio,
                              p->steps, err);
    if (st != CP_OK)
        return st;

    t->batch = malloc((size_t)B * (T + 1) * sizeof *t->batch);
    t->inputs = malloc((size_t)B * T * sizeof *t->inputs);
    t->targets = malloc((size_t)B * T * sizeof *t->targets);
    char *metrics_path = cp_run_folder_file(&t->run, "metrics.jsonl");
    if (metrics_path)
        t->metrics = fopen(metrics_path, "w");
    free(metrics_path);
    if (!t->batch || !t->inputs || !t->targets || !t->metrics)
        return cp_error_nomem(err, "training buffers", (size_t)B * (T + 1) * sizeof(int32_t));
    return CP_OK;
}

/* Mean loss on the held-out stream, windowed as cp_model_evaluate does. */
static cp_status evaluate(trainer *t, int step, double *loss, cp_error *err)
{
    *loss = -1.0;
    if (t->data.n_eval == 0)
        return CP_OK;
    cp_eval_result r;
    cp_status st = cp_model_evaluate(t->model, t->data.eval_ids, t->data.n_eval, t->data.seq_len,
                                     &r, err);
    if (st != CP_OK)
        return cp_error_prefix(err, "evaluation at step %d", step);
    *loss = r.loss;
    fprintf(t->metrics, "{\"step\": %d, \"eval_loss\": %.6f}\n", step, r.loss);
    return CP_OK;
}

/* One optimizer step over grad_accum micro-batches; returns the mean loss. */
static cp_status train_step(trainer *t, const cp_train_params *p, int step, double *loss,
                            double *grad_norm, cp_error *err)
{
    int B = p->batch_size, T = p->seq_len;
    cp_method_zero_grads(t->method);
    *loss = 0.0;
    for (int micro = 0; micro < p->grad_accum; micro++) {
        cp_dataset_next_batch(&t->data, t->batch, B, NULL);
        for (int b = 0; b < B; b++) {
            memcpy(t->inputs + (size_t)b * T, t->batch + (size_t)b * (T + 1), T * sizeof(int32_t));
            memcpy(t->targets + (size_t)b * T, t->batch + (size_t)b * (T + 1) + 1,
                   T * sizeof(int32_t));
        }
        cp_model_forward(t->model, &t->fb, t->inputs);
        *loss += cp_model_backward(t->model, &t->fb, &t->bb, t->targets,
                                   1.0f / (float)p->grad_accum) /
                 p->grad_accum;
    }
    if (!isfinite(*loss))
        return cp_error_set(err, CP_ERR_INPUT,
                            "the training loss became %g at step %d; lower --lr (now %g) or "
                            "check the data",
                            *loss, step, p->lr);

    cp_status st = CP_OK;
    if (p->max_grad_norm > 0) {
        st = cp_grad_clip_norm(t->method->params, t->method->n_params, p->max_grad_norm,
                               grad_norm, err);
    } else {
        double sum = 0.0;
        for (int i = 0; i < t->method->n_params; i++)
            for (size_t j = 0; j < t->method->params[i].n; j++)
                sum += (double)t->method->params[i].grad[j] * t->method->params[i].grad[j];
        *grad_norm = sqrt(sum);
    }
    if (st != CP_OK)
        return cp_error_prefix(err, "step %d; lower --lr", step);
    cp_adamw_step(&t->opt, cp_schedule_lr(&t->sched, step - 1));
    return CP_OK;
}

static size_t count_base_params(const cp_model_config *c)
{
    size_t C = c->hidden_size, F = c->intermediate_size, V = c->vocab_size;
    size_t qd = (size_t)c->n_heads * c->head_dim, kvd = (size_t)c->n_kv_heads * c->head_dim;
    size_t layer = 2 * C + 2 * C * qd + 2 * C * kvd + 3 * C * F;
    return V * C * (c->tie_word_embeddings ? 1 : 2) + c->n_layers * layer + C;
}

static cp_status run_loop(trainer *t, const cp_train_params *p, cp_train_callback cb, void *ctx,
                          cp_train_result *res, cp_error *err)
{
    cp_train_progress prog = {.total_steps = p->steps, .eval_loss = -1};
    /* Step 0 measures the base model alone: prompt and prefix tuning start
     * from random virtual tokens, which would make a worse start look like
     * the baseline. */
    cp_method *method = t->model->method;
    t->model->method = NULL;
    cp_status st = evaluate(t, 0, &res->eval_loss_before, err);
    t->model->method = method;
    prog.eval_loss = res->eval_loss_before;
    if (st == CP_OK && cb && cb(&prog, ctx))
        st = cp_error_set(err, CP_ERR_INPUT, "training stopped before the first step; nothing "
                                             "was written");

    double start = now_seconds(), tokens_per_step = (double)p->batch_size * p->seq_len * p->grad_accum;
    for (int step = 1; st == CP_OK && step <= p->steps; step++) {
        double t0 = now_seconds(), loss = 0, norm = 0;
        st = train_step(t, p, step, &loss, &norm, err);
        if (st != CP_OK)
            break;
        double elapsed = now_seconds() - start;
        prog = (cp_train_progress){
            .step = step, .total_steps = p->steps, .loss = loss,
            .lr = cp_schedule_lr(&t->sched, step - 1), .grad_norm = norm,
            .tokens_per_s = tokens_per_step / (now_seconds() - t0 + 1e-9),
            .eta_s = elapsed / step * (p->steps - step), .eval_loss = -1};
        fprintf(t->metrics,
                "{\"step\": %d, \"loss\": %.6f, \"lr\": %.6g, \"grad_norm\": %.6f, "
                "\"tokens_per_s\": %.1f}\n",
                step, loss, prog.lr, norm, prog.tokens_per_s);
        res->final_train_loss = loss;
        if (step == p->steps || (p->eval_every > 0 && step % p->eval_every == 0))
            st = evaluate(t, step, &prog.eval_loss, err);
        if (step == p->steps)
            res->eval_loss_after = prog.eval_loss;
        if (st == CP_OK && cb && cb(&prog, ctx))
            st = cp_error_set(err, CP_ERR_INPUT,
                              "training stopped after step %d of %d; nothing was written", step,
                              p->steps);
    }
    return st;
}

cp_status cp_train_run(const cp_train_params *p, cp_train_callback callback, void *ctx,
                       cp_train_result *result, cp_error *err)
{
    trainer t;
    memset(&t, 0, sizeof t);
    memset(result, 0, sizeof *result);
    cp_status st = setup(&t, p, err);
    if (st == CP_OK) {
        result->trainable_params = cp_method_param_count(t.method);
        result->base_params = count_base_params(&t.model->cfg);
        cp_model_nf4_stats(t.model, &result->nf4);
        st = run_loop(&t, p, callback, ctx, result, err);
    }

    /* The adapter and the metrics go into the temporary folder, which then
     * replaces the final one. */
    /* The base model is recorded by absolute path, so the run folder names
     * it correctly from any working directory. */
    char *base = st == CP_OK ? realpath(p->model_dir, NULL) : NULL;
    if (st == CP_OK)
        st = t.method->ops->save(t.method, t.model, t.run.tmp_path, base ? base : p->model_dir,
                                 err);
    free(base);
    if (st == CP_OK && (fflush(t.metrics) != 0 || fsync(fileno(t.metrics)) != 0))
        st = cp_error_set(err, CP_ERR_IO, "%s: cannot write metrics.jsonl", t.run.tmp_path);
    if (st == CP_OK) {
        fclose(t.metrics);
        t.metrics = NULL;
        st = cp_run_folder_commit(&t.run, err);
    }
    trainer_free(&t);
    return st;
}
