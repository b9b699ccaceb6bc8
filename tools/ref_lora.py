#!/usr/bin/python3
r"""Independent PyTorch reference for LoRA fine-tuning of a Llama model, in Python PEFT's semantics.

This script computes the golden values that cpeft's LoRA tests compare against:
the loss and the gradients of every lora_A and lora_B of an adapter, a short
AdamW trajectory, and the evaluation loss with and without an adapter. It also
evaluates any LoRA adapter saved in PEFT's layout (cpeft's or PEFT's own), and
trains one as a yardstick for cpeft's training runs. It runs with Debian's
python3-torch 1.13, numpy and sentencepiece, without transformers, peft or the
safetensors package. Model loading, safetensors, RoPE, RMSNorm and the
tokenizer come from tools/ref_llama.py.

LoRA as Hugging Face PEFT defines it (read for this script in huggingface/peft:
src/peft/tuners/lora/layer.py for LoraLayer.update_layer,
reset_lora_parameters and Linear.forward; src/peft/tuners/tuners_utils.py for
check_target_module_exists and the all-linear shorthand;
src/peft/utils/save_and_load.py for get_peft_model_state_dict;
src/peft/config.py for PeftConfigMixin.from_peft_type):
    y = W x + lora_B(lora_A(dropout(x))) * scaling, for a target nn.Linear W (out, in)
    lora_A.weight (r, in): nn.init.kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in))
    lora_B.weight (out, r): zero
    scaling = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora
The saved tensors drop the adapter name ("default"), so the keys read
base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight.

DoRA (use_dora; read in huggingface/peft src/peft/tuners/lora/dora.py for
DoraLinearLayer.get_weight_norm, update_layer and forward, variants.py for
DoraLinearVariant.forward, save_and_load.py for the magnitude's saved name):
    norm = ||W + scaling * B @ A|| per output row (dim 1 of the (out, in) weight), detached
    g = lora_magnitude_vector / norm
    y = W x + b + (g - 1) * (W dropout(x)) + g * lora_B(lora_A(dropout(x))) * scaling
    lora_magnitude_vector (out,): initialized to norm, saved as
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_magnitude_vector
Without dropout (or at evaluation) PEFT takes W x from the base result minus
the bias, which is the same value.

Precision: make-step-fixture and eval-adapter compute in float64 from the
stored float32 weights, so the fixture values are the exact-math result of
those weights. train computes in float32, as cpeft trains, and evaluates in
float64.

Regenerate the fixtures from the repository root (../shared is the default
location of the shared models and data, the same as the Makefile's SHARED):

    /usr/bin/python3 tools/ref_lora.py make-step-fixture

Evaluate a saved adapter on token ids printed by `cpeft tokenize`:

    ./cpeft tokenize --model ../shared/models/stories260K < TEXT > /tmp/ids.txt
    /usr/bin/python3 tools/ref_lora.py eval-adapter --model ../shared/models/stories260K \
        --adapter RUN_DIR --ids /tmp/ids.txt --seq-len 128

The train yardstick on tinyshakespeare split at 90% of its characters (the
file is ASCII, so characters are bytes):

    head -c 1003854 ../shared/data/tinyshakespeare/input.txt > /tmp/ts_train.txt
    tail -c +1003855 ../shared/data/tinyshakespeare/input.txt > /tmp/ts_eval.txt
    /usr/bin/python3 tools/ref_lora.py train --model ../shared/models/stories260K \
        --train /tmp/ts_train.txt --eval /tmp/ts_eval.txt --r 8 --alpha 16 \
        --target q_proj,k_proj,v_proj,o_proj --steps 200 --batch-size 8 --seq-len 128 --lr 3e-3

The DoRA fixture (tests/fixtures/dora/step/, with rsLoRA gradients too):

    /usr/bin/python3 tools/ref_lora.py make-step-fixture --dora

Subcommands:
    make-step-fixture  writes tests/fixtures/lora_step/ (adapter, batch, gradients, losses),
                       or with --dora tests/fixtures/dora/step/
    eval-adapter       loss and perplexity of base + adapter over consecutive windows of token ids
    train              LoRA (or --dora) training with AdamW and a cosine schedule; prints the eval loss
                       before and after
"""

import argparse
import json
import math
import os
import re
import sys
import time

# The matrix products here are small (hidden size 64 for stories260K), and
# OpenBLAS's own thread pool only adds synchronization to them, which costs the
# most on a busy machine. OpenBLAS reads this when torch loads it, so it must be
# set before the import. An OPENBLAS_NUM_THREADS from the caller wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ref_llama import (  # noqa: E402  (the tools folder must be on sys.path first)
    apply_rope,
    attention_mask,
    dumps_compact_arrays,
    encode_with_bos,
    forward as ref_llama_forward,
    load_model,
    load_tokenizer,
    read_safetensors,
    rms_norm,
    rope_cos_sin,
    rope_inv_freq,
    sha256_file,
    write_safetensors,
)

# PEFT's module names for the seven linear projections of a Llama decoder
# layer, and their paths inside the layer.
PROJECTION_PATHS = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}

# PEFT's shorthand for every nn.Linear except the output layer (lm_head).
ALL_LINEAR = "all-linear"


def projection_shape(cfg, name):
    """Return (out, in) of projection `name` under cfg."""
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    q_dim = cfg["num_attention_heads"] * cfg["head_dim"]
    kv_dim = cfg["num_key_value_heads"] * cfg["head_dim"]
    return {
        "q_proj": (q_dim, hidden),
        "k_proj": (kv_dim, hidden),
        "v_proj": (kv_dim, hidden),
        "o_proj": (hidden, q_dim),
        "gate_proj": (inter, hidden),
        "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
    }[name]


def peft_key(layer, name, matrix):
    """Return the tensor name PEFT saves for lora_A, lora_B or the DoRA magnitude (matrix "A", "B" or "M")."""
    if matrix == "M":
        return f"base_model.model.model.layers.{layer}.{PROJECTION_PATHS[name]}.lora_magnitude_vector"
    return f"base_model.model.model.layers.{layer}.{PROJECTION_PATHS[name]}.lora_{matrix}.weight"


