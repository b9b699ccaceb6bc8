#!/usr/bin/python3
r"""Golden values for cpeft's AdamW, gradient clipping and learning-rate schedules.

The optimizer and the clipping numbers come from PyTorch itself
(torch.optim.AdamW with foreach=False and torch.nn.utils.clip_grad_norm_,
Debian python3-torch 1.13). Hugging Face transformers is not installed, so the
schedules are written below from their definitions in transformers 4.x:

  src/transformers/training_args.py, TrainingArguments.get_warmup_steps:
      warmup_steps if warmup_steps > 0 else math.ceil(num_training_steps * warmup_ratio)
  src/transformers/optimization.py, the lr_lambda of
      get_constant_schedule_with_warmup, get_linear_schedule_with_warmup and
      get_cosine_schedule_with_warmup (num_cycles = 0.5)

and driven through torch.optim.lr_scheduler.LambdaLR, as the Trainer does, so
that entry s of each "lr" list is the learning rate that optimizer step s
(0-based) uses.

Regenerate the fixture from the repository root:

    /usr/bin/python3 tools/ref_optim.py --out tests/fixtures/optim_reference.json
"""

import argparse
import json
import math

import torch

# ---------------------------------------------------------------------------
# Schedules (transformers 4.x definitions)
# ---------------------------------------------------------------------------


def get_warmup_steps(warmup_steps, warmup_ratio, num_training_steps):
    return warmup_steps if warmup_steps > 0 else math.ceil(num_training_steps * warmup_ratio)


def constant_lambda(step, warmup):
    if step < warmup:
        return float(step) / float(max(1.0, warmup))
    return 1.0


def linear_lambda(step, warmup, total):
    if step < warmup:
        return float(step) / float(max(1, warmup))
    return max(0.0, float(total - step) / float(max(1, total - warmup)))


def cosine_lambda(step, warmup, total, num_cycles=0.5):
    if step < warmup:
        return float(step) / float(max(1, warmup))
    progress = float(step - warmup) / float(max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))


SCHEDULES = {
    "constant": lambda s, w, t: constant_lambda(s, w),
    "linear": linear_lambda,
    "cosine": cosine_lambda,
}


