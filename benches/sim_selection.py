"""Which page selection keeps passkey retrieval at 7K? A simulation on the default model.

    python benches/sim_selection.py [--length 7168] [--cells 0.25:1,0.5:1,0.75:0,0.75:1,0.75:2]
                                    [--policies dense,quest,omax,q8,rep4,c4x4,fb50]
                                    [--budget 0.1] [--out bench-results/sim-selection.json]

Each cell (passkey depth : trial, the prompts of ``ctxcore eval passkey``) is prefilled once
into a ``ctxcore4`` cache; each policy then decodes the answer greedily from a copy of it, its
decode steps attending, in every layer and KV head, only the tokens the policy selects (sinks,
the open page and the window always; closed pages by the policy's score), over the codes'
values (the history decoded once per step: this measures what a selection keeps, not speed).
A cell counts as found when the passkey is in the 12 generated tokens, as in the eval.

Policies (page budget ``--budget`` of the closed pages per KV head):
- ``dense``: every page (the reference: ``ctxcore4`` itself);
- ``quest``: the store's rule, the Quest bound from the pages' min/max abstracts;
- ``q32``, ``q16``, ``q8``: the Quest bound over sub-pages of 32/16/8 tokens, maximized per page
  (what finer abstracts would give, 2-8x their RAM);
- ``mean``: ``q . mean key`` of the page;
- ``rep2``, ``rep4``: the best of 2/4 k-means representatives of the page's keys;
- ``c16x4``, ``c8x4``, ``c4x4``, ``c32x8``, ``c16x8``: a coarse PQ of every key (``cDxB``:
  subspaces of D dims, B-bit codes, trained on the context), the page's best approximate score;
  the RAM a coarse code costs is 64/D*B/8 bytes per token and head;
- ``omax``: oracle, the page's true best ``q . k`` (an upper limit for any page score);
- ``fb50``, ``fb20``, ``fb05``: ``quest`` with the exact fallback (``select_fallback``) at a
  share of 0.5/0.2/0.05; prints how many heads fell back to every page.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

POLICIES: dict[str, tuple[str, dict]] = {
    "dense": ("dense", {}),
    "quest": ("quest", {}),
    "mean": ("mean", {}),
    "omax": ("omax", {}),
    "q32": ("qsub", {"sub": 32}),
    "q16": ("qsub", {"sub": 16}),
    "q8": ("qsub", {"sub": 8}),
    "rep2": ("rep", {"c": 2}),
    "rep4": ("rep", {"c": 4}),
    "c16x4": ("cpq", {"ds": 16, "nbits": 4}),
    "c8x4": ("cpq", {"ds": 8, "nbits": 4}),
    "c4x4": ("cpq", {"ds": 4, "nbits": 4}),
    "c32x8": ("cpq", {"ds": 32, "nbits": 8}),
    "c16x8": ("cpq", {"ds": 16, "nbits": 8}),
    "fb50": ("fallback", {"tau": 0.5}),
    "fb20": ("fallback", {"tau": 0.2}),
    "fb05": ("fallback", {"tau": 0.05}),
}


def train_cpq(x: torch.Tensor, ds: int, c: int, iters: int = 8) -> torch.Tensor:
    """k-means per subspace of ``ds`` dims: ``x`` [H, N, D] -> centroids [H, D/ds, c, ds]."""
    h, n, d = x.shape
    xs = x.reshape(h, n, d // ds, ds).transpose(1, 2)
    mu = xs[:, :, torch.randperm(n, generator=torch.Generator().manual_seed(0))[:c]].clone()
    for _ in range(iters):
        oh = torch.nn.functional.one_hot(torch.cdist(xs, mu).argmin(-1), c).float()
        cnt = oh.sum(2)[..., None]
        mu = torch.where(cnt > 0, torch.einsum("hmnc,hmnd->hmcd", oh, xs) / cnt.clamp(min=1), mu)
    return mu


class Sim:
    def __init__(self, budget: float) -> None:
        self.budget = budget
        self.policy: tuple[str, dict] | None = None
        self.cpq: dict = {}
        self.heads = self.dense_heads = 0

    def page_scores(self, layer: int, q: torch.Tensor, k: torch.Tensor, abs_: torch.Tensor, ns: int,
                    closed: int, psz: int) -> torch.Tensor:  # fmt: skip
        """[closed, H] page scores of ``q`` [Hq, D] over history keys ``k`` [H, N, D]."""
        name, opts = self.policy  # type: ignore[misc]
        h, _, d = k.shape
        qg = q.view(h, q.shape[0] // h, d)
        kp = k[:, ns : ns + closed * psz]
        if name in ("quest", "fallback"):
            lo, hi = abs_[:closed, :, 0], abs_[:closed, :, 1]
            return torch.maximum(qg[None] * lo[:, :, None], qg[None] * hi[:, :, None]).sum(-1).amax(-1)
        if name == "mean":
            return (qg[None] * abs_[:closed, :, 2][:, :, None]).sum(-1).amax(-1)
        if name == "qsub":
            sub = kp.reshape(h, closed, psz // opts["sub"], opts["sub"], d)
            lo, hi = sub.amin(3)[:, :, :, None], sub.amax(3)[:, :, :, None]
            qb = qg[:, None, None]
            return torch.maximum(qb * lo, qb * hi).sum(-1).amax(-1).amax(-1).T
        if name == "rep":
            c = opts["c"]
            kk = kp.reshape(h, closed, psz, d)
            mu = kk[:, :, :: psz // c].clone()
            for _ in range(6):
                oh = torch.nn.functional.one_hot(torch.cdist(kk, mu).argmin(-1), c).float()
                cnt = oh.sum(2)[..., None]
                mu = torch.where(cnt > 0, torch.einsum("hptc,hptd->hpcd", oh, kk) / cnt.clamp(min=1), mu)
            return torch.einsum("hgd,hpcd->hgpc", qg, mu).amax(-1).amax(1).T
        if name == "cpq":
            ds, nb = opts["ds"], opts["nbits"]
            key = (layer, ds, nb)
            if key not in self.cpq:
                self.cpq[key] = train_cpq(kp, ds, 1 << nb)
            cents = self.cpq[key]  # [H, m, c, ds]
            m, c, n = d // ds, cents.shape[2], kp.shape[1]
            codes = torch.cdist(kp.reshape(h, n, m, ds).transpose(1, 2), cents).argmin(-1)  # [H, m, N]
            lut = torch.einsum("hgmd,hmcd->hgmc", qg.view(h, -1, m, ds), cents)
            idx = codes[:, None, :, :, None].expand(h, qg.shape[1], m, n, 1)
            sc = torch.gather(lut[:, :, :, None, :].expand(h, qg.shape[1], m, n, c), 4, idx)[..., 0].sum(2)
            return sc.reshape(h, -1, closed, psz).amax(-1).amax(1).T
        if name == "omax":
            return torch.einsum("hgd,hptd->hgpt", qg, kp.reshape(h, closed, psz, d)).amax(-1).amax(1).T
        raise ValueError(name)

    def mask(self, layer: int, q: torch.Tensor, k: torch.Tensor, abs_: Any, ns: int, npg: int, psz: int,
             scale: float) -> torch.Tensor:  # fmt: skip
        """[H, N] tokens the policy attends."""
        h, n, d = k.shape
        sel = torch.ones(h, n, dtype=torch.bool)
        closed = npg // psz
        if self.policy[0] == "dense" or closed == 0:  # type: ignore[index]
            return sel
        keep = min(closed, math.ceil(self.budget * npg / psz))
        top = self.page_scores(layer, q, k, abs_, ns, closed, psz).topk(keep, dim=0).indices
        sel[:, ns : ns + closed * psz] = False
        for hh in range(h):
            for p in top[:, hh].tolist():
                sel[hh, ns + p * psz : ns + (p + 1) * psz] = True
        if self.policy[0] == "fallback":  # type: ignore[index]
            self.fallback(q, k, abs_, sel, ns, closed, psz, scale)
        return sel

    def fallback(self, q: torch.Tensor, k: torch.Tensor, abs_: torch.Tensor, sel: torch.Tensor, ns: int,
                 closed: int, psz: int, scale: float) -> None:  # fmt: skip
        """The store's exact fallback: a head whose left-out pages could hold more than tau of
        some query's attention (Quest bounds per query row) attends every page."""
        h, _, d = k.shape
        qg = q.view(h, -1, d)
        lo, hi = abs_[:closed, :, 0], abs_[:closed, :, 1]
        u = torch.maximum(qg[None] * lo[:, :, None], qg[None] * hi[:, :, None]).sum(-1)  # [P, H, g]
        sc = torch.einsum("hgd,hnd->hgn", qg, k) * scale
        for hh in range(h):
            self.heads += 1
            picked = sel[hh, ns : ns + closed * psz].view(closed, psz)[:, 0]
            if picked.all():
                continue
            attended = torch.logsumexp(sc[hh][:, sel[hh]], -1)
            left = torch.logsumexp(u[~picked, hh] * scale + math.log(psz), 0)
            if (torch.sigmoid(left - attended) > self.policy[1]["tau"]).any():  # type: ignore[index]
                self.dense_heads += 1
                sel[hh] = True


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=7168)
    ap.add_argument("--cells", default="0.25:1,0.5:1,0.75:0,0.75:1,0.75:2", help="depth:trial,...")
    ap.add_argument("--policies", default="dense,quest,omax,q8,rep4,c4x4,fb50")
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument("--out", default="bench-results/sim-selection.json")
    a = ap.parse_args()

    from ctxcore import evaluation as ev
    from ctxcore.attention import enable
    from ctxcore.cache import CompressedCache, CompressedLayer
    from ctxcore.cli.qa import _load_model
    from ctxcore.models import SAMPLE_TEXT

    torch.manual_seed(0)
    model, tok, _ = _load_model(None)
    enable(model)
    sim = Sim(a.budget)
    plain = CompressedLayer.attend

    def attend(self: Any, module: Any, q: torch.Tensor, mask: Any, scale: float, **kw: Any) -> torch.Tensor:
        if sim.policy is None or self.warming or self._committed == 0 or q.shape[2] != 1 or q.shape[0] != 1:
            return plain(self, module, q, mask, scale, **kw)
        k_new, v_new = self._pending
        self._pending = None
        self.commit(k_new, v_new, [0])
        st = self.cache.store
        k, v = (x[0] for x in self.dequantized())
        npg = st.paged_tokens(self.idx)
        abs_ = torch.from_numpy(st.abstracts(self.idx)) if npg else None
        qq = q[0, :, 0].float()
        sel = sim.mask(
            self.idx, qq, k, abs_, st.sinks(self.idx)[0].shape[1], npg, self.cache.page_size, scale
        )
        h = k.shape[0]
        sc = torch.einsum("hgd,hnd->hgn", qq.view(h, -1, k.shape[-1]), k) * scale
        sc = sc.masked_fill(~sel[:, None], float("-inf"))
        out = torch.einsum("hgn,hnd->hgd", sc.softmax(-1), v).reshape(1, -1, 1, k.shape[-1])
        return out.to(q.dtype).transpose(1, 2).contiguous()

    CompressedLayer.attend = attend  # type: ignore[method-assign]
    names = a.policies.split(",")
    rows = []
    for cell in a.cells.split(","):
        depth, trial = float(cell.split(":")[0]), int(cell.split(":")[1])
        key = 10000 + (hash((a.length, depth, trial)) % 89999)  # the eval's keys and prompts
        ids = ev.passkey_prompt(tok, SAMPLE_TEXT, a.length, depth, key, 7 * trial + int(depth * 13))
        sim.policy, sim.cpq = None, {}
        t0 = time.perf_counter()
        base = CompressedCache(model.config, bits=4, abstracts=True)  # the default, abstracts kept
        with torch.no_grad():
            model(ids[:, :-1], use_cache=True, logits_to_keep=1, past_key_values=base)
        base.compress()
        row: dict[str, Any] = {"depth": depth, "trial": trial}
        for nm in names:
            sim.policy, sim.heads, sim.dense_heads = POLICIES[nm], 0, 0
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                     past_key_values=copy.deepcopy(base), do_sample=False,
                                     pad_token_id=tok.eos_token_id)  # fmt: skip
            row[nm] = str(key) in tok.decode(out[0, ids.shape[1] :])
            if sim.heads:
                row[nm + "_dense_heads"] = [sim.dense_heads, sim.heads]
        sim.policy = None
        rows.append(row)
        found = " ".join(f"{nm}={'ok' if row[nm] else '--'}" for nm in names)
        print(f"depth {depth:.2f} trial {trial} ({time.perf_counter() - t0:.0f} s): {found}", flush=True)
    print("found: " + " ".join(f"{nm} {sum(r[nm] for r in rows)}/{len(rows)}" for nm in names))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "length": a.length, "budget": a.budget, "policies": names}
    out.write_text(json.dumps({**meta, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
