/*
 * llama2.c legacy checkpoints: header checks, weight views into the mapped
 * file, and conversion to a Hugging Face Llama folder.
 *
 * Every size is computed in 64-bit with overflow checks and compared with
 * the file size before any pointer is formed. The RoPE tables stored in the
 * file are skipped because Hugging Face recomputes them from rope_theta.
 * NOTE: values are read in host byte order, so a big-endian host would
 * misread the little-endian files that export.py writes.
 */
#include "io/llama2c.h"

#include <dirent.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cpeft.h"
#include "io/safetensors.h"

#define HEADER_FIELDS 7
#define HEADER_BYTES (HEADER_FIELDS * 4)
#define VERSIONED_MAGIC 0x616b3432u /* "ak42" as a little-endian uint32 */

#define HINT_DAMAGED                                                                        \
    "download the checkpoint again, or re-export it with llama2.c's export.py --version 0"

static const char *const field_names[HEADER_FIELDS] = {
    "dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"};

/* ---- header ---- */

/* Checks that every dimension is positive (vocab_size may be negative) and
 * that the heads split dim evenly into an even head_dim. */
static cp_status header_check(const char *path, const int32_t v[HEADER_FIELDS], cp_error *err)
{
    for (int i = 0; i < HEADER_FIELDS; i++) {
        int is_vocab = i == 5;
        int ok = is_vocab ? v[i] != 0 && v[i] != INT32_MIN : v[i] > 0;
        if (!ok)
            return cp_error_set(err, CP_ERR_INPUT,
                                "%s: byte %d: %s is %d, expected a positive number%s; the "
                                "header is corrupt or this is not a llama2.c checkpoint, %s",
                                path, 4 * i, field_names[i], (int)v[i],
                                is_vocab ? " (negated when the classifier is not shared)" : "",
                                HINT_DAMAGED);
    }
    int dim = v[0], n_heads = v[3], n_kv_heads = v[4];
    if (dim % n_heads != 0)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: byte 12: n_heads %d does not divide dim %d, expected a "
                            "divisor so that every head has the same size; %s",
                            path, n_heads, dim, HINT_DAMAGED);
    if ((dim / n_heads) % 2 != 0)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: byte 12: head_dim = dim / n_heads = %d / %d is odd, expected "
                            "an even number because RoPE rotates pairs of values; %s",
                            path, dim, n_heads, HINT_DAMAGED);
    if (n_heads % n_kv_heads != 0)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: byte 16: n_kv_heads %d does not divide n_heads %d, expected a "
                            "divisor so that each key/value head serves the same number of "
                            "query heads; %s",
                            path, n_kv_heads, n_heads, HINT_DAMAGED);
    return CP_OK;
}

/* Reads and checks the 28-byte header into cfg. */
static cp_status header_parse(const char *path, const uint8_t *data, size_t size,
                              cp_llama2c_config *cfg, cp_error *err)
{
    if (size < HEADER_BYTES)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: byte %zu: the file ends inside the %d-byte llama2.c header; "
                            "%s",
                            path, size, HEADER_BYTES, HINT_DAMAGED);

    uint32_t magic;
    memcpy(&magic, data, sizeof magic);
    if (magic == VERSIONED_MAGIC) {
        int32_t version;
        memcpy(&version, data + 4, sizeof version);
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: byte 0: magic \"ak42\" marks llama2.c export version %d, "
                            "expected the legacy format (version 0), which starts with 7 int32 "
                            "dimensions; re-export it with llama2.c's export.py --version 0",
                            path, (int)version);
    }

    int32_t v[HEADER_FIELDS];
    memcpy(v, data, sizeof v);
    cp_status st = header_check(path, v, err);
    if (st != CP_OK)
        return st;
    *cfg = (cp_llama2c_config){
        .dim = v[0],
        .hidden_dim = v[1],
        .n_layers = v[2],
        .n_heads = v[3],
        .n_kv_heads = v[4],
        .vocab_size = v[5] > 0 ? v[5] : -v[5],
        .seq_len = v[6],
        .shared_classifier = v[5] > 0,
    };
    return CP_OK;
}

/* ---- weight arrays ---- */

/* One float32 array of the file, in file order: a * b * c elements. */
typedef struct array_spec {
    const char *name;
    uint64_t a, b, c;
    const float **dest; /* NULL for the RoPE tables, which are skipped */
} array_spec;

#define MAX_ARRAYS 14

