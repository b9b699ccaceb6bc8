/* Random-weight GPT-2 checkpoints of any size, with GPT-2's real tokenizer,
 * written by tests that need a GPT-2 model folder. */
#ifndef CP_TEST_RANDOM_GPT2_H
#define CP_TEST_RANDOM_GPT2_H

#include <stdint.h>

/* Writes config.json, model.safetensors and GPT-2's vocab.json and
 * merges.txt into a new folder, and returns the folder. The checkpoint uses
 * GPT-2's names without the "transformer." prefix, with matrices uniform in
 * [-0.02, 0.02], LayerNorm weights 1 and biases 0. The vocabulary is GPT-2's 50257 tokens. *weights_path (when not
 * NULL) gets the checkpoint's path, which the caller frees. */
const char *test_write_random_gpt2(int hidden, int layers, int heads, int positions,
                                   uint64_t seed, char **weights_path);

#endif
