//! Dense attention over PQ codes: key tables, the per-chunk code kernel, value weights.
use super::*;

/// Per-(sequence, KV head) precomputed key tables of the group's queries.
pub(super) struct GroupTables {
    /// Layout `(queries, ck)` byte tables (4-bit tables folded pairwise: one lookup per byte,
    /// measured 3.3x faster than two per-nibble lookups despite the larger tables).
    k: Vec<[f32; 256]>,
    /// 4-bit keys on AVX2: per query, 24-bit tables in three byte planes for the shuffle-based
    /// scan of [`crate::pq::fastscan`] (scores within ~2e-6 of the table span: float-exact).
    /// When present, `k` is empty.
    kq: Vec<QuantLut>,
    /// 8-bit keys on AVX-512 (VBMI): per query, the byte tables quantized to 24-bit planes for
    /// [`crate::attention::avx512::key_scores8`]. When present, `k` is empty.
    #[cfg(target_arch = "x86_64")]
    k8: Vec<crate::attention::avx512::Lut8>,
}

impl GroupTables {
    /// Whether the 8-bit keys take the AVX-512 byte-plane tables (`k8`).
    fn has_k8(&self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            !self.k8.is_empty()
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    fn none() -> Self {
        GroupTables {
            k: Vec::new(),
            kq: Vec::new(),
            #[cfg(target_arch = "x86_64")]
            k8: Vec::new(),
        }
    }
}

/// Whether 8-bit key codes of `ck` bytes take [`crate::attention::avx512::key_scores8`].
#[inline]
pub(super) fn lookup8(nbits: u32, ck: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        nbits == 8 && ck <= crate::attention::avx512::LUT8_MAX_BYTES && crate::simd::has_avx512()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (nbits, ck);
        false
    }
}

/// Code tokens of one sequence and KV head from which the 8-bit key scan takes the AVX-512
/// byte-plane tables ([`crate::attention::avx512::Lut8`]) instead of the float byte tables.
/// Building them costs about 55 us per KV head at GQA 3 and 32 code bytes; their scan is
/// faster only on long histories: on a 2-core Xeon with AVX-512 (2026-12-07, SmolLM2 shape,
/// `append_attend` per layer) 0.41 vs 0.25 ms at 512 tokens, 0.53 vs 0.37 at 2K, 0.74 vs 0.72
/// at 8K, 1.97 vs 2.37 at 32K (planes vs float tables).
pub(super) const LUT8_MIN_TOKENS: usize = 8192;

