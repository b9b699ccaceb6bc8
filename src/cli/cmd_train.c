/* cpeft train: fine-tune a model with LoRA and write a PEFT-format run folder. */
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "cli/args.h"
#include "cli/commands.h"
#include "core/error.h"
#include "peft/method.h"
#include "train/trainer.h"

static volatile sig_atomic_t stop_requested;

static void request_stop(int sig)
{
    (void)sig;
    stop_requested = 1;
}

typedef struct progress_state {
    int quiet;
    int tty;
} progress_state;

static void format_eta(char *buf, size_t size, double seconds)
{
    int s = (int)(seconds + 0.5);
    if (s >= 3600)
        snprintf(buf, size, "%dh%02dm", s / 3600, s / 60 % 60);
    else
        snprintf(buf, size, "%dm%02ds", s / 60, s % 60);
}

/* A progress line on stderr: redrawn in place on a terminal, otherwise
 * about twenty lines per run. */
static int print_progress(const cp_train_progress *p, void *ctx)
{
    const progress_state *ps = ctx;
    if (ps->quiet)
        return stop_requested;
    if (p->step == 0) {
        if (p->eval_loss >= 0)
            fprintf(stderr, "step 0/%d  eval_loss %.4f\n", p->total_steps, p->eval_loss);
        return stop_requested;
    }
    int every = p->total_steps >= 20 ? p->total_steps / 20 : 1;
    int show = ps->tty || p->step % every == 0 || p->step == p->total_steps;
    if (show) {
        char eta[32];
        format_eta(eta, sizeof eta, p->eta_s);
        fprintf(stderr, "%sstep %d/%d  loss %.4f  lr %.3g  grad_norm %.3f  %.0f tok/s  ETA %s%s",
                ps->tty ? "\r" : "", p->step, p->total_steps, p->loss, p->lr, p->grad_norm,
                p->tokens_per_s, eta, ps->tty ? "\033[K" : "\n");
    }
    if (p->eval_loss >= 0)
        fprintf(stderr, "%sstep %d/%d  eval_loss %.4f\n", ps->tty ? "\n" : "", p->step,
                p->total_steps, p->eval_loss);
    if (stop_requested && ps->tty)
        fputc('\n', stderr);
    return stop_requested;
}

static int run(const cp_train_params *p, int quiet)
{
    cp_error err = {0};
    cp_train_result res;
    progress_state ps = {.quiet = quiet, .tty = isatty(fileno(stderr))};
    /* Ctrl-C stops after the current step and removes the unfinished run. */
    signal(SIGINT, request_stop);
    signal(SIGTERM, request_stop);
    cp_status st = cp_train_run(p, print_progress, &ps, &res, &err);
    if (st != CP_OK && stop_requested) {
        fprintf(stderr, "cpeft: %s\n", err.msg);
        return 130; /* the shell's status for a run ended by Ctrl-C */
    }
    if (st != CP_OK)
        return cli_report(&err);
    printf("trainable parameters: %zu (%.3f%% of %zu)\n", res.trainable_params,
           100.0 * res.trainable_params / res.base_params, res.base_params);
    if (res.eval_loss_before >= 0 && res.eval_loss_after >= 0)
        printf("eval loss: %.4f -> %.4f (%+.1f%%)\n", res.eval_loss_before, res.eval_loss_after,
               100.0 * (res.eval_loss_after / res.eval_loss_before - 1.0));
    if (res.nf4.n_matrices) {
        printf("NF4 base: %d projections in %.1f MB (%.3fx of float32 %.1f MB)\n",
               res.nf4.n_matrices, res.nf4.bytes / 1e6,
               (double)res.nf4.bytes / (double)res.nf4.float32_bytes, res.nf4.float32_bytes / 1e6);
        if (p->method.double_quant)
            printf("double quantization of the scales: RMS error %.3g, max %.2f%% of a scale\n",
                   res.nf4.scale_rms_error, 100.0 * res.nf4.scale_max_rel_error);
    }
    double peak = cli_peak_rss_mb();
    if (peak > 0)
        printf("peak memory: %.0f MB\n", peak);
    printf("adapter written to %s\n", p->out_dir);
    return 0;
}

/* The methods each method-specific option applies to, space-separated. */
static const struct {
    const char *option, *methods;
} method_options[] = {
    {"r", "lora qlora"},
    {"alpha", "lora qlora"},
    {"rslora", "lora qlora"},
    {"lora-dropout", "lora qlora"},
    {"dora", "lora"},
    {"target", "lora qlora ia3"},
    {"adapter-config", "adapter"},
    {"reduction-factor", "adapter"},
    {"non-linearity", "adapter"},
    {"num-virtual-tokens", "prompt prefix"},
    {"prompt-init", "prompt"},
    {"prompt-init-text", "prompt"},
    {"prefix-projection", "prefix"},
    {"double-quant", "qlora"},
    {"trainable", "full"},
    {"modules-to-save", "lora qlora ia3 prompt prefix adapter"},
};

