/*
 * Tokenizers behind one interface: text bytes to token ids and back.
 *
 * cp_tokenizer_load takes a SentencePiece `tokenizer.model`, a byte-level BPE
 * `tokenizer.json`, a GGUF file whose tokenizer.ggml.model is "llama" or
 * "gpt2" (see tokenizer_gguf.c), or a folder holding `tokenizer.model`,
 * `tokenizer.json` or `vocab.json` + `merges.txt`.
 */
#ifndef CP_TOKENIZER_H
#define CP_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"
#include "cpeft.h"

#include "tokenizer/bpe.h"
#include "tokenizer/sentencepiece.h"

/* The interface is public: see cp_tokenizer_* in include/cpeft.h. */

/* Builds the tokenizer stored in a GGUF file's tokenizer.ggml.* metadata.
 * On success exactly one of *sp and *bpe is set, and the caller owns it. */
cp_status cp_tokenizer_gguf_load(const char *path, cp_sp_model **sp, cp_bpe_model **bpe,
                                 cp_error *err);

/* Sets *add_bos from the GGUF file's tokenizer.ggml.add_bos_token. Without
 * the key it is 1 when t (loaded from path) has a BOS token, else 0. */
/* Loads the tokenizer at path (a model folder, a tokenizer file or a GGUF
 * file) and sets *add_bos from where that kind records it: the folder's
 * tokenizer_config.json or the GGUF metadata; 1 otherwise. */
cp_status cp_tokenizer_load_with_bos(const char *path, cp_tokenizer **tok, int *add_bos,
                                     cp_error *err);

cp_status cp_tokenizer_gguf_add_bos(const char *path, const cp_tokenizer *t, int *add_bos,
                                    cp_error *err);

#endif
