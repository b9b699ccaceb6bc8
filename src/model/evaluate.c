/*
 * Perplexity evaluation over consecutive, non-overlapping windows of a token
 * stream, several windows per forward pass.
 */
#include <math.h>
#include <stdlib.h>

#include "model/model.h"
#include "ops/cross_entropy.h"
#include "peft/method.h"

/* Windows per forward pass: enough to keep the matmuls busy, few enough that
 * the (B, H, S, P + S) attention probabilities and the (B, S, V) logits
 * stay within 32 MB. A window has
 * S = n_virtual + T rows after the method's P prefix positions. */
static int windows_per_batch(const cp_model *m, int T)
{
    size_t S = (size_t)cp_model_virtual_tokens(m) + T, P = (size_t)cp_model_prefix_tokens(m);
    size_t att_bytes = (size_t)m->cfg.n_heads * S * (P + S) * sizeof(float);
    size_t logits_bytes = S * (size_t)m->cfg.vocab_size * sizeof(float);
    size_t budget = (size_t)32 << 20;
    int B = (int)(budget / (att_bytes + logits_bytes + 1));
    if (B > 16)
        B = 16;
    return B < 1 ? 1 : B;
}

cp_status cp_model_evaluate(cp_model *m, const int32_t *ids, size_t n_ids, int seq_len,
                            cp_eval_result *out, cp_error *err)
{
    const cp_model_config *c = &m->cfg;
    if (seq_len <= 0 || seq_len > c->max_position_embeddings)
        return cp_error_set(err, CP_ERR_INPUT,
                            "sequence length %d is outside [1, %d], the model's context length",
                            seq_len, c->max_position_embeddings);
    size_t n_windows = n_ids > 0 ? (n_ids - 1) / (size_t)seq_len : 0;
    if (n_windows == 0)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%zu tokens do not fill one window of %d inputs plus one target; "
                            "use more text or a smaller --seq-len",
                            n_ids, seq_len);
    size_t bad = cp_model_find_bad_id(m, ids, n_windows * seq_len + 1);
    if (bad)
        return cp_error_set(err, CP_ERR_INPUT, "token %zu has id %d, outside the vocabulary of %d",
                            bad - 1, ids[bad - 1], c->vocab_size);

    int B = windows_per_batch(m, seq_len);
    if ((size_t)B > n_windows)
        B = (int)n_windows;
    cp_forward_buffers fb;
    cp_status st = cp_forward_buffers_init_model(&fb, m, B, seq_len, 0, err);
    if (st == CP_OK && m->method)
        st = m->method->ops->reserve(m->method, B * fb.S, 0, err);
    if (st != CP_OK) {
        cp_forward_buffers_free(&fb);
        return st;
    }
    /* Evaluation runs without dropout, also in the middle of training. */
    int was_training = m->method ? m->method->training : 0;
    if (m->method)
        m->method->training = 0;
    float *losses = malloc((size_t)B * seq_len * sizeof *losses);
    if (!losses) {
        cp_forward_buffers_free(&fb);
        return cp_error_nomem(err, "losses", (size_t)B * seq_len * sizeof *losses);
    }

    double total = 0.0;
    for (size_t w = 0; w < n_windows; w += (size_t)B) {
        int nb = (int)(n_windows - w < (size_t)B ? n_windows - w : (size_t)B);
        fb.B = nb; /* a smaller last batch uses a prefix of the buffers */
        const int32_t *inputs = ids + w * seq_len;
        cp_model_forward(m, &fb, inputs);
        /* Window k's targets are its inputs shifted by one; consecutive windows
         * make the whole batch's targets one contiguous run. */
        cp_cross_entropy_forward(losses, fb.logits, inputs + 1, nb * seq_len, c->vocab_size);
        for (int i = 0; i < nb * seq_len; i++)
            total += losses[i];
    }

    if (m->method)
        m->method->training = was_training;
    free(losses);
    cp_forward_buffers_free(&fb);
    out->tokens = n_windows * (size_t)seq_len;
    out->loss = total / (double)out->tokens;
    out->perplexity = exp(out->loss);
    return CP_OK;
}
