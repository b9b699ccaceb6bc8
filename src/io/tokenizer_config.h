/*
 * The parts of a Hugging Face `tokenizer_config.json` that change how text
 * becomes ids. Only add_bos_token is read so far.
 */
#ifndef CP_TOKENIZER_CONFIG_H
#define CP_TOKENIZER_CONFIG_H

#include "core/error.h"

/* Sets *add_bos from dir/tokenizer_config.json's add_bos_token. A missing
 * file or key means 1, as SentencePiece Llama tokenizers default to BOS. */
cp_status cp_tokenizer_config_add_bos(const char *dir, int *add_bos, cp_error *err);

#endif
