/*
 * Reads llama2.c's legacy checkpoint format (export.py --version 0) and
 * converts it to a Hugging Face Llama folder.
 *
 * The file starts with 7 little-endian int32: dim, hidden_dim, n_layers,
 * n_heads, n_kv_heads, vocab_size and seq_len. A negative vocab_size means
 * that the classifier is stored separately. Float32 arrays follow: token
 * embedding, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, the
 * RoPE tables freq_cis_real and freq_cis_imag, then wcls when not shared.
 * The versioned formats that start with the "ak42" magic are rejected.
 */
#ifndef CP_LLAMA2C_H
#define CP_LLAMA2C_H

#include "core/error.h"
#include "core/file.h"

/* The header, with the classifier flag split out of vocab_size. */
typedef struct cp_llama2c_config {
    int dim;               /* C, the model width */
    int hidden_dim;        /* F, the MLP width */
    int n_layers;          /* L */
    int n_heads;
    int n_kv_heads;
    int vocab_size;        /* V, always positive here */
    int seq_len;           /* the context length the model was trained with */
    int shared_classifier; /* 1: the output layer reuses the token embedding */
} cp_llama2c_config;

/* An open checkpoint. The weight pointers point into the read-only map of
 * the file and stay valid until cp_llama2c_close. Matrices are row-major in
 * PyTorch's (out_features, in_features) order, with the layers stacked
 * first. head_dim is C / n_heads. */
typedef struct cp_llama2c {
    cp_llama2c_config config;
    cp_mapped_file file;
    const float *token_embedding; /* (V, C) */
    const float *rms_att;         /* (L, C) */
    const float *wq;              /* (L, n_heads * head_dim, C) */
    const float *wk;              /* (L, n_kv_heads * head_dim, C) */
    const float *wv;              /* (L, n_kv_heads * head_dim, C) */
    const float *wo;              /* (L, C, n_heads * head_dim) */
    const float *rms_ffn;         /* (L, C) */
    const float *w1;              /* (L, F, C), the gate projection */
    const float *w2;              /* (L, C, F), the down projection */
    const float *w3;              /* (L, F, C), the up projection */
    const float *rms_final;       /* (C) */
    const float *wcls;            /* (V, C), equal to token_embedding when shared */
} cp_llama2c;

/* Maps path and checks the header against the file size. Returns
 * CP_ERR_INPUT for a truncated or oversized file, a dimension that is not
 * positive, heads that do not divide dim, key/value heads that do not divide
 * the heads, an odd head_dim, or sizes that overflow. The message names the
 * file, the byte offset, the defect and the fix. On failure *out is closed. */
cp_status cp_llama2c_open(const char *path, cp_llama2c *out, cp_error *err);
void cp_llama2c_close(cp_llama2c *ck);

/* Converts checkpoint_path and the SentencePiece tokenizer_path into the
 * folder out_dir: config.json, model.safetensors (float32), tokenizer.model
 * and tokenizer_config.json. The rows of every q and k projection are
 * reordered from llama2.c's interleaved RoPE pairs to the halves that
 * Hugging Face's rotate-half RoPE expects. Missing parent folders are
 * created. out_dir must not exist or be an empty folder. The files are
 * written into a temporary sibling folder that is renamed to out_dir once
 * complete, so on failure out_dir is left as it was (created parents stay). */
cp_status cp_llama2c_convert(const char *checkpoint_path, const char *tokenizer_path,
                             const char *out_dir, cp_error *err);

#endif
