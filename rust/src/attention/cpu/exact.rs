//! Exact attention over full-precision tokens: the fp part and selected pages.
use super::*;

/// Exact attention of the group's queries over fp tokens `[lo, hi)` of `(b, h)`.
#[inline(always)]
pub(super) fn fp_chunk(
    a: &PqAttention,
    at: Option<&Resident>,
    b: usize,
    h: usize,
    lo: usize,
    hi: usize,
) -> Vec<Partial> {
    let (tq, d) = (a.tq, a.d);
    let nq = a.hq / a.hkv * tq;
    let (fs, fe) = a.fp_range[b];
    let base = (b * a.hkv + h) * a.f * d;
    // Visible tokens of each query, counted from `lo`.
    let ends: Vec<usize> = (0..nq)
        .map(|qi| {
            let t = qi % tq;
            let visible = if a.causal {
                fe.saturating_sub(tq - 1 - t).max(fs)
            } else {
                fe
            };
            visible.clamp(lo, hi) - lo
        })
        .collect();
    let (mut kb, mut vb) = (Vec::new(), Vec::new());
    let seg: (&[f32], &[f32]) = match at {
        Some(r) => {
            kb.reserve_exact((hi - lo) * d);
            vb.reserve_exact((hi - lo) * d);
            r.gather_fp(b, h, d, lo, hi, &mut kb, &mut vb);
            (&kb, &vb)
        }
        None => (
            &a.fp_k[base + lo * d..base + hi * d],
            &a.fp_v[base + lo * d..base + hi * d],
        ),
    };
    exact_part(a, b, h, &[seg], &ends)
}

/// Exact attention of the group's queries over the selected pages `ids[lo..hi]` of `(b, h)`.
#[inline(always)]
pub(super) fn pages_chunk(
    a: &PqAttention,
    p: &Pages,
    b: usize,
    h: usize,
    lo: usize,
    hi: usize,
) -> Vec<Partial> {
    let d = a.d;
    let base = (b * a.hkv + h) * p.n * d;
    let ids = &p.ids[(b * a.hkv + h) * p.s + lo..(b * a.hkv + h) * p.s + hi];
    let segs: Vec<(&[f32], &[f32])> = ids
        .iter()
        .filter(|&&id| id >= 0)
        .map(|&id| {
            let r0 = id as usize * p.size;
            let r1 = (r0 + p.size).min(p.n);
            (
                &p.k[base + r0 * d..base + r1 * d],
                &p.v[base + r0 * d..base + r1 * d],
            )
        })
        .collect();
    let len = segs.iter().map(|(k, _)| k.len() / d).sum();
    exact_part(a, b, h, &segs, &vec![len; a.hq / a.hkv * a.tq])
}

/// Exact attention of the group's queries of `(b, h)` over the key/value rows of `segs` (in
/// order); query `qi` sees the first `ends[qi]` of those tokens.
///
/// Scores: two keys against up to four queries per pass (eight independent FMA chains, every
/// key and query row loaded once per pass). Values: the group's outputs are accumulated in
/// 16-wide slices held in registers over all tokens, so each value row is loaded once per slice
/// for every query of the group.
#[inline(always)]
pub(super) fn exact_part(
    a: &PqAttention,
    b: usize,
    h: usize,
    segs: &[(&[f32], &[f32])],
    ends: &[usize],
) -> Vec<Partial> {
    let (g, tq, d) = (a.hq / a.hkv, a.tq, a.d);
    let nq = g * tq;
    // The group's query rows are contiguous: Layout (nq, d).
    let q = &a.q[(b * a.hq + h * g) * tq * d..(b * a.hq + (h + 1) * g) * tq * d];
    let len: usize = segs.iter().map(|(k, _)| k.len() / d).sum();
    let mut s = vec![0f32; nq * len];
    let mut off = 0;
    for (keys, _) in segs {
        for q0 in (0..nq).step_by(4) {
            let n = (nq - q0).min(4);
            match n {
                1 => score_rows::<1>(q, keys, d, a.scale, &mut s, len, q0, off),
                2 => score_rows::<2>(q, keys, d, a.scale, &mut s, len, q0, off),
                3 => score_rows::<3>(q, keys, d, a.scale, &mut s, len, q0, off),
                _ => score_rows::<4>(q, keys, d, a.scale, &mut s, len, q0, off),
            }
        }
        off += keys.len() / d;
    }
    let mut m = vec![f32::NEG_INFINITY; nq];
    let mut l = vec![0f32; nq];
    for qi in 0..nq {
        let row = &mut s[qi * len..(qi + 1) * len];
        let (seen, hidden) = row.split_at_mut(ends[qi].min(len));
        hidden.fill(0.0);
        let mx = max_of(seen);
        m[qi] = mx;
        if mx == f32::NEG_INFINITY {
            seen.fill(0.0);
            continue;
        }
        let mut sum = 0f32;
        for x in seen.iter_mut() {
            *x = exp_neg(*x - mx);
            sum += *x;
        }
        l[qi] = sum;
    }
    let mut acc = vec![0f32; nq * d];
    let mut off = 0;
    for (_, vals) in segs {
        for q0 in (0..nq).step_by(4) {
            let n = (nq - q0).min(4);
            match n {
                1 => accumulate_rows::<1>(&s, len, q0, off, vals, d, &mut acc),
                2 => accumulate_rows::<2>(&s, len, q0, off, vals, d, &mut acc),
                3 => accumulate_rows::<3>(&s, len, q0, off, vals, d, &mut acc),
                _ => accumulate_rows::<4>(&s, len, q0, off, vals, d, &mut acc),
            }
        }
        off += vals.len() / d;
    }
    (0..nq)
        .map(|qi| Partial {
            m: m[qi],
            l: l[qi],
            acc: acc[qi * d..(qi + 1) * d].to_vec(),
        })
        .collect()
}

