/*
 * Prompt tuning as Hugging Face PEFT defines it (peft_type PROMPT_TUNING):
 * n trainable embeddings (n, C) placed before every sequence's token
 * embeddings through the model's embedding hook. They take positions 0..n-1
 * (GPT-2 adds its learned position embeddings to them), the tokens follow at
 * n onwards, and only the tokens are scored.
 *
 * Initialization follows PEFT's PromptEmbedding. "random" (RANDOM) draws
 * N(0, 1) as torch.nn.Embedding does. "vocab" (SAMPLE_VOCAB) copies the
 * embeddings of tokens drawn uniformly from the vocabulary. "text" (TEXT)
 * copies those of the init text's tokens, BOS included where the tokenizer
 * adds it, cut to n tokens when longer and repeated when shorter.
 */
#include <stdlib.h>
#include <string.h>

#include "cpeft.h"
#include "io/tokenizer_config.h"
#include "model/model.h"
#include "peft/method.h"
#include "peft/prompt_io.h"

typedef struct prompt_state {
    int n, C;
    float *embeddings; /* (n, C) the virtual rows */
    float *grad;       /* (n, C) */
    const char *init;  /* PEFT's name of the initialization, for the config */
    char *init_text;   /* the TEXT init's text, or NULL */
} prompt_state;

/* Copies the token embeddings of ids (n_ids of them) into the n rows, the
 * ids repeated from the start when there are fewer than n. */
static void copy_token_rows(const cp_model *m, float *rows, int n, const int32_t *ids,
                            size_t n_ids)
{
    size_t C = m->cfg.hidden_size;
    for (int i = 0; i < n; i++)
        memcpy(rows + i * C, m->embed + (size_t)ids[(size_t)i % n_ids] * C, C * sizeof(float));
}

/* TEXT: the embeddings of the init text's tokens, from the model folder's
 * own tokenizer (the one training reads the data with). */
static cp_status init_from_text(const cp_model *m, prompt_state *ps, const char *text,
                                cp_error *err)
{
    cp_tokenizer *tok = NULL;
    int32_t *ids = NULL;
    size_t n_ids = 0;
    int add_bos = 1;
    cp_status st = cp_tokenizer_load(m->dir, &tok, err);
    if (st == CP_OK)
        st = cp_tokenizer_config_add_bos(m->dir, &add_bos, err);
    if (st == CP_OK)
        st = cp_tokenizer_encode(tok, text, strlen(text), add_bos, &ids, &n_ids, err);
    if (st != CP_OK) {
        cp_tokenizer_free(tok);
        return cp_error_prefix(err, "--prompt-init-text");
    }
    if (n_ids == 0)
        st = cp_error_set(err, CP_ERR_INPUT,
                          "--prompt-init-text \"%s\" has no tokens; give a non-empty text", text);
    if (st == CP_OK && cp_model_find_bad_id(m, ids, n_ids))
        st = cp_error_set(err, CP_ERR_INPUT,
                          "--prompt-init-text: the tokenizer gives ids outside the model's "
                          "vocabulary of %d",
                          m->cfg.vocab_size);
    /* NOTE: PEFT cuts a longer text to the first n tokens without a warning, and so does this. */
    if (st == CP_OK)
        copy_token_rows(m, ps->embeddings, ps->n, ids, n_ids);
    free(ids);
    cp_tokenizer_free(tok);
    return st;
}

/* Resolves --prompt-init and --prompt-init-text into one of PEFT's three
 * initializations; the text implies "text" unless another init is named. */
static cp_status resolve_init(const cp_method_settings *s, const char **init, cp_error *err)
{
    const char *name = s->prompt_init ? s->prompt_init : "random";
    if (s->prompt_init_text && strcmp(name, "random") == 0)
        name = "text";
    if (strcmp(name, "random") == 0)
        *init = "RANDOM";
    else if (strcmp(name, "vocab") == 0)
        *init = "SAMPLE_VOCAB";
    else if (strcmp(name, "text") == 0)
        *init = "TEXT";
    else
        return cp_error_set(err, CP_ERR_INPUT,
                            "--prompt-init must be random, vocab or text, got \"%s\"", name);
    if (strcmp(*init, "TEXT") == 0 && !s->prompt_init_text)
        return cp_error_set(err, CP_ERR_INPUT,
                            "--prompt-init text needs the text: add --prompt-init-text TEXT");
    if (strcmp(*init, "SAMPLE_VOCAB") == 0 && s->prompt_init_text)
        return cp_error_set(err, CP_ERR_INPUT,
                            "--prompt-init-text applies to --prompt-init text, not vocab; drop "
                            "one of them");
    return CP_OK;
}

/* Allocates the state and lists its one parameter, prompt_embeddings. */
static cp_status alloc_state(cp_method *self, int n, int C, cp_error *err)
{
    prompt_state *ps = calloc(1, sizeof *ps);
    self->state = ps;
    if (!ps)
        return cp_error_nomem(err, "the prompt state", sizeof *ps);
    ps->n = n;
    ps->C = C;
    ps->init = "RANDOM";
    ps->embeddings = calloc(2 * (size_t)n * C, sizeof(float));
    self->params = calloc(1, sizeof *self->params);
    if (!ps->embeddings || !self->params)
        return cp_error_nomem(err, "the virtual tokens", 2 * (size_t)n * C * sizeof(float));
    ps->grad = ps->embeddings + (size_t)n * C;
    /* Weight decay applies, as Hugging Face's Trainer decays every weight but biases and norms. */
    self->params[0] = (cp_param_ref){"prompt_embeddings", ps->embeddings, ps->grad,
                                     (size_t)n * C, 1};
    self->n_params = 1;
    return CP_OK;
}

