/*
 * PEFT's modules_to_save next to any method: chosen modules of the base
 * (the head, the embeddings, norms) train fully, as float32 copies.
 *
 * A listed name selects every module whose full name ends with it, as PEFT
 * matches modules_to_save: "lm_head", "embed_tokens" (GPT-2 "wte"), "norm"
 * (every RMSNorm: model.norm and each layer's input_layernorm and
 * post_attention_layernorm), "ln_f". Linear projections are rejected (train
 * them with --method full --trainable). A module of a tied head and
 * embedding gets its own copy, which unties it, as PEFT's copy does.
 *
 * Files follow PEFT: adapter_model.safetensors stores each trained copy as
 * base_model.model.<module>.weight (and .bias), and adapter_config.json
 * lists the names under "modules_to_save".
 *
 * NOTE: only the LoRA (and QLoRA), full and BitFit loaders leave these
 * tensors to cp_modules_to_save_load. The IA³, prompt, prefix and bottleneck
 * loaders still reject them, so such runs train and save but do not load.
 */
#ifndef CP_MODULES_TO_SAVE_H
#define CP_MODULES_TO_SAVE_H

#include "core/error.h"
#include "peft/method.h"

struct cp_model;

/* Trains the modules of list (comma-separated) next to method, which must
 * already be attached to m: binds their copies into m, appends them to
 * method->params, and makes the method's save write them too. */
cp_status cp_modules_to_save_attach(cp_method *method, struct cp_model *m, const char *list,
                                    cp_error *err);

/* Reads the modules_to_save of run folder dir, if its adapter_config.json
 * lists any besides a SEQ_CLS head, into method (loaded from dir) and m. */
cp_status cp_modules_to_save_load(cp_method *method, struct cp_model *m, const char *dir,
                                  cp_error *err);

/* Returns 1 if name has the form of a modules_to_save copy PEFT stores
 * (base_model.model.<module>.weight or .bias, not a LoRA tensor and not a
 * SEQ_CLS head), for loaders that must leave those tensors to this file. */
int cp_modules_to_save_is_tensor(const char *name);

#endif