/// `s[(q0 + k) * len + off + i] = scale * q[q0 + k] . keys[i]` for `k < Q` and every key row.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) fn score_rows<const Q: usize>(
    q: &[f32],
    keys: &[f32],
    d: usize,
    scale: f32,
    s: &mut [f32],
    len: usize,
    q0: usize,
    off: usize,
) {
    let n = keys.len() / d;
    let d8 = d / 8 * 8;
    let qr: [&[f32]; Q] = std::array::from_fn(|k| &q[(q0 + k) * d..(q0 + k + 1) * d]);
    let mut i = 0;
    while i < n {
        let two = i + 1 < n;
        let k0 = &keys[i * d..(i + 1) * d];
        let k1 = if two {
            &keys[(i + 1) * d..(i + 2) * d]
        } else {
            k0
        };
        let mut acc = [[[0f32; 8]; 2]; Q];
        for c in (0..d8).step_by(8) {
            let a0: [f32; 8] = k0[c..c + 8].try_into().unwrap();
            let a1: [f32; 8] = k1[c..c + 8].try_into().unwrap();
            for k in 0..Q {
                let qv: [f32; 8] = qr[k][c..c + 8].try_into().unwrap();
                for l in 0..8 {
                    acc[k][0][l] = qv[l].mul_add(a0[l], acc[k][0][l]);
                    acc[k][1][l] = qv[l].mul_add(a1[l], acc[k][1][l]);
                }
            }
        }
        for k in 0..Q {
            let (mut t0, mut t1) = (hsum8(acc[k][0]), hsum8(acc[k][1]));
            for c in d8..d {
                t0 = qr[k][c].mul_add(k0[c], t0);
                t1 = qr[k][c].mul_add(k1[c], t1);
            }
            let row = (q0 + k) * len + off + i;
            s[row] = t0 * scale;
            if two {
                s[row + 1] = t1 * scale;
            }
        }
        i += 2;
    }
}

/// Sum of eight lanes as a tree (independent adds; a left-to-right sum is a chain of seven).
#[inline(always)]
pub(super) fn hsum8(a: [f32; 8]) -> f32 {
    let b = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    (b[0] + b[2]) + (b[1] + b[3])
}

/// `acc[q0 + k] += sum_i s[(q0 + k) * len + off + i] * vals[i]` for `k < Q`.
#[inline(always)]
pub(super) fn accumulate_rows<const Q: usize>(
    s: &[f32],
    len: usize,
    q0: usize,
    off: usize,
    vals: &[f32],
    d: usize,
    acc: &mut [f32],
) {
    const W: usize = 16;
    let n = vals.len() / d;
    let p: [&[f32]; Q] =
        std::array::from_fn(|k| &s[(q0 + k) * len + off..(q0 + k) * len + off + n]);
    let dw = d / W * W;
    for c in (0..dw).step_by(W) {
        let mut o: [[f32; W]; Q] = std::array::from_fn(|k| {
            acc[(q0 + k) * d + c..(q0 + k) * d + c + W]
                .try_into()
                .unwrap()
        });
        for (i, v) in vals.chunks_exact(d).enumerate() {
            let v: [f32; W] = v[c..c + W].try_into().unwrap();
            for k in 0..Q {
                let pk = p[k][i];
                for l in 0..W {
                    o[k][l] = pk.mul_add(v[l], o[k][l]);
                }
            }
        }
        for k in 0..Q {
            acc[(q0 + k) * d + c..(q0 + k) * d + c + W].copy_from_slice(&o[k]);
        }
    }
    if dw < d {
        for (i, v) in vals.chunks_exact(d).enumerate() {
            for k in 0..Q {
                let pk = p[k][i];
                for (x, &y) in acc[(q0 + k) * d + dw..(q0 + k + 1) * d]
                    .iter_mut()
                    .zip(&v[dw..])
                {
                    *x = pk.mul_add(y, *x);
                }
            }
        }
    }
}