static cp_status prompt_create(cp_method *self, const cp_model *m, const cp_method_settings *s,
                               cp_error *err)
{
    const char *init = NULL;
    if (s->n_virtual_tokens <= 0)
        return cp_error_set(err, CP_ERR_INPUT, "--num-virtual-tokens must be positive, got %d",
                            s->n_virtual_tokens);
    cp_status st = resolve_init(s, &init, err);
    if (st == CP_OK)
        st = alloc_state(self, s->n_virtual_tokens, m->cfg.hidden_size, err);
    if (st != CP_OK)
        return st;
    prompt_state *ps = self->state;
    ps->init = init;

    cp_rng rng;
    cp_rng_seed(&rng, s->seed);
    if (strcmp(init, "RANDOM") == 0) {
        cp_prompt_fill_normal(ps->embeddings, (size_t)ps->n * ps->C, &rng);
    } else if (strcmp(init, "SAMPLE_VOCAB") == 0) {
        int32_t *ids = malloc((size_t)ps->n * sizeof *ids);
        if (!ids)
            return cp_error_nomem(err, "token ids", (size_t)ps->n * sizeof *ids);
        for (int i = 0; i < ps->n; i++)
            ids[i] = (int32_t)(cp_rng_next(&rng) % (uint64_t)m->cfg.vocab_size);
        copy_token_rows(m, ps->embeddings, ps->n, ids, (size_t)ps->n);
        free(ids);
    } else {
        ps->init_text = strdup(s->prompt_init_text);
        if (!ps->init_text)
            return cp_error_nomem(err, "the init text", strlen(s->prompt_init_text));
        st = init_from_text(m, ps, s->prompt_init_text, err);
    }
    return st;
}

static cp_status prompt_load(cp_method *self, const cp_model *m, const char *dir, cp_error *err)
{
    cp_prompt_config c = {.peft_type = "PROMPT_TUNING"};
    cp_status st = cp_prompt_config_load(dir, &m->cfg, &c, err);
    if (st == CP_OK && c.token_dim && c.token_dim != m->cfg.hidden_size)
        st = cp_error_set(err, CP_ERR_INPUT,
                          "%s/adapter_config.json: token_dim is %d but the base model's hidden "
                          "size is %d; the adapter was made for another model",
                          dir, c.token_dim, m->cfg.hidden_size);
    if (st == CP_OK)
        st = alloc_state(self, c.n_virtual_tokens, m->cfg.hidden_size, err);
    if (st != CP_OK)
        return st;
    prompt_state *ps = self->state;
    return cp_prompt_embeddings_load(dir, ps->embeddings, ps->n, ps->C, err);
}

static cp_status prompt_save(const cp_method *self, const cp_model *m, const char *dir,
                             const char *base_model, cp_error *err)
{
    const prompt_state *ps = self->state;
    cp_prompt_config c = {
        .peft_type = "PROMPT_TUNING",
        .n_virtual_tokens = ps->n,
        .token_dim = ps->C,
        .num_attention_heads = m->cfg.n_heads,
        .num_layers = m->cfg.n_layers,
        .init = ps->init,
        .init_text = ps->init_text,
    };
    cp_status st = cp_prompt_embeddings_save(dir, ps->embeddings, ps->n, ps->C, err);
    if (st == CP_OK)
        st = cp_prompt_config_save(&c, dir, base_model, err);
    return st;
}

static void prompt_destroy(cp_method *self)
{
    prompt_state *ps = self->state;
    if (!ps)
        return;
    free(ps->embeddings);
    free(ps->init_text);
    free(ps);
}

/* The virtual rows need no activation buffers. */
static cp_status prompt_reserve(cp_method *self, int rows, int training, cp_error *err)
{
    (void)self, (void)rows, (void)training, (void)err;
    return CP_OK;
}

static int prompt_virtual_tokens(const cp_method *self)
{
    return ((const prompt_state *)self->state)->n;
}

static void prompt_embed_virtual(cp_method *self, float *out)
{
    const prompt_state *ps = self->state;
    memcpy(out, ps->embeddings, (size_t)ps->n * ps->C * sizeof(float));
}

/* Every sequence uses the same rows, so their gradients add up. */
static void prompt_embed_virtual_backward(cp_method *self, const float *dout, int B)
{
    prompt_state *ps = self->state;
    size_t n = (size_t)ps->n * ps->C;
    for (int b = 0; b < B; b++)
        cp_add_inplace(ps->grad, dout + b * n, n);
}

const cp_method_ops cp_prompt_method = {
    .name = "prompt",
    .peft_type = "PROMPT_TUNING",
    .summary = "trainable virtual token embeddings before the input (--num-virtual-tokens, "
               "--prompt-init, --prompt-init-text)",
    .saves_modules = 1,
    .create = prompt_create,
    .load = prompt_load,
    .save = prompt_save,
    .destroy = prompt_destroy,
    .reserve = prompt_reserve,
    .virtual_tokens = prompt_virtual_tokens,
    .embed_virtual = prompt_embed_virtual,
    .embed_virtual_backward = prompt_embed_virtual_backward,
};
