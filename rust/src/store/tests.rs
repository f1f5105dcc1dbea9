use super::*;
use crate::rng::SplitMix64;

fn cfg(budget: Option<u64>, dir: Option<PathBuf>) -> StoreConfig {
    StoreConfig {
        layers: 2,
        kv_heads: 2,
        head_dim: 8,
        page_size: 4,
        window: 3,
        sinks: 2,
        k_m: 4,
        k_nbits: 4,
        v_m: 8,
        v_nbits: 4,
        keep_full_precision: true,
        window_f16: false,
        abstracts: true,
        batch: 1,
        ram_budget: budget,
        offload_dir: dir,
        max_disk_bytes: None,
        model_id: "test-model".into(),
    }
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ctxcore-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn rand(n: usize, seed: u64) -> Vec<f32> {
    let mut r = SplitMix64::new(seed, 0);
    (0..n).map(|_| r.next_f64() as f32 * 2.0 - 1.0).collect()
}

fn books(c: &StoreConfig, seed: u64) -> (Vec<ProductQuantizer>, Vec<ProductQuantizer>) {
    let mk = |m, nbits, s| {
        let mut pq = ProductQuantizer::new(c.head_dim, m, nbits).unwrap();
        pq.train(&rand(256 * c.head_dim, s), 3, s).unwrap();
        pq
    };
    (
        (0..c.kv_heads)
            .map(|h| mk(c.k_m, c.k_nbits, seed + h as u64))
            .collect(),
        (0..c.kv_heads)
            .map(|h| mk(c.v_m, c.v_nbits, seed + 10 + h as u64))
            .collect(),
    )
}

fn store(c: StoreConfig) -> KvStore {
    let s = KvStore::new(c.clone()).unwrap();
    for l in 0..c.layers {
        let (k, v) = books(&c, l as u64);
        s.set_codebooks(l, k, v).unwrap();
    }
    s
}

/// Append `t` tokens to every layer; returns the (H, t, D) keys of layer 0.
fn fill(s: &KvStore, t: usize, seed: u64) -> Vec<f32> {
    let c = s.config().clone();
    let mut first = Vec::new();
    for l in 0..c.layers {
        let k = rand(c.kv_heads * t * c.head_dim, seed + l as u64);
        let v = rand(c.kv_heads * t * c.head_dim, seed + 100 + l as u64);
        s.append(0, l, &k, &v, t).unwrap();
        if l == 0 {
            first = k;
        }
    }
    first
}

#[test]
fn layout_of_positions_and_codes() {
    let c = cfg(None, None);
    let s = store(c.clone());
    let (h, d) = (c.kv_heads, c.head_dim);
    let k = fill(&s, 17, 1);
    // 17 tokens: 2 sinks, 12 paged (3 pages of 4), 3 in the window.
    assert_eq!(s.num_tokens(0, 0).unwrap(), 17);
    assert_eq!(s.paged_tokens(0, 0).unwrap(), 12);
    assert_eq!(s.num_pages(0, 0).unwrap(), 3);
    let (sk, _, ns) = s.full_precision(0, 0, Region::Sinks).unwrap();
    assert_eq!(ns, 2);
    let (wk, _, nw) = s.full_precision(0, 0, Region::Window).unwrap();
    assert_eq!(nw, 3);
    for hh in 0..h {
        assert_eq!(
            &sk[hh * 2 * d..hh * 2 * d + 2 * d],
            &k[hh * 17 * d..hh * 17 * d + 2 * d]
        );
        assert_eq!(
            &wk[hh * 3 * d..(hh + 1) * 3 * d],
            &k[(hh * 17 + 14) * d..(hh * 17 + 17) * d]
        );
    }
    // Page p holds positions 2 + 4p .. 2 + 4p + 4, encoded with the layer's key codebook.
    let (kb, _) = books(&c, 0);
    for p in 0..3 {
        let page = s.page(0, 0, p).unwrap();
        for hh in 0..h {
            let x = &k[(hh * 17 + 2 + 4 * p) * d..(hh * 17 + 6 + 4 * p) * d];
            assert_eq!(page.k_codes(hh), &kb[hh].encode(x).unwrap()[..]);
            let fp: Vec<f32> = page
                .k_fp16(hh)
                .unwrap()
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect();
            for (a, b) in fp.iter().zip(x) {
                assert!((a - b).abs() < 1e-3);
            }
        }
    }
    // Abstracts bound the keys of each page (min <= x <= max) and the mean is close.
    let (abs, np) = s.abstracts(0, 0).unwrap();
    assert_eq!(np, 3);
    for p in 0..3 {
        for hh in 0..h {
            let a = &abs[(p * h + hh) * 3 * d..(p * h + hh + 1) * 3 * d];
            for i in 0..4 {
                for dd in 0..d {
                    let x = k[(hh * 17 + 2 + 4 * p + i) * d + dd];
                    assert!(a[dd] <= x && x <= a[d + dd], "bound violated");
                }
            }
        }
    }
    // One more token fills an open page partially: it is readable and has an abstract.
    s.append(0, 0, &rand(h * d, 9), &rand(h * d, 10), 1)
        .unwrap();
    assert_eq!(s.num_pages(0, 0).unwrap(), 4);
    assert_eq!(s.page(0, 0, 3).unwrap().tokens, 1);
    assert_eq!(s.abstracts(0, 0).unwrap().1, 4);
}

#[test]
fn ram_stays_within_budget_for_10x_context() {
    let mut c = cfg(None, Some(tmpdir("budget")));
    (c.head_dim, c.page_size, c.k_m, c.v_m) = (32, 16, 16, 32);
    let min = c.min_ram_budget();
    let page = c.page_bytes() as u64;
    let budget = 3 * min;
    c.ram_budget = Some(budget);
    let s = store(c.clone());
    let mut max_seen = 0;
    let mut keys = Vec::new();
    for step in 0.. {
        if s.stats().unwrap().pages * page >= 10 * budget {
            break;
        }
        keys.push(fill(&s, 9, step));
        let st = s.stats().unwrap();
        max_seen = max_seen.max(st.ram_bytes);
        assert!(
            st.ram_bytes <= budget,
            "over budget: {} > {budget}",
            st.ram_bytes
        );
    }
    let st = s.stats().unwrap();
    assert!(
        st.pages * page >= 10 * budget,
        "stored only {} bytes of pages",
        st.pages * page
    );
    assert!(st.disk_bytes > 0 && st.evictions > 0);
    // Everything is still readable and unchanged: page 0 of layer 0, head 0 holds positions
    // 2..18, i.e. tokens 2..9 of the first append and 0..9 of the second.
    let p0 = s.page(0, 0, 0).unwrap();
    let (kb, _) = books(&c, 0);
    let d = c.head_dim;
    let mut x: Vec<f32> = keys[0][2 * d..9 * d].to_vec();
    x.extend_from_slice(&keys[1][..9 * d]);
    assert_eq!(p0.k_codes(0), &kb[0].encode(&x).unwrap()[..]);
    assert!(s.stats().unwrap().misses >= 1);
    assert!(s.stats().unwrap().ram_bytes <= budget);
    let _ = std::fs::remove_dir_all(c.offload_dir.unwrap());
}

#[test]
fn budget_below_minimum_is_rejected_with_the_minimum() {
    let mut c = cfg(Some(10), None);
    let min = c.min_ram_budget();
    match KvStore::new(c.clone()) {
        Err(Error::Budget(msg)) => assert!(msg.contains(&min.to_string())),
        other => panic!("{:?}", other.err()),
    }
    c.ram_budget = Some(min);
    assert!(KvStore::new(c).is_ok());
}

#[test]
fn page_in_prefetch_and_counters() {
    let c = cfg(None, Some(tmpdir("prefetch")));
    let s = store(c.clone());
    fill(&s, 45, 3);
    let before: Vec<Vec<u8>> = (0..10)
        .map(|p| s.page(0, 1, p).unwrap().blob().to_vec())
        .collect();
    s.evict_all().unwrap();
    assert_eq!(s.stats().unwrap().ram_page_bytes, 0);
    s.prefetch(0, 1, &[0, 1, 2]).unwrap();
    for _ in 0..200 {
        if s.stats().unwrap().prefetched >= 3 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let st = s.stats().unwrap();
    assert_eq!(st.prefetched, 3);
    for (p, b) in before.iter().enumerate() {
        assert_eq!(s.page(0, 1, p).unwrap().blob(), &b[..]);
    }
    let st2 = s.stats().unwrap();
    assert_eq!(st2.hits - st.hits, 3, "prefetched pages are RAM hits");
    assert_eq!(st2.misses - st.misses, 7);
    let _ = std::fs::remove_dir_all(c.offload_dir.unwrap());
}

#[test]
fn save_load_round_trip_and_faults() {
    let dir = tmpdir("save");
    let c = cfg(None, None);
    let s = store(c.clone());
    fill(&s, 30, 5);
    s.save(&dir, b"extra").unwrap();
    let (l, extra) = KvStore::load(&dir, &LoadOptions::default()).unwrap();
    assert_eq!(extra, b"extra");
    for layer in 0..2 {
        assert_eq!(l.num_tokens(0, layer).unwrap(), 30);
        for p in 0..s.num_pages(0, layer).unwrap() {
            assert_eq!(
                l.page(0, layer, p).unwrap().blob(),
                s.page(0, layer, p).unwrap().blob()
            );
        }
        assert_eq!(
            l.abstracts(0, layer).unwrap(),
            s.abstracts(0, layer).unwrap()
        );
        assert_eq!(
            l.full_precision(0, layer, Region::Window).unwrap(),
            s.full_precision(0, layer, Region::Window).unwrap()
        );
    }
    // The loaded store keeps working: appends encode with the saved codebooks.
    fill(&l, 7, 6);
    fill(&s, 7, 6);
    for p in 0..s.num_pages(0, 0).unwrap() {
        assert_eq!(
            l.page(0, 0, p).unwrap().blob(),
            s.page(0, 0, p).unwrap().blob()
        );
    }
    drop(l);
    let seg = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "seg"))
        .unwrap();
    let bytes = std::fs::read(&seg).unwrap();
    // Flipped byte in a page: detected when that page is read, naming file and page.
    let mut bad = bytes.clone();
    bad[c.page_bytes() + 3] ^= 0x40;
    std::fs::write(&seg, &bad).unwrap();
    let (l, _) = KvStore::load(&dir, &LoadOptions::default()).unwrap();
    assert!(l.page(0, 0, 0).is_ok());
    match l.page(0, 0, 1) {
        Err(Error::Corrupt { what, .. }) => {
            assert!(what.contains("page") && what.contains(".seg"), "{what}")
        }
        other => panic!("{:?}", other.err()),
    }
    drop(l);
    // Truncated segment: caught at load.
    std::fs::write(&seg, &bytes[..bytes.len() - 10]).unwrap();
    assert!(matches!(
        KvStore::load(&dir, &LoadOptions::default()),
        Err(Error::Corrupt { .. })
    ));
    // Missing segment.
    std::fs::remove_file(&seg).unwrap();
    assert!(matches!(
        KvStore::load(&dir, &LoadOptions::default()),
        Err(Error::Corrupt { .. })
    ));
    std::fs::write(&seg, &bytes).unwrap();
    // Metadata: flipped byte, wrong version, wrong magic.
    let meta = dir.join("meta.ctxkv");
    let m = std::fs::read(&meta).unwrap();
    let mut bad = m.clone();
    bad[40] ^= 1;
    std::fs::write(&meta, &bad).unwrap();
    assert!(matches!(
        KvStore::load(&dir, &LoadOptions::default()),
        Err(Error::Corrupt { .. })
    ));
    let mut bad = m.clone();
    bad[8] = 7;
    std::fs::write(&meta, &bad).unwrap();
    assert!(matches!(
        KvStore::load(&dir, &LoadOptions::default()),
        Err(Error::Version { found: 7, .. })
    ));
    let mut bad = m.clone();
    bad[0] = b'X';
    std::fs::write(&meta, &bad).unwrap();
    assert!(matches!(
        KvStore::load(&dir, &LoadOptions::default()),
        Err(Error::Corrupt { .. })
    ));
    std::fs::write(&meta, &m).unwrap();
    let (l, _) = KvStore::load(&dir, &LoadOptions::default()).unwrap();
    // Compatibility check names both sides.
    let mut other = cfg(None, None);
    other.model_id = "other-model".into();
    match check_compatible(l.config(), &other) {
        Err(e @ Error::Mismatch { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("test-model") && msg.contains("other-model"),
                "{msg}"
            );
        }
        other => panic!("{other:?}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn resave_over_old_version_keeps_a_readable_context() {
    let dir = tmpdir("resave");
    let s = store(cfg(None, None));
    fill(&s, 20, 1);
    s.save(&dir, b"v1").unwrap();
    let (l, _) = KvStore::load(&dir, &LoadOptions::default()).unwrap();
    fill(&l, 20, 2);
    // Save the loaded store over its own directory: reads old pages while writing new ones.
    l.save(&dir, b"v2").unwrap();
    let (l2, extra) = KvStore::load(&dir, &LoadOptions::default()).unwrap();
    assert_eq!(extra, b"v2");
    assert_eq!(l2.num_tokens(0, 0).unwrap(), 40);
    for p in 0..l.num_pages(0, 0).unwrap() {
        assert_eq!(
            l2.page(0, 0, p).unwrap().blob(),
            l.page(0, 0, p).unwrap().blob()
        );
    }
    let segs = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "seg"))
        .count();
    assert_eq!(segs, 1, "old generations are removed");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn disk_full_keeps_data_in_ram() {
    let mut c = cfg(None, Some(tmpdir("full")));
    c.ram_budget = Some(c.min_ram_budget() + 2 * c.page_bytes() as u64 + 4096);
    c.max_disk_bytes = Some(3 * c.page_bytes() as u64);
    let s = store(c.clone());
    let mut err = None;
    for step in 0..50 {
        if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let k = rand(c.kv_heads * 4 * c.head_dim, step);
            s.append(0, 0, &k, &k, 4)
        }))
        .unwrap()
        {
            err = Some(e);
            break;
        }
    }
    match err {
        Some(Error::Io { source, .. }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::StorageFull)
        }
        other => panic!("expected disk full, got {other:?}"),
    }
    // Every page is still readable.
    for p in 0..s.num_pages(0, 0).unwrap() {
        s.page(0, 0, p).unwrap();
    }
    let _ = std::fs::remove_dir_all(c.offload_dir.unwrap());
}