/* Lists the arrays that follow the header, in file order. Returns the count. */
static int arrays_list(cp_llama2c *ck, array_spec specs[MAX_ARRAYS])
{
    const cp_llama2c_config *c = &ck->config;
    uint64_t L = (uint64_t)c->n_layers, C = (uint64_t)c->dim, F = (uint64_t)c->hidden_dim;
    uint64_t V = (uint64_t)c->vocab_size, head_dim = C / (uint64_t)c->n_heads;
    uint64_t kv_rows = (uint64_t)c->n_kv_heads * head_dim;
    uint64_t rope = (uint64_t)c->seq_len * (head_dim / 2); /* positions x pairs */
    int n = 0;

    specs[n++] = (array_spec){"token_embedding", V, C, 1, &ck->token_embedding};
    specs[n++] = (array_spec){"rms_att", L, C, 1, &ck->rms_att};
    specs[n++] = (array_spec){"wq", L, C, C, &ck->wq};
    specs[n++] = (array_spec){"wk", L, kv_rows, C, &ck->wk};
    specs[n++] = (array_spec){"wv", L, kv_rows, C, &ck->wv};
    specs[n++] = (array_spec){"wo", L, C, C, &ck->wo};
    specs[n++] = (array_spec){"rms_ffn", L, C, 1, &ck->rms_ffn};
    specs[n++] = (array_spec){"w1", L, F, C, &ck->w1};
    specs[n++] = (array_spec){"w2", L, C, F, &ck->w2};
    specs[n++] = (array_spec){"w3", L, F, C, &ck->w3};
    specs[n++] = (array_spec){"rms_final", C, 1, 1, &ck->rms_final};
    specs[n++] = (array_spec){"freq_cis_real", rope, 1, 1, NULL};
    specs[n++] = (array_spec){"freq_cis_imag", rope, 1, 1, NULL};
    if (!c->shared_classifier)
        specs[n++] = (array_spec){"wcls", V, C, 1, &ck->wcls};
    return n;
}

/* Computes each array's byte offset into offsets[] (n + 1 entries, the last
 * being the total size). Returns the index of an array whose size or end
 * overflows 64 bits, or -1 when none does. */
static int arrays_place(const array_spec *specs, int n, uint64_t *offsets)
{
    offsets[0] = HEADER_BYTES;
    for (int i = 0; i < n; i++) {
        uint64_t count, bytes;
        if (__builtin_mul_overflow(specs[i].a, specs[i].b, &count) ||
            __builtin_mul_overflow(count, specs[i].c, &count) ||
            __builtin_mul_overflow(count, (uint64_t)sizeof(float), &bytes) ||
            __builtin_add_overflow(offsets[i], bytes, &offsets[i + 1]))
            return i;
    }
    return -1;
}

/* Checks the file size against the header and points each array into the map. */
static cp_status arrays_map(const char *path, cp_llama2c *ck, cp_error *err)
{
    const cp_llama2c_config *c = &ck->config;
    array_spec specs[MAX_ARRAYS];
    uint64_t offsets[MAX_ARRAYS + 1];
    int n = arrays_list(ck, specs);

    int bad = arrays_place(specs, n, offsets);
    if (bad >= 0)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: byte 0: the header's dimensions (dim %d, hidden_dim %d, "
                            "n_layers %d, vocab_size %d, seq_len %d) make array %s larger than "
                            "2^64 bytes; the header is corrupt, %s",
                            path, c->dim, c->hidden_dim, c->n_layers, c->vocab_size, c->seq_len,
                            specs[bad].name, HINT_DAMAGED);

    uint64_t size = ck->file.size, total = offsets[n];
    for (int i = 0; i < n && total > size; i++)
        if (offsets[i + 1] > size)
            return cp_error_set(err, CP_ERR_INPUT,
                                "%s: byte %llu: the file ends inside array %s (bytes %llu to "
                                "%llu), but the header's dimensions need %llu bytes in all; the "
                                "file is truncated or its header is corrupt, %s",
                                path, (unsigned long long)size, specs[i].name,
                                (unsigned long long)offsets[i],
                                (unsigned long long)offsets[i + 1], (unsigned long long)total,
                                HINT_DAMAGED);
    if (total < size)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: byte %llu: %llu bytes follow the last array, expected the file "
                            "to end there as the header's dimensions need %llu bytes; the header "
                            "does not match the data, %s",
                            path, (unsigned long long)total, (unsigned long long)(size - total),
                            (unsigned long long)total, HINT_DAMAGED);

    /* Offsets are multiples of 4 from a page-aligned map, so the floats are aligned. */
    for (int i = 0; i < n; i++)
        if (specs[i].dest)
            *specs[i].dest = (const float *)(ck->file.data + offsets[i]);
    if (c->shared_classifier)
        ck->wcls = ck->token_embedding;
    return CP_OK;
}

