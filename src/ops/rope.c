/* Rotary position embeddings: frequencies (with linear and llama3 scaling),
 * the rotation itself and its backward. */
#include "ops/rope.h"

#include <math.h>
#include <stddef.h>

/* Llama 3.1's rescaling: wavelengths longer than the original context divided
 * by low_freq_factor are slowed down by factor, those shorter than the
 * context divided by high_freq_factor are kept, and the band between is
 * interpolated linearly in 1/wavelength. */
static double llama3_scale(double inv_freq, const cp_model_config *cfg)
{
    double factor = cfg->rope_factor;
    double lo = cfg->rope_low_freq_factor, hi = cfg->rope_high_freq_factor;
    double old_len = cfg->rope_original_max_position;
    double wavelen = 2.0 * M_PI / inv_freq;

    if (wavelen < old_len / hi)
        return inv_freq;
    if (wavelen > old_len / lo)
        return inv_freq / factor;
    double smooth = (old_len / wavelen - lo) / (hi - lo);
    return (1.0 - smooth) * inv_freq / factor + smooth * inv_freq;
}

void cp_rope_inv_freq(float *inv_freq, const cp_model_config *cfg)
{
    int d = cfg->head_dim;
    for (int i = 0; i < d / 2; i++) {
        /* Rounded to float first, as Hugging Face computes it in float32. */
        double f = (float)(1.0 / pow(cfg->rope_theta, (double)(2 * i) / d));
        if (cfg->rope_scaling == CP_ROPE_SCALING_LINEAR)
            f /= cfg->rope_factor;
        else if (cfg->rope_scaling == CP_ROPE_SCALING_LLAMA3)
            f = llama3_scale(f, cfg);
        inv_freq[i] = (float)f;
    }
}

/* Rotates every rotate-half pair of x (N, n_heads, head_dim) by
 * direction * pos * inv_freq: +1 applies RoPE, -1 undoes it. */
static void rotate(float *x, const int *pos, int N, int n_heads, int head_dim,
                   const float *inv_freq, float direction)
{
    int half = head_dim / 2;
#pragma omp parallel for if (N > 16)
    for (int n = 0; n < N; n++) {
        for (int i = 0; i < half; i++) {
            float angle = (float)pos[n] * inv_freq[i];
            float c = cosf(angle), s = direction * sinf(angle);
            for (int h = 0; h < n_heads; h++) {
                float *head = x + ((size_t)n * n_heads + h) * head_dim;
                float a = head[i], b = head[i + half];
                head[i] = a * c - b * s;
                head[i + half] = b * c + a * s;
            }
        }
    }
}

void cp_rope_forward(float *x, const int *pos, int N, int n_heads, int head_dim,
                     const float *inv_freq)
{
    rotate(x, pos, N, n_heads, head_dim, inv_freq, 1.0f);
}

/* The forward, head[i] = a c - b s and head[i + half] = b c + a s, is a
 * rotation by +angle; its transpose, the rotation by -angle, carries the
 * gradient dx (N, n_heads, head_dim) back. */
void cp_rope_backward(float *dx, const int *pos, int N, int n_heads, int head_dim,
                      const float *inv_freq)
{
    rotate(dx, pos, N, n_heads, head_dim, inv_freq, -1.0f);
}
