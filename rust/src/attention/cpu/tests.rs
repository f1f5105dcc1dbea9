use super::*;
use crate::pq::ProductQuantizer;
use crate::rng::SplitMix64;

fn rand(n: usize, seed: u64) -> Vec<f32> {
    let mut r = SplitMix64::new(seed, 0);
    (0..n).map(|_| r.next_f64() as f32 * 2.0 - 1.0).collect()
}

#[test]
fn exp_is_accurate() {
    for i in 0..10000 {
        let x = -(i as f32) * 0.0087;
        let e = x.exp();
        assert!((exp_neg(x) - e).abs() <= 3e-7 * e + 1e-38, "{x}");
    }
    assert_eq!(exp_neg(-1000.0), exp_neg(-87.0));
}

/// Reference: decode codes, concatenate fp, plain softmax attention in f64.
#[allow(clippy::too_many_arguments)]
fn reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    nk: usize,
    hq: usize,
    hkv: usize,
    tq: usize,
    d: usize,
    scale: f32,
    causal_fp: Option<usize>,
) -> Vec<f32> {
    let g = hq / hkv;
    let mut out = vec![0f32; hq * tq * d];
    for qh in 0..hq {
        let h = qh / g;
        for t in 0..tq {
            let qv = &q[(qh * tq + t) * d..(qh * tq + t + 1) * d];
            let visible = match causal_fp {
                Some(fpn) => nk - fpn + (fpn - (tq - 1 - t)),
                None => nk,
            };
            let s: Vec<f64> = (0..visible)
                .map(|i| {
                    qv.iter()
                        .zip(&k[(h * nk + i) * d..(h * nk + i + 1) * d])
                        .map(|(a, b)| (*a as f64) * (*b as f64))
                        .sum::<f64>()
                        * scale as f64
                })
                .collect();
            let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = w.iter().sum();
            for dd in 0..d {
                let o: f64 = (0..visible)
                    .map(|i| w[i] * v[(h * nk + i) * d + dd] as f64)
                    .sum();
                out[(qh * tq + t) * d + dd] = (o / z) as f32;
            }
        }
    }
    out
}