#[test]
fn bad_input_is_rejected_without_changing_state() {
    let c = cfg(None, None);
    let s = KvStore::new(c.clone()).unwrap();
    let (h, d) = (c.kv_heads, c.head_dim);
    // Without codebooks, sinks + window still accept tokens; beyond that: NotTrained.
    s.append(0, 0, &rand(h * 5 * d, 1), &rand(h * 5 * d, 2), 5)
        .unwrap();
    assert!(matches!(
        s.append(0, 0, &rand(h * d, 1), &rand(h * d, 2), 1),
        Err(Error::NotTrained { .. })
    ));
    assert_eq!(s.num_tokens(0, 0).unwrap(), 5);
    assert!(matches!(
        s.append(0, 0, &rand(h * d, 1), &rand(h * d + 1, 2), 1),
        Err(Error::Shape { .. })
    ));
    let mut nan = rand(h * d, 1);
    nan[3] = f32::NAN;
    assert!(matches!(
        s.append(0, 0, &nan, &nan, 1),
        Err(Error::NonFinite { .. })
    ));
    assert!(matches!(s.append(1, 0, &[], &[], 0), Err(Error::Config(_))));
    assert!(matches!(s.append(0, 9, &[], &[], 0), Err(Error::Config(_))));
    assert_eq!(s.num_tokens(0, 0).unwrap(), 5);
    let (k, v) = books(&c, 0);
    assert!(matches!(
        s.set_codebooks(0, v.clone(), k.clone()),
        Err(Error::Config(_))
    ));
    assert!(matches!(
        s.set_codebooks(0, k[..1].to_vec(), v.clone()),
        Err(Error::Config(_))
    ));
    assert!(matches!(s.page(0, 0, 0), Err(Error::Config(_))));
    // Codebooks cannot be swapped under existing pages.
    s.set_codebooks(0, k.clone(), v.clone()).unwrap();
    s.append(0, 0, &rand(h * d, 1), &rand(h * d, 2), 1).unwrap();
    assert!(s.num_pages(0, 0).unwrap() > 0);
    assert!(matches!(s.set_codebooks(0, k, v), Err(Error::Config(_))));
}

#[test]
fn prefetch_then_read_reads_each_page_once() {
    let c = cfg(None, Some(tmpdir("inflight")));
    let s = store(c.clone());
    fill(&s, 200, 4);
    for round in 0..5 {
        s.evict_all().unwrap();
        let before = s.stats().unwrap().bytes_read;
        let pages: Vec<usize> = (0..40).collect();
        s.prefetch(0, 0, &pages).unwrap();
        for &p in &pages {
            s.page(0, 0, p).unwrap();
        }
        // Let the prefetch thread finish whatever it still holds.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let read = s.stats().unwrap().bytes_read - before;
        assert_eq!(
            read,
            40 * c.page_bytes() as u64,
            "round {round}: pages read more than once"
        );
    }
    let _ = std::fs::remove_dir_all(c.offload_dir.unwrap());
}

/// Append `t` random tokens to every layer of `seq`.
fn fill_seq(s: &KvStore, seq: usize, t: usize, seed: u64) {
    let c = s.config().clone();
    for l in 0..c.layers {
        let k = rand(c.kv_heads * t * c.head_dim, seed + l as u64);
        let v = rand(c.kv_heads * t * c.head_dim, seed + 100 + l as u64);
        s.append(seq, l, &k, &v, t).unwrap();
    }
}

fn widen16(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(2)
        .map(|x| f16::from_le_bytes([x[0], x[1]]).to_f32())
        .collect()
}

/// Every stored token of `(seq, layer)`: `(k, v, T)` Layout `(H, T, D)`; sinks and window as
/// stored, pages decoded from their codes, or their fp16 copies with `fp16`.
fn history(s: &KvStore, seq: usize, layer: usize, fp16: bool) -> (Vec<f32>, Vec<f32>, usize) {
    let c = s.config().clone();
    let (h, d) = (c.kv_heads, c.head_dim);
    let (kb, vb) = s.codebooks(layer).unwrap().unwrap();
    let mut parts = vec![s.full_precision(seq, layer, Region::Sinks).unwrap()];
    for p in 0..s.num_pages(seq, layer).unwrap() {
        let page = s.page(seq, layer, p).unwrap();
        let (mut k, mut v) = (Vec::new(), Vec::new());
        for hh in 0..h {
            if fp16 {
                k.extend(widen16(page.k_fp16(hh).unwrap()));
                v.extend(widen16(page.v_fp16(hh).unwrap()));
            } else {
                k.extend(kb[hh].decode(page.k_codes(hh)).unwrap());
                v.extend(vb[hh].decode(page.v_codes(hh)).unwrap());
            }
        }
        parts.push((k, v, page.tokens));
    }
    parts.push(s.full_precision(seq, layer, Region::Window).unwrap());
    let total: usize = parts.iter().map(|p| p.2).sum();
    let (mut k, mut v) = (Vec::new(), Vec::new());
    for hh in 0..h {
        for (pk, pv, t) in &parts {
            k.extend_from_slice(&pk[hh * t * d..(hh + 1) * t * d]);
            v.extend_from_slice(&pv[hh * t * d..(hh + 1) * t * d]);
        }
    }
    (k, v, total)
}

/// Causal softmax attention (f64) of `q` `(hq, tq, D)`, the last `tq` of `total` positions,
/// over positions `[start, own]` of `k`, `v` `(H, total, D)`. A query seeing nothing gets zeros
/// and `lse = -inf`.
#[allow(clippy::too_many_arguments)]
fn reference(
    q: &[f32],
    hq: usize,
    tq: usize,
    k: &[f32],
    v: &[f32],
    h: usize,
    total: usize,
    d: usize,
    start: usize,
    scale: f32,
) -> (Vec<f32>, Vec<f32>) {
    let g = hq / h;
    let mut out = vec![0f32; hq * tq * d];
    let mut lse = vec![f32::NEG_INFINITY; hq * tq];
    for qh in 0..hq {
        let kh = qh / g;
        for t in 0..tq {
            let qr = &q[(qh * tq + t) * d..(qh * tq + t + 1) * d];
            let own = total - tq + t;
            if start > own {
                continue;
            }
            let scores: Vec<f64> = (start..=own)
                .map(|j| {
                    let kr = &k[(kh * total + j) * d..(kh * total + j + 1) * d];
                    qr.iter()
                        .zip(kr)
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>()
                        * scale as f64
                })
                .collect();
            let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let z: f64 = w.iter().sum();
            for (j, wj) in (start..=own).zip(&w) {
                let vr = &v[(kh * total + j) * d..(kh * total + j + 1) * d];
                for dd in 0..d {
                    out[(qh * tq + t) * d + dd] += (wj / z * vr[dd] as f64) as f32;
                }
            }
            lse[qh * tq + t] = (m + z.ln()) as f32;
        }
    }
    (out, lse)
}

fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let ok = (x == y) || (x - y).abs() <= tol * (1.0 + y.abs());
        assert!(ok, "{what}[{i}]: {x} vs {y}");
    }
}

/// `attend_dense` (or, with `quest = Some(budget_pages)`, `attend_quest`) of sequence 0 of
/// `layer`, causal from `start`, against exact attention over `kv` (Layout `(H, total, D)` each).
#[allow(clippy::too_many_arguments)]
fn assert_attends(
    s: &KvStore,
    layer: usize,
    q: &[f32],
    hq: usize,
    tq: usize,
    kv: (&[f32], &[f32]),
    start: usize,
    quest: Option<usize>,
) {
    let c = s.config().clone();
    let (h, d) = (c.kv_heads, c.head_dim);
    let scale = 1.0 / (d as f32).sqrt();
    let total = kv.0.len() / (h * d);
    let qs = Queries {
        q,
        hq,
        tq,
        scale,
        causal: true,
        start,
    };
    let (ro, rl) = reference(q, hq, tq, kv.0, kv.1, h, total, d, start, scale);
    let ((o, l), what) = match quest {
        None => (s.attend_dense(0, layer, &qs).unwrap(), "dense"),
        Some(b) => (s.attend_quest(0, layer, &qs, b, None).unwrap(), "quest"),
    };
    assert_close(&o, &ro, 1e-4, &format!("{what} out, start={start}"));
    assert_close(&l, &rl, 1e-4, &format!("{what} lse, start={start}"));
}

/// Pages `f` reads from the disk tier (demand misses and prefetches), every page evicted first.
fn pages_read_cold(s: &KvStore, f: impl FnOnce()) -> u64 {
    s.evict_all().unwrap();
    let before = s.stats().unwrap();
    f();
    let after = s.stats().unwrap();
    (after.misses + after.prefetched) - (before.misses + before.prefetched)
}

