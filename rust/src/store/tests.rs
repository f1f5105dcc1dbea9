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