#[inline(always)]
pub(super) fn build_tables(a: &PqAttention, kt: &[f32], b: usize, h: usize) -> GroupTables {
    let (g, tq, d) = (a.hq / a.hkv, a.tq, a.d);
    let ksub = 1usize << a.k_nbits;
    let dsub = d / a.k_m;
    let ck = code_bytes(a.k_m, a.k_nbits);
    // Transposed centroids of this head, Layout (m, dsub, ksub): every table row is a few
    // contiguous multiply-adds over the codewords.
    let ct = &kt[h * a.k_m * dsub * ksub..(h + 1) * a.k_m * dsub * ksub];
    if lookup512(a.k_nbits) {
        // The AVX-512 key path decodes with the centroids themselves: no per-query tables.
        return GroupTables::none();
    }
    let shuffle = a.k_nbits == 4 && crate::simd::has_avx2_fma() && ck <= 128;
    let mut k = vec![[0f32; 256]; if shuffle { 0 } else { g * tq * ck }];
    let mut kq = Vec::with_capacity(if shuffle { g * tq } else { 0 });
    let mut lut = vec![0f32; a.k_m * ksub];
    for qi in 0..g * tq {
        let (gi, t) = (qi / tq, qi % tq);
        let qh = h * g + gi;
        let q = &a.q[((b * a.hq + qh) * tq + t) * d..((b * a.hq + qh) * tq + t + 1) * d];
        let fill = |j: usize, row: &mut [f32]| {
            row.fill(0.0);
            for dd in 0..dsub {
                let qd = q[j * dsub + dd] * a.scale;
                let c = &ct[(j * dsub + dd) * ksub..(j * dsub + dd + 1) * ksub];
                for (o, &x) in row.iter_mut().zip(c) {
                    *o = qd.mul_add(x, *o);
                }
            }
        };
        if a.k_nbits == 8 && !shuffle {
            for (j, row) in k[qi * ck..(qi + 1) * ck].iter_mut().enumerate() {
                fill(j, row);
            }
            continue;
        }
        debug_assert!(a.k_nbits == 4);
        for j in 0..a.k_m {
            fill(j, &mut lut[j * ksub..(j + 1) * ksub]);
        }
        if shuffle {
            kq.push(fastscan::quantize_exact(&lut, a.k_m));
            continue;
        }
        pair_tables_4bit(&lut, a.k_m, &mut k[qi * ck..(qi + 1) * ck]);
    }
    #[cfg(target_arch = "x86_64")]
    if lookup8(a.k_nbits, ck) && a.code_range[b].1 - a.code_range[b].0 >= LUT8_MIN_TOKENS {
        // A loop, not an iterator adapter: Lut8::new must inline into this function, which is
        // compiled per SIMD level (in a `map` closure it ran at the baseline level, 2x slower).
        let mut k8 = Vec::with_capacity(g * tq);
        for t in k.chunks_exact(ck) {
            k8.push(crate::attention::avx512::Lut8::new(t));
        }
        return GroupTables {
            k: Vec::new(),
            kq,
            k8,
        };
    }
    GroupTables {
        k,
        kq,
        #[cfg(target_arch = "x86_64")]
        k8: Vec::new(),
    }
}

/// Whether codes of `nbits` take the AVX-512 lookup kernels of [`crate::attention::avx512`] (4-bit codes:
/// one 16-float table per dimension is one register).
#[inline]
pub(super) fn lookup512(nbits: u32) -> bool {
    cfg!(target_arch = "x86_64") && nbits == 4 && crate::simd::has_avx512()
}

/// `sum_i a[i] * b[i]` with eight independent accumulators (vectorizes).
#[inline(always)]
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] = x[l].mul_add(y[l], acc[l]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s = x.mul_add(*y, s);
    }
    s
}

/// Key tables of `(b, h) = (bh / hkv, bh % hkv)`, or none when that sequence has no codes.
#[inline(always)]
pub(super) fn tables_for(a: &PqAttention, kt: &[f32], bh: usize) -> GroupTables {
    let b = bh / a.hkv;
    let (cs, ce) = a.code_range[b];
    if cs == ce {
        return GroupTables::none();
    }
    build_tables(a, kt, b, bh % a.hkv)
}

