/*
 * cpeft: adapt pretrained language models on a CPU.
 *
 * This header is the public C API: loading a Hugging Face model folder
 * (GPT-2, Llama, Mistral, Qwen2), tokenizing, generating and evaluating,
 * with or without a LoRA adapter. Handles are opaque; every function
 * that allocates names who frees. Functions that can fail return a cp_status
 * and fill a caller-provided cp_error with a one-line message that names the
 * file, the position and what to do. The library never prints and never exits.
 *
 * Enums are append-only: values keep their numbers across versions.
 */
#ifndef CPEFT_H
#define CPEFT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum cp_status {
    CP_OK = 0,
    CP_ERR_INPUT,    /* bad user input: files, options, data (the CLI exits with 2) */
    CP_ERR_IO,       /* the operating system failed a read or write */
    CP_ERR_NOMEM,    /* an allocation failed */
    CP_ERR_INTERNAL, /* a bug in cpeft */
} cp_status;

#define CP_ERROR_MSG_MAX 1024

typedef struct cp_error {
    cp_status code;
    char msg[CP_ERROR_MSG_MAX];
} cp_error;

/* ---- tokenizer ---------------------------------------------------------- */

typedef struct cp_tokenizer cp_tokenizer;

/* Loads a SentencePiece tokenizer.model, a Hugging Face tokenizer.json
 * (byte-level BPE), or a folder holding one of those or GPT-2's vocab.json +
 * merges.txt (tried in that order).
 * Release with cp_tokenizer_free. */
cp_status cp_tokenizer_load(const char *path, cp_tokenizer **out, cp_error *err);
void cp_tokenizer_free(cp_tokenizer *t);

int cp_tokenizer_vocab_size(const cp_tokenizer *t);
int32_t cp_tokenizer_bos_id(const cp_tokenizer *t); /* -1 if none */
int32_t cp_tokenizer_eos_id(const cp_tokenizer *t); /* -1 if none */

/* Encodes len bytes of text into a malloc'd id array that the caller frees;
 * BOS first if add_bos. */
cp_status cp_tokenizer_encode(const cp_tokenizer *t, const char *text, size_t len, int add_bos,
                              int32_t **ids, size_t *n_ids, cp_error *err);

/* Decodes ids into a malloc'd NUL-terminated string that the caller frees.
 * Control tokens produce no text; an id outside the vocabulary is an error. */
cp_status cp_tokenizer_decode(const cp_tokenizer *t, const int32_t *ids, size_t n_ids,
                              char **text, size_t *len, cp_error *err);

/* ---- model -------------------------------------------------------------- */

typedef struct cp_model cp_model;

/* Loads a Hugging Face model folder (config.json + safetensors). The frozen
 * weights stay in a read-only memory map where their dtype and alignment
 * allow. Release with cp_model_free. */
cp_status cp_model_load(const char *dir, cp_model **out, cp_error *err);
void cp_model_free(cp_model *m);

/* Loads the LoRA adapter in dir (adapter_config.json and
 * adapter_model.safetensors in PEFT's layout, written by cpeft or by PEFT)
 * and applies it to every later generate and evaluate call. The model owns
 * the adapter; loading another replaces it. */
cp_status cp_model_load_adapter(cp_model *m, const char *dir, cp_error *err);

int cp_model_vocab_size(const cp_model *m);
int cp_model_context_length(const cp_model *m);

/* Sampling settings for cp_generate; cp_generate_default_params gives greedy
 * decoding of 256 tokens. */
typedef struct cp_generate_params {
    int max_new_tokens;
    float temperature; /* 0: greedy */
    float top_p;       /* nucleus sampling mass, 1: off */
    uint64_t seed;
    int stop_at_eos;   /* 1: stop after generating the EOS token */
} cp_generate_params;

cp_generate_params cp_generate_default_params(void);

/* Continues the n_prompt ids in prompt. On success *out is a malloc'd array
 * of the *n_out new ids (the caller frees it). The prompt plus the new
 * tokens must fit the model's context length. */
cp_status cp_generate(cp_model *m, const int32_t *prompt, size_t n_prompt,
                      const cp_generate_params *params, int32_t **out, size_t *n_out,
                      cp_error *err);

/* Mean next-token cross-entropy over consecutive windows of seq_len inputs:
 * window k reads ids[k*seq_len, (k+1)*seq_len) and predicts the ids one
 * further on; a partial last window is dropped. */
typedef struct cp_eval_result {
    double loss;       /* nats per predicted token */
    double perplexity; /* exp(loss) */
    size_t tokens;     /* predicted tokens */
} cp_eval_result;

cp_status cp_model_evaluate(cp_model *m, const int32_t *ids, size_t n_ids, int seq_len,
                            cp_eval_result *out, cp_error *err);

#ifdef __cplusplus
}
#endif

#endif
