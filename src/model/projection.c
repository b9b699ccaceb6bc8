/* Names, paths and shapes of a decoder layer's linear projections. */
#include "model/projection.h"

#include <stdio.h>
#include <string.h>

static const struct {
    const char *name, *path;
} llama_names[CP_PROJ_COUNT] = {
    [CP_PROJ_Q] = {"q_proj", "self_attn.q_proj"},
    [CP_PROJ_K] = {"k_proj", "self_attn.k_proj"},
    [CP_PROJ_V] = {"v_proj", "self_attn.v_proj"},
    [CP_PROJ_O] = {"o_proj", "self_attn.o_proj"},
    [CP_PROJ_GATE] = {"gate_proj", "mlp.gate_proj"},
    [CP_PROJ_UP] = {"up_proj", "mlp.up_proj"},
    [CP_PROJ_DOWN] = {"down_proj", "mlp.down_proj"},
}, gpt2_names[CP_PROJ_COUNT] = {
    [CP_PROJ_QKV] = {"c_attn", "attn.c_attn"},
    [CP_PROJ_O] = {"c_proj", "attn.c_proj"},
    [CP_PROJ_UP] = {"c_fc", "mlp.c_fc"},
    [CP_PROJ_DOWN] = {"c_proj", "mlp.c_proj"},
};

int cp_proj_exists(const cp_model_config *cfg, cp_proj p)
{
    if (cfg->fused_qkv && (p == CP_PROJ_Q || p == CP_PROJ_K || p == CP_PROJ_V))
        return 0;
    if (!cfg->fused_qkv && p == CP_PROJ_QKV)
        return 0;
    return !(cfg->mlp != CP_MLP_SWIGLU && p == CP_PROJ_GATE);
}

const char *cp_proj_name(const cp_model_config *cfg, cp_proj p)
{
    return cfg->conv1d ? gpt2_names[p].name : llama_names[p].name;
}

const char *cp_proj_path(const cp_model_config *cfg, cp_proj p)
{
    return cfg->conv1d ? gpt2_names[p].path : llama_names[p].path;
}

void cp_proj_shape(const cp_model_config *cfg, cp_proj p, int *in, int *out)
{
    int C = cfg->hidden_size, F = cfg->intermediate_size;
    int q = cfg->n_heads * cfg->head_dim, kv = cfg->n_kv_heads * cfg->head_dim;
    switch (p) {
    case CP_PROJ_Q: *in = C, *out = q; break;
    case CP_PROJ_K:
    case CP_PROJ_V: *in = C, *out = kv; break;
    case CP_PROJ_O: *in = q, *out = C; break;
    case CP_PROJ_GATE:
    case CP_PROJ_UP: *in = C, *out = F; break;
    case CP_PROJ_DOWN: *in = F, *out = C; break;
    case CP_PROJ_QKV: *in = C, *out = q + 2 * kv; break;
    default: CP_ASSERT(0 && "unknown projection");
    }
}

unsigned cp_proj_all(const cp_model_config *cfg)
{
    unsigned mask = 0;
    for (int p = 0; p < CP_PROJ_COUNT; p++)
        if (cp_proj_exists(cfg, (cp_proj)p))
            mask |= 1u << p;
    return mask;
}

/* Writes the architecture's module names, comma-separated, for messages. */
static void list_names(const cp_model_config *cfg, char *buf, size_t size)
{
    size_t len = 0;
    buf[0] = '\0';
    for (int p = 0; p < CP_PROJ_COUNT && len < size; p++) {
        if (!cp_proj_exists(cfg, (cp_proj)p) || strstr(buf, cp_proj_name(cfg, (cp_proj)p)))
            continue;
        len += (size_t)snprintf(buf + len, size - len, "%s, ", cp_proj_name(cfg, (cp_proj)p));
    }
}

cp_status cp_proj_parse_list(const cp_model_config *cfg, const char *list, unsigned *mask,
                             cp_error *err)
{
    *mask = 0;
    if (strcmp(list, "all-linear") == 0) {
        *mask = cp_proj_all(cfg);
        return CP_OK;
    }
    const char *p = list;
    while (*p) {
        size_t len = strcspn(p, ",");
        unsigned found = 0;
        for (int i = 0; i < CP_PROJ_COUNT; i++) {
            const char *name = cp_proj_name(cfg, (cp_proj)i);
            if (cp_proj_exists(cfg, (cp_proj)i) && strlen(name) == len &&
                strncmp(p, name, len) == 0)
                found |= 1u << i;
        }
        if (!found) {
            char names[160];
            list_names(cfg, names, sizeof names);
            return cp_error_set(err, CP_ERR_INPUT,
                                "unknown target module \"%.*s\" for model_type %s; valid: %s"
                                "or all-linear",
                                (int)len, p, cfg->model_type, names);
        }
        *mask |= found;
        p += len;
        if (*p == ',')
            p++;
    }
    if (*mask == 0)
        return cp_error_set(err, CP_ERR_INPUT, "no target modules given");
    return CP_OK;
}