/// Softmax weights of queries `q0..q0 + cnt` (`cnt <= W`; rows of `s`, Layout `(nq, len)`)
/// summed per value codeword: `w` Layout `(cnt, vm, 2^nbits)`.
///
/// Weights are transposed to `(len, W)` and histogrammed per code byte value, Layout
/// `(cv, 256, W)`: one W-wide vector add per code byte covers every query (1.9x faster than one
/// scalar add per code byte and query at GQA 4; one add per byte was measured 2.7x faster than
/// one per 4-bit subquantizer). 4-bit byte histograms are then folded into their two nibbles.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) fn value_weights<const W: usize>(
    s: &[f32],
    len: usize,
    q0: usize,
    cnt: usize,
    vc: &[u8],
    cv: usize,
    nbits: u32,
    vm: usize,
    w: &mut [f32],
) {
    let mut pt = vec![[0f32; W]; len];
    for k in 0..cnt {
        for (dst, &x) in pt.iter_mut().zip(&s[(q0 + k) * len..(q0 + k + 1) * len]) {
            dst[k] = x;
        }
    }
    let mut hist = vec![[[0f32; W]; 256]; cv];
    for (&p, code) in pt.iter().zip(vc.chunks_exact(cv)) {
        for (cells, &c) in hist.iter_mut().zip(code) {
            let cell = &mut cells[c as usize];
            // Written as a whole-array update so it compiles to one vector add.
            *cell = std::array::from_fn(|k| cell[k] + p[k]);
        }
    }
    let vsub = 1usize << nbits;
    let mut acc = vec![[0f32; W]; vm * vsub];
    if nbits == 8 {
        for (dst, cells) in acc.chunks_exact_mut(256).zip(&hist) {
            dst.copy_from_slice(cells);
        }
    } else {
        for (bi, cells) in hist.iter().enumerate() {
            for hi4 in 0..16 {
                let mut row = [0f32; W];
                for lo4 in 0..16 {
                    let x = cells[hi4 * 16 + lo4];
                    let lo = &mut acc[2 * bi * 16 + lo4];
                    *lo = std::array::from_fn(|k| lo[k] + x[k]);
                    row = std::array::from_fn(|k| row[k] + x[k]);
                }
                if 2 * bi + 1 < vm {
                    let hi = &mut acc[(2 * bi + 1) * 16 + hi4];
                    *hi = std::array::from_fn(|k| hi[k] + row[k]);
                }
            }
        }
    }
    for k in 0..cnt {
        for (dst, x) in w[k * vm * vsub..(k + 1) * vm * vsub].iter_mut().zip(&acc) {
            *dst = x[k];
        }
    }
}

