"""Golden values for the optimizer and schedules, from PyTorch and transformers.

Writes tests/golden/optim.json: torch.optim.AdamW on a small parameter with fixed gradients,
clip_grad_norm_ before each step, and the lr multipliers of transformers' constant, linear and
cosine schedules with warmup. Run: python scripts/make_optim_golden.py (torch, transformers).
"""
import json
from pathlib import Path

import torch
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

OUT = Path(__file__).resolve().parent.parent / "tests" / "golden" / "optim.json"


def main():
    torch.manual_seed(0)
    p0 = torch.randn(6, dtype=torch.float64)
    grads = [torch.randn(6, dtype=torch.float64) * s for s in (0.5, 3.0, 0.1, 2.0, 1.0)]
    cfg = dict(lr=0.05, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    p = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([p], **cfg)
    steps = []
    for g in grads:
        p.grad = g.clone()
        norm = torch.nn.utils.clip_grad_norm_([p], max_norm=1.0)
        opt.step()
        steps.append({"grad": g.tolist(), "grad_norm": float(norm), "param": p.detach().tolist()})
    total, warmup = 10, 3
    sched = {}
    for name, make in [("constant", lambda o: get_constant_schedule_with_warmup(o, warmup)),
                       ("linear", lambda o: get_linear_schedule_with_warmup(o, warmup, total)),
                       ("cosine", lambda o: get_cosine_schedule_with_warmup(o, warmup, total))]:
        o = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        s = make(o)
        factors = []
        for _ in range(total):
            factors.append(o.param_groups[0]["lr"])
            o.step()
            s.step()
        sched[name] = factors
    OUT.write_text(json.dumps({"adamw": {"init": p0.tolist(), "lr": cfg["lr"], "beta1": 0.9, "beta2": 0.95, "eps": 1e-8,
                                         "weight_decay": 0.1, "max_grad_norm": 1.0, "steps": steps},
                               "schedules": {"total": total, "warmup": warmup, **sched}}, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