cp_status cp_llama2c_open(const char *path, cp_llama2c *out, cp_error *err)
{
    memset(out, 0, sizeof *out);
    cp_status st = cp_file_map(path, &out->file, err);
    if (st == CP_OK)
        st = header_parse(path, out->file.data, out->file.size, &out->config, err);
    if (st == CP_OK)
        st = arrays_map(path, out, err);
    if (st != CP_OK)
        cp_llama2c_close(out);
    return st;
}

void cp_llama2c_close(cp_llama2c *ck)
{
    cp_mapped_file_free(&ck->file);
    memset(ck, 0, sizeof *ck);
}

/* ---- Hugging Face tensors ---- */

#define NAME_SIZE 96 /* fits "model.layers.<int>.post_attention_layernorm.weight" */
#define TENSORS_PER_LAYER 9

/* The tensors of the converted model. Most point into the checkpoint's map;
 * the q and k projections point into q_rows and k_rows, reordered for RoPE. */
typedef struct hf_tensors {
    cp_st_tensor *items;
    size_t n;
    char *names;   /* NAME_SIZE bytes per tensor */
    float *q_rows; /* (L, n_heads * head_dim, C) */
    float *k_rows; /* (L, n_kv_heads * head_dim, C) */
} hf_tensors;

static void hf_tensors_free(hf_tensors *t)
{
    free(t->items);
    free(t->names);
    free(t->q_rows);
    free(t->k_rows);
    memset(t, 0, sizeof *t);
}

/* Appends a float32 tensor of shape (rows) when cols is 0, else (rows, cols). */
static void hf_tensors_add(hf_tensors *t, const char *name, const float *data, size_t rows,
                           size_t cols)
{
    cp_st_tensor *x = &t->items[t->n];
    char *slot = t->names + t->n * NAME_SIZE;
    snprintf(slot, NAME_SIZE, "%s", name);
    *x = (cp_st_tensor){.name = slot, .dtype = CP_DTYPE_F32, .data = data};
    x->ndim = cols ? 2 : 1;
    x->shape[0] = (int64_t)rows;
    x->shape[1] = (int64_t)cols;
    x->nbytes = rows * (cols ? cols : 1) * sizeof(float);
    t->n++;
}

/* Reorders the rows of one q or k projection, (n_heads * head_dim, cols).
 * llama2.c's RoPE rotates the pairs (2i, 2i + 1) of each head, Hugging
 * Face's rotates (i, i + head_dim / 2), so row 2i + t of a head moves to row
 * t * head_dim / 2 + i. This matches `permute` in transformers'
 * convert_llama_weights_to_hf.py. */
static void rope_pairs_to_halves(const float *src, float *dst, size_t n_heads, size_t head_dim,
                                 size_t cols)
{
    size_t half = head_dim / 2;
    for (size_t h = 0; h < n_heads; h++)
        for (size_t i = 0; i < half; i++)
            for (size_t t = 0; t < 2; t++) {
                const float *from = src + (h * head_dim + 2 * i + t) * cols;
                float *to = dst + (h * head_dim + t * half + i) * cols;
                memcpy(to, from, cols * sizeof *to);
            }
}