/// Attention of the group's queries over code tokens `[lo, hi)` of `(b, h)` (at most [`CHUNK`]).
///
/// Three passes keep every table in L1 and avoid rescaling: key scores of the whole chunk (one
/// byte-table lookup per key code byte), one max and `exp` per query, then softmax weights summed
/// per value code byte value, folded per codeword and multiplied with the value codebook once.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn codes_chunk(
    a: &PqAttention,
    paged: Option<&Resident>,
    tables: &GroupTables,
    vt: &[f32],
    b: usize,
    h: usize,
    lo: usize,
    hi: usize,
) -> Vec<Partial> {
    let (g, tq, d) = (a.hq / a.hkv, a.tq, a.d);
    let nq = g * tq;
    let len = hi - lo;
    let (ck, cv) = (code_bytes(a.k_m, a.k_nbits), code_bytes(a.v_m, a.v_nbits));
    let (mut kb, mut vb) = (Vec::new(), Vec::new());
    let (kc, vc): (&[u8], &[u8]) = match paged {
        Some(p) => {
            kb.reserve_exact(len * ck);
            vb.reserve_exact(len * cv);
            p.gather(b * a.hkv + h, lo, hi, (ck, cv), &mut kb, &mut vb);
            (&kb, &vb)
        }
        None => {
            let kbase = ((b * a.hkv + h) * a.n + lo) * ck;
            let vbase = ((b * a.hkv + h) * a.n + lo) * cv;
            (
                &a.k_codes[kbase..kbase + len * ck],
                &a.v_codes[vbase..vbase + len * cv],
            )
        }
    };
    // Pass 1: scores, Layout (nq, len), block by block so a block of codes is read once. (Fusing
    // the group's queries per code byte was measured slower: it loses the 4-token ILP.) 4-bit
    // keys on AVX2 use the shuffle scan with 24-bit tables, all queries per transposed block.
    let mut s = vec![0f32; nq * len];
    if lookup512(a.k_nbits) {
        #[cfg(target_arch = "x86_64")]
        {
            let dsub = d / a.k_m;
            let q = &a.q[(b * a.hq + h * g) * tq * d..(b * a.hq + (h + 1) * g) * tq * d];
            let cent = &a.k_cent[h * a.k_m * 16 * dsub..(h + 1) * a.k_m * 16 * dsub];
            // SAFETY: lookup512 says the CPU has the AVX-512 level (F, BW, VBMI) and AVX2+FMA.
            unsafe {
                crate::attention::avx512::key_scores(
                    q, a.scale, nq, len, kc, ck, a.k_m, dsub, cent, &mut s,
                )
            };
        }
    } else if cfg!(target_arch = "x86_64") && tables.has_k8() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: k8 tables exist only where lookup8 says the CPU has the AVX-512 level (F, BW,
        // VBMI) and AVX2.
        unsafe {
            crate::attention::avx512::key_scores8(&tables.k8, kc, ck, &mut s)
        };
    } else if !tables.kq.is_empty() {
        let mut rows: Vec<&mut [f32]> = s.chunks_exact_mut(len.max(1)).collect();
        rows.truncate(nq);
        fastscan::scan(&tables.kq, kc, ck, &mut rows);
    } else {
        // One query's byte tables (ck x 1 KiB: 32 KiB at 32 code bytes) at a time over the
        // whole chunk: they stay in L1, where a block-major order cycles the group's tables
        // (96 KiB at GQA 3) through L2 on every block; the chunk's codes stay in L2.
        for qi in 0..nq {
            scan_bytes(
                &tables.k[qi * ck..(qi + 1) * ck],
                kc,
                &mut s[qi * len..(qi + 1) * len],
            );
        }
    }
    // Pass 2: softmax numerators.
    let mut m = vec![f32::NEG_INFINITY; nq];
    let mut l = vec![0f32; nq];
    softmax_rows(&mut s, len, &mut m, &mut l);
    // Pass 3: softmax weights summed per value codeword for up to 8 queries at once, multiplied
    // with the value codebook once.
    let vsub = 1usize << a.v_nbits;
    let vm = a.v_m;
    let dsub = d / vm;
    let ct = &vt[h * vm * dsub * vsub..(h + 1) * vm * dsub * vsub];
    #[cfg(target_arch = "x86_64")]
    if a.v_nbits == 4 && crate::simd::has_avx2_fma() {
        let mut acc = vec![0f32; nq * d];
        let cent = &a.v_cent[h * vm * 16 * dsub..(h + 1) * vm * 16 * dsub];
        if lookup512(a.v_nbits) {
            // SAFETY: lookup512 says the CPU has the AVX-512 level (F, BW, VBMI) and AVX2+FMA.
            unsafe {
                crate::attention::avx512::weighted_values(
                    &s, nq, len, vc, cv, vm, dsub, cent, &mut acc,
                )
            };
        } else {
            // SAFETY: AVX2 and FMA are available (checked just above).
            unsafe {
                crate::attention::values::avx2::weighted_values(
                    &s, nq, len, vc, cv, vm, dsub, cent, &mut acc,
                )
            };
        }
        return (0..nq)
            .map(|qi| Partial {
                m: m[qi],
                l: l[qi],
                acc: acc[qi * d..(qi + 1) * d].to_vec(),
            })
            .collect();
    }
    let mut w = vec![0f32; nq * vm * vsub];
    let mut q0 = 0;
    while q0 < nq {
        let cnt = (nq - q0).min(8);
        let dst = &mut w[q0 * vm * vsub..(q0 + cnt) * vm * vsub];
        if cnt <= 4 {
            value_weights::<4>(&s, len, q0, cnt, vc, cv, a.v_nbits, vm, dst);
        } else {
            value_weights::<8>(&s, len, q0, cnt, vc, cv, a.v_nbits, vm, dst);
        }
        q0 += cnt;
    }
    // Value codebook transposed, Layout (m, dsub, ksub): one contiguous dot product per output
    // dimension.
    let mut out = Vec::with_capacity(nq);
    for qi in 0..nq {
        let w = &w[qi * vm * vsub..(qi + 1) * vm * vsub];
        let mut acc = vec![0f32; d];
        for j in 0..vm {
            let wj = &w[j * vsub..(j + 1) * vsub];
            for dd in 0..dsub {
                acc[j * dsub + dd] =
                    dot(wj, &ct[(j * dsub + dd) * vsub..(j * dsub + dd + 1) * vsub]);
            }
        }
        out.push(Partial {
            m: m[qi],
            l: l[qi],
            acc,
        });
    }
    out
}