def dora_weight_norm(weight, a, b, scaling):
    """Return ||W + scaling * B @ A|| per output row of a (out, in) weight, detached as PEFT detaches it."""
    return torch.linalg.norm(weight + (b @ a) * scaling, dim=1).detach()


def dora_delta(base, low_rank, magnitude, norm):
    """Return DoRA's addition to the base result: (g - 1) * base + g * low_rank with g = magnitude / norm.

    base is x_dropped @ W.T without the bias, low_rank is scaling * B A x_dropped.
    """
    g = magnitude / norm
    return (g - 1.0) * base + g * low_rank


# ---------------------------------------------------------------------------
# Adapter
# ---------------------------------------------------------------------------


class LoraAdapter:
    """A LoRA adapter on some projections of every layer.

    `pairs` maps (layer, projection name) to the tensors (A, B) with A (r, in)
    and B (out, r). The tensors may require grad, so autograd can differentiate
    the loss with respect to them.
    """

    def __init__(self, r, alpha, use_rslora, targets, pairs, dropout=0.0, magnitudes=None):
        self.r = r
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.targets = list(targets)
        self.pairs = pairs
        self.dropout = dropout
        # DoRA: (layer, name) -> magnitude (out,), or None for plain LoRA.
        self.magnitudes = magnitudes
        # DoRA: (layer, name) -> a norm that forward uses instead of computing
        # it, so that finite differences see the norm as the constant PEFT's
        # backward pass treats it as. None: computed from A and B.
        self.frozen_norms = None

    @property
    def use_dora(self):
        return self.magnitudes is not None

    @property
    def scaling(self):
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def tensors(self):
        """Return the tensors in a fixed order: layer, then projection, then A, B and the DoRA magnitude."""
        order = sorted(self.pairs, key=pair_order)
        if self.use_dora:
            return [t for key in order for t in (*self.pairs[key], self.magnitudes[key])]
        return [t for key in order for t in self.pairs[key]]

    def named_tensors(self):
        """Return {PEFT tensor name: tensor}."""
        named = {}
        for (layer, name), (a, b) in self.pairs.items():
            named[peft_key(layer, name, "A")] = a
            named[peft_key(layer, name, "B")] = b
            if self.use_dora:
                named[peft_key(layer, name, "M")] = self.magnitudes[(layer, name)]
        return named

    def state_dict(self):
        """Return {PEFT tensor name: float32 numpy array}."""
        return {key: t.detach().to(torch.float32).numpy() for key, t in self.named_tensors().items()}

    def with_dtype(self, dtype, use_rslora=None):
        """Return a detached copy in another dtype, optionally with use_rslora changed."""
        pairs = {key: (a.detach().to(dtype).clone(), b.detach().to(dtype).clone())
                 for key, (a, b) in self.pairs.items()}
        magnitudes = None
        if self.use_dora:
            magnitudes = {key: m.detach().to(dtype).clone() for key, m in self.magnitudes.items()}
        rslora = self.use_rslora if use_rslora is None else use_rslora
        return LoraAdapter(self.r, self.alpha, rslora, self.targets, pairs, self.dropout, magnitudes)


def pair_order(key):
    layer, name = key
    return layer, list(PROJECTION_PATHS).index(name)


