/*
 * LoRA adapters on disk in Hugging Face PEFT's layout: a run folder with
 * adapter_config.json and adapter_model.safetensors, tensors named after the
 * base model's modules (cp_lora_tensor_name).
 *
 * Loading accepts adapters cpeft or PEFT wrote for the same base model, with
 * task_type CAUSAL_LM or SEQ_CLS (whose classification head
 * cp_seq_cls_load reads), with or without DoRA. A DoRA adapter (use_dora)
 * has one 1-D "...lora_magnitude_vector" tensor per adapted module.
 * Loading rejects settings it cannot apply (other modules_to_save, per-layer
 * rank or alpha patterns, layer subsets, regex targets) by name, and reads
 * target_modules null as PEFT's default for the architecture.
 */
#ifndef CP_LORA_IO_H
#define CP_LORA_IO_H

#include "peft/lora.h"

/* Writes adapter_config.json and adapter_model.safetensors into dir (which
 * must exist), each atomically. base_model is recorded as
 * base_model_name_or_path. */
cp_status cp_lora_save(const cp_lora *lora, const char *dir, const char *base_model,
                       cp_error *err);

/* Reads the adapter in dir for a model of config cfg into a fresh lora
 * (release with cp_lora_free). */
cp_status cp_lora_load(cp_lora *lora, const char *dir, const cp_model_config *cfg,
                       cp_error *err);

/* PEFT's tensor name for one slot's A ('A') or B ('B') matrix, e.g.
 * base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight, or for
 * GPT-2 base_model.model.transformer.h.0.attn.c_attn.lora_A.weight; 'M'
 * names the DoRA magnitude, ...q_proj.lora_magnitude_vector, as PEFT saves it. */
void cp_lora_tensor_name(const cp_model_config *cfg, char *buf, size_t size, int layer,
                         cp_proj p, char which);

#endif