/* Returns 1 if the word method occurs in the space-separated list. */
static int listed(const char *list, const char *method)
{
    size_t n = strlen(method);
    for (const char *at = strstr(list, method); at; at = strstr(at + 1, method))
        if ((at == list || at[-1] == ' ') && (at[n] == ' ' || at[n] == '\0'))
            return 1;
    return 0;
}

/* Finds an option on the command line that the chosen method does not read,
 * as PEFT's configs reject fields they do not have. Returns its index in
 * method_options, or -1. */
static int misplaced_option(int argc, char **argv, const char *method)
{
    for (int i = 1; i < argc; i++) {
        if (strncmp(argv[i], "--", 2) != 0)
            continue;
        const char *name = argv[i] + 2;
        for (int k = 0; k < (int)(sizeof method_options / sizeof *method_options); k++) {
            size_t n = strlen(method_options[k].option);
            if (strncmp(name, method_options[k].option, n) == 0 &&
                (name[n] == '\0' || name[n] == '=') && !listed(method_options[k].methods, method))
                return k;
        }
    }
    return -1;
}

/* The help text: what train writes, then one line per registered method. */
static void describe_methods(char *buf, size_t size)
{
    int n = snprintf(buf, size,
                     "Fine-tunes the model on the text in FILE with the chosen method. Writes the\n"
                     "adapter into DIR (adapter_config.json and the weights, in PEFT's layout where\n"
                     "PEFT defines one), and DIR/metrics.jsonl with one JSON object per step (step, loss, lr,\n"
                     "grad_norm, tokens_per_s) and per evaluation (step, eval_loss). DIR appears\n"
                     "only when training succeeds.\n\nMethods (--method):");
    for (int i = 0; i < cp_method_count() && n > 0 && (size_t)n < size; i++)
        n += snprintf(buf + n, size - (size_t)n, "\n  %-8s %s", cp_method_at(i)->name,
                      cp_method_at(i)->summary);
}

