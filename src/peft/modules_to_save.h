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
 * A method whose weights go elsewhere (the bottleneck adapter's AdapterHub
 * adapter.safetensors) gets the copies in that file, under the same names.
 * The loaders of every method that sets saves_modules accept the
 * "modules_to_save" key and leave these tensors to cp_modules_to_save_load.
 */
#ifndef CP_MODULES_TO_SAVE_H
#define CP_MODULES_TO_SAVE_H

#include "core/error.h"
#include "io/safetensors.h"
#include "peft/method.h"

struct cJSON;
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

/* The number of tensors of file that cp_modules_to_save_is_tensor claims. */
size_t cp_modules_to_save_count(const cp_safetensors *file);

/* Checks a method loader's adapter_config.json (root, read from path): its
 * "modules_to_save" must be absent, null or a list of module names, which
 * cp_modules_to_save_load then reads. */
cp_status cp_modules_to_save_check_config(const struct cJSON *root, const char *path,
                                          cp_error *err);

#endif
