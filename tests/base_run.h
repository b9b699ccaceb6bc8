/* Helpers of tests/test_full.c, test_bitfit.c and test_modules_to_save.c. */
#ifndef CP_TEST_BASE_RUN_H
#define CP_TEST_BASE_RUN_H

#include <stddef.h>
#include <stdint.h>

#include "model/model.h"
#include "peft/method.h"

/* A model with a method attached and buffers for one batch of B x T. */
typedef struct run {
    cp_model *m;
    cp_method *method;
    cp_forward_buffers fb;
    cp_backward_buffers bb;
    int B, T;
    int32_t inputs[64], targets[64];
} run;

/* Loads model_dir, creates method (with --trainable trainable and
 * --modules-to-save modules, each NULL for none), binds it as the trainer
 * does, and fills a random batch. Returns 0 after a failed check. */
int base_run_init(run *r, const char *model_dir, const char *method, const char *trainable,
                  const char *modules, int B, int T);
void base_run_free(run *r);

/* Mean cross-entropy of the batch; with backward, the gradients accumulate. */
double base_run_loss(run *r, int backward);

/* Compares the gradients of parameters first onwards with central
 * differences at each one's largest-gradient element and two others. */
void base_run_check_gradients(run *r, int first, const char *label);

/* Returns the largest |got[i * total / n] - want[i]| over n values, divided
 * by max |want|: every value when n == total, else the fixture's sample. */
double base_max_rel_diff(const float *got, size_t total, const float *want, size_t n);

/* Loads tests/fixtures/lora_step/batch.json (two windows of 33 ids) into a
 * run of B 2, T 32. */
void base_run_stories_batch(run *r);

/* The loss tests/fixtures/full/expected.json records for model. */
double base_expected_loss(const char *model);

#endif
