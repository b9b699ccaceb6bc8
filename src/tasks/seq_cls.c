/*
 * The sequence classification head: its parameters, its forward pass on the
 * last token's final hidden state, and a whole-model classify call.
 *
 * NOTE: there is no backward pass yet, so the gradients stay zero until a
 * trainer adds one.
 */
#include "tasks/seq_cls.h"

#include <stdlib.h>
#include <string.h>

#include "peft/method.h"

cp_status cp_seq_cls_init(cp_seq_cls *head, int num_labels, int hidden, int has_bias,
                          cp_error *err)
{
    memset(head, 0, sizeof *head);
    if (num_labels < 1 || hidden < 1)
        return cp_error_set(err, CP_ERR_INPUT,
                            "a classification head needs at least 1 label and 1 hidden unit, "
                            "found %d labels and %d hidden units",
                            num_labels, hidden);
    size_t n_weight = (size_t)num_labels * hidden, n_bias = has_bias ? (size_t)num_labels : 0;
    size_t total = 2 * (n_weight + n_bias);
    head->memory = calloc(total, sizeof(float));
    if (!head->memory)
        return cp_error_nomem(err, "the classification head", total * sizeof(float));

    head->num_labels = num_labels;
    head->hidden = hidden;
    head->weight = head->memory;
    head->grad_weight = head->weight + n_weight;
    if (has_bias) {
        head->bias = head->grad_weight + n_weight;
        head->grad_bias = head->bias + n_bias;
    }
    return CP_OK;
}

void cp_seq_cls_free(cp_seq_cls *head)
{
    free(head->memory);
    memset(head, 0, sizeof *head);
}

int cp_seq_cls_params(cp_seq_cls *head, cp_param_ref *params)
{
    params[0] = (cp_param_ref){.name = "score.weight",
                               .param = head->weight,
                               .grad = head->grad_weight,
                               .n = (size_t)head->num_labels * head->hidden,
                               .decay = 1};
    if (!head->bias)
        return 1;
    params[1] = (cp_param_ref){.name = "score.bias",
                               .param = head->bias,
                               .grad = head->grad_bias,
                               .n = (size_t)head->num_labels,
                               .decay = 0};
    return 2;
}

void cp_seq_cls_forward(const cp_seq_cls *head, float *logits, const float *hidden, int B, int T,
                        const int *lengths)
{
    int L = head->num_labels, C = head->hidden;
    for (int b = 0; b < B; b++) {
        int t = lengths ? lengths[b] - 1 : T - 1;
        CP_ASSERT(t >= 0 && t < T);
        const float *h = hidden + ((size_t)b * T + t) * C;
        for (int j = 0; j < L; j++) {
            const float *w = head->weight + (size_t)j * C;
            float sum = head->bias ? head->bias[j] : 0.0f;
            for (int i = 0; i < C; i++)
                sum += w[i] * h[i];
            logits[(size_t)b * L + j] = sum;
        }
    }
}

/* Checks the shapes, ids and lengths of a classify call. */
static cp_status check_inputs(const cp_model *m, const cp_seq_cls *head, const int32_t *ids,
                              int B, int T, const int *lengths, cp_error *err)
{
    const cp_model_config *c = &m->cfg;
    if (head->hidden != c->hidden_size)
        return cp_error_set(err, CP_ERR_INPUT,
                            "the classification head reads %d hidden units but the model has "
                            "hidden size %d; load a head made for this model",
                            head->hidden, c->hidden_size);
    if (B < 1 || T < 1 || T > c->max_position_embeddings)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%d sequences of %d tokens: expected at least 1 sequence and 1 to %d "
                            "tokens, the model's context length",
                            B, T, c->max_position_embeddings);
    size_t bad = cp_model_find_bad_id(m, ids, (size_t)B * T);
    if (bad)
        return cp_error_set(err, CP_ERR_INPUT, "token %zu has id %d, outside the vocabulary of %d",
                            bad - 1, ids[bad - 1], c->vocab_size);
    for (int b = 0; lengths && b < B; b++)
        if (lengths[b] < 1 || lengths[b] > T)
            return cp_error_set(err, CP_ERR_INPUT,
                                "sequence %d has length %d, outside [1, %d] (the padded length)",
                                b, lengths[b], T);
    return CP_OK;
}

cp_status cp_seq_cls_classify(cp_model *m, const cp_seq_cls *head, const int32_t *ids, int B,
                              int T, const int *lengths, float *logits, float *final_hidden,
                              cp_error *err)
{
    cp_status st = check_inputs(m, head, ids, B, T, lengths, err);
    if (st != CP_OK)
        return st;

    cp_forward_buffers fb;
    st = cp_forward_buffers_init(&fb, &m->cfg, B, T, 0, err);
    if (st == CP_OK && m->method)
        st = m->method->ops->reserve(m->method, B * T, 0, err);
    if (st != CP_OK) {
        cp_forward_buffers_free(&fb);
        return st;
    }

    /* Classification runs without dropout, also in the middle of training. */
    int was_training = m->method ? m->method->training : 0;
    if (m->method)
        m->method->training = 0;
    /* NOTE: cp_model_forward also computes the language-model logits
     * (B, T, vocab), which the head does not need. For GPT-2 124M that
     * product is about a third of a short pass's arithmetic (an estimate
     * from the parameter counts: 39M of 124M multiply every token). */
    cp_model_forward(m, &fb, ids);
    if (m->method)
        m->method->training = was_training;

    cp_seq_cls_forward(head, logits, fb.norm_f, B, T, lengths);
    if (final_hidden)
        memcpy(final_hidden, fb.norm_f, (size_t)B * T * head->hidden * sizeof(float));
    cp_forward_buffers_free(&fb);
    return CP_OK;
}
