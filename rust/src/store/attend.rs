//! Decode attention straight from a [`KvStore`]: dense over every page's codes, or Quest
//! selection of pages by their in-RAM abstracts followed by attention over the selected pages:
//! their codes, or their fp16 copies where the store keeps them (`keep_full_precision`). Pages are prefetched, read once (checksummed), and fed to the kernels in
//! [`crate::attention`] without going through Python.

use half::f16;

use super::{KvStore, Region};
use crate::attention::{
    group_max, page_bounds_quantized, pq_attention, pq_attention_paged, PqAttention, Resident,
};
use crate::error::{Error, Result};

/// Pages read for one attention call: `views[i]` is page `idx[i]`, `idx` ascending.
struct Picked {
    idx: Vec<usize>,
    views: Vec<super::PageView>,
}

impl Picked {
    fn get(&self, p: usize) -> &super::PageView {
        &self.views[self
            .idx
            .binary_search(&p)
            .expect("a page read for this call")]
    }
}

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

/// Left padding `start` (an absolute position) of a sequence with `ns` sinks, `n_all` paged
/// tokens and `f` full-precision tokens (sinks then window, positions `ns + n_all ..` for the
/// window): `(paged tokens to skip, first fp token to attend)`.
fn padding(start: usize, ns: usize, n_all: usize, f: usize) -> (usize, usize) {
    let skip = start.saturating_sub(ns).min(n_all);
    let fp_start = if start <= ns {
        start
    } else if start <= ns + n_all {
        ns
    } else {
        start - n_all
    };
    (skip, fp_start.min(f))
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
        let (skip, fp_start) = padding(start, ns, n_all, f);
        let first = skip / psz;
        let n = n_all - first * psz;
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
        // buffer per chunk, the chunk's pages on disk read 16 at a time), merged by
        // log-sum-exp: the working memory stays bounded however long the context, and a
        // context larger than the RAM budget streams from the disk tier once per step. (No
        // prefetch thread: it read pages a second time after the parallel reads had used them
        // without keeping them, see `Shared::page_in`.) Sinks and window go with the last
        // chunk.
        let pages: Vec<usize> = (first..np).collect();
        let chunks: Vec<&[usize]> = if pages.is_empty() {
            vec![&[]]
        } else {
            pages.chunks(CHUNK_PAGES).collect()
        };
        let (empty_k, empty_v): (&[f32], &[f32]) = (&[], &[]);
        let mut acc: Option<Attended> = None;
        let mut at = 0;
        // One pair of code buffers for every chunk (sized for the longest).
        let most = (CHUNK_PAGES * psz).min(n);
        let (mut kbuf, mut vbuf) = (vec![0u8; h * most * ck], vec![0u8; h * most * cv]);
        for (ci, chunk) in chunks.iter().enumerate() {
            let last = ci + 1 == chunks.len();
            let cn = (chunk.len() * psz).min(n - at);
            let (kc, vc) = (&mut kbuf[..h * cn * ck], &mut vbuf[..h * cn * cv]);
            let mut got = 0;
            for page in self.pages(seq, layer, chunk)? {
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

    /// Per KV head, the `keep` candidate pages of `first..closed` whose abstracts bound `q . k`
    /// highest (ties to the earlier page), ascending; and the bounds themselves, Layout
    /// `(hq * tq, closed - first)` (see [`page_bounds_quantized`]). Scored from the quantized
    /// abstracts in place, under one lock.
    fn quest_select(
        &self,
        seq: usize,
        layer: usize,
        qs: &Queries,
        first: usize,
        closed: usize,
        keep: usize,
    ) -> Result<(Vec<Vec<usize>>, Vec<f32>)> {
        let c = self.config();
        c.need_abstracts("method=\"quest\"")?;
        let (h, cand) = (c.kv_heads, closed - first);
        let bounds = {
            let st = self.shared.lock()?;
            self.check_in(&st, seq, layer)?;
            let l = &st.seqs[seq][layer];
            st.check_fetched(l, seq, layer)?;
            let ids = l.pages.get(first..closed).ok_or_else(|| {
                Error::Internal(format!(
                    "sequence {seq}, layer {layer} changed during attention"
                ))
            })?;
            let abs: Vec<&[u8]> = ids
                .iter()
                .map(|&id| &*st.pages[id as usize].abstract_)
                .collect();
            page_bounds_quantized(qs.q, &abs, qs.hq, h, qs.tq, c.head_dim)?
        };
        let scores = group_max(&bounds, h, qs.hq / h * qs.tq, cand);
        let chosen = (0..h)
            .map(|hh| {
                let row = &scores[hh * cand..(hh + 1) * cand];
                // Higher score first, then the earlier page: a total order, so the kept set is
                // the same whatever the partition does.
                let better = |a: &usize, b: &usize| row[*b].total_cmp(&row[*a]).then(a.cmp(b));
                let mut idx: Vec<usize> = (0..cand).collect();
                if keep < cand {
                    if keep > 0 {
                        idx.select_nth_unstable_by(keep - 1, better);
                    }
                    idx.truncate(keep);
                }
                idx.sort_unstable();
                idx.into_iter().map(|i| first + i).collect()
            })
            .collect();
        Ok((chosen, bounds))
    }

    /// Whether the Quest bounds let the left-out candidate pages `left` (indices into the
    /// candidates) hold more than `tau` of the attention of some query row of KV head `hh`
    /// (`per` rows): with `lse` the rows' log-sum-exp over what was attended, the left-out
    /// share is at most `B / (exp(lse) + B)`, `B` the sum over `left` of
    /// `page_size * exp(scale * bound)`.
    #[allow(clippy::too_many_arguments)]
    fn leaves_out_too_much(
        tau: f32,
        hh: usize,
        per: usize,
        left: &[usize],
        cand: usize,
        bounds: &[f32],
        lse: &[f32],
        scale: f32,
        psz: usize,
    ) -> bool {
        let ln_p = (psz as f32).ln();
        !left.is_empty()
            && (0..per).any(|i| {
                let r = hh * per + i;
                let row = &bounds[r * cand..(r + 1) * cand];
                let m = left
                    .iter()
                    .map(|&j| scale * row[j] + ln_p)
                    .fold(f32::NEG_INFINITY, f32::max);
                if m == f32::NEG_INFINITY {
                    return false;
                }
                let b = m + left
                    .iter()
                    .map(|&j| (scale * row[j] + ln_p - m).exp())
                    .sum::<f32>()
                    .ln();
                // share = 1 / (1 + exp(lse - b)) > tau
                let share = 1.0 / (1.0 + (lse[i] - b).exp());
                share > tau || !share.is_finite()
            })
    }

    /// Quest selective attention: per KV head, rank the closed pages by the upper bound of
    /// `q . k` from their abstracts (no page read), keep the best `budget_pages`, and attend
    /// over sinks + selected pages + the open page + window: over the pages' codes, or exactly
    /// over their fp16 copies where the store keeps them (`keep_full_precision`). Only the
    /// selected pages are read. With a budget covering every page this is dense attention.
    /// Tokens at positions `< qs.start` are skipped everywhere; pages wholly before `start`
    /// are not candidates.
    ///
    /// `fallback = Some(tau)` (codes only): exact fallback. After attending, the abstracts
    /// bound the share of each query row's attention that the left-out pages could hold; where
    /// that bound exceeds `tau` for some row of a KV head, the head also attends the rest of its
    /// candidate pages (read then), so its result is dense attention over the codes.
    /// [`super::Stats::fallbacks`] counts those heads.
    pub fn attend_quest(
        &self,
        seq: usize,
        layer: usize,
        qs: &Queries,
        budget_pages: usize,
        fallback: Option<f32>,
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
        self.check_start(seq, layer, start)?;
        if let Some(t) = fallback {
            if !(0.0..1.0).contains(&t) {
                return Err(Error::config(format!(
                    "fallback must be a share of the attention in [0, 1), got {t}"
                )));
            }
            if c.keep_full_precision {
                return Err(Error::config(
                    "fallback applies to selection over the codes; this store attends its \
                     selected pages over their fp16 copies (keep_full_precision): pass no fallback",
                ));
            }
        }
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
        let keep = budget_pages.min(cand);
        let (chosen, bounds) = self.quest_select(seq, layer, qs, first, closed, keep)?;
        let mut wanted: Vec<usize> = chosen.iter().flatten().copied().collect();
        wanted.sort_unstable();
        wanted.dedup();
        let open_page = if open {
            Some(self.page(seq, layer, np - 1)?)
        } else {
            None
        };
        let open_t = open_page.as_ref().map_or(0, |p| p.tokens);
        let f = ns + keep * psz + open_t + nw;
        let mut out = vec![0f32; hq * tq * d];
        let mut lse = vec![f32::NEG_INFINITY; hq * tq];
        let pages = Picked {
            views: self.pages(seq, layer, &wanted)?,
            idx: wanted,
        };
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
        if !c.keep_full_precision {
            // The selected pages' codes, read in place, plus sinks and window: per KV head, one
            // kernel call over that head's pages.
            let books = self.flat_centroids(layer)?.ok_or_else(|| {
                Error::config(format!("layer {layer} has pages but no codebooks"))
            })?;
            let kc = books.0.len() / h;
            let vc = books.1.len() / h;
            // Attention of head `hh`'s queries over the codes of pages `sel` (ascending) and,
            // with `tail`, the open page, sinks and window (the queries' own tokens among them).
            let run = |hh: usize, sel: &[usize], pages: &Picked, tail: bool| -> Result<Attended> {
                let open_tail = open_page.as_ref().filter(|_| tail);
                let segs: Vec<(&[u8], &[u8])> = sel
                    .iter()
                    .map(|&p| pages.get(p))
                    .chain(open_tail)
                    .map(|v| (v.k_codes(hh), v.v_codes(hh)))
                    .collect();
                let n = sel.len() * psz + open_tail.map_or(0, |p| p.tokens);
                // Only the first segment can start before `start` (the candidates begin at the
                // page holding it).
                let first_pos = sel.first().map_or(ns + closed * psz, |&p| ns + p * psz);
                let skip = pad(first_pos, if sel.is_empty() { open_t } else { psz });
                let fp: Vec<(&[f32], &[f32])> = if tail {
                    let (a, b) = ((hh * ns + s0) * d, (hh + 1) * ns * d);
                    let (e, f) = ((hh * nw + w0) * d, (hh + 1) * nw * d);
                    sk[a..b]
                        .chunks_exact(d)
                        .zip(sv[a..b].chunks_exact(d))
                        .chain(wk[e..f].chunks_exact(d).zip(wv[e..f].chunks_exact(d)))
                        .collect()
                } else {
                    Vec::new()
                };
                let fl = fp.len();
                pq_attention_paged(
                    &PqAttention {
                        batch: 1,
                        hq: g,
                        hkv: 1,
                        tq,
                        d,
                        q: &q[hh * g * tq * d..(hh + 1) * g * tq * d],
                        n,
                        k_codes: &[],
                        v_codes: &[],
                        k_cent: &books.0[hh * kc..(hh + 1) * kc],
                        k_m: c.k_m,
                        k_nbits: c.k_nbits,
                        v_cent: &books.1[hh * vc..(hh + 1) * vc],
                        v_m: c.v_m,
                        v_nbits: c.v_nbits,
                        code_range: &[(skip, n)],
                        f: fl,
                        fp_k: &[],
                        fp_v: &[],
                        fp_range: &[(0, fl)],
                        scale,
                        // The pages without the tail all lie before every query.
                        causal: causal && tail,
                    },
                    &Resident {
                        segs: &[segs],
                        size: psz,
                        fp: &[fp],
                    },
                )
            };
            for (hh, sel) in chosen.iter().enumerate() {
                let mut part = run(hh, sel, &pages, true)?;
                if let Some(tau) = fallback {
                    // The candidates this head left out, as indices into the candidates.
                    let left: Vec<usize> = (0..cand)
                        .filter(|&j| sel.binary_search(&(first + j)).is_err())
                        .collect();
                    if Self::leaves_out_too_much(
                        tau,
                        hh,
                        g * tq,
                        &left,
                        cand,
                        &bounds,
                        &part.1,
                        scale,
                        psz,
                    ) {
                        // Exact fallback: the rest of this head's candidate pages too.
                        let rest: Vec<usize> = left.iter().map(|&j| first + j).collect();
                        let more = Picked {
                            views: self.pages(seq, layer, &rest)?,
                            idx: rest,
                        };
                        part = merge_lse(part, run(hh, &more.idx, &more, false)?, d);
                        self.shared
                            .counters
                            .fallbacks
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                out[hh * g * tq * d..(hh + 1) * g * tq * d].copy_from_slice(&part.0);
                lse[hh * g * tq..(hh + 1) * g * tq].copy_from_slice(&part.1);
            }
            return Ok((out, lse));
        }
        // Only the full-precision part is attended (no codes); the kernel still takes codebooks.
        let no_kcent = vec![0f32; (1 << c.k_nbits) * d];
        let no_vcent = vec![0f32; (1 << c.v_nbits) * d];
        for (hh, sel) in chosen.iter().enumerate() {
            let mut fk = Vec::with_capacity(f * d);
            let mut fv = Vec::with_capacity(f * d);
            fk.extend_from_slice(&sk[(hh * ns + s0) * d..(hh + 1) * ns * d]);
            fv.extend_from_slice(&sv[(hh * ns + s0) * d..(hh + 1) * ns * d]);
            let selected = sel.iter().map(|&p| (p, pages.get(p)));
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

/// One step of every sequence of a layer: the input of [`KvStore::append_attend`].
#[derive(Clone, Copy, Debug)]
pub struct Step<'a> {
    /// Queries, Layout `(batch, hq, tq, d)`.
    pub q: &'a [f32],
    /// New keys (after RoPE), Layout `(batch, H, tq, D)`: the queries' own tokens.
    pub k: &'a [f32],
    /// New values, Layout `(batch, H, tq, D)`.
    pub v: &'a [f32],
    /// Query heads.
    pub hq: usize,
    /// New tokens per sequence.
    pub tq: usize,
    /// Score scale.
    pub scale: f32,
    /// Per sequence: absolute position of its first real token (left padding), as
    /// [`Queries::start`].
    pub starts: &'a [usize],
}

/// What a dense attention call over every sequence of a layer reads, taken under one lock:
/// the resident page blobs (shared, not copied), and sinks + window already in the kernel's
/// layout.
struct Snapshot {
    books: Arc<super::LayerBooks>,
    /// Per sequence: closed pages then (a copy of) the open page, with their token counts.
    pages: Vec<Vec<(Arc<Vec<u8>>, usize)>>,
    /// Per sequence: `(sinks, window)` token counts.
    fp_counts: Vec<(usize, usize)>,
    /// Full-precision part of every sequence: sinks (copied, token-major `(t, H, D)`) and the
    /// window's token rows (shared, not copied).
    fp: Vec<(Vec<f32>, Vec<f32>, Vec<TokenKv>)>,
    f: usize,
}

use super::{Row, TokenKv};
use std::sync::Arc;

impl KvStore {
    /// Append one step's K/V to every sequence of `layer`, then attend the step's queries over
    /// each sequence's whole context (sinks + every page's codes + window, causal over the new
    /// tokens, positions `< starts[b]` skipped): one call per layer and step for the whole
    /// batch. Returns `(out, lse)`, Layout `(batch, hq, tq, d)` and `(batch, hq, tq)`.
    ///
    /// The layer is read under one lock into one snapshot (pages shared, not copied) and every
    /// sequence goes through one kernel call. A layer with pages on disk or longer than
    /// [`CHUNK_PAGES`] pages takes the streaming path of [`KvStore::attend_dense`] per sequence.
    /// `tq` must not exceed the window (the queries' tokens must still be in it).
    pub fn append_attend(&self, layer: usize, s: &Step) -> Result<Attended> {
        let c = self.config().clone();
        let (h, d) = (c.kv_heads, c.head_dim);
        let batch = self.batch()?;
        let (hq, tq) = (s.hq, s.tq);
        crate::attention::check_heads(hq, h)?;
        for (what, x, heads) in [("q", s.q, hq), ("keys", s.k, h), ("values", s.v, h)] {
            if x.len() != batch * heads * tq * d {
                return Err(Error::shape(
                    what,
                    format!("[{batch}, {heads}, {tq}, {d}]"),
                    format!("{} values", x.len()),
                ));
            }
        }
        if s.starts.len() != batch {
            return Err(Error::shape(
                "starts",
                format!("[{batch}]"),
                format!("{} values", s.starts.len()),
            ));
        }
        if tq == 0 || tq > c.window.max(1) {
            return Err(Error::config(format!(
                "append_attend takes 1 to window={} new tokens per sequence, got {tq}",
                c.window
            )));
        }
        crate::pq::check_finite("q", s.q, d)?;
        // Every sequence's K/V are checked before the first is appended: all or nothing.
        crate::pq::check_finite("keys", s.k, d)?;
        crate::pq::check_finite("values", s.v, d)?;
        // Validate every sequence's start against its length after the append, then append.
        for b in 0..batch {
            let total = self.num_tokens(b, layer)? + tq;
            if s.starts[b] > total {
                return Err(Error::config(format!(
                    "start={} is beyond the {total} tokens of sequence {b}, layer {layer}",
                    s.starts[b]
                )));
            }
        }
        let kv = h * tq * d;
        // Several sequences encode with the layer's codebooks converted once (float16 ->
        // float32, norms) rather than once per sequence.
        let held = if batch > 1 {
            self.shared.lock()?.books[layer].clone()
        } else {
            None
        };
        let expanded = held.as_ref().map(|b| b.expanded());
        for b in 0..batch {
            self.append_with(
                b,
                layer,
                &s.k[b * kv..(b + 1) * kv],
                &s.v[b * kv..(b + 1) * kv],
                tq,
                held.as_ref().zip(expanded.as_ref()),
            )?;
        }
        let per_seq = |b: usize| -> Result<Attended> {
            let qn = hq * tq * d;
            self.attend_dense(
                b,
                layer,
                &Queries {
                    q: &s.q[b * qn..(b + 1) * qn],
                    hq,
                    tq,
                    scale: s.scale,
                    causal: true,
                    start: s.starts[b],
                },
            )
        };
        let snap = match self.snapshot(layer, batch)? {
            Some(snap) => snap,
            None => {
                let (mut out, mut lse) = (Vec::new(), Vec::new());
                for b in 0..batch {
                    let (o, l) = per_seq(b)?;
                    out.extend_from_slice(&o);
                    lse.extend_from_slice(&l);
                }
                return Ok((out, lse));
            }
        };
        let counts: Vec<usize> = snap
            .pages
            .iter()
            .map(|ps| ps.iter().map(|p| p.1).sum())
            .collect();
        let n = counts.iter().copied().max().unwrap_or(0);
        // The kernel reads every page's codes where they are (each task copies its own chunk).
        let views: Vec<Vec<super::PageView>> = snap
            .pages
            .iter()
            .map(|ps| {
                ps.iter()
                    .map(|(blob, t)| self.shared.view(blob.clone(), *t))
                    .collect()
            })
            .collect();
        let segs: Vec<Vec<(&[u8], &[u8])>> = (0..batch * h)
            .map(|bh| {
                views[bh / h]
                    .iter()
                    .map(|v| (v.k_codes(bh % h), v.v_codes(bh % h)))
                    .collect()
            })
            .collect();
        // float16 window rows converted (once per call, a row at a time into one buffer per
        // sequence); float32 ones read where they are.
        let hd = h * d;
        let converted: Vec<(Vec<f32>, Vec<f32>)> = snap
            .fp
            .iter()
            .map(|(_, _, win)| {
                let halves: Vec<&TokenKv> = win
                    .iter()
                    .filter(|(k, _)| matches!(k, Row::F16(_)))
                    .collect();
                let mut k = vec![0f32; halves.len() * hd];
                let mut v = vec![0f32; halves.len() * hd];
                for (i, (tk, tv)) in halves.iter().enumerate() {
                    tk.read_into(&mut k[i * hd..(i + 1) * hd]);
                    tv.read_into(&mut v[i * hd..(i + 1) * hd]);
                }
                (k, v)
            })
            .collect();
        let fp: Vec<Vec<(&[f32], &[f32])>> = snap
            .fp
            .iter()
            .zip(&converted)
            .map(|((sk, sv, win), (ck, cv))| {
                let mut halves = ck.chunks_exact(hd).zip(cv.chunks_exact(hd));
                sk.chunks_exact(hd)
                    .zip(sv.chunks_exact(hd))
                    .chain(win.iter().map(|(k, v)| match (k, v) {
                        (Row::F32(k), Row::F32(v)) => (&k[..], &v[..]),
                        _ => halves.next().expect("one converted row per float16 row"),
                    }))
                    .collect()
            })
            .collect();
        let mut code_range = Vec::with_capacity(batch);
        let mut fp_range = Vec::with_capacity(batch);
        for ((&(ns, nw), &start), &n_all) in snap.fp_counts.iter().zip(s.starts).zip(&counts) {
            let (skip, fp_start) = padding(start, ns, n_all, ns + nw);
            code_range.push((skip, n_all));
            fp_range.push((fp_start, ns + nw));
        }
        // Flattened here, not under the store lock (a copy about the size of the kernel's own
        // per-call transposition).
        let flat = snap.books.flat();
        let (kcent, vcent) = (&flat.0, &flat.1);
        pq_attention_paged(
            &PqAttention {
                batch,
                hq,
                hkv: h,
                tq,
                d,
                q: s.q,
                n,
                k_codes: &[],
                v_codes: &[],
                k_cent: kcent,
                k_m: c.k_m,
                k_nbits: c.k_nbits,
                v_cent: vcent,
                v_m: c.v_m,
                v_nbits: c.v_nbits,
                code_range: &code_range,
                f: snap.f,
                fp_k: &[],
                fp_v: &[],
                fp_range: &fp_range,
                scale: s.scale,
                causal: true,
            },
            &Resident {
                segs: &segs,
                size: c.page_size,
                fp: &fp,
            },
        )
    }

    /// The snapshot [`KvStore::append_attend`] reads, or None when a sequence of the layer
    /// has a page that is not resident, more than [`CHUNK_PAGES`] pages, or no codebooks yet
    /// for its pages (the per-sequence path handles those cases and their errors).
    fn snapshot(&self, layer: usize, batch: usize) -> Result<Option<Snapshot>> {
        let c = &self.shared.cfg;
        let (h, d) = (c.kv_heads, c.head_dim);
        let mut st = self.shared.lock()?;
        let st = &mut *st;
        let books = match st.books[layer].as_ref() {
            Some(b) => b.clone(),
            None => return Ok(None),
        };
        if st.seqs.len() != batch {
            return Ok(None);
        }
        let mut fp_counts = Vec::with_capacity(batch);
        for seq in st.seqs.iter() {
            let l = &seq[layer];
            if l.pages.len() > CHUNK_PAGES {
                return Ok(None);
            }
            if l.pages.iter().any(|id| !st.ram.map.contains_key(id)) {
                return Ok(None);
            }
            fp_counts.push((l.sinks_k.len() / (h * d), l.window.len()));
        }
        let f = fp_counts.iter().map(|(a, b)| a + b).max().unwrap_or(0);
        let mut fp = Vec::with_capacity(batch);
        let mut pages = Vec::with_capacity(batch);
        for b in 0..batch {
            let l = &st.seqs[b][layer];
            fp.push((
                l.sinks_k.clone(),
                l.sinks_v.clone(),
                l.window.iter().cloned().collect(),
            ));
            let ids = l.pages.clone();
            let open = l
                .open
                .as_ref()
                .filter(|o| o.filled > 0)
                .map(|o| (Arc::new(o.blob.clone()), o.filled));
            let mut ps = Vec::with_capacity(ids.len() + 1);
            for id in ids {
                let blob = st.ram.touch(id).expect("checked resident under this lock");
                ps.push((blob, c.page_size));
            }
            self.shared
                .counters
                .hits
                .fetch_add(ps.len() as u64, std::sync::atomic::Ordering::Relaxed);
            ps.extend(open);
            pages.push(ps);
        }
        Ok(Some(Snapshot {
            books,
            pages,
            fp_counts,
            fp,
            f,
        }))
    }
}
