#!/usr/bin/python3
r"""PyTorch reference for one LoRA gradient step on the tiny GPT-2, Qwen2 and biased Llama fixtures.

For each of tests/fixtures/tiny-gpt2, tiny-qwen2 and tiny-llama-bias this
script draws a LoRA adapter (r 2, lora_alpha 4, so scaling 2) on every linear
module of the architecture and a batch of token ids. It then computes in
float64 the mean next-token cross-entropy and its gradient with respect to
every lora_A and lora_B. It runs with Debian's python3-torch 1.13 and numpy,
without transformers, peft or the safetensors package. Model loading and the base
forward passes come from tools/ref_gpt2.py and tools/ref_llama.py. The LoRA
forward passes here must match them without the adapter, and with the adapter
merged into the base weights (W + scaling * B @ A, transposed for Conv1D).

LoRA in PEFT's semantics, as tools/ref_lora.py states them from PEFT's source:
    y = base(x) + (dropout(x) @ A^T) @ B^T * scaling, A (r, in), B (out, r)
This holds for GPT-2's Conv1D modules as well: PEFT keeps lora_A and lora_B as
nn.Linear there, and fan_in_fan_out only says that the base weight is stored
(in, out). The target modules are
    GPT-2:        attn.c_attn (16 -> 48), attn.c_proj (16 -> 16),
                  mlp.c_fc (16 -> 64), mlp.c_proj (64 -> 16)
    Qwen2, Llama: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj
A is drawn from U(-1/sqrt(in), 1/sqrt(in)), as PEFT's kaiming_uniform_(a=sqrt(5))
draws it, and B from N(0, 0.05^2) instead of PEFT's zero, so that the
gradients of both A and B are non-trivial.

Regenerate the fixtures from the repository root:

    /usr/bin/python3 tools/ref_lora_arch.py make-fixture

It writes tests/fixtures/lora_arch/<model>/ with adapter_model.safetensors and
adapter_config.json (PEFT's layout), grads.safetensors (the gradients under
the adapter's tensor names, F32) and expected.json (input ids and loss).
"""

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ref_gpt2  # noqa: E402  (the tools folder must be on sys.path first)
import ref_llama  # noqa: E402
from ref_llama import dumps_compact_arrays, read_safetensors, write_safetensors  # noqa: E402
from ref_lora import peft_adapter_config  # noqa: E402

RANK = 2
LORA_ALPHA = 4
SCALING = LORA_ALPHA / RANK
B_STD = 0.05
ADAPTER_SEED = 20240601
IDS_SEED = 1234
BATCH, WINDOW = 2, 9

GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Module paths inside one layer, in the order the adapter tensors are drawn.
GPT2_LAYER_MODULES = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
LLAMA_LAYER_MODULES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]

MODELS = ["tiny-gpt2", "tiny-qwen2", "tiny-llama-bias"]

# Entries checked against central finite differences: (layer, module, matrix, row, column).
FINITE_DIFFERENCE_ENTRIES = {
    "gpt2": [
        (0, "attn.c_attn", "A", 1, 7),
        (0, "attn.c_attn", "B", 40, 0),
        (1, "attn.c_proj", "B", 3, 1),
        (0, "mlp.c_fc", "A", 0, 15),
        (1, "mlp.c_proj", "A", 1, 63),
        (1, "mlp.c_proj", "B", 9, 0),
    ],
    "llama": [
        (0, "self_attn.q_proj", "A", 1, 5),
        (0, "self_attn.k_proj", "B", 7, 1),
        (1, "self_attn.v_proj", "A", 0, 3),
        (1, "self_attn.o_proj", "B", 2, 0),
        (0, "mlp.gate_proj", "A", 1, 10),
        (1, "mlp.up_proj", "B", 20, 1),
        (0, "mlp.down_proj", "A", 0, 23),
    ],
}
FINITE_DIFFERENCE_STEP = 1e-6
# Central differences with step 1e-6 have a truncation error near 1e-12 and a
# float64 rounding error near 1e-16 / 1e-6 = 1e-10, well inside these bounds.
FINITE_DIFFERENCE_ATOL = 1e-8
FINITE_DIFFERENCE_RTOL = 1e-5