#[test]
fn equals_attention_over_decoded_codes() {
    for (hq, hkv, d, km, kn, vm, vn, n, f, tq) in [
        (3, 1, 16, 16, 4, 8, 4, 700, 5, 1),
        (4, 2, 16, 4, 8, 16, 4, 4100, 0, 2),
        (2, 2, 8, 8, 4, 2, 8, 0, 7, 3),
        (8, 1, 16, 16, 4, 16, 4, 9000, 3, 1),
        (2, 1, 16, 16, 4, 16, 4, 10, 9000, 2),
        // 4-bit values on AVX2 (exact table lookups): odd m and dsub > 1, 5 queries (a group
        // of 4 and one of 1), code widths that are and are not multiples of 16 bytes, and
        // lengths that are not multiples of 8, 32 or the 256-token block.
        (5, 1, 12, 12, 4, 3, 4, 37, 2, 1),
        (6, 3, 14, 7, 4, 7, 4, 290, 1, 1),
        (4, 1, 32, 32, 4, 32, 4, 1000, 3, 1),
        // 4-bit codes, 12 and 9 query rows per KV head (the AVX-512 kernels take up to 8 at
        // a time), and 8 rows in one pass.
        (4, 1, 16, 16, 4, 8, 4, 530, 6, 3),
        (9, 1, 16, 8, 4, 16, 4, 300, 2, 1),
        (8, 1, 32, 32, 4, 32, 4, 257, 1, 1),
        // 8-bit keys and values (the CompressedCache default), GQA 3, 4 and 6 queries.
        (3, 1, 16, 8, 8, 8, 8, 700, 5, 1),
        (8, 2, 16, 8, 8, 4, 8, 4100, 3, 1),
        (6, 2, 16, 8, 8, 8, 8, 300, 4, 2),
        // 8-bit keys over a history of at least LUT8_MIN_TOKENS: the byte-plane tables on
        // AVX-512 (the float byte tables below that, and on other CPUs).
        (3, 1, 16, 8, 8, 16, 4, 9000, 2, 1),
    ] {
        let mk = |m: usize, nbits: u32, seed: u64| {
            let mut pq = ProductQuantizer::new(d, m, nbits).unwrap();
            pq.train(&rand(300 * d, seed), 3, seed).unwrap();
            pq
        };
        let kpq: Vec<_> = (0..hkv).map(|h| mk(km, kn, h as u64)).collect();
        let vpq: Vec<_> = (0..hkv).map(|h| mk(vm, vn, 10 + h as u64)).collect();
        let kx = rand(hkv * n * d, 1);
        let vx = rand(hkv * n * d, 2);
        let mut kc = Vec::new();
        let mut vc = Vec::new();
        let mut kdec = Vec::new();
        let mut vdec = Vec::new();
        let fk = rand(hkv * f * d, 3);
        let fv = rand(hkv * f * d, 4);
        for h in 0..hkv {
            let a = kpq[h].encode(&kx[h * n * d..(h + 1) * n * d]).unwrap();
            let b = vpq[h].encode(&vx[h * n * d..(h + 1) * n * d]).unwrap();
            kdec.extend(kpq[h].decode(&a).unwrap());
            kdec.extend_from_slice(&fk[h * f * d..(h + 1) * f * d]);
            vdec.extend(vpq[h].decode(&b).unwrap());
            vdec.extend_from_slice(&fv[h * f * d..(h + 1) * f * d]);
            kc.extend(a);
            vc.extend(b);
        }
        let kcent: Vec<f32> = kpq
            .iter()
            .flat_map(|p| p.centroids().unwrap().to_vec())
            .collect();
        let vcent: Vec<f32> = vpq
            .iter()
            .flat_map(|p| p.centroids().unwrap().to_vec())
            .collect();
        let q = rand(hq * tq * d, 5)
            .iter()
            .map(|x| x * 3.0)
            .collect::<Vec<_>>();
        let scale = 1.0 / (d as f32).sqrt();
        let causal = f >= tq;
        let args = PqAttention {
            batch: 1,
            hq,
            hkv,
            tq,
            d,
            q: &q,
            n,
            k_codes: &kc,
            v_codes: &vc,
            k_cent: &kcent,
            k_m: km,
            k_nbits: kn,
            v_cent: &vcent,
            v_m: vm,
            v_nbits: vn,
            code_range: &[(0, n)],
            f,
            fp_k: &fk,
            fp_v: &fv,
            fp_range: &[(0, f)],
            scale,
            causal,
        };
        let (out, lse) = pq_attention(&args).unwrap();
        let want = reference(
            &q,
            &kdec,
            &vdec,
            n + f,
            hq,
            hkv,
            tq,
            d,
            scale,
            causal.then_some(f),
        );
        for (i, (a, b)) in out.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "cfg n={n} f={f} i={i}: {a} vs {b}"
            );
        }
        assert!(lse.iter().all(|x| x.is_finite() == (n + f > 0)));
    }
}

