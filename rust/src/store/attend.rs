//! Decode attention straight from a [`KvStore`]: dense over every page's codes, or Quest
//! selection of pages by their in-RAM abstracts followed by exact attention over the selected
//! pages' fp16 copies. Pages are prefetched, read once (checksummed), and fed to the kernels in
//! [`crate::attention`] without going through Python.

use half::f16;

use super::{KvStore, Region};
use crate::attention::{page_scores, pq_attention, PqAttention};
use crate::error::{Error, Result};

/// Output `(hq, tq, d)` and log-sum-exp `(hq, tq)`.
pub type Attended = (Vec<f32>, Vec<f32>);

/// Decode queries of one sequence.
#[derive(Clone, Copy, Debug)]
pub struct Queries<'a> {
    /// Layout `(hq, tq, d)`.
    pub q: &'a [f32],
    /// Query heads (a multiple of the store's KV heads).
    pub hq: usize,
    /// Query tokens; with `causal` they are the window's last `tq` tokens.
    pub tq: usize,
    /// Score scale (usually `1 / sqrt(d)`).
    pub scale: f32,
    /// Causal masking over the window.
    pub causal: bool,
}

impl KvStore {
    fn check_q(&self, qs: &Queries) -> Result<()> {
        let (q, hq, tq) = (qs.q, qs.hq, qs.tq);
        let c = self.config();
        if c.kv_heads == 0 || hq % c.kv_heads != 0 {
            return Err(Error::config(format!(
                "query heads ({hq}) must be a multiple of the store's KV heads ({})",
                c.kv_heads
            )));
        }
        if q.len() != hq * tq * c.head_dim {
            return Err(Error::shape(
                "q",
                format!("[{hq}, {tq}, {}]", c.head_dim),
                format!("{} values", q.len()),
            ));
        }
        Ok(())
    }

    /// Sinks followed by the window, Layout `(H, F, D)` each, and `F`.
    fn fp_part(&self, seq: usize, layer: usize) -> Result<(Vec<f32>, Vec<f32>, usize)> {
        let c = self.config();
        let (h, d) = (c.kv_heads, c.head_dim);
        let (sk, sv, ns) = self.full_precision(seq, layer, Region::Sinks)?;
        let (wk, wv, nw) = self.full_precision(seq, layer, Region::Window)?;
        let f = ns + nw;
        let mut k = Vec::with_capacity(h * f * d);
        let mut v = Vec::with_capacity(h * f * d);
        for hh in 0..h {
            k.extend_from_slice(&sk[hh * ns * d..(hh + 1) * ns * d]);
            k.extend_from_slice(&wk[hh * nw * d..(hh + 1) * nw * d]);
            v.extend_from_slice(&sv[hh * ns * d..(hh + 1) * ns * d]);
            v.extend_from_slice(&wv[hh * nw * d..(hh + 1) * nw * d]);
        }
        Ok((k, v, f))
    }

    /// Softmax attention of `q` (Layout `(hq, tq, d)`) over everything stored for
    /// `(seq, layer)`: sinks and window in full precision, every page through its PQ codes.
    /// With `causal`, the last `tq` window tokens are the queries' own positions.
    pub fn attend_dense(&self, seq: usize, layer: usize, qs: &Queries) -> Result<Attended> {
        self.check_q(qs)?;
        let Queries {
            q,
            hq,
            tq,
            scale,
            causal,
        } = *qs;
        let c = self.config().clone();
        let (h, d) = (c.kv_heads, c.head_dim);
        let (ck, cv) = c.code_bytes();
        let np = self.num_pages(seq, layer)?;
        self.prefetch(seq, layer, &(0..np).collect::<Vec<_>>())?;
        let n = self.paged_tokens(seq, layer)?;
        let mut kc = vec![0u8; h * n * ck];
        let mut vc = vec![0u8; h * n * cv];
        let mut at = 0;
        for p in 0..np {
            let page = self.page(seq, layer, p)?;
            let t = page.tokens;
            for hh in 0..h {
                kc[(hh * n + at) * ck..(hh * n + at + t) * ck].copy_from_slice(page.k_codes(hh));
                vc[(hh * n + at) * cv..(hh * n + at + t) * cv].copy_from_slice(page.v_codes(hh));
            }
            at += t;
        }
        let (fk, fv, f) = self.fp_part(seq, layer)?;
        let (kcent, vcent) = match self.codebooks(layer)? {
            Some((k, v)) => (
                k.iter()
                    .flat_map(|p| p.centroids().unwrap_or(&[]).to_vec())
                    .collect::<Vec<f32>>(),
                v.iter()
                    .flat_map(|p| p.centroids().unwrap_or(&[]).to_vec())
                    .collect::<Vec<f32>>(),
            ),
            None if n == 0 => (
                vec![0f32; h * (1 << c.k_nbits) * d],
                vec![0f32; h * (1 << c.v_nbits) * d],
            ),
            None => {
                return Err(Error::NotTrained {
                    what: "attend (the layer has pages but no codebooks)",
                })
            }
        };
        pq_attention(&PqAttention {
            batch: 1,
            hq,
            hkv: h,
            tq,
            d,
            q,
            n,
            k_codes: &kc,
            v_codes: &vc,
            k_cent: &kcent,
            k_m: c.k_m,
            k_nbits: c.k_nbits,
            v_cent: &vcent,
            v_m: c.v_m,
            v_nbits: c.v_nbits,
            code_range: &[(0, n)],
            f,
            fp_k: &fk,
            fp_v: &fv,
            fp_range: &[(0, f)],
            scale,
            causal,
        })
    }

