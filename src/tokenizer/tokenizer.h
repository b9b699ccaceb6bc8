/*
 * Tokenizers behind one interface: text bytes to token ids and back.
 *
 * cp_tokenizer_load takes a SentencePiece `tokenizer.model` file or a model
 * folder that holds one. Byte-level BPE (`tokenizer.json`, `vocab.json` +
 * `merges.txt`) and GGUF vocabularies are not implemented yet and are
 * rejected with a message that says so.
 */
#ifndef CP_TOKENIZER_H
#define CP_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"
#include "cpeft.h"

/* The interface is public: see cp_tokenizer_* in include/cpeft.h. */

#endif