#[test]
fn attend_with_start_ignores_left_padding() {
    let c = cfg(None, Some(tmpdir("start")));
    let s = store(c.clone());
    let (h, d) = (c.kv_heads, c.head_dim);
    // 2 sinks, 18 paged (4 closed pages + 2 tokens in the open page), 3 in the window.
    fill(&s, 23, 7);
    assert_eq!(s.paged_tokens(0, 0).unwrap(), 18);
    let total = 23;
    let (hq, tq) = (2 * h, 2);
    let q: Vec<f32> = rand(hq * tq * d, 99).iter().map(|x| x * 3.0).collect();
    let scale = 1.0 / (d as f32).sqrt();
    let (kd, vd, t1) = history(&s, 0, 1, false);
    let (kf, vf, t2) = history(&s, 0, 1, true);
    assert_eq!((t1, t2), (total, total));
    // 0, 1, the sinks' end, page boundaries and inside pages, the open page, the window, past
    // the first query (it sees nothing), and everything (no query sees anything).
    for start in [0, 1, 2, 3, 6, 9, 18, 19, 20, 21, 22, 23] {
        assert_attends(&s, 1, &q, hq, tq, (&kd, &vd), start, None);
        assert_attends(&s, 1, &q, hq, tq, (&kf, &vf), start, Some(100));
    }
    // Pages wholly before `start` are not read: start=11 skips pages 0 and 1 (positions 2..10).
    let qs = Queries {
        q: &q,
        hq,
        tq,
        scale,
        causal: true,
        start: 11,
    };
    let read = pages_read_cold(&s, || {
        s.attend_dense(0, 0, &qs).unwrap();
    });
    assert_eq!(
        read, 2,
        "only the 2 closed pages at or after start are read"
    );
    // start beyond the stored tokens is an error.
    let qs = Queries { start: 24, ..qs };
    assert!(matches!(s.attend_dense(0, 0, &qs), Err(Error::Config(_))));
    assert!(matches!(
        s.attend_quest(0, 0, &qs, 1, None),
        Err(Error::Config(_))
    ));
    let _ = std::fs::remove_dir_all(c.offload_dir.unwrap());
}

#[test]
fn quest_does_not_pick_pages_before_start() {
    let c = cfg(None, None);
    let s = store(c.clone());
    let (h, d, t) = (c.kv_heads, c.head_dim, 23);
    let mut k = rand(h * t * d, 1);
    let v = rand(h * t * d, 2);
    // Keys of page 0 (positions 2..6) dominate q . k; page 2 (positions 10..14) comes next.
    for hh in 0..h {
        for pos in 2..6 {
            k[(hh * t + pos) * d] = 50.0;
        }
        for pos in 10..14 {
            k[(hh * t + pos) * d] = 20.0;
        }
    }
    s.append(0, 0, &k, &v, t).unwrap();
    let mut q = vec![0f32; h * d];
    for hh in 0..h {
        q[hh * d] = 1.0;
    }
    let qs = Queries {
        q: &q,
        hq: h,
        tq: 1,
        scale: 1.0,
        causal: true,
        start: 6,
    };
    // With page 0 padded away, one page per head must be page 2, which holds the mass.
    let (one, _) = s.attend_quest(0, 0, &qs, 1, None).unwrap();
    let (all, _) = s.attend_quest(0, 0, &qs, 100, None).unwrap();
    assert_close(&one, &all, 1e-3, "budget 1 vs everything");
}

#[test]
fn quest_over_codes_with_every_page_equals_dense_and_reads_only_selected_pages() {
    // No fp16 copies: Quest selects by the abstracts and attends the selected pages' codes.
    let c = StoreConfig {
        keep_full_precision: false,
        window_f16: false,
        abstracts: true,
        ..cfg(None, Some(tmpdir("quest-codes")))
    };
    let s = store(c.clone());
    let (h, d) = (c.kv_heads, c.head_dim);
    fill(&s, 23, 7); // 2 sinks, 4 closed pages + 2 tokens open, 3 in the window
    let (hq, tq) = (2 * h, 2);
    let q: Vec<f32> = rand(hq * tq * d, 99).iter().map(|x| x * 3.0).collect();
    let scale = 1.0 / (d as f32).sqrt();
    for start in [0, 1, 2, 3, 6, 9, 18, 19, 20, 21, 22, 23] {
        let qs = Queries {
            q: &q,
            hq,
            tq,
            scale,
            causal: true,
            start,
        };
        let (od, ld) = s.attend_dense(0, 1, &qs).unwrap();
        let (oq, lq) = s.attend_quest(0, 1, &qs, 100, None).unwrap();
        assert_close(
            &oq,
            &od,
            1e-5,
            &format!("quest-all vs dense out, start={start}"),
        );
        assert_close(
            &lq,
            &ld,
            1e-5,
            &format!("quest-all vs dense lse, start={start}"),
        );
    }
    // A budget of one page reads one page per head from the disk tier, not all four.
    let qs = Queries {
        q: &q,
        hq,
        tq,
        scale,
        causal: true,
        start: 0,
    };
    let mut o1 = Vec::new();
    let read = pages_read_cold(&s, || o1 = s.attend_quest(0, 0, &qs, 1, None).unwrap().0);
    assert!((1..=h as u64).contains(&read), "read {read} pages");
    assert!(o1.iter().all(|x| x.is_finite()));
    let _ = std::fs::remove_dir_all(c.offload_dir.unwrap());
}

/// Everything observable of one sequence: per layer token count, sinks, window, page blobs.
type SeqSnapshot = Vec<(usize, Vec<f32>, Vec<f32>, Vec<Vec<u8>>)>;

fn snapshot(s: &KvStore, seq: usize) -> SeqSnapshot {
    (0..s.config().layers)
        .map(|l| {
            (
                s.num_tokens(seq, l).unwrap(),
                s.full_precision(seq, l, Region::Sinks).unwrap().0,
                s.full_precision(seq, l, Region::Window).unwrap().1,
                (0..s.num_pages(seq, l).unwrap())
                    .map(|p| s.page(seq, l, p).unwrap().blob().to_vec())
                    .collect(),
            )
        })
        .collect()
}

fn attend_all(s: &KvStore, seq: usize) -> Vec<Vec<f32>> {
    let c = s.config();
    let q = rand(c.kv_heads * c.head_dim, 5);
    let qs = Queries {
        q: &q,
        hq: c.kv_heads,
        tq: 1,
        scale: 0.3,
        causal: true,
        start: 0,
    };
    (0..c.layers)
        .flat_map(|l| {
            [
                s.attend_dense(seq, l, &qs).unwrap().0,
                s.attend_quest(seq, l, &qs, 100, None).unwrap().0,
            ]
        })
        .collect()
}