    /// Quest selective attention: per KV head, rank the closed pages by the upper bound of
    /// `q . k` from their abstracts (no page read), keep the best `budget_pages`, and attend
    /// exactly over sinks + selected pages (fp16 copies) + the open page + window. Needs
    /// `keep_full_precision`. With a budget covering every page this is exact attention over the
    /// stored fp16 keys and values.
    pub fn attend_quest(
        &self,
        seq: usize,
        layer: usize,
        qs: &Queries,
        budget_pages: usize,
    ) -> Result<Attended> {
        self.check_q(qs)?;
        let Queries {
            q,
            hq,
            tq,
            scale,
            causal,
        } = *qs;
        let c = self.config().clone();
        if !c.keep_full_precision {
            return Err(Error::config("Quest attention reads the pages' fp16 copies: build the store with keep_full_precision=True"));
        }
        let (h, d, psz) = (c.kv_heads, c.head_dim, c.page_size);
        let g = hq / h;
        let np = self.num_pages(seq, layer)?;
        let open = self.paged_tokens(seq, layer)? % psz != 0;
        let closed = np - open as usize;
        // Page scores per KV head from the abstracts, Layout (h, closed).
        let (abs, _) = self.abstracts(seq, layer)?;
        let mut kmin = vec![0f32; h * closed * d];
        let mut kmax = vec![0f32; h * closed * d];
        for p in 0..closed {
            for hh in 0..h {
                let a = &abs[(p * h + hh) * 3 * d..(p * h + hh + 1) * 3 * d];
                kmin[(hh * closed + p) * d..(hh * closed + p + 1) * d].copy_from_slice(&a[..d]);
                kmax[(hh * closed + p) * d..(hh * closed + p + 1) * d]
                    .copy_from_slice(&a[d..2 * d]);
            }
        }
        let scores = page_scores(q, &kmin, &kmax, 1, hq, h, tq, closed, d)?;
        let keep = budget_pages.min(closed);
        let mut chosen: Vec<Vec<usize>> = Vec::with_capacity(h);
        for hh in 0..h {
            let row = &scores[hh * closed..(hh + 1) * closed];
            let mut idx: Vec<usize> = (0..closed).collect();
            idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            idx.truncate(keep);
            idx.sort_unstable();
            chosen.push(idx);
        }
        let mut wanted: Vec<usize> = chosen.iter().flatten().copied().collect();
        wanted.sort_unstable();
        wanted.dedup();
        self.prefetch(seq, layer, &wanted)?;
        let (sk, sv, ns) = self.full_precision(seq, layer, Region::Sinks)?;
        let (wk, wv, nw) = self.full_precision(seq, layer, Region::Window)?;
        let open_page = if open {
            Some(self.page(seq, layer, np - 1)?)
        } else {
            None
        };
        let open_t = open_page.as_ref().map_or(0, |p| p.tokens);
        let f = ns + keep * psz + open_t + nw;
        let mut out = vec![0f32; hq * tq * d];
        let mut lse = vec![f32::NEG_INFINITY; hq * tq];
        let pages: std::collections::HashMap<usize, super::PageView> = wanted
            .iter()
            .map(|&p| self.page(seq, layer, p).map(|v| (p, v)))
            .collect::<Result<_>>()?;
        let widen = |b: &[u8], dst: &mut Vec<f32>| {
            dst.extend(
                b.chunks_exact(2)
                    .map(|x| f16::from_le_bytes([x[0], x[1]]).to_f32()),
            )
        };
        // Only the full-precision part is attended (no codes); the kernel still takes codebooks.
        let no_kcent = vec![0f32; (1 << c.k_nbits) * d];
        let no_vcent = vec![0f32; (1 << c.v_nbits) * d];
        for (hh, sel) in chosen.iter().enumerate() {
            let mut fk = Vec::with_capacity(f * d);
            let mut fv = Vec::with_capacity(f * d);
            fk.extend_from_slice(&sk[hh * ns * d..(hh + 1) * ns * d]);
            fv.extend_from_slice(&sv[hh * ns * d..(hh + 1) * ns * d]);
            for p in sel.iter().chain(open_page.as_ref().map(|_| np - 1).iter()) {
                let page = if *p == np - 1 && open {
                    open_page.as_ref().expect("open")
                } else {
                    &pages[p]
                };
                widen(page.k_fp16(hh).unwrap_or(&[]), &mut fk);
                widen(page.v_fp16(hh).unwrap_or(&[]), &mut fv);
            }
            fk.extend_from_slice(&wk[hh * nw * d..(hh + 1) * nw * d]);
            fv.extend_from_slice(&wv[hh * nw * d..(hh + 1) * nw * d]);
            let fl = fk.len() / d;
            let qh = &q[hh * g * tq * d..(hh + 1) * g * tq * d];
            let (o, l) = pq_attention(&PqAttention {
                batch: 1,
                hq: g,
                hkv: 1,
                tq,
                d,
                q: qh,
                n: 0,
                k_codes: &[],
                v_codes: &[],
                k_cent: &no_kcent,
                k_m: c.k_m,
                k_nbits: c.k_nbits,
                v_cent: &no_vcent,
                v_m: c.v_m,
                v_nbits: c.v_nbits,
                code_range: &[(0, 0)],
                f: fl,
                fp_k: &fk,
                fp_v: &fv,
                fp_range: &[(0, fl)],
                scale,
                causal,
            })?;
            out[hh * g * tq * d..(hh + 1) * g * tq * d].copy_from_slice(&o);
            lse[hh * g * tq..(hh + 1) * g * tq].copy_from_slice(&l);
        }
        Ok((out, lse))
    }
}
