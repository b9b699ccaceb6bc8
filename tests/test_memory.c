/*
 * Memory on a GPT-2-124M-shaped float32 checkpoint (random weights, about
 * 500 MB): generation peaks below 1.3x its file size, because the frozen
 * weights are used in place from the read-only map, and QLoRA training at
 * most at half of LoRA's peak.
 */
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include "core/file.h"
#include "random_gpt2.h"
#include "test.h"

/* A GPT-2-124M-shaped random checkpoint with GPT-2's tokenizer; *path gets
 * the checkpoint's path. */
static const char *write_gpt2_124m(char **path)
{
    return test_write_random_gpt2(768, 12, 12, 1024, 124, path);
}

/* The peak RSS of the largest child process waited for so far, in bytes. */
static double children_peak_rss(void)
{
    struct rusage usage;
    getrusage(RUSAGE_CHILDREN, &usage);
    return (double)usage.ru_maxrss * 1024; /* ru_maxrss is in KiB */
}

TEST(gpt2_124m_generates_within_rss_budget)
{
    char *path = NULL;
    const char *dir = write_gpt2_124m(&path);
    struct stat st;
    CHECK(stat(path, &st) == 0);
    char args[600], *out = NULL, *err_text = NULL;
    snprintf(args, sizeof args, "generate --model '%s' --prompt 'Hello, world' --max-new-tokens 8 --temperature 0",
             dir);
    CHECK_EQ_INT(test_run_cli(args, NULL, &out, &err_text), 0);
    CHECK_MSG(strncmp(out, "Hello, world", 12) == 0, "%s %s", out, err_text);

    double peak = children_peak_rss(), size = (double)st.st_size;
    CHECK_MSG(peak < 1.3 * size, "peak RSS %.0f MB for a %.0f MB checkpoint (%.2fx, limit 1.3x)",
              peak / 1e6, size / 1e6, peak / size);
    fprintf(stderr, "    peak RSS %.0f MB for a %.0f MB checkpoint (%.2fx)\n", peak / 1e6,
            size / 1e6, peak / size);
    free(out), free(err_text), free(path);
}

/* QLoRA's point: training at B=1, T=128 with the projections in NF4 peaks at
 * no more than half of float32 LoRA's resident memory, as cpeft train reports
 * it. That is VmHWM, because the children's ru_maxrss would include this
 * process's heap, which a child maps between fork and exec. */
TEST(qlora_124m_training_rss_below_half_of_lora)
{
    char *path = NULL;
    const char *dir = write_gpt2_124m(&path);
    char *text = NULL;
    size_t len = 0;
    cp_error err = {0};
    CHECK(cp_file_read(test_shared("data/tinyshakespeare/input.txt"), &text, &len, &err) == CP_OK);
    char *data = test_write_file(dir, "train.txt", text, len > 40000 ? 40000 : len);
    free(text);

    double peak[2];
    const char *methods[2] = {"qlora", "lora"};
    for (int i = 0; i < 2; i++) {
        char args[1200], *out = NULL, *err_text = NULL;
        snprintf(args, sizeof args,
                 "train --model '%s' --data '%s' --out '%s/run-%s' --method %s --steps 2 "
                 "--batch-size 1 --seq-len 128 --quiet",
                 dir, data, dir, methods[i], methods[i]);
        CHECK_EQ_INT(test_run_cli(args, NULL, &out, &err_text), 0);
        const char *line = out ? strstr(out, "peak memory: ") : NULL;
        CHECK_MSG(line && sscanf(line, "peak memory: %lf", &peak[i]) == 1, "%s: %s %s",
                  methods[i], out, err_text);
        peak[i] *= 1 << 20;
        free(out), free(err_text);
    }
    fprintf(stderr, "    peak RSS: QLoRA %.0f MB, LoRA %.0f MB (%.2fx)\n", peak[0] / 1e6,
            peak[1] / 1e6, peak[0] / peak[1]);
    CHECK_MSG(peak[0] <= 0.5 * peak[1], "QLoRA peak RSS %.0f MB is %.2fx of LoRA's %.0f MB",
              peak[0] / 1e6, peak[0] / peak[1], peak[1] / 1e6);
    free(data), free(path);
}