/* Adds the nine tensors of layer l. */
static void hf_tensors_add_layer(hf_tensors *t, const cp_llama2c *ck, size_t l)
{
    const cp_llama2c_config *c = &ck->config;
    size_t C = (size_t)c->dim, F = (size_t)c->hidden_dim;
    size_t head_dim = C / (size_t)c->n_heads, kv_rows = (size_t)c->n_kv_heads * head_dim;
    float *q = t->q_rows + l * C * C, *k = t->k_rows + l * kv_rows * C;
    rope_pairs_to_halves(ck->wq + l * C * C, q, (size_t)c->n_heads, head_dim, C);
    rope_pairs_to_halves(ck->wk + l * kv_rows * C, k, (size_t)c->n_kv_heads, head_dim, C);

    const struct {
        const char *suffix;
        const float *data;
        size_t rows, cols;
    } parts[TENSORS_PER_LAYER] = {
        {"input_layernorm.weight", ck->rms_att + l * C, C, 0},
        {"self_attn.q_proj.weight", q, C, C},
        {"self_attn.k_proj.weight", k, kv_rows, C},
        {"self_attn.v_proj.weight", ck->wv + l * kv_rows * C, kv_rows, C},
        {"self_attn.o_proj.weight", ck->wo + l * C * C, C, C},
        {"post_attention_layernorm.weight", ck->rms_ffn + l * C, C, 0},
        {"mlp.gate_proj.weight", ck->w1 + l * F * C, F, C},
        {"mlp.down_proj.weight", ck->w2 + l * C * F, C, F},
        {"mlp.up_proj.weight", ck->w3 + l * F * C, F, C},
    };
    for (int i = 0; i < TENSORS_PER_LAYER; i++) {
        char name[NAME_SIZE];
        snprintf(name, sizeof name, "model.layers.%zu.%s", l, parts[i].suffix);
        hf_tensors_add(t, name, parts[i].data, parts[i].rows, parts[i].cols);
    }
}

/* Builds every tensor of the Hugging Face layout from an open checkpoint. */
static cp_status hf_tensors_build(const cp_llama2c *ck, hf_tensors *t, cp_error *err)
{
    const cp_llama2c_config *c = &ck->config;
    size_t L = (size_t)c->n_layers, C = (size_t)c->dim, V = (size_t)c->vocab_size;
    size_t kv_rows = (size_t)c->n_kv_heads * (C / (size_t)c->n_heads);
    size_t cap = L * TENSORS_PER_LAYER + 3;
    /* The file contains L * C * C floats of wq, so these products cannot overflow. */
    size_t q_bytes = L * C * C * sizeof(float), k_bytes = L * kv_rows * C * sizeof(float);

    memset(t, 0, sizeof *t);
    t->items = calloc(cap, sizeof *t->items);
    t->names = calloc(cap, NAME_SIZE);
    t->q_rows = malloc(q_bytes);
    t->k_rows = malloc(k_bytes);
    if (!t->items || !t->names || !t->q_rows || !t->k_rows) {
        hf_tensors_free(t);
        return cp_error_nomem(err, "the reordered q and k projections", q_bytes + k_bytes);
    }

    hf_tensors_add(t, "model.embed_tokens.weight", ck->token_embedding, V, C);
    for (size_t l = 0; l < L; l++)
        hf_tensors_add_layer(t, ck, l);
    hf_tensors_add(t, "model.norm.weight", ck->rms_final, C, 0);
    if (!c->shared_classifier)
        hf_tensors_add(t, "lm_head.weight", ck->wcls, V, C);
    return CP_OK;
}

/* ---- output folder ---- */

/* Writes config.json and tokenizer_config.json into dir. */
static cp_status json_files_write(const char *dir, const cp_llama2c_config *c, int bos_id,
                                  int eos_id, cp_error *err)
{
    char config[1024], tokenizer_config[512];
    snprintf(config, sizeof config,
             "{\n"
             "  \"architectures\": [\"LlamaForCausalLM\"],\n"
             "  \"model_type\": \"llama\",\n"
             "  \"hidden_size\": %d,\n"
             "  \"intermediate_size\": %d,\n"
             "  \"num_hidden_layers\": %d,\n"
             "  \"num_attention_heads\": %d,\n"
             "  \"num_key_value_heads\": %d,\n"
             "  \"vocab_size\": %d,\n"
             "  \"max_position_embeddings\": %d,\n"
             "  \"rms_norm_eps\": 1e-05,\n"
             "  \"rope_theta\": 10000.0,\n"
             "  \"hidden_act\": \"silu\",\n"
             "  \"tie_word_embeddings\": %s,\n"
             "  \"bos_token_id\": %d,\n"
             "  \"eos_token_id\": %d,\n"
             "  \"torch_dtype\": \"float32\"\n"
             "}\n",
             c->dim, c->hidden_dim, c->n_layers, c->n_heads, c->n_kv_heads, c->vocab_size,
             c->seq_len, c->shared_classifier ? "true" : "false", bos_id, eos_id);
    snprintf(tokenizer_config, sizeof tokenizer_config,
             "{\n"
             "  \"tokenizer_class\": \"LlamaTokenizer\",\n"
             "  \"add_bos_token\": true,\n"
             "  \"add_eos_token\": false,\n"
             "  \"bos_token\": \"<s>\",\n"
             "  \"eos_token\": \"</s>\",\n"
             "  \"unk_token\": \"<unk>\",\n"
             "  \"model_max_length\": %d\n"
             "}\n",
             c->seq_len);

    const char *names[2] = {"config.json", "tokenizer_config.json"};
    const char *texts[2] = {config, tokenizer_config};
    cp_status st = CP_OK;
    for (int i = 0; i < 2 && st == CP_OK; i++) {
        char *path = cp_path_join(dir, names[i]);
        st = path ? cp_file_write_atomic(path, texts[i], strlen(texts[i]), err)
                  : cp_error_nomem(err, names[i], strlen(dir) + 32);
        free(path);
    }
    return st;
}

