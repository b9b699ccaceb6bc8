/*
 * Training data as token ids: a .txt or .jsonl file becomes one token stream,
 * the stream's tail is held out for evaluation, and the rest is cut into
 * windows of seq_len + 1 ids that are shuffled once per epoch and handed out
 * in batches.
 *
 * Windows are cut as cp_model_evaluate cuts them: with N = seq_len, window k
 * is ids[kN, kN + N + 1), so it reads ids[kN, (k+1)N) and predicts
 * ids[kN + 1, (k+1)N + 1), and consecutive windows share their boundary id.
 * A partial last window is dropped. There is no padding, loss masking or
 * chat/instruction format yet: only plain text and {"text": ...} records.
 */
#ifndef CP_DATASET_H
#define CP_DATASET_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"
#include "core/rng.h"
#include "cpeft.h"

/* Tokenizes a whole file into a malloc'd id stream that the caller frees.
 *   *.jsonl  one JSON object per line with a string field "text"; each record
 *            is encoded on its own, with BOS when add_bos is 1 and with EOS
 *            appended when the tokenizer has one, and the records are
 *            concatenated. Blank lines are skipped. A bad line is a
 *            CP_ERR_INPUT error that names the file and the 1-based line.
 *   *.json   rejected: a JSON document is not a list of records.
 *   other    plain text, encoded once as one text (BOS once at the start
 *            when add_bos is 1).
 * An empty file, or a .jsonl file without records, is a CP_ERR_INPUT error. */
cp_status cp_dataset_tokenize_file(const cp_tokenizer *tok, const char *path, int add_bos,
                                   int32_t **ids, size_t *n_ids, cp_error *err);

/* Settings for cp_dataset_init; cp_dataset_default_params leaves the paths
 * NULL and context_length 0, which the caller must set. */
typedef struct cp_dataset_params {
    const char *train_path; /* .txt or .jsonl */
    const char *eval_path;  /* separate held-out file, or NULL to split train_path */
    int seq_len;            /* N: inputs per window (default 512) */
    int context_length;     /* the model's context length; seq_len may not exceed it */
    double eval_split;      /* held-out fraction of the stream when eval_path is NULL,
                             * in [0, 1) (default 0.05; 0: no held-out stream) */
    int add_bos;            /* 1: BOS as tokenizer_config.json's add_bos_token (default 1) */
    uint64_t seed;          /* seeds the shuffle of every epoch (default 42) */
} cp_dataset_params;

cp_dataset_params cp_dataset_default_params(void);

/* The training stream, its windows and the shuffle state, plus the held-out
 * stream. Fields are read-only for callers. */
typedef struct cp_dataset {
    int seq_len;              /* N */
    const int32_t *train_ids; /* (n_train,) the stream that windows are cut from */
    size_t n_train;
    const int32_t *eval_ids;  /* (n_eval,) held-out stream; NULL when n_eval is 0 */
    size_t n_eval;
    size_t n_windows;         /* (n_train - 1) / N */
    size_t *order;            /* (n_windows,) window indices in this epoch's order */
    size_t cursor;            /* windows of this epoch handed out so far */
    int64_t epoch;            /* 0-based index of the current epoch */
    cp_rng rng;               /* shuffle stream; each epoch continues it */
    int32_t *ids;             /* owned: train_path's stream (training part, then held-out) */
    int32_t *eval_file_ids;   /* owned: eval_path's stream, or NULL */
} cp_dataset;

/* Tokenizes the files and shuffles epoch 0. The held-out stream is either
 * eval_path's stream or the last floor(eval_split * n) ids of train_path's
 * stream, split off before windowing so that no window spans both parts.
 * CP_ERR_INPUT errors, each one line naming the file where there is one:
 * seq_len outside [1, context_length], an empty file, a training stream
 * shorter than N + 1 ids (the message gives both counts), or a non-empty
 * held-out stream shorter than N + 1 ids. Release with cp_dataset_free. */
cp_status cp_dataset_init(cp_dataset *ds, const cp_tokenizer *tok, const cp_dataset_params *p,
                          cp_error *err);
void cp_dataset_free(cp_dataset *ds);

/* Returns the number of training windows, (n_train - 1) / seq_len. */
size_t cp_dataset_n_windows(const cp_dataset *ds);

/* Returns window k (k < n_windows): seq_len + 1 ids inside train_ids. */
const int32_t *cp_dataset_window(const cp_dataset *ds, size_t k);

/* Copies the next B windows of the shuffled order into batch, which is
 * (B, seq_len + 1) int32: row b holds the inputs batch[b][0..N) and the
 * targets batch[b][1..N]. When the epoch runs out in the middle of a batch,
 * the next epoch starts (a new shuffle continuing the same random stream)
 * and fills the rest, so every batch is full and every epoch visits each
 * window exactly once. With B > n_windows a batch repeats windows. windows,
 * if not NULL, receives the B window indices. */
void cp_dataset_next_batch(cp_dataset *ds, int32_t *batch, int B, size_t *windows);

#endif
