"""Every loss TRL 1.16 has, on fixed inputs, as TRL itself computes it -> tests/golden/losses_trl.json.

DPO family: `DPOTrainer._compute_loss` runs on a stand-in model that returns fixed per-token
log-probs (and the fused statistics TRL logs: entropy, mean logit, top-1, log Σp²); the golden
values are the loss, its gradient with respect to the policy's per-token log-probs, and the
logged metrics, for every loss type, the weighted combinations, each f-divergence, WPO and LD-DPO.
The cases TRL refuses or crashes on are recorded with their error.

CPO/SimPO and ORPO: `CPOTrainer`/`ORPOTrainer.get_batch_loss_metrics` on a stand-in model that
returns fixed logits for three (prompt, chosen, rejected) examples; loss and metrics.

Run: python scripts/make_loss_golden.py (torch, trl==1.16.0). Not run by CI: output committed.
"""
import json
import types
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch
from trl.experimental.cpo.cpo_trainer import CPOTrainer
from trl.experimental.orpo.orpo_trainer import ORPOTrainer
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.utils import FusedCausalLMOutput

OUT = Path(__file__).resolve().parent.parent / "tests" / "golden" / "losses_trl.json"


class Acc:
    device = torch.device("cpu")

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x

    def unwrap_model(self, m):
        return m