/* Writes the four files of the converted model into dir. */
static cp_status folder_write(const char *dir, const cp_llama2c_config *c, const hf_tensors *t,
                              const char *tokenizer, size_t tokenizer_len, int bos_id,
                              int eos_id, cp_error *err)
{
    cp_status st = json_files_write(dir, c, bos_id, eos_id, err);
    char *tok_path = cp_path_join(dir, "tokenizer.model");
    char *st_path = cp_path_join(dir, "model.safetensors");
    if (st == CP_OK && (!tok_path || !st_path))
        st = cp_error_nomem(err, "output paths", 2 * strlen(dir) + 64);
    if (st == CP_OK)
        st = cp_file_write_atomic(tok_path, tokenizer, tokenizer_len, err);
    if (st == CP_OK) {
        const cp_st_metadata format = {"format", "pt"};
        st = cp_safetensors_write(st_path, t->items, t->n, &format, 1, err);
    }
    free(tok_path);
    free(st_path);
    return st;
}

/* Returns a malloc'd copy of path without trailing slashes, or NULL. */
static char *path_trim(const char *path)
{
    size_t n = strlen(path);
    while (n > 1 && path[n - 1] == '/')
        n--;
    char *s = malloc(n + 1);
    if (s) {
        memcpy(s, path, n);
        s[n] = '\0';
    }
    return s;
}

/* Checks that out does not exist or is an empty folder. */
static cp_status out_dir_check(const char *out, cp_error *err)
{
    struct stat sb;
    if (stat(out, &sb) != 0)
        return errno == ENOENT ? CP_OK
                               : cp_error_set(err, CP_ERR_INPUT, "%s: cannot access: %s", out,
                                              strerror(errno));
    if (!S_ISDIR(sb.st_mode))
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: exists and is not a folder; choose another --out", out);
    DIR *d = opendir(out);
    if (!d)
        return cp_error_set(err, CP_ERR_INPUT, "%s: cannot open folder: %s", out,
                            strerror(errno));
    int empty = 1;
    for (struct dirent *e; empty && (e = readdir(d));)
        empty = strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0;
    closedir(d);
    if (!empty)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: folder exists and is not empty; remove it or choose another "
                            "--out",
                            out);
    return CP_OK;
}

/* Creates every missing folder above path, as `mkdir -p "$(dirname path)"`. */
static cp_status parents_make(const char *path, cp_error *err)
{
    char *p = strdup(path);
    if (!p)
        return cp_error_nomem(err, path, strlen(path) + 1);
    cp_status st = CP_OK;
    for (char *slash = strchr(p + 1, '/'); slash && st == CP_OK; slash = strchr(slash + 1, '/')) {
        *slash = '\0';
        if (mkdir(p, 0755) != 0 && errno != EEXIST)
            st = cp_error_set(err, CP_ERR_INPUT, "%s: cannot create folder: %s", p,
                              strerror(errno));
        else if (!cp_file_is_dir(p))
            st = cp_error_set(err, CP_ERR_INPUT,
                              "%s: exists and is not a folder, so %s cannot be created there",
                              p, path);
        *slash = '/';
    }
    free(p);
    return st;
}

/* Creates an empty staging folder "<out>.partial-XXXXXX" beside out. */
static cp_status staging_create(const char *out, char **staging, cp_error *err)
{
    size_t n = strlen(out) + sizeof ".partial-XXXXXX";
    *staging = malloc(n);
    if (!*staging)
        return cp_error_nomem(err, out, n);
    snprintf(*staging, n, "%s.partial-XXXXXX", out);
    if (!mkdtemp(*staging) || chmod(*staging, 0755) != 0) {
        cp_status st = cp_error_set(err, CP_ERR_INPUT, "%s: cannot create folder: %s",
                                    *staging, strerror(errno));
        rmdir(*staging);
        free(*staging);
        *staging = NULL;
        return st;
    }
    return CP_OK;
}