def init_adapter(cfg, r, alpha, targets, generator, b_std=0.0, use_rslora=False, dropout=0.0):
    """Create a float32 adapter: A Kaiming-uniform as PEFT draws it, B zero or N(0, b_std^2).

    nn.init.kaiming_uniform_(a=sqrt(5)) on a (r, in) tensor has gain
    sqrt(2 / (1 + 5)) and bound gain * sqrt(3 / in) = 1 / sqrt(in). The values
    are drawn from `generator` layer by layer in PROJECTION_PATHS order, so they
    depend only on the seed and the shapes.
    """
    pairs = {}
    for layer in range(cfg["num_hidden_layers"]):
        for name in PROJECTION_PATHS:
            if name not in targets:
                continue
            out_features, in_features = projection_shape(cfg, name)
            bound = 1.0 / math.sqrt(in_features)
            a = torch.empty(r, in_features, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
            b = torch.zeros(out_features, r, dtype=torch.float32)
            if b_std > 0.0:
                b.normal_(0.0, b_std, generator=generator)
            pairs[(layer, name)] = (a, b)
    return LoraAdapter(r, alpha, use_rslora, targets, pairs, dropout)


def add_dora_magnitudes(adapter, weights, generator=None, spread=0.0):
    """Give the adapter DoRA magnitudes: PEFT's initial row norms of W + scaling B A.

    With spread > 0 each entry is then multiplied by a factor from
    U(1 - spread, 1 + spread) drawn from `generator`, so that the magnitude
    differs from the norm and its gradient paths are all non-trivial.
    """
    adapter.magnitudes = {}
    for key in sorted(adapter.pairs, key=pair_order):
        layer, name = key
        a, b = adapter.pairs[key]
        weight = weights[f"model.layers.{layer}.{PROJECTION_PATHS[name]}.weight"].to(a.dtype)
        magnitude = dora_weight_norm(weight, a, b, adapter.scaling).clone()
        if spread > 0.0:
            factors = torch.empty(magnitude.shape, dtype=torch.float64).uniform_(1 - spread, 1 + spread,
                                                                                  generator=generator)
            magnitude = magnitude * factors.to(magnitude.dtype)
        adapter.magnitudes[key] = magnitude
    return adapter


# ---------------------------------------------------------------------------
# adapter_config.json
# ---------------------------------------------------------------------------


def peft_adapter_config(r, alpha, targets, dropout, use_rslora, base_model, use_dora=False):
    """Return the adapter_config.json that PEFT 0.10.0 writes for a LoRA on a causal LM.

    The keys are those of a LoRA adapter saved by PEFT 0.10.0. PEFT before
    0.13 raises "unexpected keyword argument" on a key its LoraConfig lacks,
    while later versions drop unknown keys with a warning and give missing
    keys their defaults, so this set loads in 0.10.0 and every later version.
    Newer keys (lora_bias, exclude_modules, eva_config, corda_config) are left
    out because their defaults already describe this adapter. PEFT's
    save_pretrained writes inference_mode true.
    """
    return {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": r,
        "rank_pattern": {},
        "revision": None,
        "target_modules": list(targets),
        "task_type": "CAUSAL_LM",
        "use_dora": use_dora,
        "use_rslora": use_rslora,
    }


def save_peft_adapter(out_dir, adapter, base_model):
    """Write adapter_config.json and an F32 adapter_model.safetensors in PEFT's layout."""
    os.makedirs(out_dir, exist_ok=True)
    config = peft_adapter_config(adapter.r, adapter.alpha, adapter.targets, adapter.dropout, adapter.use_rslora,
                                 base_model, adapter.use_dora)
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        # PEFT writes json.dumps(config, indent=2, sort_keys=True), without a final newline.
        f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
    write_safetensors(os.path.join(out_dir, "adapter_model.safetensors"), adapter.state_dict())


# Config keys eval-adapter applies, and keys that do not change the forward
# pass of a saved adapter (dropout is off at evaluation, and the base model
# comes from --model).
APPLIED_CONFIG_KEYS = {"peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "target_modules"}
INERT_CONFIG_KEYS = {"base_model_name_or_path", "revision", "inference_mode", "lora_dropout", "auto_mapping",
                     "megatron_core", "peft_version", "qalora_group_size"}

# init_lora_weights values that leave the base weights untouched. PiSSA,
# CorDA, OLoRA, LoftQ and orthogonal initialization read or rewrite the base
# weights, and an adapter saved after them may expect modified base weights.
PLAIN_INIT_VALUES = (True, False, "gaussian", "eva")


def is_default_value(value):
    """Return whether a config value means "feature off" (null, false, empty or bias "none")."""
    return value is None or value is False or value == {} or value == [] or value == "" or value == "none"


def validate_adapter_config(config, path):
    """Raise ValueError unless the config is a plain LoRA that eval-adapter can apply.

    eval-adapter applies r, lora_alpha, use_rslora, use_dora and
    target_modules. Every other key must be inert or hold its "off" value, so
    that an adapter using biases, rank_pattern, layers_to_transform,
    modules_to_save or any other feature fails here instead of giving a wrong
    loss.
    """
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type is {config.get('peft_type')!r}; only LORA adapters are supported")
    for key in ("r", "lora_alpha", "target_modules"):
        if config.get(key) is None:
            raise ValueError(f"{path}: {key} is missing or null")
    if not isinstance(config["r"], int) or config["r"] <= 0:
        raise ValueError(f"{path}: r is {config['r']!r}, expected a positive integer")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise ValueError(f"{path}: task_type is {config['task_type']!r}; only CAUSAL_LM adapters are supported")
    init = config.get("init_lora_weights", True)
    if init not in PLAIN_INIT_VALUES:
        raise ValueError(f"{path}: init_lora_weights is {init!r}, which may have modified the base weights; "
                         f"only {PLAIN_INIT_VALUES} are supported")
    for key, value in sorted(config.items()):
        if key in APPLIED_CONFIG_KEYS or key in INERT_CONFIG_KEYS or key in ("task_type", "init_lora_weights"):
            continue
        if not is_default_value(value):
            raise ValueError(f"{path}: {key} is {value!r}, which this reference does not implement. It applies "
                             "only r, lora_alpha, use_rslora, use_dora and target_modules, and every other key "
                             "must be off; "
                             "evaluate this adapter with PEFT itself")


def llama_module_names(cfg):
    """Return the names of every module of LlamaForCausalLM, as named_modules() lists them."""
    names = ["model", "model.embed_tokens", "model.layers", "model.norm", "model.rotary_emb", "lm_head"]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        names += [p, f"{p}.self_attn", f"{p}.mlp", f"{p}.mlp.act_fn", f"{p}.input_layernorm",
                  f"{p}.post_attention_layernorm", f"{p}.self_attn.rotary_emb"]
        names += [f"{p}.{path}" for path in PROJECTION_PATHS.values()]
    return names


def is_target_module(target_modules, module_name):
    """Return whether PEFT's LoRA wraps the module, following check_target_module_exists.

    A string is a regular expression that must match the whole module name,
    except "all-linear", which selects every nn.Linear but lm_head. A list
    matches a module whose name equals an entry or ends with "." + an entry.
    (huggingface/peft src/peft/tuners/tuners_utils.py, check_target_module_exists)
    """
    if isinstance(target_modules, str):
        if target_modules.lower() == ALL_LINEAR:
            return any(module_name.endswith("." + path) for path in PROJECTION_PATHS.values())
        return re.fullmatch(target_modules, module_name) is not None
    return module_name in target_modules or any(module_name.endswith("." + t) for t in target_modules)


def load_peft_adapter(adapter_dir, cfg, dtype):
    """Load a LoRA adapter saved in PEFT's layout; raise ValueError on anything this reference cannot apply."""
    config_path = os.path.join(adapter_dir, "adapter_config.json")
    with open(config_path) as f:
        config = json.load(f)
    validate_adapter_config(config, config_path)
    target_modules = config["target_modules"]
    if not isinstance(target_modules, (str, list)):
        raise ValueError(f"{config_path}: target_modules is {target_modules!r}, expected a list or a string")

    matched = [name for name in llama_module_names(cfg) if is_target_module(target_modules, name)]
    projection_suffixes = tuple("." + path for path in PROJECTION_PATHS.values())
    unsupported = [name for name in matched if not name.endswith(projection_suffixes)]
    if unsupported:
        raise ValueError(f"{config_path}: target_modules {target_modules!r} selects {unsupported}; only the "
                         f"projections {list(PROJECTION_PATHS)} of the decoder layers are supported")
    if not matched:
        raise ValueError(f"{config_path}: target_modules {target_modules!r} selects no module of the model")

    weights_path = os.path.join(adapter_dir, "adapter_model.safetensors")
    arrays = read_safetensors(weights_path)
    r = config["r"]
    use_dora = bool(config.get("use_dora", False))
    pairs, magnitudes = {}, {}
    for module_name in matched:
        layer = int(module_name.split(".")[2])
        name = module_name.rsplit(".", 1)[1]
        out_features, in_features = projection_shape(cfg, name)
        pair = []
        for matrix, shape in (("A", (r, in_features)), ("B", (out_features, r))):
            key = peft_key(layer, name, matrix)
            if key not in arrays:
                raise ValueError(f"{weights_path}: tensor {key} is missing, but target_modules selects {module_name}")
            array = arrays.pop(key)
            if array.shape != shape:
                raise ValueError(f"{weights_path}: tensor {key} has shape {array.shape}, expected {shape} for r={r}")
            pair.append(torch.from_numpy(array.copy()).to(dtype))
        pairs[(layer, name)] = tuple(pair)
        if use_dora:
            # PEFT saves the magnitude without ".weight"; its modules name it with.
            key = peft_key(layer, name, "M")
            key = key if key in arrays else key + ".weight"
            if key not in arrays:
                raise ValueError(f"{weights_path}: tensor {peft_key(layer, name, 'M')} is missing, but use_dora "
                                 f"is set and target_modules selects {module_name}")
            array = arrays.pop(key)
            if array.shape != (out_features,):
                raise ValueError(f"{weights_path}: tensor {key} has shape {array.shape}, expected "
                                 f"({out_features},)")
            magnitudes[(layer, name)] = torch.from_numpy(array.copy()).to(dtype)
    if arrays:
        raise ValueError(f"{weights_path}: tensors {sorted(arrays)[:5]} (of {len(arrays)}) belong to no module "
                         "that target_modules selects, so this reference cannot apply them")

    targets = sorted({name for _, name in pairs}, key=list(PROJECTION_PATHS).index)
    return LoraAdapter(r, config["lora_alpha"], bool(config.get("use_rslora", False)), targets, pairs,
                       magnitudes=magnitudes if use_dora else None)


# ---------------------------------------------------------------------------
# Forward pass and loss
# ---------------------------------------------------------------------------


def forward(cfg, weights, ids, adapter=None, inv_freq=None, training=False):
    """Return the logits [batch, seq, vocab] of the Llama model plus the LoRA adapter (if any).

    This is ref_llama.forward with every projection going through `project`, so
    the base model computes the same as there. Dropout on the LoRA input runs
    only when `training` is true and the adapter's dropout is above zero.
    """
    dtype = weights["model.embed_tokens.weight"].dtype
    batch, seq_len = ids.shape
    heads, kv_heads, head_dim = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    group = heads // kv_heads
    eps = cfg["rms_norm_eps"]
    if inv_freq is None:
        inv_freq = rope_inv_freq(cfg)
    cos, sin = rope_cos_sin(inv_freq, seq_len, dtype)
    mask = attention_mask(seq_len, cfg["sliding_window"])

    def project(x, layer, name):
        weight = weights[f"model.layers.{layer}.{PROJECTION_PATHS[name]}.weight"]
        y = x @ weight.T
        if adapter is not None and (layer, name) in adapter.pairs:
            a, b = adapter.pairs[(layer, name)]
            dropped = training and adapter.dropout > 0.0
            if dropped:
                x = torch.nn.functional.dropout(x, adapter.dropout, training=True)
            low_rank = ((x @ a.T) @ b.T) * adapter.scaling
            if not adapter.use_dora:
                return y + low_rank
            if adapter.frozen_norms is not None:
                norm = adapter.frozen_norms[(layer, name)]
            else:
                norm = dora_weight_norm(weight, a, b, adapter.scaling)
            # The models here have no projection biases, so y is W x.
            base = x @ weight.T if dropped else y
            y = y + dora_delta(base, low_rank, adapter.magnitudes[(layer, name)], norm)
        return y

    x = weights["model.embed_tokens.weight"][ids]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."

        h = rms_norm(x, weights[p + "input_layernorm.weight"], eps)
        q = project(h, layer, "q_proj").view(batch, seq_len, heads, head_dim).transpose(1, 2)
        k = project(h, layer, "k_proj").view(batch, seq_len, kv_heads, head_dim).transpose(1, 2)
        v = project(h, layer, "v_proj").view(batch, seq_len, kv_heads, head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        # Grouped-query attention: query head h reads key/value head h // group.
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        scores = (q / math.sqrt(head_dim)) @ k.transpose(-1, -2)
        scores = scores.masked_fill(~mask, float("-inf"))
        attn = torch.softmax(scores, dim=-1) @ v
        attn = attn.transpose(1, 2).reshape(batch, seq_len, heads * head_dim)
        x = x + project(attn, layer, "o_proj")

        h = rms_norm(x, weights[p + "post_attention_layernorm.weight"], eps)
        gate = torch.nn.functional.silu(project(h, layer, "gate_proj"))
        x = x + project(gate * project(h, layer, "up_proj"), layer, "down_proj")

    x = rms_norm(x, weights["model.norm.weight"], eps)
    return x @ weights["lm_head.weight"].T


def batch_loss(cfg, weights, windows, adapter=None, inv_freq=None, training=False):
    """Return the mean next-token cross-entropy over a batch of windows [B, T+1].

    Inputs are windows[:, :T] and targets windows[:, 1:], so the mean runs over
    all B * T predicted tokens.
    """
    logits = forward(cfg, weights, windows[:, :-1], adapter, inv_freq, training)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))


def windowed_loss(cfg, weights, ids, seq_len, adapter=None, batch_tokens=4096):
    """Return (mean loss in nats, predicted tokens) over floor((len(ids) - 1) / seq_len) windows.

    Window k reads ids[k*N : (k+1)*N] and predicts ids[k*N+1 : (k+1)*N+1], as
    `cpeft eval` and ref_llama.windowed_loss do, and a partial last window is
    dropped.
    """
    num_windows = (len(ids) - 1) // seq_len
    if num_windows == 0:
        raise ValueError(f"{len(ids)} token ids are too few for one window of {seq_len} inputs")
    stream = torch.tensor(ids[:num_windows * seq_len + 1], dtype=torch.long)
    inputs = stream[:-1].view(num_windows, seq_len)
    targets = stream[1:].view(num_windows, seq_len)

    inv_freq = rope_inv_freq(cfg)
    windows_per_batch = max(1, batch_tokens // seq_len)
    total = 0.0
    with torch.no_grad():
        for start in range(0, num_windows, windows_per_batch):
            stop = start + windows_per_batch
            logits = forward(cfg, weights, inputs[start:stop], adapter, inv_freq)
            log_probs = torch.log_softmax(logits.to(torch.float64), dim=-1)
            total -= float(log_probs.gather(-1, targets[start:stop].unsqueeze(-1)).sum())
    tokens = num_windows * seq_len
    return total / tokens, tokens


def merged_weights(weights, adapter):
    """Return a copy of the base weights with scaling * B @ A added to every adapted projection.

    This is PEFT's merge (LoraLayer.get_delta_weight), an independent way to
    apply the adapter. With DoRA each merged row is then scaled by
    magnitude / norm, as DoraLinearVariant.merge_safe does.
    """
    merged = dict(weights)
    for (layer, name), (a, b) in adapter.pairs.items():
        key = f"model.layers.{layer}.{PROJECTION_PATHS[name]}.weight"
        merged[key] = weights[key] + (b @ a) * adapter.scaling
        if adapter.use_dora:
            norm = dora_weight_norm(weights[key], a, b, adapter.scaling)
            merged[key] = (adapter.magnitudes[(layer, name)] / norm).view(-1, 1) * merged[key]
    return merged


# ---------------------------------------------------------------------------
# Optimizer and schedule
# ---------------------------------------------------------------------------


def make_adamw(params, lr):
    """Return torch.optim.AdamW with betas (0.9, 0.999), eps 1e-8 and no weight decay."""
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def cosine_lr(base_lr, step, total_steps):
    """Return the learning rate of step `step` (0-based) of a cosine decay to 0 with no warmup.

    The formula is that of transformers' get_cosine_schedule_with_warmup
    (num_cycles 0.5) with no warmup steps:
    lr * 0.5 * (1 + cos(pi * step / total_steps)), so step 0 uses the full lr.
    """
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))