def peft_key(module_path, matrix):
    """Return the tensor name PEFT saves for lora_A or lora_B (matrix "A" or "B") of a module."""
    return f"base_model.model.{module_path}.lora_{matrix}.weight"


# ---------------------------------------------------------------------------
# Architectures
# ---------------------------------------------------------------------------


class Architecture:
    """The pieces of one model family: loading, module shapes, the LoRA forward pass and the base forward pass."""

    def __init__(self, family, model_dir):
        self.family = family
        self.model_dir = model_dir
        if family == "gpt2":
            self.cfg, self.weights = ref_gpt2.load_model(model_dir, torch.float64)
            self.num_layers = self.cfg["n_layer"]
            self.layer_prefix = "transformer.h."
            self.layer_modules = GPT2_LAYER_MODULES
            self.targets = GPT2_TARGETS
        else:
            self.cfg, self.weights = ref_llama.load_model(model_dir, torch.float64)
            self.num_layers = self.cfg["num_hidden_layers"]
            self.layer_prefix = "model.layers."
            self.layer_modules = LLAMA_LAYER_MODULES
            self.targets = LLAMA_TARGETS
        self.vocab_size = self.cfg["vocab_size"]

    def module_path(self, layer, module):
        return f"{self.layer_prefix}{layer}.{module}"

    def module_paths(self):
        """Return every target module path, layer by layer, in the order the adapter is drawn."""
        return [self.module_path(layer, module) for layer in range(self.num_layers) for module in self.layer_modules]

    def module_shape(self, path):
        """Return (out, in) of a target module from its base weight."""
        weight = self.weights[path + ".weight"]
        if self.family == "gpt2":
            # Conv1D stores its weight (in, out).
            return weight.shape[1], weight.shape[0]
        return weight.shape[0], weight.shape[1]

    def project(self, adapter, path, x):
        """Apply a target module with its bias and the LoRA term of `adapter` (a dict path -> (A, B))."""
        weight = self.weights[path + ".weight"]
        y = x @ weight if self.family == "gpt2" else x @ weight.T
        bias = self.weights.get(path + ".bias")
        if bias is not None:
            y = y + bias
        if adapter is not None:
            a, b = adapter[path]
            # lora_dropout is 0, so dropout(x) is x.
            y = y + ((x @ a.T) @ b.T) * SCALING
        return y

    def forward(self, ids, adapter):
        if self.family == "gpt2":
            return self.gpt2_forward(ids, adapter)
        return self.llama_forward(ids, adapter)

    def base_forward(self, ids, weights=None):
        """Return the logits of the reference implementation (ref_gpt2 or ref_llama) without LoRA."""
        weights = self.weights if weights is None else weights
        if self.family == "gpt2":
            return ref_gpt2.forward(self.cfg, weights, ids)[0]
        return ref_llama.forward(self.cfg, weights, ids)

    def merged_weights(self, adapter):
        """Return the base weights with scaling * B @ A added to the weight of every target module."""
        merged = dict(self.weights)
        for path, (a, b) in adapter.items():
            delta = (b @ a) * SCALING
            # A Conv1D weight is stored (in, out), so its delta is transposed.
            merged[path + ".weight"] = self.weights[path + ".weight"] + (delta.T if self.family == "gpt2" else delta)
        return merged

    def gpt2_forward(self, ids, adapter):
        """Return the logits of ref_gpt2.forward with every Conv1D module going through `project`."""
        cfg, weights = self.cfg, self.weights
        batch, seq_len = ids.shape
        hidden, heads, head_dim = cfg["n_embd"], cfg["n_head"], cfg["head_dim"]
        eps = cfg["layer_norm_epsilon"]
        future = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool), diagonal=1)

        x = weights["transformer.wte.weight"][ids] + weights["transformer.wpe.weight"][:seq_len]
        for layer in range(self.num_layers):
            p = self.module_path(layer, "")
            h = ref_gpt2.layer_norm(x, weights[p + "ln_1.weight"], weights[p + "ln_1.bias"], eps)
            qkv = self.project(adapter, p + "attn.c_attn", h)
            q, k, v = (t.reshape(batch, seq_len, heads, head_dim).transpose(1, 2) for t in qkv.split(hidden, dim=-1))
            scores = q @ k.transpose(-1, -2)
            if cfg["scale_attn_weights"]:
                scores = scores / math.sqrt(head_dim)
            if cfg["scale_attn_by_inverse_layer_idx"]:
                scores = scores / (layer + 1)
            scores = scores.masked_fill(future, float("-inf"))
            context = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(batch, seq_len, hidden)
            x = x + self.project(adapter, p + "attn.c_proj", context)

            h = ref_gpt2.layer_norm(x, weights[p + "ln_2.weight"], weights[p + "ln_2.bias"], eps)
            inner = ref_gpt2.gelu_new(self.project(adapter, p + "mlp.c_fc", h))
            x = x + self.project(adapter, p + "mlp.c_proj", inner)

        x = ref_gpt2.layer_norm(x, weights["transformer.ln_f.weight"], weights["transformer.ln_f.bias"], eps)
        return x @ weights["lm_head.weight"].T

    def llama_forward(self, ids, adapter):
        """Return the logits of ref_llama.forward (biases included) with every projection going through `project`."""
        cfg, weights = self.cfg, self.weights
        batch, seq_len = ids.shape
        heads, kv_heads, head_dim = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
        group = heads // kv_heads
        eps = cfg["rms_norm_eps"]
        cos, sin = ref_llama.rope_cos_sin(ref_llama.rope_inv_freq(cfg), seq_len, torch.float64)
        mask = ref_llama.attention_mask(seq_len, cfg["sliding_window"])

        x = weights["model.embed_tokens.weight"][ids]
        for layer in range(self.num_layers):
            p = self.module_path(layer, "")
            h = ref_llama.rms_norm(x, weights[p + "input_layernorm.weight"], eps)
            q = self.project(adapter, p + "self_attn.q_proj", h).view(batch, seq_len, heads, head_dim)
            k = self.project(adapter, p + "self_attn.k_proj", h).view(batch, seq_len, kv_heads, head_dim)
            v = self.project(adapter, p + "self_attn.v_proj", h).view(batch, seq_len, kv_heads, head_dim)
            q = ref_llama.apply_rope(q.transpose(1, 2), cos, sin)
            k = ref_llama.apply_rope(k.transpose(1, 2), cos, sin).repeat_interleave(group, dim=1)
            v = v.transpose(1, 2).repeat_interleave(group, dim=1)
            scores = (q / math.sqrt(head_dim)) @ k.transpose(-1, -2)
            scores = scores.masked_fill(~mask, float("-inf"))
            attn = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(batch, seq_len, heads * head_dim)
            x = x + self.project(adapter, p + "self_attn.o_proj", attn)

            h = ref_llama.rms_norm(x, weights[p + "post_attention_layernorm.weight"], eps)
            gate = torch.nn.functional.silu(self.project(adapter, p + "mlp.gate_proj", h))
            up = self.project(adapter, p + "mlp.up_proj", h)
            x = x + self.project(adapter, p + "mlp.down_proj", gate * up)

        x = ref_llama.rms_norm(x, weights["model.norm.weight"], eps)
        return x @ weights["lm_head.weight"].T