/// Attention over pages in place equals attention over the same pages gathered into the
/// full-precision part (skipped ids, a partial last page, GQA 3, causal Tq = 2, batch 2).
#[test]
fn paged_equals_gathered() {
    let (batch, hq, hkv, tq, d, n, size, f) = (
        2usize, 6usize, 2usize, 2usize, 24usize, 300usize, 64usize, 5usize,
    );
    let k = rand(batch * hkv * n * d, 11);
    let v = rand(batch * hkv * n * d, 12);
    let fk = rand(batch * hkv * f * d, 13);
    let fv = rand(batch * hkv * f * d, 14);
    let q: Vec<f32> = rand(batch * hq * tq * d, 15)
        .iter()
        .map(|x| x * 2.0)
        .collect();
    let s = 3;
    let ids: Vec<i64> = vec![4, 0, -1, 2, 3, 1, 1, -1, -1, 4, 2, 0];
    // Gathered: selected rows first, then the fp part, per (b, h).
    let mut gk = Vec::new();
    let mut gv = Vec::new();
    let mut gf = 0;
    let mut lens = Vec::new();
    for bh in 0..batch * hkv {
        let mut rows_k = Vec::new();
        let mut rows_v = Vec::new();
        for &id in &ids[bh * s..(bh + 1) * s] {
            if id < 0 {
                continue;
            }
            let (r0, r1) = (id as usize * size, ((id as usize + 1) * size).min(n));
            rows_k.extend_from_slice(&k[(bh * n + r0) * d..(bh * n + r1) * d]);
            rows_v.extend_from_slice(&v[(bh * n + r0) * d..(bh * n + r1) * d]);
        }
        rows_k.extend_from_slice(&fk[bh * f * d..(bh + 1) * f * d]);
        rows_v.extend_from_slice(&fv[bh * f * d..(bh + 1) * f * d]);
        gf = gf.max(rows_k.len() / d);
        lens.push(rows_k.len() / d);
        gk.push(rows_k);
        gv.push(rows_v);
    }
    // Each (b, h) right-aligned in a common capacity (left padding).
    let mut fk_all = vec![0f32; batch * hkv * gf * d];
    let mut fv_all = vec![0f32; batch * hkv * gf * d];
    for bh in 0..batch * hkv {
        let pad = gf - lens[bh];
        fk_all[(bh * gf + pad) * d..(bh + 1) * gf * d].copy_from_slice(&gk[bh]);
        fv_all[(bh * gf + pad) * d..(bh + 1) * gf * d].copy_from_slice(&gv[bh]);
    }
    /// [`PqAttention::fp_only`] at scale 0.3 (not the default 1/sqrt(d)) for both sides.
    fn fp_only<'a>(
        q: &'a [f32],
        dims: (usize, usize, usize, usize, usize),
        fk: &'a [f32],
        fv: &'a [f32],
        f: usize,
        fp_range: &'a [(usize, usize)],
        code_range: &'a [(usize, usize)],
    ) -> PqAttention<'a> {
        PqAttention {
            scale: 0.3,
            ..PqAttention::fp_only(dims, q, (f, fk, fv), fp_range, code_range)
        }
    }
    let dims = (batch, hq, hkv, tq, d);
    let ranges = [(0, f); 2];
    let empty = [(0, 0); 2];
    let all = fp_only(&q, dims, &fk, &fv, f, &ranges, &empty);
    let pages = Pages {
        k: &k,
        v: &v,
        n,
        ids: &ids,
        s,
        size,
    };
    let (out, lse) = paged_attention(&all, &pages).unwrap();
    let g = hq / hkv;
    for bh in 0..batch * hkv {
        // Reference per (sequence, KV head): the gathered rows, left-padded to gf.
        let (b, h) = (bh / hkv, bh % hkv);
        let pad = [(gf - lens[bh], gf)];
        let qh = &q[(b * hq + h * g) * tq * d..(b * hq + (h + 1) * g) * tq * d];
        let one = fp_only(
            qh,
            (1, g, 1, tq, d),
            &fk_all[bh * gf * d..(bh + 1) * gf * d],
            &fv_all[bh * gf * d..(bh + 1) * gf * d],
            gf,
            &pad,
            &empty[..1],
        );
        let (want, want_lse) = pq_attention(&one).unwrap();
        let got = &out[(b * hq + h * g) * tq * d..(b * hq + (h + 1) * g) * tq * d];
        for (x, y) in got.iter().zip(&want) {
            assert!(
                (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                "bh={bh}: {x} vs {y}"
            );
        }
        let got_lse = &lse[(b * hq + h * g) * tq..(b * hq + (h + 1) * g) * tq];
        for (x, y) in got_lse.iter().zip(&want_lse) {
            assert!(
                (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                "bh={bh} lse: {x} vs {y}"
            );
        }
    }
    // Out-of-range ids and mismatched shapes are errors, not panics.
    let bad: Vec<i64> = vec![5; batch * hkv * s];
    let e = paged_attention(&all, &Pages { ids: &bad, ..pages });
    assert!(e.unwrap_err().to_string().contains("out of range"));
    let twice: Vec<i64> = vec![1, -1, 1, 0, 1, 2, 0, 1, 2, 0, 1, 2];
    let e = paged_attention(
        &all,
        &Pages {
            ids: &twice,
            ..pages
        },
    );
    assert!(e.unwrap_err().to_string().contains("appears twice"));
    let e = paged_attention(
        &all,
        &Pages {
            k: &k[1..],
            ..pages
        },
    );
    assert!(e.is_err());
}

#[test]
fn resident_pages_and_rows_give_the_contiguous_result() {
    // The store's path (codes in pages, fp tokens as token-major rows) must compute exactly
    // what the kernel computes over the same data in one array: uneven sequences, left padding
    // that starts mid-page, a partial last page, for 8-bit and 4-bit key layouts; small pages,
    // and the default shape (head_dim 64, 64-token pages, 32 code bytes, chunks spanning many
    // pages) over histories that do and do not reach the 8-bit byte-plane tables
    // (LUT8_MIN_TOKENS).
    let (batch, hq, hkv, tq) = (3, 6, 2, 2);
    let small = [(4, 8, 8, 4), (8, 4, 8, 4), (8, 8, 4, 8)];
    let wide = [(32, 8, 64, 4), (64, 4, 64, 4), (16, 8, 16, 8)];
    /// `(head_dim, page size, sequence lengths, code ranges, (k_m, k_nbits, v_m, v_nbits)s)`.
    type Shape<'a> = (
        usize,
        usize,
        [usize; 3],
        [(usize, usize); 3],
        &'a [(usize, u32, usize, u32)],
    );
    let shapes: [Shape; 2] = [
        (8, 4, [13, 4, 9], [(2, 13), (0, 4), (5, 9)], &small),
        (
            64,
            64,
            [9100, 300, 4200],
            [(70, 9100), (0, 300), (5, 4200)],
            &wide,
        ),
    ];
    for (d, size, lens, code_range, layouts) in shapes {
        for &(km, kb, vm, vb) in layouts {
            let (ck, cv) = (code_bytes(km, kb), code_bytes(vm, vb));
            let n = lens[0];
            let mut r = SplitMix64::new(11, 0);
            let mut bytes =
                |len: usize| -> Vec<u8> { (0..len).map(|_| r.next_u64() as u8).collect() };
            let kc = bytes(batch * hkv * n * ck);
            let vc = bytes(batch * hkv * n * cv);
            let kcent = rand(hkv * (1 << kb) * d, 1);
            let vcent = rand(hkv * (1 << vb) * d, 2);
            let q = rand(batch * hq * tq * d, 3);
            let f = 5;
            let fk = rand(batch * hkv * f * d, 4);
            let fv = rand(batch * hkv * f * d, 5);
            let fp_range = [(0, 5), (1, 5), (3, 5)];
            let a = PqAttention {
                batch,
                hq,
                hkv,
                tq,
                d,
                q: &q,
                n,
                k_codes: &kc,
                v_codes: &vc,
                k_cent: &kcent,
                k_m: km,
                k_nbits: kb,
                v_cent: &vcent,
                v_m: vm,
                v_nbits: vb,
                code_range: &code_range,
                f,
                fp_k: &fk,
                fp_v: &fv,
                fp_range: &fp_range,
                scale: 0.4,
                causal: true,
            };
            let want = pq_attention(&a).unwrap();
            // The same codes cut into pages of `size` tokens (each sequence's real length only).
            let segs: Vec<Vec<(&[u8], &[u8])>> = (0..batch * hkv)
                .map(|bh| {
                    let len = lens[bh / hkv];
                    (0..len.div_ceil(size))
                        .map(|p| {
                            let (t0, t1) = (p * size, ((p + 1) * size).min(len));
                            let (kb0, vb0) = ((bh * n + t0) * ck, (bh * n + t0) * cv);
                            (
                                &kc[kb0..kb0 + (t1 - t0) * ck],
                                &vc[vb0..vb0 + (t1 - t0) * cv],
                            )
                        })
                        .collect()
                })
                .collect();
            // fp tokens as rows of Layout (hkv, d), as the store's window holds them.
            let rows: Vec<(Vec<f32>, Vec<f32>)> = (0..batch * f)
                .map(|bt| {
                    let (b, t) = (bt / f, bt % f);
                    let row = |x: &[f32]| -> Vec<f32> {
                        (0..hkv)
                            .flat_map(|h| {
                                x[((b * hkv + h) * f + t) * d..((b * hkv + h) * f + t + 1) * d]
                                    .to_vec()
                            })
                            .collect()
                    };
                    (row(&fk), row(&fv))
                })
                .collect();
            let fp: Vec<Vec<(&[f32], &[f32])>> = (0..batch)
                .map(|b| {
                    rows[b * f..(b + 1) * f]
                        .iter()
                        .map(|(k, v)| (&k[..], &v[..]))
                        .collect()
                })
                .collect();
            let at = Resident {
                segs: &segs,
                size,
                fp: &fp,
            };
            let empty = PqAttention {
                k_codes: &[],
                v_codes: &[],
                fp_k: &[],
                fp_v: &[],
                ..a
            };
            let got = pq_attention_paged(&empty, &at).unwrap();
            assert_eq!(got, want, "k {km}x{kb}, v {vm}x{vb}");
            // A page list shorter than the code range is a typed error, not a wrong answer.
            let short: Vec<Vec<(&[u8], &[u8])>> =
                segs.iter().map(|l| l[..l.len() - 1].to_vec()).collect();
            let bad = Resident {
                segs: &short,
                size,
                fp: &fp,
            };
            assert!(matches!(
                pq_attention_paged(&empty, &bad),
                Err(Error::Config(_))
            ));
        }
    }
}