# ---------------------------------------------------------------------------
# make-step-fixture
# ---------------------------------------------------------------------------

STEP_FIXTURE = {
    "r": 4,
    "alpha": 8,
    "targets": list(PROJECTION_PATHS),
    "seed": 20240601,
    "b_std": 0.02,
    "window": 33,
    "num_windows": 2,
    "adamw_steps": 20,
    "adamw_lr": 1e-3,
    "max_grad_norm": 1.0,
    "eval_bytes": 20000,
    "eval_seq_len": 128,
}

# The DoRA fixture: the same draws on five of the seven projections (the
# files stay small), then magnitudes moved up to 20% off their initial norms.
DORA_STEP_FIXTURE = dict(STEP_FIXTURE, targets=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
                         magnitude_spread=0.2)

# Entries checked against central finite differences: (layer, projection,
# matrix, row, column); a DoRA magnitude ("M") has a row only.
FINITE_DIFFERENCE_ENTRIES = [
    (0, "q_proj", "A", 1, 5),
    (1, "v_proj", "B", 7, 0),
    (2, "gate_proj", "A", 3, 60),
    (2, "up_proj", "B", 171, 3),
    (3, "o_proj", "A", 0, 63),
    (4, "down_proj", "B", 10, 2),
    (4, "down_proj", "A", 2, 171),
    (0, "k_proj", "B", 31, 1),
]
DORA_FINITE_DIFFERENCE_ENTRIES = [
    (0, "q_proj", "A", 1, 5),
    (1, "v_proj", "B", 7, 0),
    (3, "o_proj", "A", 0, 63),
    (4, "down_proj", "B", 10, 2),
    (4, "down_proj", "A", 2, 171),
    (0, "k_proj", "B", 31, 1),
    (0, "q_proj", "M", 3, None),
    (2, "v_proj", "M", 17, None),
    (3, "k_proj", "M", 0, None),
    (4, "down_proj", "M", 60, None),
]
FINITE_DIFFERENCE_STEP = 1e-6
# Central differences with step 1e-6 have a truncation error near 1e-12 and a
# float64 rounding error near 1e-16 / 1e-6 = 1e-10, well inside these bounds.
FINITE_DIFFERENCE_ATOL = 1e-8
FINITE_DIFFERENCE_RTOL = 1e-5