def schedule_lrs(name, peak_lr, warmup, total):
    """Returns the learning rate of optimizer steps 0 .. total-1 under LambdaLR."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=peak_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: SCHEDULES[name](s, warmup, total))
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def schedule_cases():
    cases = []
    # (name, peak lr, warmup_steps, warmup_ratio, total steps)
    settings = [
        ("cosine", 2e-4, 3, 0.0, 20),
        ("linear", 2e-4, 3, 0.0, 20),
        ("constant", 2e-4, 3, 0.0, 20),
        ("cosine", 1e-3, 0, 0.1, 23),  # ratio: ceil(2.3) = 3
        ("linear", 1e-3, 0, 0.0, 7),  # no warmup
        ("cosine", 5e-4, 5, 0.5, 12),  # warmup_steps wins over the ratio
        ("constant", 1e-3, 0, 0.25, 9),  # ceil(2.25) = 3
    ]
    for name, lr, warmup_steps, warmup_ratio, total in settings:
        warmup = get_warmup_steps(warmup_steps, warmup_ratio, total)
        cases.append({
            "schedule": name,
            "peak_lr": lr,
            "warmup_steps": warmup_steps,
            "warmup_ratio": warmup_ratio,
            "total_steps": total,
            "resolved_warmup": warmup,
            "lr": schedule_lrs(name, lr, warmup, total),
        })
    return cases


def warmup_cases():
    # 100 * 0.07 is 7.000000000000001 in binary floating point, so
    # transformers resolves it to 8 warmup steps, not 7.
    settings = [(0, 0.07, 100), (0, 0.1, 30), (0, 0.1, 23), (7, 0.1, 30), (0, 0.0, 100),
                (0, 0.05, 1000)]
    return [{"warmup_steps": w, "warmup_ratio": r, "total_steps": t,
             "resolved_warmup": get_warmup_steps(w, r, t)} for w, r, t in settings]


# ---------------------------------------------------------------------------
# AdamW
# ---------------------------------------------------------------------------


def f32_list(tensor):
    return [float(x) for x in tensor.detach().to(torch.float32).flatten().tolist()]


def make_grads(steps, n, phase, scale):
    """Deterministic float32 gradients (steps, n); element 0 is tiny so eps matters."""
    g = torch.zeros(steps, n, dtype=torch.float64)
    for t in range(steps):
        for i in range(n):
            g[t, i] = scale * math.sin(0.7 * t + 1.3 * i + phase)
    g[:, 0] *= 1e-7
    return g.to(torch.float32)


def adamw_case(lrs):
    """Two tensors, one with weight decay and one without, through len(lrs) steps."""
    steps = len(lrs)
    decayed = torch.nn.Parameter(torch.tensor([0.5, -1.25, 2.0, 0.125, -0.75], dtype=torch.float32))
    plain = torch.nn.Parameter(torch.tensor([1.0, -0.5, 0.25], dtype=torch.float32))
    init = [f32_list(decayed), f32_list(plain)]
    grads = [make_grads(steps, 5, 0.0, 0.8), make_grads(steps, 3, 0.4, 2.5)]
    opt = torch.optim.AdamW(
        [{"params": [decayed], "weight_decay": 0.01}, {"params": [plain], "weight_decay": 0.0}],
        lr=lrs[0], betas=(0.9, 0.999), eps=1e-8, foreach=False)

    after = []
    for t in range(steps):
        for group in opt.param_groups:
            group["lr"] = lrs[t]
        decayed.grad = grads[0][t].clone()
        plain.grad = grads[1][t].clone()
        opt.step()
        after.append([f32_list(decayed), f32_list(plain)])

    def tensor(i, p, decay):
        state = opt.state[p]
        return {
            "decay": decay,
            "init": init[i],
            "grads": [f32_list(grads[i][t]) for t in range(steps)],
            "after": [after[t][i] for t in range(steps)],
            "exp_avg": f32_list(state["exp_avg"]),
            "exp_avg_sq": f32_list(state["exp_avg_sq"]),
        }

    return {
        "lr": lrs,
        "beta1": 0.9,
        "beta2": 0.999,
        "eps": 1e-8,
        "weight_decay": 0.01,
        "tensors": [tensor(0, decayed, 1), tensor(1, plain, 0)],
    }


# ---------------------------------------------------------------------------
# Gradient clipping
# ---------------------------------------------------------------------------


def clip_case(max_norm, scale):
    a = torch.nn.Parameter(torch.zeros(4))
    b = torch.nn.Parameter(torch.zeros(3))
    a.grad = torch.tensor([0.3, -1.2, 0.05, 2.0], dtype=torch.float32) * scale
    b.grad = torch.tensor([-0.7, 0.9, 1.5], dtype=torch.float32) * scale
    before = [f32_list(a.grad), f32_list(b.grad)]
    norm = torch.nn.utils.clip_grad_norm_([a, b], max_norm)
    return {
        "max_norm": max_norm,
        "grads": before,
        "norm": float(norm),
        "clipped": [f32_list(a.grad), f32_list(b.grad)],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args()

    torch.set_default_dtype(torch.float32)
    cosine = schedule_lrs("cosine", 1e-2, 2, 10)
    fixture = {
        "generator": "tools/ref_optim.py, torch " + torch.__version__,
        "adamw": [adamw_case([1e-2] * 10), adamw_case(cosine)],
        "clip": [clip_case(1.0, 1.0), clip_case(10.0, 1.0), clip_case(0.5, 1e3)],
        "warmup": warmup_cases(),
        "schedules": schedule_cases(),
    }
    with open(args.out, "w") as f:
        json.dump(fixture, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