#[test]
fn select_seqs_reorders_repeats_and_shrinks() {
    let mut c = cfg(None, Some(tmpdir("select")));
    c.batch = 2;
    let s = store(c.clone());
    fill_seq(&s, 0, 30, 1);
    fill_seq(&s, 1, 21, 2);
    let old = [snapshot(&s, 0), snapshot(&s, 1)];
    let old_att = [attend_all(&s, 0), attend_all(&s, 1)];
    let pages0 = s.stats().unwrap().pages;
    assert_eq!(s.batch().unwrap(), 2);

    s.select_seqs(&[1, 0]).unwrap();
    assert_eq!(s.batch().unwrap(), 2);
    assert_eq!(snapshot(&s, 0), old[1]);
    assert_eq!(snapshot(&s, 1), old[0]);
    assert_eq!(attend_all(&s, 0), old_att[1]);
    assert_eq!(
        s.stats().unwrap().pages,
        pages0,
        "pages are shared, not copied"
    );

    // Now [seq1, seq0] -> [seq1, seq1, seq0, seq0].
    s.select_seqs(&[0, 0, 1, 1]).unwrap();
    assert_eq!(s.batch().unwrap(), 4);
    for (i, o) in [1, 1, 0, 0].iter().enumerate() {
        assert_eq!(snapshot(&s, i), old[*o], "new sequence {i}");
        assert_eq!(attend_all(&s, i), old_att[*o]);
    }
    assert_eq!(s.stats().unwrap().pages, pages0);
    assert!(matches!(s.num_tokens(4, 0), Err(Error::Config(_))));

    // Appending to one of two sequences sharing pages leaves the other as it was.
    fill_seq(&s, 2, 13, 3);
    assert_eq!(snapshot(&s, 3), old[0]);
    assert_eq!(s.num_tokens(2, 0).unwrap(), 43);
    assert_eq!(snapshot(&s, 2)[0].3[..6], old[0][0].3[..6]);

    // Errors change nothing.
    let before = snapshot(&s, 2);
    assert!(matches!(s.select_seqs(&[]), Err(Error::Config(_))));
    match s.select_seqs(&[0, 4]) {
        Err(Error::Config(msg)) => assert!(msg.contains("batch=4"), "{msg}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(s.batch().unwrap(), 4);
    assert_eq!(snapshot(&s, 2), before);

    // Shrink to the old sequence 1 (twice appended copy of seq 0 dropped): RAM is released.
    s.evict_all().unwrap(); // half of the pages on disk, the rest resident below
    for i in 0..4 {
        for l in 0..2 {
            for p in 0..s.num_pages(i, l).unwrap() / 2 {
                s.page(i, l, p).unwrap();
            }
        }
    }
    let ram0 = s.stats().unwrap();
    s.select_seqs(&[1]).unwrap();
    let ram1 = s.stats().unwrap();
    assert_eq!(s.batch().unwrap(), 1);
    assert_eq!(snapshot(&s, 0), old[1]);
    assert_eq!(attend_all(&s, 0), old_att[1]);
    assert!(ram1.ram_bytes < ram0.ram_bytes, "{ram1:?} vs {ram0:?}");
    assert!(ram1.ram_page_bytes < ram0.ram_page_bytes);
    let live: u64 = (0..2)
        .map(|l| (s.paged_tokens(0, l).unwrap() / c.page_size) as u64)
        .sum();
    assert_eq!(
        ram1.pages, live,
        "only the remaining sequence's closed pages stay live"
    );
    assert!(ram1.pages < pages0);
    // Resident pages all belong to the remaining sequence.
    let st = s.shared.lock().unwrap();
    for id in st.ram.map.keys() {
        assert!(st.pages[*id as usize].refs > 0);
    }
    drop(st);
    let _ = std::fs::remove_dir_all(c.offload_dir.unwrap());
}

#[test]
fn select_seqs_then_save_and_load() {
    let dir = tmpdir("select-save");
    let mut c = cfg(None, None);
    c.batch = 2;
    let s = store(c.clone());
    fill_seq(&s, 0, 30, 1);
    fill_seq(&s, 1, 25, 2);
    s.select_seqs(&[0, 1, 0]).unwrap();
    fill_seq(&s, 2, 5, 9);
    s.save(&dir, b"beam").unwrap();
    // Shared pages are written once.
    let unique = s.stats().unwrap().pages;
    let seg = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "seg"))
        .unwrap();
    assert_eq!(
        std::fs::metadata(&seg).unwrap().len(),
        unique * c.page_bytes() as u64
    );
    let (l, _) = KvStore::load(&dir, &LoadOptions::default()).unwrap();
    assert_eq!(l.batch().unwrap(), 3);
    assert_eq!(l.config().batch, 3);
    assert_eq!(
        l.stats().unwrap().pages,
        unique,
        "sharing survives the round trip"
    );
    for i in 0..3 {
        assert_eq!(snapshot(&l, i), snapshot(&s, i));
        assert_eq!(attend_all(&l, i), attend_all(&s, i));
    }
    // And the loaded store keeps selecting and appending independently.
    l.select_seqs(&[2, 2]).unwrap();
    fill_seq(&l, 0, 9, 4);
    assert_eq!(snapshot(&l, 1), snapshot(&s, 2));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn select_seqs_checks_the_budget_before_changing_anything() {
    let mut c = cfg(None, Some(tmpdir("select-budget")));
    c.ram_budget = Some(c.min_ram_budget() + 64 * 1024);
    let s = store(c.clone());
    fill(&s, 40, 1);
    let before = snapshot(&s, 0);
    assert!(matches!(
        s.select_seqs(&vec![0; 200]),
        Err(Error::Budget(_))
    ));
    assert_eq!(s.batch().unwrap(), 1);
    assert_eq!(snapshot(&s, 0), before);
    s.select_seqs(&[0, 0]).unwrap();
    assert!(s.stats().unwrap().ram_bytes <= c.ram_budget.unwrap());
    let _ = std::fs::remove_dir_all(c.offload_dir.unwrap());
}

#[test]
fn crop_removes_full_precision_tokens_only() {
    let mut c = cfg(None, None);
    c.batch = 2;
    let s = store(c.clone());
    let (h, d) = (c.kv_heads, c.head_dim);
    // Sequence 0: 2 sinks + 3 window, nothing paged; sequence 1: 2 sinks, pages, 3 window.
    fill_seq(&s, 0, 5, 1);
    fill_seq(&s, 1, 20, 2);
    let win1 = s.full_precision(1, 0, Region::Window).unwrap();
    s.crop(1, 0, 2).unwrap();
    assert_eq!(s.num_tokens(1, 0).unwrap(), 18);
    let (k, v, t) = s.full_precision(1, 0, Region::Window).unwrap();
    assert_eq!(t, 1);
    for hh in 0..h {
        assert_eq!(
            &k[hh * d..(hh + 1) * d],
            &win1.0[hh * 3 * d..hh * 3 * d + d]
        );
        assert_eq!(
            &v[hh * d..(hh + 1) * d],
            &win1.1[hh * 3 * d..hh * 3 * d + d]
        );
    }
    assert_eq!(s.num_tokens(1, 1).unwrap(), 20, "other layers untouched");
    // Only the one window token is left: more is refused, naming the maximum and the reason.
    match s.crop(1, 0, 2) {
        Err(Error::Config(msg)) => {
            assert!(
                msg.contains("at most 1") && msg.contains("PQ-coded"),
                "{msg}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.num_tokens(1, 0).unwrap(), 18);
    // Appending after a crop continues at the cropped position.
    let k = rand(h * 2 * d, 3);
    s.append(1, 0, &k, &k, 2).unwrap();
    assert_eq!(s.num_tokens(1, 0).unwrap(), 20);
    assert_eq!(s.full_precision(1, 0, Region::Window).unwrap().2, 3);

    // Nothing paged: the window, then the sinks.
    let sinks0 = s.full_precision(0, 0, Region::Sinks).unwrap();
    s.crop(0, 0, 4).unwrap();
    assert_eq!(s.num_tokens(0, 0).unwrap(), 1);
    assert_eq!(s.full_precision(0, 0, Region::Window).unwrap().2, 0);
    let (k, _, t) = s.full_precision(0, 0, Region::Sinks).unwrap();
    assert_eq!(t, 1);
    for hh in 0..h {
        assert_eq!(
            &k[hh * d..(hh + 1) * d],
            &sinks0.0[hh * 2 * d..hh * 2 * d + d]
        );
    }
    assert!(matches!(s.crop(0, 0, 2), Err(Error::Config(_))));
    s.crop(0, 0, 1).unwrap();
    assert_eq!(s.num_tokens(0, 0).unwrap(), 0);
    // Refilled from scratch, the layout is as for a fresh sequence.
    let k = rand(h * 10 * d, 4);
    s.append(0, 0, &k, &k, 10).unwrap();
    assert_eq!(s.full_precision(0, 0, Region::Sinks).unwrap().2, 2);
    assert_eq!(s.paged_tokens(0, 0).unwrap(), 5);

    // crop_many is all or nothing.
    let n = [s.num_tokens(0, 1).unwrap(), s.num_tokens(1, 1).unwrap()];
    assert!(matches!(
        s.crop_many(&[(0, 1), (1, 1)], 4),
        Err(Error::Config(_))
    ));
    assert_eq!(
        [s.num_tokens(0, 1).unwrap(), s.num_tokens(1, 1).unwrap()],
        n
    );
    s.crop_many(&[(0, 1), (1, 1), (1, 1)], 3).unwrap();
    assert_eq!(
        [s.num_tokens(0, 1).unwrap(), s.num_tokens(1, 1).unwrap()],
        [n[0] - 3, n[1] - 3]
    );
    assert!(matches!(s.crop(2, 0, 0), Err(Error::Config(_))));
}

#[test]
fn dense_attention_over_many_chunks_streams_under_a_budget() {
    use super::attend::CHUNK_PAGES;
    // 2.5 kernel chunks of pages (plus an open page), under a RAM budget of a few chunks' worth
    // of pages so the scan streams from the disk tier: equal to exact attention over the
    // decoded history, with and without left padding that skips whole pages.
    let mut c = cfg(None, Some(tmpdir("chunks")));
    c.layers = 1;
    c.keep_full_precision = false;
    let pages = CHUNK_PAGES * 5 / 2 + 1;
    c.ram_budget = Some(
        c.min_ram_budget()
            + 300 * c.page_bytes() as u64
            + (pages * (c.abstract_bytes() + std::mem::size_of::<PageMeta>())) as u64,
    );
    let s = store(c.clone());
    let (h, d) = (c.kv_heads, c.head_dim);
    let total = c.sinks + (CHUNK_PAGES * 5 / 2) * c.page_size + 2 + c.window;
    fill(&s, total, 31);
    assert!(
        s.stats().unwrap().disk_bytes > 0,
        "the context must spill to disk"
    );
    let (hq, tq) = (2 * h, 1);
    let q: Vec<f32> = rand(hq * tq * d, 5).iter().map(|x| x * 3.0).collect();
    let (kd, vd, n) = history(&s, 0, 0, false);
    assert_eq!(n, total);
    for start in [0, 3, CHUNK_PAGES * c.page_size + 7] {
        assert_attends(&s, 0, &q, hq, tq, (&kd, &vd), start, None);
    }
    let st = s.stats().unwrap();
    assert!(
        st.ram_bytes <= c.ram_budget.unwrap(),
        "{} > budget",
        st.ram_bytes
    );
}

/// `append_attend` (one call for the batch) equals a per-sequence `append` + `attend_dense`,
/// with sequences of different lengths and left padding, from RAM (one snapshot) and with
/// pages on disk (the streaming fallback).
#[test]
fn append_attend_equals_append_then_attend_per_sequence() {
    for on_disk in [false, true] {
        let c = StoreConfig {
            batch: 3,
            ..cfg(None, Some(tmpdir(&format!("append-attend-{on_disk}"))))
        };
        let (h, d) = (c.kv_heads, c.head_dim);
        let (a, b) = (store(c.clone()), store(c.clone()));
        for s in [&a, &b] {
            for seq in 0..3 {
                fill_seq(s, seq, 9 + 7 * seq, 40 + seq as u64);
            }
        }
        if on_disk {
            a.evict_all().unwrap();
        }
        let (hq, tq) = (2 * h, 2);
        let q = rand(3 * hq * tq * d, 5);
        let k = rand(3 * h * tq * d, 6);
        let v = rand(3 * h * tq * d, 7);
        let starts = [0usize, 3, 12];
        let scale = 0.4;
        let step = Step {
            q: &q,
            k: &k,
            v: &v,
            hq,
            tq,
            scale,
            starts: &starts,
        };
        let (out, lse) = a.append_attend(1, &step).unwrap();
        let (qn, kn) = (hq * tq * d, h * tq * d);
        for seq in 0..3 {
            b.append(
                seq,
                1,
                &k[seq * kn..(seq + 1) * kn],
                &v[seq * kn..(seq + 1) * kn],
                tq,
            )
            .unwrap();
            let (o, l) = b
                .attend_dense(
                    seq,
                    1,
                    &Queries {
                        q: &q[seq * qn..(seq + 1) * qn],
                        hq,
                        tq,
                        scale,
                        causal: true,
                        start: starts[seq],
                    },
                )
                .unwrap();
            let what = format!("seq {seq}, on_disk={on_disk}");
            assert_close(&out[seq * qn..(seq + 1) * qn], &o, 1e-5, &what);
            assert_close(&lse[seq * hq * tq..(seq + 1) * hq * tq], &l, 1e-5, &what);
            assert_eq!(a.num_tokens(seq, 1).unwrap(), b.num_tokens(seq, 1).unwrap());
        }
        // Bad input is rejected before anything is appended.
        let n0 = a.num_tokens(0, 1).unwrap();
        let bad = Step {
            starts: &[0, 0],
            ..step
        };
        assert!(matches!(a.append_attend(1, &bad), Err(Error::Shape { .. })));
        let bad = Step {
            starts: &[0, 0, 10_000],
            ..step
        };
        assert!(matches!(a.append_attend(1, &bad), Err(Error::Config(_))));
        let bad = Step {
            q: &q[..q.len() - 1],
            ..step
        };
        assert!(matches!(a.append_attend(1, &bad), Err(Error::Shape { .. })));
        let long = rand(3 * h * 4 * d, 8);
        let bad = Step {
            k: &long,
            v: &long,
            tq: 4, // more than the window of 3
            q: &rand(3 * hq * 4 * d, 9),
            ..step
        };
        assert!(matches!(a.append_attend(1, &bad), Err(Error::Config(_))));
        assert_eq!(a.num_tokens(0, 1).unwrap(), n0);
        let _ = std::fs::remove_dir_all(c.offload_dir.unwrap());
    }
}

#[test]
fn fork_is_independent_and_shares_pages() {
    // Under a RAM budget, so that some shared pages live only on disk.
    for own_dir in [false, true] {
        let mut c = cfg(None, own_dir.then(|| tmpdir("fork")));
        (c.head_dim, c.page_size, c.k_m, c.v_m) = (32, 16, 16, 32);
        c.ram_budget = Some(3 * c.min_ram_budget());
        let a = store(c.clone());
        for step in 0..200 {
            fill(&a, 9, step);
            if a.stats().unwrap().evictions > 2 {
                break;
            }
        }
        assert!(a.stats().unwrap().disk_bytes > 0, "no page was offloaded");
        let before = snapshot(&a, 0);
        let ref_out = attend_all(&a, 0);
        let b = a.fork().unwrap();
        assert_eq!(
            snapshot(&b, 0),
            before,
            "the copy reads what the original holds"
        );
        assert_eq!(attend_all(&b, 0), ref_out);
        // Diverge: different tokens appended to each.
        fill(&a, 40, 1000);
        fill(&b, 40, 2000);
        let (sa, sb) = (snapshot(&a, 0), snapshot(&b, 0));
        assert_ne!(sa, sb);
        // The old pages are the same in both and unchanged.
        for l in 0..c.layers {
            let n = before[l].3.len() - 1; // the open page changes: compare the closed ones
            assert_eq!(sa[l].3[..n], before[l].3[..n]);
            assert_eq!(sb[l].3[..n], before[l].3[..n]);
        }
        // Dropping the original (its offload directory goes) leaves the copy readable.
        drop(a);
        let again = b.fork().unwrap();
        assert_eq!(snapshot(&again, 0), sb);
        assert_eq!(snapshot(&b, 0), sb);
        drop(again);
        assert_eq!(attend_all(&b, 0).len(), 2 * c.layers);
        if let Some(d) = c.offload_dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shared-context pieces (parts.rs): export_books / export_sinks / export_tail / export_pages,
// KvStore::assemble and KvStore::truncate_to_pages.
// ---------------------------------------------------------------------------------------------
mod parts_tests {
    use super::*;

    /// Three layers, 2 sinks, window 3, pages of 4 tokens.
    fn pcfg() -> StoreConfig {
        StoreConfig {
            layers: 3,
            ..cfg(None, None)
        }
    }

    /// Keys and values of `t` tokens for every layer, each Layout `(H, t, D)`.
    fn tokens(c: &StoreConfig, t: usize, seed: u64) -> Vec<(Vec<f32>, Vec<f32>)> {
        (0..c.layers)
            .map(|l| {
                let n = c.kv_heads * t * c.head_dim;
                (
                    rand(n, seed + 7 * l as u64),
                    rand(n, seed + 1000 + 7 * l as u64),
                )
            })
            .collect()
    }

    /// Tokens `a..b` of `x` Layout `(H, t, D)`, as Layout `(H, b - a, D)`.
    fn span(c: &StoreConfig, x: &[f32], t: usize, a: usize, b: usize) -> Vec<f32> {
        let d = c.head_dim;
        (0..c.kv_heads)
            .flat_map(|h| x[(h * t + a) * d..(h * t + b) * d].iter().copied())
            .collect()
    }

    /// Append tokens `a..b` of `kv` (each `t` tokens long) to every layer of sequence 0.
    fn feed(s: &KvStore, kv: &[(Vec<f32>, Vec<f32>)], t: usize, a: usize, b: usize) {
        let c = s.config().clone();
        for (l, (k, v)) in kv.iter().enumerate() {
            s.append(0, l, &span(&c, k, t, a, b), &span(&c, v, t, a, b), b - a)
                .unwrap();
        }
    }

    /// Every piece of sequence 0: books, sinks, tail and all closed pages per layer.
    struct Pieces {
        books: Option<Vec<u8>>,
        sinks: Vec<u8>,
        tail: Vec<u8>,
        pages: Vec<Vec<Vec<u8>>>,
    }

    fn closed_pages(s: &KvStore, layer: usize) -> usize {
        s.paged_tokens(0, layer).unwrap() / s.config().page_size
    }

    fn pieces(s: &KvStore) -> Pieces {
        Pieces {
            books: s.export_books().unwrap(),
            sinks: s.export_sinks(0).unwrap(),
            tail: s.export_tail(0).unwrap(),
            pages: (0..s.config().layers)
                .map(|l| {
                    let idxs: Vec<usize> = (0..closed_pages(s, l)).collect();
                    s.export_pages(0, l, &idxs).unwrap()
                })
                .collect(),
        }
    }

    /// The first `n[l]` pages of every layer `l`, as the slices `assemble` takes.
    fn first(pages: &[Vec<Vec<u8>>], n: impl Fn(usize) -> usize) -> Vec<Vec<&[u8]>> {
        pages
            .iter()
            .enumerate()
            .map(|(l, p)| p[..n(l)].iter().map(|x| &x[..]).collect())
            .collect()
    }

    fn all(pages: &[Vec<Vec<u8>>]) -> Vec<Vec<&[u8]>> {
        first(pages, |l| pages[l].len())
    }

    /// `assemble` that must fail: its error, with a panic reported as a test failure.
    fn assemble_err(
        c: &StoreConfig,
        books: Option<&[u8]>,
        sinks: Option<&[u8]>,
        pages: &[Vec<&[u8]>],
        tail: Option<&[u8]>,
        what: &str,
    ) -> Error {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            KvStore::assemble(c.clone(), books, sinks, pages, tail)
        }));
        match r {
            Err(_) => panic!("{what}: assemble panicked"),
            Ok(Ok(_)) => panic!("{what}: assemble accepted it"),
            Ok(Err(e)) => e,
        }
    }

    fn assert_corrupt(e: Error, what: &str) {
        assert!(matches!(e, Error::Corrupt { .. }), "{what}: {e:?}");
    }

    /// Recompute the trailing CRC-32 of a piece (to get past the checksum to later checks).
    fn reseal(p: &mut [u8]) {
        let n = p.len() - 4;
        let crc = crc32fast::hash(&p[..n]);
        p[n..].copy_from_slice(&crc.to_le_bytes());
    }

    /// Dense and Quest attention (output and log-sum-exp) of every layer of sequence 0 for one
    /// fixed, non-causal, grouped query of two tokens.
    fn attention(s: &KvStore) -> Vec<Attended> {
        let c = s.config();
        let (hq, tq) = (2 * c.kv_heads, 2);
        let q: Vec<f32> = rand(hq * tq * c.head_dim, 77)
            .iter()
            .map(|x| x * 2.0)
            .collect();
        let qs = Queries {
            q: &q,
            hq,
            tq,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
            causal: false,
            start: 0,
        };
        (0..c.layers)
            .flat_map(|l| {
                [
                    s.attend_dense(0, l, &qs).unwrap(),
                    s.attend_quest(0, l, &qs, 2, None).unwrap(),
                ]
            })
            .collect()
    }

    /// Per layer: token count, pages (with the open one), paged tokens, abstracts.
    type Counts = Vec<(usize, usize, usize, (Vec<f32>, usize))>;

    fn counts(s: &KvStore) -> Counts {
        (0..s.config().layers)
            .map(|l| {
                (
                    s.num_tokens(0, l).unwrap(),
                    s.num_pages(0, l).unwrap(),
                    s.paged_tokens(0, l).unwrap(),
                    s.abstracts(0, l).unwrap(),
                )
            })
            .collect()
    }

    /// A store of `pcfg()` with 5 closed pages, an open page of 2 tokens and a full window in
    /// layers 0 and 1, and one more closed page in layer 2 (27 and 31 tokens).
    fn source() -> KvStore {
        let c = pcfg();
        let s = store(c.clone());
        fill(&s, 27, 11);
        let (h, d) = (c.kv_heads, c.head_dim);
        s.append(0, 2, &rand(h * 4 * d, 12), &rand(h * 4 * d, 13), 4)
            .unwrap();
        for l in 0..2 {
            assert_eq!(closed_pages(&s, l), 5);
            assert_eq!(s.num_pages(0, l).unwrap(), 6, "5 closed + the open page");
            assert_eq!(s.full_precision(0, l, Region::Window).unwrap().2, c.window);
        }
        assert_eq!(closed_pages(&s, 2), 6);
        s
    }

    #[test]
    fn pending_pages_are_typed_errors_until_filled_then_equal_the_given_ones() {
        let c = pcfg();
        let s = source();
        let p = pieces(&s);
        let n: Vec<usize> = p.pages.iter().map(|l| l.len()).collect();
        assert!(n.iter().all(|&k| k > 1));
        let empty: Vec<Vec<&[u8]>> = (0..c.layers).map(|_| Vec::new()).collect();
        let a = KvStore::assemble_pending(
            c.clone(),
            p.books.as_deref(),
            None,
            &empty,
            &n,
            Some(&p.tail),
        )
        .unwrap();
        for l in 0..c.layers {
            assert_eq!(a.num_tokens(0, l).unwrap(), s.num_tokens(0, l).unwrap());
            assert_eq!(a.num_pages(0, l).unwrap(), s.num_pages(0, l).unwrap());
        }
        assert_eq!(a.stats().unwrap().ram_page_bytes, 0);
        // Nothing reads a page that is not here: typed errors, never a panic or a zero page.
        let ids: Vec<Vec<u32>> = (0..c.layers).map(|l| a.pending_pages(l).unwrap()).collect();
        assert!(ids.iter().zip(&n).all(|(i, &k)| i.len() == k));
        for r in [
            a.page(0, 0, 0).map(|_| ()),
            a.abstracts(0, 0).map(|_| ()),
            a.export_pages(0, 0, &[0]).map(|_| ()),
            a.save(&std::env::temp_dir().join("ctxcore-pending-never"), b"")
                .map(|_| ()),
        ] {
            assert!(
                matches!(r, Err(Error::Config(ref m)) if m.contains("not fetched")),
                "{r:?}"
            );
        }
        // A damaged piece, or a count mismatch, installs nothing.
        let mut bad = p.pages[0][1].clone();
        bad[20] ^= 1;
        let pieces0: Vec<&[u8]> = p.pages[0].iter().map(|x| &x[..]).collect();
        let mut with_bad = pieces0.clone();
        with_bad[1] = &bad;
        assert!(matches!(
            a.fill_pages(&ids[0], &with_bad),
            Err(Error::Corrupt { .. })
        ));
        assert!(matches!(
            a.fill_pages(&ids[0], &pieces0[1..]),
            Err(Error::Config(_))
        ));
        assert_eq!(a.pending_pages(0).unwrap(), ids[0]);
        // Filled (one layer, then the rest; a second fill is skipped), the store is the source.
        a.fill_pages(&ids[0], &pieces0).unwrap();
        assert!(a.pending_pages(0).unwrap().is_empty());
        assert_eq!(a.pending_pages(1).unwrap(), ids[1]);
        a.fill_pages(&ids[0], &pieces0).unwrap();
        for (li, pl) in ids.iter().zip(&p.pages).skip(1) {
            let pl: Vec<&[u8]> = pl.iter().map(|x| &x[..]).collect();
            a.fill_pages(li, &pl).unwrap();
        }
        assert_eq!(counts(&a), counts(&s));
        assert_eq!(snapshot(&a, 0), snapshot(&s, 0));
        assert_eq!(attention(&a), attention(&s));
        assert_eq!(pieces(&a).pages, p.pages);
    }

    #[test]
    fn parts_round_trip_with_tail_rebuilds_the_store() {
        let c = pcfg();
        let s = source();
        let p = pieces(&s);
        assert!(p.books.is_some());
        let a = KvStore::assemble(
            c.clone(),
            p.books.as_deref(),
            None,
            &all(&p.pages),
            Some(&p.tail),
        )
        .unwrap();
        assert_eq!(counts(&a), counts(&s));
        // Token counts, sinks, window and every page blob (the open one included) are equal.
        assert_eq!(snapshot(&a, 0), snapshot(&s, 0));
        for l in 0..c.layers {
            for which in [Region::Sinks, Region::Window] {
                assert_eq!(
                    a.full_precision(0, l, which).unwrap(),
                    s.full_precision(0, l, which).unwrap()
                );
            }
            let (ka, va) = a.codebooks(l).unwrap().unwrap();
            let (ks, vs) = s.codebooks(l).unwrap().unwrap();
            for (x, y) in ka.iter().chain(&va).zip(ks.iter().chain(&vs)) {
                assert_eq!(x.to_bytes(), y.to_bytes(), "codebooks of layer {l}");
            }
        }
        assert_eq!(a.stats().unwrap().pages, s.stats().unwrap().pages);
        // Same attention, bit for bit.
        assert_eq!(attention(&a), attention(&s));
        // Re-exporting gives the same bytes: pieces are content-addressable.
        let q = pieces(&a);
        assert_eq!(q.books, p.books);
        assert_eq!(q.sinks, p.sinks);
        assert_eq!(q.tail, p.tail);
        assert_eq!(q.pages, p.pages);
        // Both continue identically: the open page's codes and key statistics survived.
        fill(&a, 9, 21);
        fill(&s, 9, 21);
        assert_eq!(counts(&a), counts(&s));
        assert_eq!(snapshot(&a, 0), snapshot(&s, 0));
        assert_eq!(attention(&a), attention(&s));
    }

    #[test]
    fn parts_round_trip_of_short_contexts_without_pages() {
        // Fewer tokens than sinks + window: no codebooks needed, no pages, no books piece.
        let c = pcfg();
        let s = KvStore::new(c.clone()).unwrap();
        assert_eq!(s.export_books().unwrap(), None);
        fill(&s, 4, 3);
        let p = pieces(&s);
        assert!(p.pages.iter().all(|l| l.is_empty()));
        let a = KvStore::assemble(c.clone(), None, None, &all(&p.pages), Some(&p.tail)).unwrap();
        assert_eq!(counts(&a), counts(&s));
        assert_eq!(snapshot(&a, 0), snapshot(&s, 0));
        assert_eq!(attention(&a), attention(&s));
        // Sequence and page indices out of range are Config errors.
        assert!(matches!(s.export_tail(1), Err(Error::Config(_))));
        assert!(matches!(s.export_sinks(1), Err(Error::Config(_))));
        assert!(matches!(s.export_pages(0, 0, &[0]), Err(Error::Config(_))));
        assert!(matches!(s.export_pages(0, 3, &[]), Err(Error::Config(_))));
    }

    #[test]
    fn parts_prefix_without_tail_equals_truncated_fork() {
        let c = pcfg();
        let s = source();
        let before = snapshot(&s, 0);
        let att = attention(&s);
        let p = pieces(&s);
        for j in 0..=5 {
            let a = KvStore::assemble(
                c.clone(),
                p.books.as_deref(),
                Some(&p.sinks),
                &first(&p.pages, |_| j),
                None,
            )
            .unwrap();
            for (l, (_, _, _, blobs)) in before.iter().enumerate() {
                assert_eq!(a.num_tokens(0, l).unwrap(), c.sinks + j * c.page_size);
                assert_eq!(a.num_pages(0, l).unwrap(), j);
                assert_eq!(a.full_precision(0, l, Region::Window).unwrap().2, 0);
                for (i, blob) in blobs[..j].iter().enumerate() {
                    assert_eq!(a.page(0, l, i).unwrap().blob(), &blob[..]);
                }
            }
            let f = s.fork().unwrap();
            f.truncate_to_pages(j).unwrap();
            assert_eq!(counts(&a), counts(&f), "prefix of {j} pages");
            assert_eq!(snapshot(&a, 0), snapshot(&f, 0), "prefix of {j} pages");
            assert_eq!(attention(&a), attention(&f), "prefix of {j} pages");
            // The prefix is exported as the same pieces again (a tail naming j pages now).
            assert_eq!(pieces(&a).pages, pieces(&f).pages);
            assert_eq!(a.export_tail(0).unwrap(), f.export_tail(0).unwrap());
        }
        // Truncating the forks left the original as it was.
        assert_eq!(snapshot(&s, 0), before);
        assert_eq!(attention(&s), att);
        // A sinks-only prefix needs no codebooks; pages without codebooks are refused.
        let a = KvStore::assemble(
            c.clone(),
            None,
            Some(&p.sinks),
            &first(&p.pages, |_| 0),
            None,
        )
        .unwrap();
        assert_eq!(a.num_tokens(0, 0).unwrap(), c.sinks);
        let e = assemble_err(
            &c,
            None,
            Some(&p.sinks),
            &first(&p.pages, |_| 1),
            None,
            "pages without books",
        );
        assert!(
            matches!(&e, Error::Corrupt { what, .. } if what == "codebooks"),
            "{e:?}"
        );
    }

    #[test]
    fn parts_flipped_bytes_are_corrupt_and_never_panic() {
        let c = pcfg();
        let s = source();
        let p = pieces(&s);
        let books = p.books.clone().unwrap();
        let pages = all(&p.pages);
        // Flip every byte of a page piece, of the tail and of the sinks piece, and a spread of
        // bytes of the (larger) books piece.
        let expect = |i: usize, e: Error, what: &str| {
            if (8..12).contains(&i) {
                assert!(
                    matches!(
                        e,
                        Error::Version {
                            supported: PARTS_FORMAT_VERSION,
                            ..
                        }
                    ),
                    "{what}, byte {i}: {e:?}"
                );
            } else {
                assert_corrupt(e, &format!("{what}, byte {i}"));
            }
        };
        let page = p.pages[1][2].clone();
        for i in 0..page.len() {
            let mut bad = page.clone();
            bad[i] ^= 0x5a;
            let mut pg = pages.clone();
            pg[1][2] = &bad;
            let e = assemble_err(&c, Some(&books), None, &pg, Some(&p.tail), "page");
            expect(i, e, "page");
        }
        for i in 0..p.tail.len() {
            let mut bad = p.tail.clone();
            bad[i] ^= 0x01;
            let e = assemble_err(&c, Some(&books), None, &pages, Some(&bad), "tail");
            expect(i, e, "tail");
        }
        for i in 0..p.sinks.len() {
            let mut bad = p.sinks.clone();
            bad[i] ^= 0x80;
            let pg = first(&p.pages, |_| 3);
            let e = assemble_err(&c, Some(&books), Some(&bad), &pg, None, "sinks");
            expect(i, e, "sinks");
        }
        let stride = (books.len() / 400).max(1);
        for i in (0..books.len())
            .step_by(stride)
            .chain(books.len() - 8..books.len())
        {
            let mut bad = books.clone();
            bad[i] ^= 0xff;
            let e = assemble_err(&c, Some(&bad), None, &pages, Some(&p.tail), "books");
            expect(i, e, "books");
        }
    }

    #[test]
    fn parts_wrong_version_truncated_and_misplaced_pieces() {
        let c = pcfg();
        let s = source();
        let p = pieces(&s);
        let books = p.books.clone().unwrap();
        let pages = all(&p.pages);
        let page = p.pages[0][0].clone();
        // Which piece to replace, in an otherwise valid call (books + tail + pages, or for the
        // sinks piece books + sinks + pages).
        let call = |kind: &str, piece: &[u8]| -> Error {
            let mut pg = pages.clone();
            let (mut b, mut t, mut sk): (&[u8], Option<&[u8]>, Option<&[u8]>) =
                (&books[..], Some(&p.tail[..]), None);
            match kind {
                "books" => b = piece,
                "tail" => t = Some(piece),
                "sinks" => (t, sk) = (None, Some(piece)),
                "page" => pg[0][0] = piece,
                _ => unreachable!(),
            }
            assemble_err(&c, Some(b), sk, &pg, t, kind)
        };
        let all_kinds: [(&str, &Vec<u8>); 4] = [
            ("books", &books),
            ("tail", &p.tail),
            ("sinks", &p.sinks),
            ("page", &page),
        ];
        for (kind, piece) in all_kinds {
            // A version this build does not read, with and without a valid checksum.
            for resealed in [false, true] {
                let mut bad = piece.clone();
                bad[8..12].copy_from_slice(&(PARTS_FORMAT_VERSION + 1).to_le_bytes());
                if resealed {
                    reseal(&mut bad);
                }
                match call(kind, &bad) {
                    Error::Version {
                        found, supported, ..
                    } => assert_eq!(
                        (found, supported),
                        (PARTS_FORMAT_VERSION + 1, PARTS_FORMAT_VERSION)
                    ),
                    e => panic!("{kind}: {e:?}"),
                }
            }
            // Truncated pieces.
            for n in [
                0,
                1,
                10,
                12,
                15,
                16,
                17,
                piece.len() / 2,
                piece.len() - 4,
                piece.len() - 1,
            ] {
                assert_corrupt(call(kind, &piece[..n]), &format!("{kind} cut to {n} bytes"));
            }
            // Trailing garbage, with the checksum made valid again: still refused.
            let mut long = piece.clone();
            long.splice(piece.len() - 4..piece.len() - 4, [0u8; 8]);
            reseal(&mut long);
            assert_corrupt(call(kind, &long), &format!("{kind} with trailing bytes"));
            // Another kind of piece in its place: bad magic.
            for (other, o) in all_kinds {
                if other != kind {
                    let e = call(kind, o);
                    assert!(
                        matches!(&e, Error::Corrupt { detail, .. } if detail.contains("magic")),
                        "{other} given as {kind}: {e:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn parts_resealed_mutations_never_panic() {
        // Past the checksum (a piece rewritten with a valid CRC), every single-byte change to a
        // length, count or size field must still be an error, never a panic or an internal
        // error; a change to the data itself may be accepted, and the store must then work.
        let c = pcfg();
        let s = source();
        let p = pieces(&s);
        let books = p.books.clone().unwrap();
        let pages = all(&p.pages);
        let page = p.pages[2][5].clone();
        let check = |what: String, r: std::thread::Result<Result<KvStore>>| match r {
            Err(_) => panic!("{what}: assemble panicked"),
            Ok(Err(Error::Internal(m))) => panic!("{what}: internal error {m}"),
            Ok(Err(_)) => {}
            Ok(Ok(a)) => {
                // Accepted: then its counts are consistent (sinks + paged + window).
                for l in 0..a.config().layers {
                    let ns = a.full_precision(0, l, Region::Sinks).unwrap().2;
                    let nw = a.full_precision(0, l, Region::Window).unwrap().2;
                    let np = a.paged_tokens(0, l).unwrap();
                    assert_eq!(
                        a.num_tokens(0, l).unwrap(),
                        ns + np + nw,
                        "{what}: layer {l} accepted with inconsistent counts"
                    );
                    assert!(ns <= c.sinks && nw <= c.window, "{what}: layer {l}");
                }
                // Errors are allowed here (e.g. a non-finite value), panics are not.
                let used = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let cf = a.config().clone();
                    let (h, d) = (cf.kv_heads, cf.head_dim);
                    let q = rand(2 * h * d, 3);
                    let qs = Queries {
                        q: &q,
                        hq: 2 * h,
                        tq: 1,
                        scale: 0.3,
                        causal: true,
                        start: 0,
                    };
                    for l in 0..cf.layers {
                        for i in 0..a.num_pages(0, l).unwrap_or(0) {
                            let _ = a.page(0, l, i);
                        }
                        let _ = a.abstracts(0, l);
                        let _ = a.attend_dense(0, l, &qs);
                        let _ = a.attend_quest(0, l, &qs, 2, None);
                        let _ = a.append(0, l, &rand(h * 9 * d, 1), &rand(h * 9 * d, 2), 9);
                        let _ = a.attend_quest(0, l, &qs, 2, None);
                    }
                    let _ = a.export_tail(0);
                }));
                assert!(used.is_ok(), "{what}: the accepted store panicked in use");
            }
        };
        for i in 12..page.len() - 4 {
            let mut bad = page.clone();
            bad[i] ^= 0xff;
            reseal(&mut bad);
            let mut pg = pages.clone();
            pg[2][5] = &bad;
            check(
                format!("page byte {i}"),
                std::panic::catch_unwind(|| {
                    KvStore::assemble(c.clone(), Some(&books), None, &pg, Some(&p.tail))
                }),
            );
        }
        for i in 12..p.tail.len() - 4 {
            let mut bad = p.tail.clone();
            bad[i] ^= 0xff;
            reseal(&mut bad);
            check(
                format!("tail byte {i}"),
                std::panic::catch_unwind(|| {
                    KvStore::assemble(c.clone(), Some(&books), None, &pages, Some(&bad))
                }),
            );
        }
        for i in 12..p.sinks.len() - 4 {
            let mut bad = p.sinks.clone();
            bad[i] ^= 0xff;
            reseal(&mut bad);
            let pg = first(&p.pages, |_| 2);
            check(
                format!("sinks byte {i}"),
                std::panic::catch_unwind(|| {
                    KvStore::assemble(c.clone(), Some(&books), Some(&bad), &pg, None)
                }),
            );
        }
        // The books piece: its header and each quantizer's header (the first bytes of every
        // length-prefixed entry), plus a spread of centroid bytes.
        let stride = (books.len() / 300).max(1);
        for i in (12..60).chain((60..books.len() - 4).step_by(stride)) {
            let mut bad = books.clone();
            bad[i] ^= 0xff;
            reseal(&mut bad);
            check(
                format!("books byte {i}"),
                std::panic::catch_unwind(|| {
                    KvStore::assemble(c.clone(), Some(&bad), None, &pages, Some(&p.tail))
                }),
            );
        }
    }

    #[test]
    fn parts_mismatched_pieces_are_rejected() {
        let c = pcfg();
        let s = source();
        let p = pieces(&s);
        let books = p.books.clone().unwrap();
        let pages = all(&p.pages);
        // A tail whose page count disagrees with the pages given: one fewer, one more.
        let fewer = first(&p.pages, |l| p.pages[l].len() - usize::from(l == 1));
        let e = assemble_err(&c, Some(&books), None, &fewer, Some(&p.tail), "fewer");
        assert!(
            matches!(&e, Error::Corrupt { what, detail } if what == "tail" && detail.contains("layer 1")),
            "{e:?}"
        );
        let mut more = pages.clone();
        more[0].push(&p.pages[0][0]);
        assert_corrupt(
            assemble_err(&c, Some(&books), None, &more, Some(&p.tail), "more"),
            "one page more than the tail counts",
        );
        // A tail with a valid checksum whose token count disagrees with what it holds.
        let mut bad = p.tail.clone();
        let n0 = u64::from_le_bytes(bad[20..28].try_into().unwrap());
        assert_eq!(
            n0,
            s.num_tokens(0, 0).unwrap() as u64,
            "layer 0's token count"
        );
        bad[20..28].copy_from_slice(&(n0 + 1).to_le_bytes());
        reseal(&mut bad);
        let e = assemble_err(&c, Some(&books), None, &pages, Some(&bad), "n_tokens");
        assert!(
            matches!(&e, Error::Corrupt { what, detail } if what == "tail" && detail.contains("tokens")),
            "{e:?}"
        );
        // Page pieces of a store with another page size.
        let c8 = StoreConfig {
            page_size: 8,
            ..pcfg()
        };
        let o = store(c8.clone());
        fill(&o, 27, 11);
        let op = pieces(&o);
        assert_ne!(c8.page_bytes(), c.page_bytes());
        let mut pg = pages.clone();
        pg[0][0] = &op.pages[0][0];
        let e = assemble_err(
            &c,
            Some(&books),
            None,
            &pg,
            Some(&p.tail),
            "page size, tail",
        );
        assert!(
            matches!(&e, Error::Corrupt { detail, .. } if detail.contains("wrong size")),
            "{e:?}"
        );
        let e = assemble_err(
            &c,
            Some(&books),
            Some(&p.sinks),
            &first(&op.pages, |_| 2),
            None,
            "page size, sinks",
        );
        assert!(
            matches!(&e, Error::Corrupt { detail, .. } if detail.contains("wrong size")),
            "{e:?}"
        );
        // The tail of the page-8 store (its counts are of pages of 8 tokens) with our pages.
        assert_corrupt(
            assemble_err(
                &c,
                Some(&books),
                None,
                &first(&p.pages, |_| 2),
                Some(&op.tail),
                "tail 8",
            ),
            "tail of another page size",
        );
        // No tail and no sinks.
        assert!(matches!(
            assemble_err(&c, Some(&books), None, &pages, None, "neither"),
            Error::Config(_)
        ));
        // Pages for another number of layers; a batch other than 1.
        assert!(matches!(
            assemble_err(&c, Some(&books), None, &pages[..2], Some(&p.tail), "layers"),
            Error::Config(_)
        ));
        let c2 = StoreConfig { batch: 2, ..pcfg() };
        assert!(matches!(
            assemble_err(&c2, Some(&books), None, &pages, Some(&p.tail), "batch"),
            Error::Config(_)
        ));
        // Pieces of a store with another number of layers.
        let c4 = StoreConfig {
            layers: 4,
            ..pcfg()
        };
        let four = store(c4.clone());
        fill(&four, 27, 11);
        let fp = pieces(&four);
        let e = assemble_err(
            &c,
            fp.books.as_deref(),
            None,
            &pages,
            Some(&p.tail),
            "books 4",
        );
        assert!(matches!(e, Error::Mismatch { .. }), "{e:?}");
        for (what, t, sk) in [
            ("tail of 4 layers", Some(&fp.tail[..]), None),
            ("sinks of 4 layers", None, Some(&fp.sinks[..])),
        ] {
            let pg = if t.is_some() {
                pages.clone()
            } else {
                first(&p.pages, |_| 1)
            };
            assert_corrupt(assemble_err(&c, Some(&books), sk, &pg, t, what), what);
        }
        // Codebooks of another code size (k_m = 2): refused as corrupt codebooks.
        let cm = StoreConfig { k_m: 2, ..pcfg() };
        let m2 = store(cm);
        let e = assemble_err(
            &c,
            m2.export_books().unwrap().as_deref(),
            None,
            &pages,
            Some(&p.tail),
            "k_m",
        );
        assert!(
            matches!(&e, Error::Corrupt { what, .. } if what == "codebooks"),
            "{e:?}"
        );
        // A tail for a configuration with a smaller window or fewer sinks.
        for small in [
            StoreConfig {
                window: 2,
                ..pcfg()
            },
            StoreConfig { sinks: 1, ..pcfg() },
        ] {
            assert_corrupt(
                assemble_err(&small, Some(&books), None, &pages, Some(&p.tail), "small"),
                &format!("window={}, sinks={}", small.window, small.sinks),
            );
        }
    }

    #[test]
    fn truncate_to_pages_keeps_a_page_aligned_prefix() {
        let c = pcfg();
        let (h, d, ps) = (c.kv_heads, c.head_dim, c.page_size);
        let kv = tokens(&c, 27, 5);
        let s = store(c.clone());
        feed(&s, &kv, 27, 0, 27);
        let orig = snapshot(&s, 0);
        let f = s.fork().unwrap();
        // More pages than held: a Config error, nothing changed.
        let st0 = f.stats().unwrap();
        match f.truncate_to_pages(6) {
            Err(Error::Config(m)) => assert!(m.contains("5 closed pages"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(f.stats().unwrap(), st0);
        assert_eq!(snapshot(&f, 0), orig);
        // Keep 2 of 5 pages: the window, the open page and 3 pages per layer go.
        f.truncate_to_pages(2).unwrap();
        let kept = snapshot(&f, 0);
        for (l, (o, k)) in orig.iter().zip(&kept).enumerate() {
            assert_eq!(f.num_tokens(0, l).unwrap(), c.sinks + 2 * ps);
            assert_eq!(f.num_pages(0, l).unwrap(), 2);
            assert_eq!(f.paged_tokens(0, l).unwrap(), 2 * ps);
            assert_eq!(f.full_precision(0, l, Region::Window).unwrap().2, 0);
            assert_eq!(f.abstracts(0, l).unwrap().1, 2);
            assert_eq!(k.1, o.1, "sinks kept");
            assert_eq!(k.3[..], o.3[..2], "first pages kept");
        }
        let st1 = f.stats().unwrap();
        assert_eq!(st1.pages, 2 * c.layers as u64);
        assert_eq!(
            st1.ram_page_bytes,
            st0.ram_page_bytes - (3 * c.layers * c.page_bytes()) as u64
        );
        assert!(st1.ram_bytes < st0.ram_bytes);
        assert_eq!(snapshot(&s, 0), orig, "the original is untouched");
        assert_eq!(s.stats().unwrap().pages, 5 * c.layers as u64);
        // Appending continues at position sinks + 2 pages and closes new pages: exactly as a
        // store that was only ever given those 10 tokens and then the new ones.
        let new = tokens(&c, 9, 99);
        feed(&f, &new, 9, 0, 9);
        let fresh = store(c.clone());
        feed(&fresh, &kv, 27, 0, c.sinks + 2 * ps);
        feed(&fresh, &new, 9, 0, 9);
        for l in 0..c.layers {
            assert_eq!(f.num_tokens(0, l).unwrap(), 19);
            assert_eq!(closed_pages(&f, l), 3, "a new page closed");
            assert_eq!(f.num_pages(0, l).unwrap(), 4);
        }
        assert_eq!(snapshot(&f, 0), snapshot(&fresh, 0));
        assert_eq!(counts(&f), counts(&fresh));
        assert_eq!(attention(&f), attention(&fresh));
        assert_eq!(f.stats().unwrap().pages, 3 * c.layers as u64);
        // To the sinks alone, then refilled.
        f.truncate_to_pages(0).unwrap();
        assert_eq!(f.num_tokens(0, 0).unwrap(), c.sinks);
        assert_eq!(f.stats().unwrap().ram_page_bytes, 0);
        assert_eq!(f.stats().unwrap().pages, 0);
        f.append(0, 0, &rand(h * 9 * d, 1), &rand(h * 9 * d, 2), 9)
            .unwrap();
        assert_eq!(f.num_tokens(0, 0).unwrap(), c.sinks + 9);
        assert_eq!(closed_pages(&f, 0), 1);
        // Pages shared between sequences (select_seqs): dropped from RAM only when no
        // sequence keeps them.
        let b = s.fork().unwrap();
        b.select_seqs(&[0, 0]).unwrap();
        let ram0 = b.stats().unwrap().ram_page_bytes;
        b.truncate_to_pages(4).unwrap();
        let st = b.stats().unwrap();
        assert_eq!(st.pages, 4 * c.layers as u64);
        assert_eq!(ram0 - st.ram_page_bytes, (c.layers * c.page_bytes()) as u64);
        for seq in 0..2 {
            for (l, (_, _, _, blobs)) in orig.iter().enumerate() {
                assert_eq!(b.num_tokens(seq, l).unwrap(), c.sinks + 4 * ps);
                for (i, blob) in blobs[..4].iter().enumerate() {
                    assert_eq!(b.page(seq, l, i).unwrap().blob(), &blob[..]);
                }
            }
        }
    }

    #[test]
    fn parts_assemble_under_a_small_ram_budget_spills_to_disk() {
        let c = pcfg();
        let s = store(c.clone());
        fill(&s, c.sinks + 12 * c.page_size + 1 + c.window, 8);
        let p = pieces(&s);
        let n_pages: usize = p.pages.iter().map(|l| l.len()).sum();
        assert_eq!(n_pages, 12 * c.layers);
        // Room for the fixed part, every page's abstract and metadata, and 3 page blobs.
        let dir = tmpdir("assemble-budget");
        let budget = c.min_ram_budget()
            + (3 * c.page_bytes()) as u64
            + (n_pages * (c.abstract_bytes() + std::mem::size_of::<PageMeta>())) as u64;
        assert!(budget < c.min_ram_budget() + (n_pages * c.page_bytes()) as u64);
        let cb = StoreConfig {
            ram_budget: Some(budget),
            offload_dir: Some(dir.clone()),
            ..c.clone()
        };
        let a = KvStore::assemble(
            cb.clone(),
            p.books.as_deref(),
            None,
            &all(&p.pages),
            Some(&p.tail),
        )
        .unwrap();
        let st = a.stats().unwrap();
        assert!(st.disk_bytes > 0 && st.evictions > 0, "{st:?}");
        assert!(st.ram_bytes <= budget, "{} > {budget}", st.ram_bytes);
        assert!(st.ram_page_bytes < (n_pages * c.page_bytes()) as u64);
        assert_eq!(st.pages, n_pages as u64);
        // Pages read back from disk are the same blobs; attention is the same.
        assert_eq!(snapshot(&a, 0), snapshot(&s, 0));
        assert_eq!(attention(&a), attention(&s));
        assert!(a.stats().unwrap().misses > 0);
        assert!(a.stats().unwrap().ram_bytes <= budget);
        // Exporting from the spilled store gives the same pieces again.
        let q = pieces(&a);
        assert_eq!(q.pages, p.pages);
        assert_eq!(q.tail, p.tail);
        // A budget that cannot hold even the abstracts of every page is a Budget error.
        let tight = StoreConfig {
            ram_budget: Some(c.min_ram_budget()),
            ..cb
        };
        let e = assemble_err(
            &tight,
            p.books.as_deref(),
            None,
            &all(&p.pages),
            Some(&p.tail),
            "tight",
        );
        assert!(matches!(e, Error::Budget(_)), "{e:?}");
        drop(a);
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn codebook_bytes_are_what_the_books_hold() {
    // The figure memory_stats reports for codebooks is the RAM they take (the quantizers'
    // centroids, norms and scalar midpoints), for 8-bit vector and 4-bit scalar codes.
    for (k_m, k_nbits, v_m, v_nbits) in [(4, 8, 8, 4), (4, 4, 8, 4), (2, 8, 2, 8), (8, 8, 8, 8)] {
        let c = StoreConfig {
            k_m,
            k_nbits,
            v_m,
            v_nbits,
            ..cfg(None, None)
        };
        let s = store(c.clone());
        let st = s.shared.lock().unwrap();
        let held: usize = st
            .books
            .iter()
            .flatten()
            .map(|b| {
                b.k.iter()
                    .chain(&b.v)
                    .map(|q| q.held_bytes())
                    .sum::<usize>()
            })
            .sum();
        assert_eq!(
            held,
            c.codebook_bytes(),
            "k {k_m}x{k_nbits}, v {v_m}x{v_nbits}"
        );
    }
}

#[test]
fn pages_read_in_parallel_equal_single_reads_and_check_every_checksum() {
    let dir = tmpdir("pages-par");
    let c = cfg(None, None);
    let s = store(c.clone());
    fill(&s, 2 + 4 * 150 + 2 + 3, 9); // sinks, 150 closed pages, an open page of 2, window
    s.save(&dir, b"").unwrap();
    let np = s.num_pages(0, 1).unwrap();
    assert_eq!(np, 151);
    let all: Vec<usize> = (0..np).rev().collect(); // any order, the open page included
    let (l, _) = KvStore::load(&dir, &LoadOptions::default()).unwrap();
    let before = l.stats().unwrap();
    let got = l.pages(0, 1, &all).unwrap();
    assert_eq!(
        l.stats().unwrap().misses - before.misses,
        150,
        "each page read once"
    );
    for (&p, v) in all.iter().zip(&got) {
        let want = s.page(0, 1, p).unwrap();
        assert_eq!((v.blob(), v.tokens), (want.blob(), want.tokens), "page {p}");
    }
    // Twice the same page, and again from RAM.
    let twice = l.pages(0, 1, &[5, 5, 150, 150]).unwrap();
    assert_eq!(twice[0].blob(), twice[1].blob());
    assert_eq!(twice[3].tokens, 2);
    assert!(matches!(l.pages(0, 1, &[152]), Err(Error::Config(_))));
    drop(l);
    // A flipped byte in one of many pages read in parallel: a Corrupt error, not a page.
    let seg = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "seg"))
        .unwrap();
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[c.page_bytes() * 200 + 5] ^= 0x10;
    std::fs::write(&seg, &bytes).unwrap();
    let (l, _) = KvStore::load(&dir, &LoadOptions::default()).unwrap();
    let e = (0..2)
        .map(|layer| l.pages(0, layer, &(0..150).collect::<Vec<_>>()))
        .find_map(|r| r.err());
    assert!(matches!(e, Some(Error::Corrupt { .. })), "{e:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn quest_exact_fallback_widens_to_dense_only_where_the_bound_says_so() {
    let c = StoreConfig {
        keep_full_precision: false,
        ..cfg(None, None)
    };
    let s = store(c.clone());
    let (h, d) = (c.kv_heads, c.head_dim);
    fill(&s, 2 + 4 * 12 + 3, 8); // 2 sinks, 12 closed pages, 3 in the window
    let (hq, tq) = (2 * h, 1);
    let q: Vec<f32> = rand(hq * tq * d, 5).iter().map(|x| x * 3.0).collect();
    let scale = 1.0 / (d as f32).sqrt();
    for start in [0, 9] {
        let qs = Queries {
            q: &q,
            hq,
            tq,
            scale,
            causal: true,
            start,
        };
        let (od, ld) = s.attend_dense(0, 1, &qs).unwrap();
        let plain = s.attend_quest(0, 1, &qs, 1, None).unwrap();
        // tau = 0: any page left out could hold some attention, so every head goes dense.
        let f0 = s.stats().unwrap().fallbacks;
        let (o0, l0) = s.attend_quest(0, 1, &qs, 1, Some(0.0)).unwrap();
        assert_eq!(s.stats().unwrap().fallbacks - f0, h as u64, "start={start}");
        assert_close(
            &o0,
            &od,
            1e-5,
            &format!("fallback vs dense out, start={start}"),
        );
        assert_close(
            &l0,
            &ld,
            1e-5,
            &format!("fallback vs dense lse, start={start}"),
        );
        assert!(
            plain.1.iter().zip(&ld).any(|(a, b)| a < b),
            "one page misses mass"
        );
        // tau near 1: the bound never exceeds it, nothing changes.
        let f1 = s.stats().unwrap().fallbacks;
        let near = s.attend_quest(0, 1, &qs, 1, Some(0.999_999)).unwrap();
        assert_eq!(s.stats().unwrap().fallbacks, f1);
        assert_eq!(near, plain);
        // Every page selected: nothing to fall back to.
        let _ = s.attend_quest(0, 1, &qs, 100, Some(0.0)).unwrap();
        assert_eq!(s.stats().unwrap().fallbacks, f1);
    }
    let qs = Queries {
        q: &q,
        hq,
        tq,
        scale,
        causal: true,
        start: 0,
    };
    for bad in [-0.1, 1.0, f32::NAN] {
        let e = s.attend_quest(0, 1, &qs, 1, Some(bad)).unwrap_err();
        assert!(e.to_string().contains("fallback"), "{e}");
    }
    let fp = store(cfg(None, None));
    fill(&fp, 30, 1);
    let e = fp.attend_quest(0, 1, &qs, 1, Some(0.5)).unwrap_err();
    assert!(e.to_string().contains("keep_full_precision"), "{e}");
}

#[test]
fn repeated_scans_larger_than_ram_still_hit_and_smaller_ones_all_hit() {
    let dir = tmpdir("scan");
    let probe = store(cfg(None, None));
    fill(&probe, 2 + 4 * 60 + 3, 4); // 60 closed pages per layer, 2 layers
    probe.evict_all().unwrap();
    let fixed = probe.stats().unwrap().ram_bytes;
    let pb = probe.config().page_bytes() as u64;
    drop(probe);
    // RAM for 40 pages; a scan of both layers' 120 pages per "step" (3x the tier).
    let s = store(cfg(Some(fixed + 40 * pb), Some(dir.clone())));
    fill(&s, 2 + 4 * 60 + 3, 4);
    let scan = |s: &KvStore| {
        for layer in 0..2 {
            s.pages(0, layer, &(0..60).collect::<Vec<_>>()).unwrap();
        }
    };
    scan(&s);
    let before = s.stats().unwrap();
    scan(&s);
    scan(&s);
    let after = s.stats().unwrap();
    let hits = after.hits - before.hits;
    // Plain LRU hits nothing on such a loop; with 7 in 8 read-backs not kept when RAM is full,
    // about a third of the tier survives each pass.
    assert!(hits >= 2 * 8, "hits {hits} of 240 page reads");
    assert!(after.ram_bytes <= fixed + 40 * pb);
    // A loop that fits (30 of the 40 pages of RAM, half of them not resident now) becomes
    // resident, 1 in 8 of its misses at a time: after 40 passes, (almost) every read hits.
    let few: Vec<usize> = (0..15).collect();
    for _ in 0..40 {
        s.pages(0, 0, &few).unwrap();
        s.pages(0, 1, &few).unwrap();
    }
    let b = s.stats().unwrap();
    s.pages(0, 0, &few).unwrap();
    s.pages(0, 1, &few).unwrap();
    let a = s.stats().unwrap();
    assert!(
        a.misses - b.misses <= 3,
        "{} of 30 missed",
        a.misses - b.misses
    );
    assert_eq!(a.hits - b.hits + a.misses - b.misses, 30);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `x` rounded to float16 and back.
fn round16(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect()
}

#[test]
fn float16_window_holds_half_the_bytes_and_rounds_what_it_holds() {
    let c32 = StoreConfig {
        keep_full_precision: false,
        ..cfg(None, None)
    };
    let c16 = StoreConfig {
        window_f16: true,
        abstracts: true,
        ..c32.clone()
    };
    let (s32, s16) = (store(c32.clone()), store(c16.clone()));
    let (h, d, t) = (c16.kv_heads, c16.head_dim, 13);
    let k = rand(h * t * d, 1);
    let v = rand(h * t * d, 2);
    s32.append(0, 0, &k, &v, t).unwrap();
    s16.append(0, 0, &k, &v, t).unwrap();
    // The window holds the float16 rounding of the last tokens; the sinks stay exact.
    let (wk, wv, nw) = s16.full_precision(0, 0, Region::Window).unwrap();
    let (ek, ev, _) = s32.full_precision(0, 0, Region::Window).unwrap();
    assert_eq!(nw, c16.window);
    assert_eq!(wk, round16(&ek));
    assert_eq!(wv, round16(&ev));
    assert_ne!(wk, ek, "random values are not all float16-exact");
    assert_eq!(
        s16.full_precision(0, 0, Region::Sinks).unwrap(),
        s32.full_precision(0, 0, Region::Sinks).unwrap()
    );
    // Fixed bytes: the window counts 2 bytes a value instead of 4.
    let (b32, b16) = (s32.stats().unwrap(), s16.stats().unwrap());
    assert_eq!(
        b32.ram_bytes - b16.ram_bytes,
        (c16.window * h * d * 2 * 2) as u64
    );
    assert_eq!(
        c32.min_ram_budget() - c16.min_ram_budget(),
        (c16.layers * c16.batch * c16.window * h * d * 2 * 2) as u64
    );
}

#[test]
fn float16_window_pages_do_not_depend_on_how_appends_are_split() {
    // Tokens pass through the window's dtype before they are encoded, whether they leave the
    // window later (one token at a time) or skip it (one long append).
    let c = StoreConfig {
        window_f16: true,
        abstracts: true,
        keep_full_precision: false,
        ..cfg(None, None)
    };
    let (a, b) = (store(c.clone()), store(c.clone()));
    let (h, d, t) = (c.kv_heads, c.head_dim, 23);
    let k = rand(h * t * d, 3);
    let v = rand(h * t * d, 4);
    a.append(0, 0, &k, &v, t).unwrap();
    let tok = |x: &[f32], i: usize| -> Vec<f32> {
        (0..h)
            .flat_map(|hh| x[(hh * t + i) * d..(hh * t + i + 1) * d].to_vec())
            .collect()
    };
    for i in 0..t {
        b.append(0, 0, &tok(&k, i), &tok(&v, i), 1).unwrap();
    }
    assert_eq!(a.num_pages(0, 0).unwrap(), b.num_pages(0, 0).unwrap());
    for p in 0..a.num_pages(0, 0).unwrap() {
        assert_eq!(
            a.page(0, 0, p).unwrap().blob(),
            b.page(0, 0, p).unwrap().blob(),
            "page {p}"
        );
    }
    assert_eq!(
        a.full_precision(0, 0, Region::Window).unwrap(),
        b.full_precision(0, 0, Region::Window).unwrap()
    );
}

#[test]
fn float16_window_rejects_values_beyond_its_range_and_survives_save_load() {
    let dir = tmpdir("window16");
    let c = StoreConfig {
        window_f16: true,
        abstracts: true,
        ..cfg(None, None)
    };
    let s = store(c.clone());
    let (h, d) = (c.kv_heads, c.head_dim);
    fill(&s, 11, 7);
    let before = s.full_precision(0, 0, Region::Window).unwrap();
    let mut k = rand(h * 2 * d, 8);
    k[5] = 1.0e5;
    let e = s.append(0, 0, &k, &rand(h * 2 * d, 9), 2).unwrap_err();
    assert!(matches!(e, Error::Config(_)), "{e}");
    assert!(e.to_string().contains("window_dtype"), "{e}");
    assert_eq!(s.num_tokens(0, 0).unwrap(), 11, "nothing appended");
    assert_eq!(s.full_precision(0, 0, Region::Window).unwrap(), before);
    // Saved and loaded: the same window, still float16, still appending the same pages.
    s.save(&dir, b"").unwrap();
    let (l, _) = KvStore::load(&dir, &LoadOptions::default()).unwrap();
    assert!(l.config().window_f16);
    assert_eq!(l.full_precision(0, 0, Region::Window).unwrap(), before);
    fill(&l, 9, 10);
    fill(&s, 9, 10);
    for p in 0..s.num_pages(0, 0).unwrap() {
        assert_eq!(
            l.page(0, 0, p).unwrap().blob(),
            s.page(0, 0, p).unwrap().blob()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