/* Removes the staging folder and the files in it. The converter creates no
 * subfolders there, and the atomic writers remove their own temporary files. */
static void staging_remove(const char *staging)
{
    DIR *d = opendir(staging);
    if (d) {
        for (struct dirent *e; (e = readdir(d));) {
            if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
                continue;
            char *path = cp_path_join(staging, e->d_name);
            if (path)
                unlink(path);
            free(path);
        }
        closedir(d);
    }
    rmdir(staging);
}

/* ---- conversion ---- */

/* Loads the tokenizer to check it against the checkpoint, then reads its
 * bytes for copying. Sets the BOS and EOS ids, falling back to 1 and 2,
 * the ids llama2.c's run.c uses. */
static cp_status tokenizer_read(const char *path, const char *checkpoint,
                                const cp_llama2c_config *c, char **bytes, size_t *len,
                                int *bos_id, int *eos_id, cp_error *err)
{
    if (cp_file_is_dir(path))
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: is a folder, expected a SentencePiece .model file", path);
    cp_tokenizer *tok = NULL;
    cp_status st = cp_tokenizer_load(path, &tok, err);
    if (st != CP_OK)
        return st;
    int n_pieces = cp_tokenizer_vocab_size(tok);
    *bos_id = cp_tokenizer_bos_id(tok) >= 0 ? cp_tokenizer_bos_id(tok) : 1;
    *eos_id = cp_tokenizer_eos_id(tok) >= 0 ? cp_tokenizer_eos_id(tok) : 2;
    cp_tokenizer_free(tok);

    if (n_pieces != c->vocab_size)
        return cp_error_set(err, CP_ERR_INPUT,
                            "%s: %d pieces, but %s has vocab_size %d; pass the tokenizer the "
                            "model was trained with",
                            path, n_pieces, checkpoint, c->vocab_size);
    return cp_file_read(path, bytes, len, err);
}

/* Writes the staged folder and renames it to out. */
static cp_status convert_into(const char *out, const cp_llama2c *ck, const hf_tensors *t,
                              const char *tokenizer, size_t tokenizer_len, int bos_id,
                              int eos_id, cp_error *err)
{
    char *staging = NULL;
    cp_status st = parents_make(out, err);
    if (st == CP_OK)
        st = staging_create(out, &staging, err);
    if (st == CP_OK)
        st = folder_write(staging, &ck->config, t, tokenizer, tokenizer_len, bos_id, eos_id,
                          err);
    /* rename() replaces an empty folder at out, and fails if it is not empty. */
    if (st == CP_OK && rename(staging, out) != 0) {
        int saved = errno;
        st = cp_error_set(err, CP_ERR_INPUT, "%s: cannot rename %s to it: %s%s", out, staging,
                          strerror(saved),
                          saved == ENOTEMPTY || saved == EEXIST
                              ? "; another process filled the folder, remove it and retry"
                              : "");
    }
    if (st != CP_OK && staging)
        staging_remove(staging);
    free(staging);
    return st;
}

cp_status cp_llama2c_convert(const char *checkpoint_path, const char *tokenizer_path,
                             const char *out_dir, cp_error *err)
{
    cp_llama2c ck;
    hf_tensors t = {0};
    char *tokenizer = NULL, *out = NULL;
    size_t tokenizer_len = 0;
    int bos_id = 1, eos_id = 2;

    cp_status st = cp_llama2c_open(checkpoint_path, &ck, err);
    if (st != CP_OK)
        return st;
    st = tokenizer_read(tokenizer_path, checkpoint_path, &ck.config, &tokenizer, &tokenizer_len,
                        &bos_id, &eos_id, err);
    if (st == CP_OK) {
        out = path_trim(out_dir);
        if (!out)
            st = cp_error_nomem(err, out_dir, strlen(out_dir) + 1);
    }
    if (st == CP_OK)
        st = out_dir_check(out, err);
    if (st == CP_OK)
        st = hf_tensors_build(&ck, &t, err);
    if (st == CP_OK)
        st = convert_into(out, &ck, &t, tokenizer, tokenizer_len, bos_id, eos_id, err);

    free(out);
    free(tokenizer);
    hf_tensors_free(&t);
    cp_llama2c_close(&ck);
    return st;
}
