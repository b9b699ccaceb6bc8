/*
 * A small deterministic random number generator (xoshiro256** seeded through
 * splitmix64), so that a seed gives the same stream on every machine.
 */
#ifndef CP_RNG_H
#define CP_RNG_H

#include <stdint.h>

typedef struct cp_rng {
    uint64_t s[4];
} cp_rng;

void cp_rng_seed(cp_rng *r, uint64_t seed);
uint64_t cp_rng_next(cp_rng *r);

/* Uniform in [0, 1) with 24 random bits. */
float cp_rng_uniform(cp_rng *r);

#endif
