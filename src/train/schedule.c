/*
 * Learning-rate schedules. Each formula is transformers' lr_lambda evaluated
 * in double in the same order of operations as its Python floats.
 */
#include <math.h>
#include <string.h>

#include "train/schedule.h"

static const char *const kind_names[] = {
    [CP_SCHEDULE_COSINE] = "cosine",
    [CP_SCHEDULE_LINEAR] = "linear",
    [CP_SCHEDULE_CONSTANT] = "constant",
};
#define N_KINDS (int)(sizeof kind_names / sizeof *kind_names)

cp_status cp_schedule_parse(const char *name, cp_schedule_kind *kind, cp_error *err)
{
    for (int k = 0; k < N_KINDS; k++) {
        if (strcmp(name, kind_names[k]) == 0) {
            *kind = (cp_schedule_kind)k;
            return CP_OK;
        }
    }
    /* transformers' name for the same shape; its "constant" has no warmup,
     * which is this "constant" with 0 warmup steps. */
    if (strcmp(name, "constant_with_warmup") == 0) {
        *kind = CP_SCHEDULE_CONSTANT;
        return CP_OK;
    }
    return cp_error_set(err, CP_ERR_INPUT,
                        "unknown learning-rate schedule \"%s\"; expected cosine, linear or constant",
                        name);
}

const char *cp_schedule_name(cp_schedule_kind kind)
{
    CP_ASSERT((int)kind >= 0 && (int)kind < N_KINDS);
    return kind_names[kind];
}

int64_t cp_schedule_warmup_steps(int64_t warmup_steps, double warmup_ratio, int64_t total_steps)
{
    if (warmup_steps > 0)
        return warmup_steps;
    return (int64_t)ceil((double)total_steps * warmup_ratio);
}

cp_status cp_schedule_init(cp_schedule *s, cp_schedule_kind kind, double peak_lr,
                           int64_t warmup_steps, double warmup_ratio, int64_t total_steps,
                           cp_error *err)
{
    CP_ASSERT((int)kind >= 0 && (int)kind < N_KINDS);
    if (!(peak_lr >= 0.0) || !isfinite(peak_lr))
        return cp_error_set(err, CP_ERR_INPUT,
                            "learning rate %g must be non-negative and finite", peak_lr);
    if (total_steps < 1)
        return cp_error_set(err, CP_ERR_INPUT,
                            "the run has %lld optimizer steps; a schedule needs at least 1",
                            (long long)total_steps);
    if (warmup_steps < 0)
        return cp_error_set(err, CP_ERR_INPUT, "warmup steps %lld must be >= 0",
                            (long long)warmup_steps);
    if (!(warmup_ratio >= 0.0 && warmup_ratio <= 1.0))
        return cp_error_set(err, CP_ERR_INPUT, "warmup ratio %g must lie in [0, 1]",
                            warmup_ratio);

    s->kind = kind;
    s->peak_lr = peak_lr;
    s->warmup = cp_schedule_warmup_steps(warmup_steps, warmup_ratio, total_steps);
    s->total_steps = total_steps;
    return CP_OK;
}

/* The multiplier of peak_lr after warmup, step >= W. */
static double decay_factor(const cp_schedule *s, int64_t step)
{
    int64_t W = s->warmup, S = s->total_steps;
    double span = (double)(S - W > 1 ? S - W : 1);
    switch (s->kind) {
    case CP_SCHEDULE_COSINE: {
        double progress = (double)(step - W) / span;
        /* transformers' cosine rises again past S; it stays at 0 here. */
        if (progress > 1.0)
            progress = 1.0;
        return fmax(0.0, 0.5 * (1.0 + cos(M_PI * progress)));
    }
    case CP_SCHEDULE_LINEAR:
        return fmax(0.0, (double)(S - step) / span);
    case CP_SCHEDULE_CONSTANT:
        return 1.0;
    }
    CP_ASSERT(!"unknown schedule kind");
    return 0.0;
}

double cp_schedule_lr(const cp_schedule *s, int64_t step)
{
    if (step < s->warmup)
        return s->peak_lr * ((double)step / (double)(s->warmup > 1 ? s->warmup : 1));
    return s->peak_lr * decay_factor(s, step);
}
