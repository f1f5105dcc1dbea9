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

/// Pages per kernel call in [`KvStore::attend_dense`] (64K tokens at 64-token pages).
pub const CHUNK_PAGES: usize = 1024;

/// Softmax attention over the union of two disjoint token sets, from each set's output and
/// log-sum-exp (`-inf` = the set was empty for that query).
fn merge_lse(a: Attended, b: Attended, d: usize) -> Attended {
    let (mut oa, mut la) = a;
    let (ob, lb) = b;
    for (i, l) in la.iter_mut().enumerate() {
        let m = l.max(lb[i]);
        if m == f32::NEG_INFINITY {
            continue;
        }
        let (wa, wb) = ((*l - m).exp(), (lb[i] - m).exp());
        let inv = 1.0 / (wa + wb);
        for (x, &y) in oa[i * d..(i + 1) * d]
            .iter_mut()
            .zip(&ob[i * d..(i + 1) * d])
        {
            *x = (*x * wa + y * wb) * inv;
        }
        *l = m + (wa + wb).ln();
    }
    (oa, la)
}

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
    /// Absolute position of the first real token of the sequence: every token at a position
    /// `< start` (left padding; sinks `[0, ns)`, pages `[ns, ns + paged)`, window after) is
    /// ignored. `0` attends over everything. At most the number of stored tokens.
    pub start: usize,
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

    /// `start` must lie within the stored tokens of `(seq, layer)`.
    fn check_start(&self, seq: usize, layer: usize, start: usize) -> Result<()> {
        let total = self.num_tokens(seq, layer)?;
        if start > total {
            return Err(Error::config(format!(
                "start={start} is beyond the {total} tokens stored for sequence {seq}, layer {layer}"
            )));
        }
        Ok(())
    }

    /// Sinks followed by the window, Layout `(H, F, D)` each, `F`, and the number of sinks.
    fn fp_part(&self, seq: usize, layer: usize) -> Result<(Vec<f32>, Vec<f32>, usize, usize)> {
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
        Ok((k, v, f, ns))
    }

    /// Softmax attention of `q` (Layout `(hq, tq, d)`) over everything stored for
    /// `(seq, layer)` at positions `>= qs.start`: sinks and window in full precision, every page
    /// through its PQ codes (pages wholly before `start` are not read). With `causal`, the last
    /// `tq` window tokens are the queries' own positions; a query that sees no token gets zeros
    /// and `lse = -inf`.
    pub fn attend_dense(&self, seq: usize, layer: usize, qs: &Queries) -> Result<Attended> {
        self.check_q(qs)?;
        let Queries {
            q,
            hq,
            tq,
            scale,
            causal,
            start,
        } = *qs;
        self.check_start(seq, layer, start)?;
        let c = self.config().clone();
        let (h, d, psz) = (c.kv_heads, c.head_dim, c.page_size);
        let (ck, cv) = c.code_bytes();
        let (fk, fv, f, ns) = self.fp_part(seq, layer)?;
        let np = self.num_pages(seq, layer)?;
        let n_all = self.paged_tokens(seq, layer)?;
        // Paged tokens before `start`; whole pages of them are skipped.
        let skip = start.saturating_sub(ns).min(n_all);
        let first = skip / psz;
        let n = n_all - first * psz;
        // Full-precision part: sinks [0, ns) then the window (positions ns + n_all ..).
        let fp_start = if start <= ns {
            start
        } else if start <= ns + n_all {
            ns
        } else {
            start - n_all
        }
        .min(f);
        let zeros;
        let flat = self.flat_centroids(layer)?;
        let (kcent, vcent): (&[f32], &[f32]) = match &flat {
            Some(f) => (&f.0, &f.1),
            None if n == 0 => {
                zeros = (
                    vec![0f32; h * (1 << c.k_nbits) * d],
                    vec![0f32; h * (1 << c.v_nbits) * d],
                );
                (&zeros.0, &zeros.1)
            }
            None => {
                return Err(Error::NotTrained {
                    what: "attend (the layer has pages but no codebooks)",
                })
            }
        };
        // Pages go through the kernel in chunks of CHUNK_PAGES (codes gathered into one
        // buffer per chunk, the next chunk prefetched meanwhile), merged by log-sum-exp: the
        // working memory stays bounded however long the context, and a context larger than
        // the RAM budget streams from the disk tier once per step. Sinks and window go with
        // the last chunk.
        let pages: Vec<usize> = (first..np).collect();
        let chunks: Vec<&[usize]> = if pages.is_empty() {
            vec![&[]]
        } else {
            pages.chunks(CHUNK_PAGES).collect()
        };
        self.prefetch(seq, layer, chunks[0])?;
        let (empty_k, empty_v): (&[f32], &[f32]) = (&[], &[]);
        let mut acc: Option<Attended> = None;
        let mut at = 0;
        // One pair of code buffers for every chunk (sized for the longest).
        let most = (CHUNK_PAGES * psz).min(n);
        let (mut kbuf, mut vbuf) = (vec![0u8; h * most * ck], vec![0u8; h * most * cv]);
        for (ci, chunk) in chunks.iter().enumerate() {
            let last = ci + 1 == chunks.len();
            if !last {
                self.prefetch(seq, layer, chunks[ci + 1])?;
            }
            let cn = (chunk.len() * psz).min(n - at);
            let (kc, vc) = (&mut kbuf[..h * cn * ck], &mut vbuf[..h * cn * cv]);
            let mut got = 0;
            for &p in chunk.iter() {
                let page = self.page(seq, layer, p)?;
                let t = page.tokens;
                if got + t > cn {
                    break; // appended to meanwhile: reported below
                }
                for hh in 0..h {
                    kc[(hh * cn + got) * ck..(hh * cn + got + t) * ck]
                        .copy_from_slice(page.k_codes(hh));
                    vc[(hh * cn + got) * cv..(hh * cn + got + t) * cv]
                        .copy_from_slice(page.v_codes(hh));
                }
                got += t;
            }
            if got != cn {
                return Err(Error::Internal(format!(
                    "sequence {seq}, layer {layer} changed during attention (paged tokens {} != {n})",
                    at + got
                )));
            }
            let lo = if ci == 0 { skip - first * psz } else { 0 };
            let (fk_c, fv_c, f_c, fr) = if last {
                (&fk[..], &fv[..], f, (fp_start, f))
            } else {
                (empty_k, empty_v, 0, (0, 0))
            };
            let part = pq_attention(&PqAttention {
                batch: 1,
                hq,
                hkv: h,
                tq,
                d,
                q,
                n: cn,
                k_codes: kc,
                v_codes: vc,
                k_cent: kcent,
                k_m: c.k_m,
                k_nbits: c.k_nbits,
                v_cent: vcent,
                v_m: c.v_m,
                v_nbits: c.v_nbits,
                code_range: &[(lo.min(cn), cn)],
                f: f_c,
                fp_k: fk_c,
                fp_v: fv_c,
                fp_range: &[fr],
                scale,
                causal: causal && last,
            })?;
            at += cn;
            acc = Some(match acc {
                None => part,
                Some(prev) => merge_lse(prev, part, d),
            });
        }
        if at != n {
            return Err(Error::Internal(format!(
                "sequence {seq}, layer {layer} changed during attention (paged tokens {at} != {n})"
            )));
        }
        Ok(acc.expect("at least one chunk"))
    }

    /// Quest selective attention: per KV head, rank the closed pages by the upper bound of
    /// `q . k` from their abstracts (no page read), keep the best `budget_pages`, and attend
    /// exactly over sinks + selected pages (fp16 copies) + the open page + window. Needs
    /// `keep_full_precision`. With a budget covering every page this is exact attention over the
    /// stored fp16 keys and values. Tokens at positions `< qs.start` are skipped everywhere;
    /// pages wholly before `start` are not candidates.
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
            start,
        } = *qs;
        let c = self.config().clone();
        if !c.keep_full_precision {
            return Err(Error::config("Quest attention reads the pages' fp16 copies: build the store with keep_full_precision=True"));
        }
        self.check_start(seq, layer, start)?;
        let (h, d, psz) = (c.kv_heads, c.head_dim, c.page_size);
        let g = hq / h;
        let (sk, sv, ns) = self.full_precision(seq, layer, Region::Sinks)?;
        let (wk, wv, nw) = self.full_precision(seq, layer, Region::Window)?;
        let np = self.num_pages(seq, layer)?;
        let n_all = self.paged_tokens(seq, layer)?;
        let open = n_all % psz != 0;
        let closed = np - open as usize;
        // Closed pages wholly before `start` are no candidates; candidates are `first..closed`.
        let first = (start.saturating_sub(ns) / psz).min(closed);
        let cand = closed - first;
        // Page scores per KV head from the abstracts, Layout (h, cand).
        let (abs, _) = self.abstracts(seq, layer)?;
        if abs.len() < closed * h * 3 * d {
            return Err(Error::Internal(format!(
                "sequence {seq}, layer {layer} changed during attention"
            )));
        }
        let mut kmin = vec![0f32; h * cand * d];
        let mut kmax = vec![0f32; h * cand * d];
        for i in 0..cand {
            let p = first + i;
            for hh in 0..h {
                let a = &abs[(p * h + hh) * 3 * d..(p * h + hh + 1) * 3 * d];
                kmin[(hh * cand + i) * d..(hh * cand + i + 1) * d].copy_from_slice(&a[..d]);
                kmax[(hh * cand + i) * d..(hh * cand + i + 1) * d].copy_from_slice(&a[d..2 * d]);
            }
        }
        let scores = page_scores(q, &kmin, &kmax, 1, hq, h, tq, cand, d)?;
        let keep = budget_pages.min(cand);
        let mut chosen: Vec<Vec<usize>> = Vec::with_capacity(h);
        for hh in 0..h {
            let row = &scores[hh * cand..(hh + 1) * cand];
            let mut idx: Vec<usize> = (0..cand).collect();
            idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            idx.truncate(keep);
            idx.sort_unstable();
            chosen.push(idx.into_iter().map(|i| first + i).collect());
        }
        let mut wanted: Vec<usize> = chosen.iter().flatten().copied().collect();
        wanted.sort_unstable();
        wanted.dedup();
        self.prefetch(seq, layer, &wanted)?;
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
        // Leading tokens of a region starting at absolute position `pos` that lie before `start`.
        let pad = |pos: usize, len: usize| start.saturating_sub(pos).min(len);
        // fp16 tokens `[skip, ..)` of a page blob region.
        let widen = |b: &[u8], skip: usize, dst: &mut Vec<f32>| {
            dst.extend(
                b.get(skip * d * 2..)
                    .unwrap_or(&[])
                    .chunks_exact(2)
                    .map(|x| f16::from_le_bytes([x[0], x[1]]).to_f32()),
            )
        };
        let (s0, w0) = (pad(0, ns), pad(ns + n_all, nw));
        // Only the full-precision part is attended (no codes); the kernel still takes codebooks.
        let no_kcent = vec![0f32; (1 << c.k_nbits) * d];
        let no_vcent = vec![0f32; (1 << c.v_nbits) * d];
        for (hh, sel) in chosen.iter().enumerate() {
            let mut fk = Vec::with_capacity(f * d);
            let mut fv = Vec::with_capacity(f * d);
            fk.extend_from_slice(&sk[(hh * ns + s0) * d..(hh + 1) * ns * d]);
            fv.extend_from_slice(&sv[(hh * ns + s0) * d..(hh + 1) * ns * d]);
            let selected = sel.iter().map(|p| (*p, &pages[p]));
            for (p, page) in selected.chain(open_page.as_ref().map(|o| (np - 1, o))) {
                let skip = pad(ns + p * psz, page.tokens);
                widen(page.k_fp16(hh).unwrap_or(&[]), skip, &mut fk);
                widen(page.v_fp16(hh).unwrap_or(&[]), skip, &mut fv);
            }
            fk.extend_from_slice(&wk[(hh * nw + w0) * d..(hh + 1) * nw * d]);
            fv.extend_from_slice(&wv[(hh * nw + w0) * d..(hh + 1) * nw * d]);
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