int cmd_train(int argc, char **argv)
{
    cp_train_params p = cp_train_default_params();
    const char *method = "lora", *target = NULL, *schedule = "cosine";
    int rslora = 0, dora = 0, quiet = 0, warmup_steps = 0;
    float lr = 2e-4f, weight_decay = 0.0f, warmup_ratio = 0.0f, max_grad_norm = 1.0f;
    float eval_split = 0.05f;
    const cli_option options[] = {
        {"model", CLI_STRING, &p.model_dir, "PATH", "model folder (Hugging Face layout) or GGUF file (required)"},
        {"tokenizer", CLI_STRING, &p.tokenizer_path, "PATH", "tokenizer to use instead of the model's own: a folder, tokenizer.model, tokenizer.json or a .gguf file"},
        {"data", CLI_STRING, &p.data_path, "FILE", "training text: .txt, or .jsonl with a \"text\" field (required)"},
        {"eval-data", CLI_STRING, &p.eval_path, "FILE", "held-out text (default: the last --eval-split of --data)"},
        {"out", CLI_STRING, &p.out_dir, "DIR", "run folder to write (required)"},
        {"method", CLI_STRING, &method, "NAME", "fine-tuning method, one of those listed above (default lora)"},
        {"r", CLI_INT, &p.method.lora.r, "N", "LoRA rank (default 8)"},
        {"alpha", CLI_FLOAT, &p.method.lora.alpha, "A", "LoRA alpha; the update is scaled by alpha/r (default 16)"},
        {"rslora", CLI_FLAG, &rslora, NULL, "scale by alpha/sqrt(r) instead (rank-stabilized LoRA)"},
        {"lora-dropout", CLI_FLOAT, &p.method.lora.dropout, "P", "dropout on the LoRA input (default 0)"},
        {"dora", CLI_FLAG, &dora, NULL, "weight-decomposed LoRA: also learn a magnitude per output row"},
        {"adapter-config", CLI_STRING, &p.method.adapter_config, "NAME", "bottleneck adapters: houlsby (after attention and MLP) or pfeiffer (after the MLP) (default houlsby)"},
        {"reduction-factor", CLI_INT, &p.method.reduction_factor, "N", "bottleneck adapters: hidden size / bottleneck size (default 16)"},
        {"non-linearity", CLI_STRING, &p.method.non_linearity, "NAME", "bottleneck adapters: relu, swish or gelu (default relu)"},
        {"num-virtual-tokens", CLI_INT, &p.method.n_virtual_tokens, "N", "prompt and prefix tuning: virtual tokens (default 20)"},
        {"prompt-init", CLI_STRING, &p.method.prompt_init, "HOW", "prompt tuning: random, vocab (embeddings of sampled tokens) or text (default random)"},
        {"prompt-init-text", CLI_STRING, &p.method.prompt_init_text, "TEXT", "prompt tuning: the text whose embeddings start the prompt (implies --prompt-init text)"},
        {"prefix-projection", CLI_FLAG, &p.method.prefix_projection, NULL, "prefix tuning: train the prefixes through an MLP (saved projected)"},
        {"double-quant", CLI_FLAG, &p.method.double_quant, NULL, "qlora: quantize the NF4 block scales again to 8 bits"},
        {"trainable", CLI_STRING, &p.method.trainable, "GLOB", "full: train only the weights whose names match (e.g. '*layers.3.*', '*norm*')"},
        {"modules-to-save", CLI_STRING, &p.method.modules_to_save, "LIST", "modules trained fully next to the method (not full or bitfit), comma-separated (e.g. lm_head)"},
        {"target", CLI_STRING, &target, "LIST", "projections to adapt: comma-separated module names or all-linear (default: PEFT's for the method and architecture, e.g. LoRA q_proj,v_proj or c_attn for GPT-2)"},
        {"steps", CLI_INT, &p.steps, "N", "optimizer steps (default 100)"},
        {"batch-size", CLI_INT, &p.batch_size, "B", "windows per micro-batch (default 8)"},
        {"seq-len", CLI_INT, &p.seq_len, "T", "tokens per window (default 128)"},
        {"grad-accum", CLI_INT, &p.grad_accum, "K", "micro-batches per optimizer step (default 1)"},
        {"lr", CLI_FLOAT, &lr, "LR", "peak learning rate (default 2e-4)"},
        {"weight-decay", CLI_FLOAT, &weight_decay, "W", "AdamW decoupled weight decay (default 0)"},
        {"warmup-ratio", CLI_FLOAT, &warmup_ratio, "F", "fraction of the steps spent warming up linearly (default 0)"},
        {"warmup-steps", CLI_INT, &warmup_steps, "N", "warmup steps; overrides --warmup-ratio"},
        {"schedule", CLI_STRING, &schedule, "NAME", "learning-rate decay after warmup: cosine, linear or constant (default cosine)"},
        {"max-grad-norm", CLI_FLOAT, &max_grad_norm, "G", "clip the global gradient norm to G; 0 disables (default 1)"},
        {"eval-split", CLI_FLOAT, &eval_split, "F", "held-out fraction of --data without --eval-data (default 0.05)"},
        {"eval-every", CLI_INT, &p.eval_every, "N", "evaluate every N steps; 0: only before and after (default 0)"},
        {"seed", CLI_U64, &p.seed, "S", "seed of the data order and the LoRA initialization (default 42)"},
        {"quiet", CLI_FLAG, &quiet, NULL, "no progress line on stderr"},
    };
    char about[2048];
    describe_methods(about, sizeof about);
    const cli_command cmd = {
        .name = "train",
        .usage = "--model DIR --data FILE --out DIR [options]",
        .about = about,
        .options = options,
        .n_options = sizeof options / sizeof *options,
    };
    int rc = cli_parse(&cmd, argc, argv, NULL);
    if (rc != CLI_PARSED)
        return rc == CLI_HELP_SHOWN ? 0 : 2;
    if (!p.model_dir || !p.data_path || !p.out_dir)
        return cli_usage_error(&cmd, "--model, --data and --out are required");
    if (!cp_method_find(method)) {
        char names[256];
        cp_method_list(names, sizeof names);
        return cli_usage_error(&cmd, "unknown --method \"%s\"; available: %s", method, names);
    }
    int bad = misplaced_option(argc, argv, method);
    if (bad >= 0)
        return cli_usage_error(&cmd, "--%s does not apply to --method %s; it is an option of: %s",
                               method_options[bad].option, method, method_options[bad].methods);

    cp_error err = {0};
    p.method_name = method;
    p.method.lora.use_rslora = rslora;
    p.method.lora.use_dora = dora;
    p.method.lora.seed = p.seed;
    p.method.seed = p.seed;
    p.lr = lr;
    p.weight_decay = weight_decay;
    p.warmup_ratio = warmup_ratio;
    p.warmup_steps = warmup_steps;
    p.max_grad_norm = max_grad_norm;
    p.eval_split = eval_split;
    p.targets = target;
    if (cp_schedule_parse(schedule, &p.schedule, &err) != CP_OK)
        return cli_usage_error(&cmd, "%s", err.msg);
    return run(&p, quiet);
}