def model_family(model_dir):
    """Return "gpt2" or "llama" (ref_llama's Llama, Mistral and Qwen2) from the model_type of config.json."""
    with open(os.path.join(model_dir, "config.json")) as f:
        model_type = json.load(f).get("model_type")
    return "gpt2" if model_type == "gpt2" else "llama"


# ---------------------------------------------------------------------------
# Adapter, loss and gradients
# ---------------------------------------------------------------------------


def init_adapter(arch, generator):
    """Draw a float32 adapter {module path: (A, B)}: for each module in order, A then B."""
    adapter = {}
    for path in arch.module_paths():
        out_features, in_features = arch.module_shape(path)
        bound = 1.0 / math.sqrt(in_features)
        a = torch.empty(RANK, in_features, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        b = torch.empty(out_features, RANK, dtype=torch.float32).normal_(0.0, B_STD, generator=generator)
        adapter[path] = (a, b)
    return adapter


def adapter_state_dict(adapter):
    """Return {PEFT tensor name: float32 numpy array}."""
    arrays = {}
    for path, (a, b) in adapter.items():
        arrays[peft_key(path, "A")] = a.detach().to(torch.float32).numpy()
        arrays[peft_key(path, "B")] = b.detach().to(torch.float32).numpy()
    return arrays


def load_adapter(path, arch):
    """Read adapter_model.safetensors back as a float64 adapter {module path: (A, B)}."""
    arrays = read_safetensors(path)
    adapter = {}
    for module in arch.module_paths():
        a = torch.from_numpy(arrays.pop(peft_key(module, "A")).copy()).to(torch.float64)
        b = torch.from_numpy(arrays.pop(peft_key(module, "B")).copy()).to(torch.float64)
        adapter[module] = (a, b)
    if arrays:
        raise RuntimeError(f"{path}: contains tensors of no target module: {sorted(arrays)}")
    return adapter


def batch_loss(arch, windows, adapter):
    """Return the mean cross-entropy of predicting windows[:, 1:] from windows[:, :-1]."""
    logits = arch.forward(windows[:, :-1], adapter)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))


