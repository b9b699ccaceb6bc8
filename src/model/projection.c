/* Names, paths and shapes of a decoder layer's linear projections. */
#include "model/projection.h"

#include <string.h>

static const struct {
    const char *name, *path;
} proj_names[CP_PROJ_COUNT] = {
    [CP_PROJ_Q] = {"q_proj", "self_attn.q_proj"},
    [CP_PROJ_K] = {"k_proj", "self_attn.k_proj"},
    [CP_PROJ_V] = {"v_proj", "self_attn.v_proj"},
    [CP_PROJ_O] = {"o_proj", "self_attn.o_proj"},
    [CP_PROJ_GATE] = {"gate_proj", "mlp.gate_proj"},
    [CP_PROJ_UP] = {"up_proj", "mlp.up_proj"},
    [CP_PROJ_DOWN] = {"down_proj", "mlp.down_proj"},
};

const char *cp_proj_name(cp_proj p) { return proj_names[p].name; }

const char *cp_proj_path(cp_proj p) { return proj_names[p].path; }

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
    default: CP_ASSERT(0 && "unknown projection");
    }
}

cp_status cp_proj_parse_list(const char *list, unsigned *mask, cp_error *err)
{
    *mask = 0;
    if (strcmp(list, "all-linear") == 0) {
        *mask = (1u << CP_PROJ_COUNT) - 1;
        return CP_OK;
    }
    const char *p = list;
    while (*p) {
        size_t len = strcspn(p, ",");
        int found = -1;
        for (int i = 0; i < CP_PROJ_COUNT; i++)
            if (strlen(proj_names[i].name) == len && strncmp(p, proj_names[i].name, len) == 0)
                found = i;
        if (found < 0)
            return cp_error_set(err, CP_ERR_INPUT,
                                "unknown target module \"%.*s\"; valid: q_proj, k_proj, v_proj, "
                                "o_proj, gate_proj, up_proj, down_proj, or all-linear",
                                (int)len, p);
        *mask |= 1u << found;
        p += len;
        if (*p == ',')
            p++;
    }
    if (*mask == 0)
        return cp_error_set(err, CP_ERR_INPUT, "no target modules given");
    return CP_OK;
}