#[test]
fn quantized_page_scores_equal_the_scores_of_the_dequantized_abstracts() {
    use crate::store::{dequantize_abstract, quantize_abstract};
    let (hq, hkv, tq, d, pages) = (6, 2, 2, 40, 2500); // more pages than one task, d % 8 != 0
    let q = rand(hq * tq * d, 1);
    let raw = rand(pages * hkv * 3 * d, 2);
    let mut bytes = Vec::new();
    let mut kmin = vec![0f32; hkv * pages * d];
    let mut kmax = vec![0f32; hkv * pages * d];
    for p in 0..pages {
        let mut a = raw[p * hkv * 3 * d..(p + 1) * hkv * 3 * d].to_vec();
        for h in 0..hkv {
            // min <= mean <= max per dimension, as a page's abstract holds.
            for x in 0..d {
                let mut v = [
                    a[h * 3 * d + x],
                    a[h * 3 * d + d + x],
                    a[h * 3 * d + 2 * d + x],
                ];
                v.sort_by(f32::total_cmp);
                (
                    a[h * 3 * d + x],
                    a[h * 3 * d + 2 * d + x],
                    a[h * 3 * d + d + x],
                ) = (v[0], v[1], v[2]);
            }
        }
        let qa = quantize_abstract(&a, hkv, d);
        let mut deq = Vec::new();
        dequantize_abstract(&qa, hkv, d, &mut deq);
        for h in 0..hkv {
            let at = (h * pages + p) * d;
            kmin[at..at + d].copy_from_slice(&deq[h * 3 * d..h * 3 * d + d]);
            kmax[at..at + d].copy_from_slice(&deq[h * 3 * d + d..h * 3 * d + 2 * d]);
        }
        bytes.push(qa);
    }
    let slices: Vec<&[u8]> = bytes.iter().map(|b| &b[..]).collect();
    let got = page_scores_quantized(&q, &slices, hq, hkv, tq, d).unwrap();
    let want = page_scores(&q, &kmin, &kmax, 1, hq, hkv, tq, pages, d).unwrap();
    assert_eq!(got, want);
    // A wrong abstract size is a typed error naming the page.
    let mut bad = slices.clone();
    bad[7] = &bytes[7][1..];
    let e = page_scores_quantized(&q, &bad, hq, hkv, tq, d)
        .unwrap_err()
        .to_string();
    assert!(e.contains("page 7"), "{e}");
}