def loss_and_grads(arch, windows, adapter):
    """Return the loss (float) and {PEFT name: float64 gradient}."""
    for a, b in adapter.values():
        a.requires_grad_(True)
        b.requires_grad_(True)
    loss = batch_loss(arch, windows, adapter)
    loss.backward()
    grads = {}
    for path, (a, b) in adapter.items():
        grads[peft_key(path, "A")] = a.grad.detach().clone()
        grads[peft_key(path, "B")] = b.grad.detach().clone()
        a.requires_grad_(False)
        b.requires_grad_(False)
    return float(loss), grads


def check_base_forward(arch, windows, adapter):
    """Assert that the LoRA forward pass with B = 0 equals the reference base forward pass."""
    zero_b = {path: (a, torch.zeros_like(b)) for path, (a, b) in adapter.items()}
    ids = windows[:, :-1]
    reference = arch.base_forward(ids)
    for name, logits in (("no adapter", arch.forward(ids, None)), ("B = 0", arch.forward(ids, zero_b))):
        difference = float((logits - reference).abs().max())
        print(f"{arch.model_dir}: LoRA forward with {name} vs the reference forward: max |diff| {difference:.3g}")
        assert difference < 1e-12, f"{arch.model_dir}: LoRA forward with {name} differs from the reference by " \
                                   f"{difference}"


def check_merged_forward(arch, windows, adapter):
    """Assert that the LoRA forward pass equals the reference forward pass on the merged weights."""
    ids = windows[:, :-1]
    with torch.no_grad():
        lora_logits = arch.forward(ids, adapter)
        merged_logits = arch.base_forward(ids, arch.merged_weights(adapter))
    difference = float((lora_logits - merged_logits).abs().max())
    print(f"{arch.model_dir}: LoRA forward vs the reference forward on merged weights: max |diff| {difference:.3g}")
    assert difference < 1e-12, f"{arch.model_dir}: LoRA forward differs from the merged forward by {difference}"


def check_finite_differences(arch, windows, adapter, grads):
    """Assert that autograd's gradients match central finite differences of the float64 loss."""
    for layer, module, matrix, row, column in FINITE_DIFFERENCE_ENTRIES[arch.family]:
        path = arch.module_path(layer, module)
        tensor = adapter[path][0 if matrix == "A" else 1]
        original = float(tensor[row, column])
        losses = []
        with torch.no_grad():
            for sign in (1.0, -1.0):
                tensor[row, column] = original + sign * FINITE_DIFFERENCE_STEP
                losses.append(float(batch_loss(arch, windows, adapter)))
            tensor[row, column] = original
        numeric = (losses[0] - losses[1]) / (2 * FINITE_DIFFERENCE_STEP)
        analytic = float(grads[peft_key(path, matrix)][row, column])
        error = abs(numeric - analytic)
        entry = f"{peft_key(path, matrix)}[{row}, {column}]"
        print(f"finite difference {entry}: autograd {analytic:.12g}, numeric {numeric:.12g}, error {error:.3g}")
        assert error <= FINITE_DIFFERENCE_ATOL + FINITE_DIFFERENCE_RTOL * abs(analytic), (
            f"{entry}: autograd gradient {analytic} differs from the finite difference {numeric}")