def frozen_dora_norms(weights, adapter):
    """Return {(layer, name): norm} of the adapter's current A and B, for LoraAdapter.frozen_norms."""
    return {(layer, name): dora_weight_norm(weights[f"model.layers.{layer}.{PROJECTION_PATHS[name]}.weight"],
                                            a, b, adapter.scaling)
            for (layer, name), (a, b) in adapter.pairs.items()}


def check_finite_differences(cfg, weights, windows, adapter, grads):
    """Assert that autograd's gradients match central finite differences of the float64 loss.

    With DoRA the norm stays at its value for the unperturbed adapter, because
    PEFT's backward pass treats it as a constant.
    """
    results = []
    entries = DORA_FINITE_DIFFERENCE_ENTRIES if adapter.use_dora else FINITE_DIFFERENCE_ENTRIES
    if adapter.use_dora:
        adapter.frozen_norms = frozen_dora_norms(weights, adapter)
    for layer, name, matrix, row, column in entries:
        if matrix == "M":
            tensor, index = adapter.magnitudes[(layer, name)], (row,)
        else:
            tensor, index = adapter.pairs[(layer, name)][0 if matrix == "A" else 1], (row, column)
        original = float(tensor[index])
        losses = []
        with torch.no_grad():
            for sign in (1.0, -1.0):
                tensor[index] = original + sign * FINITE_DIFFERENCE_STEP
                losses.append(float(batch_loss(cfg, weights, windows, adapter)))
            tensor[index] = original
        numeric = (losses[0] - losses[1]) / (2 * FINITE_DIFFERENCE_STEP)
        analytic = float(grads[peft_key(layer, name, matrix)][index])
        error = abs(numeric - analytic)
        entry = f"{peft_key(layer, name, matrix)}{list(index)}"
        print(f"finite difference {entry}: autograd {analytic:.12g}, numeric {numeric:.12g}, error {error:.3g}")
        assert error <= FINITE_DIFFERENCE_ATOL + FINITE_DIFFERENCE_RTOL * abs(analytic), (
            f"{entry}: autograd gradient {analytic} differs from the finite difference {numeric}")
        results.append({"tensor": peft_key(layer, name, matrix), "index": list(index),
                        "autograd": analytic, "finite_difference": numeric})
    adapter.frozen_norms = None
    return results


