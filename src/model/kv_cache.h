/*
 * Incremental decoding with a key/value cache: one token at a time, each
 * attending to the cached keys and values of every earlier position,
 * including a method's prefix and virtual rows (cp_kv_cache_start).
 */
#ifndef CP_KV_CACHE_H
#define CP_KV_CACHE_H

#include "model/model.h"

typedef struct cp_kv_cache {
    int n_ctx;       /* positions the cache has room for */
    int len;         /* positions filled so far */
    float *k;        /* (n_layers, n_ctx, KVH, D) keys after RoPE (prefix keys as given) */
    float *v;        /* (n_layers, n_ctx, KVH, D) */
    float *x;        /* (C) residual stream of the current token */
    float *xn;       /* (C) */
    float *q;        /* (H, D) */
    float *attn_out; /* (H, D) */
    float *proj;     /* (C) */
    float *gate;     /* (F) */
    float *up;       /* (F) */
    float *hidden;   /* (F) the MLP's activation */
    float *qkv;      /* (H D + 2 KVH D) a fused q/k/v product */
    float *scores;   /* (H, n_ctx) */
    float *logits;   /* (V) */
    float *memory;   /* the single allocation behind every buffer above */
} cp_kv_cache;

cp_status cp_kv_cache_init(cp_kv_cache *kv, const cp_model_config *cfg, int n_ctx,
                           cp_error *err);
void cp_kv_cache_free(cp_kv_cache *kv);

/* Feeds what the attached method places before the first token: its
 * attention prefix as cache rows 0..P-1 of every layer, then its virtual
 * rows, one position each. Call once on an empty cache with room for them;
 * without such a method it does nothing. */
cp_status cp_kv_cache_start(const cp_model *m, cp_kv_cache *kv, cp_error *err);

/* Feeds token at position kv->len, appends its keys and values, and leaves
 * the next-token logits in kv->logits. The cache must not be full. */
void cp_kv_cache_step(const cp_model *m, cp_kv_cache *kv, int32_t token);

#endif