# ---------------------------------------------------------------------------
# make-fixture
# ---------------------------------------------------------------------------


def write_adapter_config(out_dir, arch):
    """Write adapter_config.json in PEFT's layout, with the keys of ref_lora.peft_adapter_config."""
    config = peft_adapter_config(RANK, LORA_ALPHA, arch.targets, 0.0, False, arch.model_dir)
    # fan_in_fan_out says that the base weights of the targets are stored (in, out), as GPT-2's Conv1D stores them.
    config["fan_in_fan_out"] = arch.family == "gpt2"
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        # The same formatting as ref_lora.save_peft_adapter.
        f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")


def make_model_fixture(model_dir, out_root):
    """Write the adapter, gradients and expected loss of one model to out_root/<model name>/."""
    name = os.path.basename(os.path.normpath(model_dir))
    out_dir = os.path.join(out_root, name)
    arch = Architecture(model_family(model_dir), model_dir)

    windows = torch.randint(0, arch.vocab_size, (BATCH, WINDOW), generator=torch.Generator().manual_seed(IDS_SEED))
    adapter32 = init_adapter(arch, torch.Generator().manual_seed(ADAPTER_SEED))

    os.makedirs(out_dir, exist_ok=True)
    adapter_path = os.path.join(out_dir, "adapter_model.safetensors")
    write_safetensors(adapter_path, adapter_state_dict(adapter32))
    write_adapter_config(out_dir, arch)
    # Reload from disk so that every value comes from exactly the stored float32 file.
    adapter = load_adapter(adapter_path, arch)

    check_base_forward(arch, windows, adapter)
    check_merged_forward(arch, windows, adapter)
    loss, grads = loss_and_grads(arch, windows, adapter)
    check_finite_differences(arch, windows, adapter, grads)
    write_safetensors(os.path.join(out_dir, "grads.safetensors"), {k: v.numpy() for k, v in grads.items()})

    order = "attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj" if arch.family == "gpt2" else ", ".join(
        LLAMA_LAYER_MODULES)
    expected = {
        "description": f"One-step LoRA fixture on {model_dir}, computed in float64 by tools/ref_lora_arch.py from "
                       "the float32 values of adapter_model.safetensors. `loss` is the mean cross-entropy of "
                       "predicting input_ids[:, 1:] from input_ids[:, :-1] (16 tokens), and grads.safetensors "
                       "holds its gradient with respect to every lora_A and lora_B (same names, float32).",
        "regenerate": "/usr/bin/python3 tools/ref_lora_arch.py make-fixture",
        "model": model_dir,
        "dtype": "float64",
        "adapter": {
            "r": RANK,
            "lora_alpha": LORA_ALPHA,
            "scaling": SCALING,
            "target_modules": arch.targets,
            "init": f"torch.Generator().manual_seed({ADAPTER_SEED}); for each layer, for each module in the "
                    f"order {order}: A (r, in) from U(-1/sqrt(in), 1/sqrt(in)), then B (out, r) from "
                    f"N(0, {B_STD}^2)",
        },
        "input_ids_init": f"torch.randint(0, {arch.vocab_size}, ({BATCH}, {WINDOW}), "
                          f"generator=torch.Generator().manual_seed({IDS_SEED}))",
        "input_ids": windows.tolist(),
        "loss": loss,
    }
    with open(os.path.join(out_dir, "expected.json"), "w") as f:
        f.write(dumps_compact_arrays(expected))

    sizes = {entry: os.path.getsize(os.path.join(out_dir, entry)) for entry in sorted(os.listdir(out_dir))}
    print(f"{name}: loss {loss:.12f}; wrote {out_dir} {sizes}")
    return loss


def cmd_make_fixture(args):
    for model in MODELS:
        make_model_fixture(os.path.join(args.models_dir, model), args.out_dir)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make-fixture", help="write tests/fixtures/lora_arch/<model>/ for the three tiny models")
    p.add_argument("--models-dir", default="tests/fixtures", help="folder that contains " + ", ".join(MODELS))
    p.add_argument("--out-dir", default="tests/fixtures/lora_arch", help="output folder")
    p.set_defaults(func=cmd_make_fixture)
    args = parser.parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