def loss_and_grads(cfg, weights, windows, adapter):
    """Return the loss (float) and {PEFT name: gradient}, in the dtype of the base weights."""
    leaves = adapter.with_dtype(weights["model.embed_tokens.weight"].dtype)
    for tensor in leaves.tensors():
        tensor.requires_grad_(True)
    loss = batch_loss(cfg, weights, windows, leaves)
    loss.backward()
    grads = {key: t.grad.detach().clone() for key, t in leaves.named_tensors().items()}
    return float(loss), grads


def adamw_trajectory(cfg, weights, windows, adapter, steps, lr, max_grad_norm):
    """Train on one batch with AdamW; return the losses before each step, the pre-clip norms and the final loss."""
    trained = adapter.with_dtype(torch.float64)
    params = trained.tensors()
    for tensor in params:
        tensor.requires_grad_(True)
    optimizer = make_adamw(params, lr)
    inv_freq = rope_inv_freq(cfg)
    losses, norms = [], []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = batch_loss(cfg, weights, windows, trained, inv_freq)
        loss.backward()
        # clip_grad_norm_ returns the norm before clipping.
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm)))
        losses.append(float(loss))
        optimizer.step()
    with torch.no_grad():
        final_loss = float(batch_loss(cfg, weights, windows, trained, inv_freq))
    return losses, norms, final_loss


def build_batch(sp, text, window, num_windows):
    """Return the first window * num_windows ids of [BOS] + encode(text), cut into consecutive windows."""
    ids = encode_with_bos(sp, text)
    needed = window * num_windows
    if len(ids) < needed:
        raise ValueError(f"the text gives {len(ids)} ids, fewer than the {needed} the batch needs")
    return [ids[k * window:(k + 1) * window] for k in range(num_windows)]


def read_text_prefix(path, num_bytes):
    """Return the first num_bytes bytes of a UTF-8 file as text; raise if the cut splits a character."""
    with open(path, "rb") as f:
        raw = f.read(num_bytes)
    if len(raw) < num_bytes:
        raise ValueError(f"{path} has {len(raw)} bytes, fewer than {num_bytes}")
    return raw.decode("utf-8")