def dpo_cases():
    torch.manual_seed(3)
    B, T = 4, 10
    prompt_lens = [2, 3, 1, 4, 2, 3, 1, 4]  # rows 0..3 chosen, 4..7 rejected (pair i = rows i, i+B)
    comp_lens = [3, 6, 2, 5, 5, 1, 7, 5]
    completion_mask = torch.zeros(2 * B, T, dtype=torch.long)
    attention_mask = torch.zeros(2 * B, T, dtype=torch.long)
    for r in range(2 * B):
        completion_mask[r, prompt_lens[r] : prompt_lens[r] + comp_lens[r]] = 1
        attention_mask[r, : prompt_lens[r] + comp_lens[r]] = 1
    input_ids = torch.randint(0, 5, (2 * B, T))
    shift = completion_mask[:, 1:].bool()
    pol_tok = (-torch.rand(2 * B, T - 1) * 2.0).masked_fill(~shift, 0.0)
    ref_tok = (-torch.rand(2 * B, T - 1) * 2.0).masked_fill(~shift, 0.0)
    lssp = (-torch.rand(2 * B, T - 1)).masked_fill(~shift, 0.0)
    ent = torch.rand(2 * B, T - 1).masked_fill(~shift, 0.0)
    ml = torch.randn(2 * B, T - 1).masked_fill(~shift, 0.0)
    top1 = (torch.rand(2 * B, T - 1) > 0.5) & shift

    class FakeModel(torch.nn.Module):
        def __init__(self, tok, policy):
            super().__init__()
            self.tok, self.policy, self.is_gradient_checkpointing = tok, policy, False

        def forward(self, **kw):
            lp = self.tok.clone().requires_grad_(self.policy)
            if self.policy:
                self.leaf = lp
                return FusedCausalLMOutput(log_probs=lp, entropy=ent, mean_logits=ml, is_top1=top1, log_sum_sq_probs=lssp)
            return FusedCausalLMOutput(log_probs=lp)

    def run(loss_types, loss_weights=None, **kw):
        cfg = dict(beta=0.1, label_smoothing=0.0, ld_alpha=None, f_divergence_type="reverse_kl",
                   f_alpha_divergence_coef=0.5, use_weighting=False, discopop_tau=0.05)
        cfg.update(kw)
        model = FakeModel(pol_tok, True)
        trainer = SimpleNamespace(
            model=model, ref_model=FakeModel(ref_tok, False), accelerator=Acc(),
            args=SimpleNamespace(discopop_tau=cfg["discopop_tau"], gradient_checkpointing_kwargs=None),
            beta=cfg["beta"], label_smoothing=cfg["label_smoothing"], ld_alpha=cfg["ld_alpha"],
            f_divergence_type=cfg["f_divergence_type"], f_alpha_divergence_coef=cfg["f_alpha_divergence_coef"],
            use_weighting=cfg["use_weighting"], loss_types=loss_types, precompute_ref_logps=False,
            aux_loss_enabled=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
            _total_train_tokens=0, _tp_size=1)
        trainer.loss_weights = loss_weights or [1.0] * len(loss_types)
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, completion_mask=completion_mask)
        loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
        loss.backward()
        return loss.item(), {k: v[0] for k, v in trainer._metrics["train"].items()}, model.leaf.grad

    one = lambda t, **kw: ([t], None, kw)
    cases = [one(t) for t in ["sigmoid", "hinge", "ipo", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
                              "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]]
    cases += [
        one("exo_pair", label_smoothing=1e-3), one("robust", label_smoothing=0.1),
        one("sigmoid", beta=2.0), one("discopop", beta=2.0), one("discopop", beta=0.5, discopop_tau=1.0),
        one("aot", label_smoothing=0.1), one("aot_unpaired", label_smoothing=0.1),
        one("sigmoid", ld_alpha=0.5), one("ipo", ld_alpha=0.0), one("bco_pair", ld_alpha=0.3),
        one("sigmoid", f_divergence_type="forward_kl"), one("sigmoid", f_divergence_type="js_divergence"),
        one("sigmoid", f_divergence_type="alpha_divergence"),
        one("sigmoid", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
        one("ipo", f_divergence_type="js_divergence"), one("hinge", f_divergence_type="forward_kl"),
        one("sigmoid", use_weighting=True), one("ipo", use_weighting=True), one("apo_zero", use_weighting=True),
        (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], {}),  # MPO
        (["ipo", "sft"], [1.0, 0.5], {"beta": 0.3}),
    ]
    res = []
    for types_, weights, kw in cases:
        loss, metrics, g = run(types_, weights, **kw)
        res.append(dict(loss_types=types_, loss_weights=weights, config=kw, loss=loss,
                        grad_wrt_policy_token_logps=g.tolist(), metrics=metrics))
    # TRL 1.16 crashes on hinge with WPO: it scales relu's output in place, which relu's backward
    # needs. The same computation with relu as clamp(min=0) (equal values; equal gradients away
    # from the kink) gives the values ours must match.
    relu = torch.relu
    torch.relu = lambda x: x.clamp(min=0)
    try:
        loss, metrics, g = run(["hinge"], None, use_weighting=True)
    finally:
        torch.relu = relu
    res.append(dict(loss_types=["hinge"], loss_weights=None, config={"use_weighting": True}, loss=loss,
                    grad_wrt_policy_token_logps=g.tolist(), metrics=metrics,
                    note="TRL 1.16 crashes on this case (in-place op); computed with relu as clamp(min=0)"))
    # TRL 1.16 crashes on these (in-place ops under autograd); we refuse sft with WPO (one mean
    # over the batch's tokens has no per-pair weight).
    for types_, kw in [(["hinge"], {"use_weighting": True}), (["sft"], {"use_weighting": True})]:
        try:
            run(types_, None, **kw)
            res.append(dict(loss_types=types_, config=kw, error=None))
        except Exception as e:  # noqa: BLE001 - recording TRL's failure is the point
            res.append(dict(loss_types=types_, config=kw, error=f"{type(e).__name__}: {str(e)[:120]}"))
    inputs = dict(prompt_lens=prompt_lens, completion_lens=comp_lens, completion_mask=completion_mask.tolist(),
                  policy_per_token_logps=pol_tok.tolist(), ref_per_token_logps=ref_tok.tolist(),
                  log_sum_sq_probs=lssp.tolist(), entropy=ent.tolist(), mean_logits=ml.tolist(),
                  is_top1=top1.int().tolist())
    return dict(inputs=inputs, cases=res)


def reference_free_cases():
    torch.manual_seed(7)
    B, V, PAD = 3, 6, 0
    ex = [([1, 4], [2, 3, 5], [3, 5]), ([1, 2, 2], [4], [5, 4, 3, 2]), ([1], [3, 3], [2, 5, 4])]

    def build(which):
        ids, am, lab = [], [], []
        for p, c, r in ex:
            a = c if which == "chosen" else r
            ids.append(p + a)
            am.append([1] * len(p + a))
            lab.append([-100] * len(p) + a)
        L = max(len(x) for x in ids)
        padf = lambda xs, v: torch.tensor([x + [v] * (L - len(x)) for x in xs])
        return padf(ids, PAD), padf(am, 0), padf(lab, -100)

    ci, ca, cl = build("chosen")
    ri, ra, rl = build("rejected")
    batch = dict(chosen_input_ids=ci, chosen_attention_mask=ca, chosen_labels=cl,
                 rejected_input_ids=ri, rejected_attention_mask=ra, rejected_labels=rl)
    T = max(ci.shape[1], ri.shape[1])
    logits = torch.randn(2 * B, T, V) * 2.0

    class FakeLM(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, use_cache=False, **kw):
            self.leaf = logits[:, : input_ids.shape[1]].clone().requires_grad_(True)
            return SimpleNamespace(logits=self.leaf)

    def trainer(cls, **attrs):
        s = SimpleNamespace(accelerator=Acc(), is_encoder_decoder=False, aux_loss_enabled=False, pad_token_id=PAD,
                            padding_value=PAD, **attrs)
        s.concatenated_inputs = cls.concatenated_inputs
        s.get_batch_logps = cls.get_batch_logps
        s.concatenated_forward = types.MethodType(cls.concatenated_forward, s)
        if cls is CPOTrainer:
            s.cpo_loss = types.MethodType(cls.cpo_loss, s)
        else:
            s.odds_ratio_loss = types.MethodType(cls.odds_ratio_loss, s)
        return s

    res = []
    for cls, name, cfgs in [
        (CPOTrainer, "cpo", [dict(loss_type="sigmoid"), dict(loss_type="sigmoid", label_smoothing=0.2),
                             dict(loss_type="sigmoid", cpo_alpha=0.5, beta=0.3), dict(loss_type="simpo"),
                             dict(loss_type="simpo", cpo_alpha=0.0, simpo_gamma=1.0, beta=2.0)]),
        (ORPOTrainer, "orpo", [dict(), dict(beta=0.5)]),
    ]:
        for cfg in cfgs:
            base = dict(beta=0.1, label_smoothing=0.0, loss_type="sigmoid", cpo_alpha=1.0, simpo_gamma=0.5, alpha=0.0) \
                if cls is CPOTrainer else dict(beta=0.1)
            base.update(cfg)
            model = FakeLM()
            loss, metrics = cls.get_batch_loss_metrics(trainer(cls, **base), model, batch)
            res.append(dict(trainer=name, config=base, loss=loss.item(), metrics=metrics))
    inputs = {"examples": ex, "logits": logits.tolist(),
              "note": "rows chosen0..2 then rejected0..2, each prompt+completion padded right; logits[t] predicts token t+1"}
    return dict(inputs=inputs, cases=res)


if __name__ == "__main__":
    out = {"dpo": dpo_cases(), "reference_free": reference_free_cases()}
    OUT.write_text(json.dumps(out, indent=None))
    print(f"wrote {OUT}")
