/*
 * Learning-rate schedules with linear warmup, as Hugging Face transformers
 * 4.x defines them (get_cosine_schedule_with_warmup with num_cycles 0.5,
 * get_linear_schedule_with_warmup, get_constant_schedule_with_warmup) and as
 * its Trainer steps them: optimizer step s (0-based) of S uses lr(s), so the
 * first warmup step has learning rate 0. Restarts, minimum learning rates and
 * other shapes are not implemented.
 */
#ifndef CP_SCHEDULE_H
#define CP_SCHEDULE_H

#include <stdint.h>

#include "core/error.h"

/* Append-only: values keep their numbers. */
typedef enum cp_schedule_kind {
    CP_SCHEDULE_COSINE = 0, /* half cosine from peak_lr down to 0 at total_steps (the default) */
    CP_SCHEDULE_LINEAR,     /* straight line from peak_lr down to 0 at total_steps */
    CP_SCHEDULE_CONSTANT,   /* peak_lr after warmup */
} cp_schedule_kind;

/* Sets *kind from "cosine", "linear" or "constant"; any other name is a
 * CP_ERR_INPUT error that lists those three. */
cp_status cp_schedule_parse(const char *name, cp_schedule_kind *kind, cp_error *err);

/* Returns the name that cp_schedule_parse accepts for kind. */
const char *cp_schedule_name(cp_schedule_kind kind);

/* Returns the warmup length as TrainingArguments.get_warmup_steps resolves
 * it: warmup_steps when > 0, otherwise ceil(total_steps * warmup_ratio). */
int64_t cp_schedule_warmup_steps(int64_t warmup_steps, double warmup_ratio, int64_t total_steps);

typedef struct cp_schedule {
    cp_schedule_kind kind;
    double peak_lr;      /* learning rate at the end of warmup */
    int64_t warmup;      /* W: steps of linear warmup from 0 */
    int64_t total_steps; /* S: optimizer steps in the run */
} cp_schedule;

/* Fills s after checking peak_lr >= 0 and finite, total_steps >= 1,
 * warmup_steps >= 0 and warmup_ratio in [0, 1]. A warmup longer than the run
 * is accepted, as transformers accepts it: the rate then never reaches
 * peak_lr. */
cp_status cp_schedule_init(cp_schedule *s, cp_schedule_kind kind, double peak_lr,
                           int64_t warmup_steps, double warmup_ratio, int64_t total_steps,
                           cp_error *err);

/* Returns the learning rate of optimizer step `step` (0-based):
 * peak_lr * step / W during warmup, then the decay of s->kind. Steps at or
 * past total_steps return 0 for cosine and linear. */
double cp_schedule_lr(const cp_schedule *s, int64_t step);

#endif