def cmd_make_step_fixture(args):
    spec = DORA_STEP_FIXTURE if args.dora else STEP_FIXTURE
    out_dir = args.out_dir or ("tests/fixtures/dora/step" if args.dora else "tests/fixtures/lora_step")
    cfg, weights32 = load_model(args.model, torch.float32)
    _, weights = load_model(args.model, torch.float64)
    sp = load_tokenizer(args.model)
    inv_freq = rope_inv_freq(cfg)

    # The adapter: A as PEFT initializes it, B from N(0, 0.02^2) instead of zero
    # so that the gradients of both A and B are non-zero. DoRA's magnitudes
    # start at PEFT's initial norms and are then moved off them.
    generator = torch.Generator().manual_seed(spec["seed"])
    adapter32 = init_adapter(cfg, spec["r"], spec["alpha"], spec["targets"], generator, b_std=spec["b_std"])
    if args.dora:
        add_dora_magnitudes(adapter32, weights32, generator, spec["magnitude_spread"])
    save_peft_adapter(out_dir, adapter32, args.model)
    # Reload from disk so that every value comes from exactly the stored file.
    adapter = load_peft_adapter(out_dir, cfg, torch.float64)
    if adapter.scaling != 2.0:
        raise RuntimeError(f"scaling is {adapter.scaling}, expected 8 / 4 = 2")

    with open(args.data, encoding="utf-8") as f:
        text = f.read()
    batch_ids = build_batch(sp, text, spec["window"], spec["num_windows"])
    windows = torch.tensor(batch_ids, dtype=torch.long)
    with open(os.path.join(out_dir, "batch.json"), "w") as f:
        f.write(dumps_compact_arrays({
            "description": "Two windows of 33 token ids; the loss uses inputs input_ids[:, :32] and targets "
                           "input_ids[:, 1:], 64 predicted tokens in all.",
            "construction": "ids = [BOS] + sentencepiece.encode(whole text of data), with the model's "
                            "tokenizer.model; input_ids = [ids[0:33], ids[33:66]]. The windows share no id, "
                            "and only the first starts with BOS.",
            "data": args.data,
            "data_sha256": sha256_file(args.data),
            "input_ids": batch_ids,
        }))

    # The base model of this script must compute what ref_llama's does, a zero
    # B must leave it unchanged, and the unmerged LoRA forward must equal the
    # merged one.
    with torch.no_grad():
        base = forward(cfg, weights, windows[:, :-1], None, inv_freq)
        base_ref_llama = ref_llama_forward(cfg, weights, windows[:, :-1], inv_freq)
        zero_b = adapter.with_dtype(torch.float64)
        for _, b in zero_b.pairs.values():
            b.zero_()
        if zero_b.use_dora:
            # DoRA also leaves the base unchanged at its initial magnitudes.
            add_dora_magnitudes(zero_b, weights)
        with_zero_b = forward(cfg, weights, windows[:, :-1], zero_b, inv_freq)
        unmerged = forward(cfg, weights, windows[:, :-1], adapter, inv_freq)
        merged = forward(cfg, merged_weights(weights, adapter), windows[:, :-1], None, inv_freq)
    checks = {
        "max_abs_diff_base_vs_ref_llama": float((base - base_ref_llama).abs().max()),
        "max_abs_diff_zero_B_vs_base": float((with_zero_b - base).abs().max()),
        "max_abs_diff_merged_vs_unmerged": float((merged - unmerged).abs().max()),
        "max_abs_diff_adapter_vs_base": float((unmerged - base).abs().max()),
    }
    assert checks["max_abs_diff_base_vs_ref_llama"] < 1e-12, checks
    assert checks["max_abs_diff_zero_B_vs_base"] == 0.0, checks
    assert checks["max_abs_diff_merged_vs_unmerged"] < 1e-12, checks
    assert checks["max_abs_diff_adapter_vs_base"] > 1e-3, checks

    loss, grads = loss_and_grads(cfg, weights, windows, adapter)
    write_safetensors(os.path.join(out_dir, "grads.safetensors"), {k: v.numpy() for k, v in grads.items()})
    if args.dora:
        # rsLoRA's gradients too: the same stored tensors with scaling alpha / sqrt(r).
        _, rslora_grads = loss_and_grads(cfg, weights, windows, adapter.with_dtype(torch.float64, use_rslora=True))
        write_safetensors(os.path.join(out_dir, "grads_rslora.safetensors"),
                          {k: v.numpy() for k, v in rslora_grads.items()})
    checks["finite_differences"] = check_finite_differences(cfg, weights, windows, adapter, grads)

    # What a float32 implementation gets, to size the C tests' tolerances.
    loss32, grads32 = loss_and_grads(cfg, weights32, windows, adapter)
    checks["abs_diff_loss_float32"] = abs(loss32 - loss)
    checks["max_rel_diff_grads_float32"] = max(
        float((grads32[k].double() - grads[k]).abs().max() / grads[k].abs().max()) for k in grads)

    rslora_loss = float(batch_loss(cfg, weights, windows, adapter.with_dtype(torch.float64, use_rslora=True)))

    losses, norms, final_loss = adamw_trajectory(cfg, weights, windows, adapter, spec["adamw_steps"],
                                                 spec["adamw_lr"], spec["max_grad_norm"])

    eval_text = read_text_prefix(args.data, spec["eval_bytes"])
    eval_ids = encode_with_bos(sp, eval_text)
    base_eval, tokens = windowed_loss(cfg, weights, eval_ids, spec["eval_seq_len"])
    adapter_eval, _ = windowed_loss(cfg, weights, eval_ids, spec["eval_seq_len"], adapter)

    description = ("LoRA step fixture on stories260K, computed in float64 by tools/ref_lora.py from the float32 "
                   "values of adapter_model.safetensors. grads.safetensors holds the gradient of `loss` with "
                   "respect to every lora_A and lora_B (same names, float32).")
    init = ("torch.Generator().manual_seed({seed}); for each layer, for each target in target_modules order: "
            "A (r, in) from U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming_uniform_(a=sqrt(5))), then B (out, r) "
            "from N(0, 0.02^2), not zero, so that both gradients are non-trivial").format(seed=spec["seed"])
    if args.dora:
        description = ("DoRA step fixture on stories260K, computed in float64 by tools/ref_lora.py from the "
                       "float32 values of adapter_model.safetensors. grads.safetensors holds the gradient of "
                       "`loss` with respect to every lora_A, lora_B and lora_magnitude_vector (same names, "
                       "float32), and grads_rslora.safetensors that of `rslora_loss`, the same tensors with "
                       "scaling alpha / sqrt(r). The weight norm is detached, as PEFT detaches it.")
        init += (f"; then, in the same order, lora_magnitude_vector = ||W + scaling B A|| per output row "
                 f"(PEFT's initialization) times U(1 - {spec['magnitude_spread']}, 1 + "
                 f"{spec['magnitude_spread']}) drawn from the same generator")
    expected = {
        "description": description,
        "regenerate": "/usr/bin/python3 tools/ref_lora.py make-step-fixture" + (" --dora" if args.dora else ""),
        "model": args.model,
        "dtype": "float64",
        "adapter": {
            "r": spec["r"],
            "lora_alpha": spec["alpha"],
            "scaling": adapter.scaling,
            "target_modules": spec["targets"],
            "init": init,
        },
        "loss": loss,
        "rslora_loss": rslora_loss,
        "rslora_scaling": adapter.with_dtype(torch.float64, use_rslora=True).scaling,
        "adamw": {
            "recipe": "the batch of batch.json at every step; torch.optim.AdamW(lr 1e-3, betas (0.9, 0.999), "
                      "eps 1e-8, weight_decay 0), constant lr; before each step "
                      "torch.nn.utils.clip_grad_norm_(max_norm 1.0), which multiplies the gradients by "
                      "min(1, 1.0 / (norm + 1e-6))",
            "steps": spec["adamw_steps"],
            "loss_before_step": losses,
            "grad_norm_before_clip": norms,
            "loss_after_last_step": final_loss,
        },
        "eval": {
            "data": args.data,
            "data_bytes_used": spec["eval_bytes"],
            "construction": "the first 20000 bytes of data tokenized as one text with BOS once and no EOS; "
                            "window k reads ids[kN, (k+1)N) and predicts ids[kN+1, (k+1)N+1) with N = seq_len; "
                            "a partial last window is dropped",
            "num_ids": len(eval_ids),
            "seq_len": spec["eval_seq_len"],
            "tokens": tokens,
            "base_loss": base_eval,
            "adapter_loss": adapter_eval,
        },
        "checks": checks,
    }
    if args.dora:
        expected["adapter"]["use_dora"] = True
    with open(os.path.join(out_dir, "expected.json"), "w") as f:
        f.write(dumps_compact_arrays(expected))

    sizes = {entry: os.path.getsize(os.path.join(out_dir, entry)) for entry in sorted(os.listdir(out_dir))}
    print(f"loss {loss:.10f}, rslora_loss {rslora_loss:.10f}, adamw {losses[0]:.10f} -> {final_loss:.10f}, "
          f"eval base {base_eval:.10f}, adapter {adapter_eval:.10f}")
    print(f"wrote {out_dir} {sizes}, {sum(sizes.values())} bytes in all")


# ---------------------------------------------------------------------------
# eval-adapter
# ---------------------------------------------------------------------------


def read_ids(path, vocab_size):
    """Read whitespace-separated decimal token ids; raise ValueError on anything else or an id out of range."""
    with open(path) as f:
        words = f.read().split()
    ids = []
    for position, word in enumerate(words):
        if not word.isdigit():
            raise ValueError(f"{path}: word {position} is {word!r}, expected a non-negative token id")
        value = int(word)
        if value >= vocab_size:
            raise ValueError(f"{path}: token id {value} at word {position} is not below the vocabulary size "
                             f"{vocab_size}")
        ids.append(value)
    return ids


def cmd_eval_adapter(args):
    cfg, weights = load_model(args.model, torch.float64)
    adapter = load_peft_adapter(args.adapter, cfg, torch.float64) if args.adapter else None
    ids = read_ids(args.ids, cfg["vocab_size"])
    loss, tokens = windowed_loss(cfg, weights, ids, args.seq_len, adapter)
    print(json.dumps({"loss": loss, "perplexity": math.exp(loss), "tokens": tokens}))


# ---------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------


