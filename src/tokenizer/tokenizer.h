/*
 * Tokenizers behind one interface: text bytes to token ids and back.
 *
 * cp_tokenizer_load takes a SentencePiece `tokenizer.model`, a byte-level BPE
 * `tokenizer.json`, or a folder holding one of them or `vocab.json` +
 * `merges.txt`. GGUF vocabularies are not loaded yet and are rejected with a
 * message that states it.
 */
#ifndef CP_TOKENIZER_H
#define CP_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"
#include "cpeft.h"

/* The interface is public: see cp_tokenizer_* in include/cpeft.h. */

#endif
