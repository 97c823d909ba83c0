"""PyTorch's attention on the packed layouts, for tests/attention.rs: tests/golden/sdpa.json.

For each case: q, k, v (float32, [tokens, heads, head_dim]), a weight w, the output y of
torch.nn.functional.scaled_dot_product_attention (eager softmax where soft-capping is on, as
transformers' Gemma 2 computes it) under the case's block mask, and the gradients of sum(y * w).
Run: python scripts/make_attention_golden.py (needs torch). Not run by CI: its output is committed.
"""
import json
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent.parent / "tests" / "golden" / "sdpa.json"


def layout(spans):
    """Spans (prefix, branches, pad) -> (positions, visible[i][j]) as the project defines them."""
    positions, parts = [], []
    for s in spans:
        start = len(positions)
        positions += list(range(s["prefix"]))
        parts += [(start, "prefix", None)] * s["prefix"]
        for b, n in enumerate(s["branches"]):
            positions += list(range(s["prefix"], s["prefix"] + n))
            parts += [(start, "branch", b)] * n
        last = positions[-1] + 1 if positions else 0
        positions += list(range(last, last + s["pad"]))
        parts += [(start, "pad", None)] * s["pad"]
    n = len(positions)
    vis = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(i + 1):
            (si, ki, bi), (sj, kj, bj) = parts[i], parts[j]
            if si != sj:
                continue
            if ki == "pad":
                vis[i, j] = i == j
            elif ki == "prefix":
                vis[i, j] = kj == "prefix"
            else:
                vis[i, j] = kj == "prefix" or (kj == "branch" and bj == bi)
    return torch.tensor(positions), vis


def case(name, spans, nh, nkv, hd, scale, softcap=None, window=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    pos, vis = layout(spans)
    if window is not None:
        vis &= (pos[:, None] - pos[None, :]) < window
    n = len(pos)
    q, k, v = (torch.randn(n, h, hd, generator=g, requires_grad=True) for h in (nh, nkv, nkv))
    w = torch.randn(n, nh, hd, generator=g)
    rep = nh // nkv
    qh, kh, vh = q.permute(1, 0, 2), k.repeat_interleave(rep, 1).permute(1, 0, 2), v.repeat_interleave(rep, 1).permute(1, 0, 2)
    if softcap is None:
        y = torch.nn.functional.scaled_dot_product_attention(qh[None], kh[None], vh[None], attn_mask=vis, scale=scale)[0]
    else:
        s = (qh @ kh.transpose(-1, -2)) * scale
        s = torch.tanh(s / softcap) * softcap
        s = s.masked_fill(~vis, float("-inf"))
        y = torch.softmax(s, -1) @ vh
    y = y.permute(1, 0, 2)
    (y * w).sum().backward()
    t = lambda x: {"shape": list(x.shape), "data": [round(float(a), 7) for a in x.detach().flatten()]}
    return {"name": name, "spans": spans, "scale": scale, "softcap": softcap, "window": window,
            "q": t(q), "k": t(k), "v": t(v), "w": t(w), "y": t(y), "dq": t(q.grad), "dk": t(k.grad), "dv": t(v.grad)}


def main():
    packed = [{"prefix": 5, "branches": [4, 3], "pad": 0}, {"prefix": 2, "branches": [3, 2], "pad": 0}]
    padded = [{"prefix": 6, "branches": [], "pad": 3}, {"prefix": 4, "branches": [2, 2], "pad": 1}]
    cases = [
        case("packed, GQA", packed, 4, 2, 8, 8 ** -0.5),
        case("padded rows", padded, 2, 2, 8, 0.3, seed=1),
        case("sliding window 3", packed, 4, 1, 8, 8 ** -0.5, window=3, seed=2),
        case("soft-capped, window", padded, 4, 2, 8, 0.5, softcap=1.5, window=4, seed=3),
    ]
    OUT.write_text(json.dumps({"torch": torch.__version__, "cases": cases}) + "\n")


if __name__ == "__main__":
    main()