def parse_targets(text):
    """Parse "q_proj,v_proj" or "all-linear" into projection names in PROJECTION_PATHS order."""
    if text.strip().lower() == ALL_LINEAR:
        return list(PROJECTION_PATHS)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in PROJECTION_PATHS]
    if unknown or not names:
        raise ValueError(f"--target {text!r}: expected a comma-separated list of {list(PROJECTION_PATHS)} "
                         f"or {ALL_LINEAR}")
    return [name for name in PROJECTION_PATHS if name in names]


def cmd_train(args):
    torch.set_num_threads(args.threads)
    dtype = torch.float32
    cfg, weights = load_model(args.model, dtype)
    _, weights64 = load_model(args.model, torch.float64)
    sp = load_tokenizer(args.model)
    targets = parse_targets(args.target)
    with open(args.train, encoding="utf-8") as f:
        train_ids = encode_with_bos(sp, f.read())
    with open(args.eval, encoding="utf-8") as f:
        eval_ids = encode_with_bos(sp, f.read())
    window = args.seq_len + 1
    if len(train_ids) < window:
        raise ValueError(f"{args.train}: {len(train_ids)} token ids are fewer than one window of {window}")

    generator = torch.Generator().manual_seed(args.seed)
    adapter = init_adapter(cfg, args.r, args.alpha, targets, generator, use_rslora=args.rslora,
                           dropout=args.dropout)
    if args.dora:
        add_dora_magnitudes(adapter, weights)
    params = adapter.tensors()
    for tensor in params:
        tensor.requires_grad_(True)
    optimizer = make_adamw(params, args.lr)
    inv_freq = rope_inv_freq(cfg, dtype)
    stream = torch.tensor(train_ids, dtype=torch.long)

    eval_before, eval_tokens = windowed_loss(cfg, weights64, eval_ids, args.eval_seq_len,
                                             adapter.with_dtype(torch.float64))
    print(f"eval before: loss {eval_before:.6f} over {eval_tokens} tokens", file=sys.stderr)

    started = time.time()
    for step in range(args.steps):
        # Windows of seq_len + 1 ids at uniform random starts in the training ids.
        starts = torch.randint(0, len(train_ids) - window + 1, (args.batch_size,), generator=generator)
        windows = torch.stack([stream[s:s + window] for s in starts.tolist()])
        lr = cosine_lr(args.lr, step, args.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad()
        loss = batch_loss(cfg, weights, windows, adapter, inv_freq, training=True)
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm))
        optimizer.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            print(f"step {step + 1}/{args.steps}: loss {float(loss):.4f}, lr {lr:.3g}, grad_norm {norm:.4f}",
                  file=sys.stderr)
    seconds = time.time() - started

    eval_after, _ = windowed_loss(cfg, weights64, eval_ids, args.eval_seq_len, adapter.with_dtype(torch.float64))
    if args.out:
        save_peft_adapter(args.out, adapter, args.model)
    print(json.dumps({
        "eval_loss_before": eval_before,
        "eval_loss_after": eval_after,
        "eval_perplexity_after": math.exp(eval_after),
        "eval_tokens": eval_tokens,
        "train_ids": len(train_ids),
        "steps": args.steps,
        "train_seconds": round(seconds, 1),
        "threads": args.threads,
    }))


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    model_help = "Hugging Face folder with config.json, model.safetensors and tokenizer.model"

    p = sub.add_parser("make-step-fixture", help="write the LoRA step fixture (adapter, batch, gradients, losses)")
    p.add_argument("--model", default="../shared/models/stories260K", help=model_help)
    p.add_argument("--data", default="../shared/data/tinyshakespeare/input.txt",
                   help="UTF-8 text for the batch and the evaluation")
    p.add_argument("--out-dir", help="output folder (default tests/fixtures/lora_step, or with --dora "
                                     "tests/fixtures/dora/step)")
    p.add_argument("--dora", action="store_true", help="DoRA: magnitudes moved off their initial norms, "
                                                       "and rsLoRA gradients in grads_rslora.safetensors")
    p.set_defaults(func=cmd_make_step_fixture)

    p = sub.add_parser("eval-adapter", help="loss of base + PEFT LoRA adapter over consecutive windows of ids")
    p.add_argument("--model", required=True, help=model_help)
    p.add_argument("--adapter", help="folder with adapter_config.json and adapter_model.safetensors "
                                     "(omit to evaluate the base model)")
    p.add_argument("--ids", required=True, help="file of whitespace-separated token ids, as `cpeft tokenize` "
                                                "prints them")
    p.add_argument("--seq-len", type=int, required=True, help="window length in input tokens")
    p.set_defaults(func=cmd_eval_adapter)

    p = sub.add_parser("train", help="train a LoRA adapter; print the eval loss before and after")
    p.add_argument("--model", required=True, help=model_help)
    p.add_argument("--train", required=True, help="UTF-8 training text, tokenized as one string with BOS")
    p.add_argument("--eval", required=True, help="UTF-8 evaluation text, tokenized as one string with BOS")
    p.add_argument("--r", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, default=16, help="lora_alpha (default 16)")
    p.add_argument("--rslora", action="store_true", help="scaling alpha / sqrt(r) instead of alpha / r")
    p.add_argument("--dora", action="store_true", help="weight-decomposed LoRA (PEFT's use_dora)")
    p.add_argument("--dropout", type=float, default=0.0, help="lora_dropout probability (default 0)")
    p.add_argument("--target", default="q_proj,k_proj,v_proj,o_proj",
                   help="comma-separated projections, or all-linear (default q_proj,k_proj,v_proj,o_proj)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per step (default 8)")
    p.add_argument("--seq-len", type=int, default=128, help="training window length in input tokens "
                                                            "(default 128)")
    p.add_argument("--eval-seq-len", type=int, default=128, help="evaluation window length (default 128)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the cosine schedule "
                                                          "(default 3e-3)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialization and the window sampling")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--log-every", type=int, default=20, help="print the training loss every N steps")
    p.add_argument("--out", help="write the trained adapter to this folder in PEFT's layout")
    p.set_defaults(func=cmd_train)

    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (OSError, ValueError) as error:
        # Bad input (a missing file, an adapter this reference cannot apply)
        # gets one line instead of a traceback. Failed self-checks still raise.
        print(f"ref_lora.py {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
