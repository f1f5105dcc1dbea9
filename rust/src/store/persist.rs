//! Saving and loading a [`KvStore`] (a "context") to a directory.
//!
//! ```text
//! DIR/meta.ctxkv         metadata: magic b"CTXCKV\0\0", format version (u32 LE), configuration,
//!                        model id, codebooks, page tables, abstracts, sinks, windows, open pages,
//!                        caller metadata; CRC-32 of everything before it (u32 LE) at the end
//! DIR/pages-GEN.seg      closed page blobs, back to back, each once (page-table entries of
//!                        sequences sharing a page name the same slot); each page's CRC-32 is in
//!                        the metadata
//! ```
//!
//! `save` writes the segment and `meta.ctxkv.tmp`, fsyncs both, renames the metadata into place
//! (atomic), fsyncs the directory, then removes segments of earlier generations: a crash at any
//! point leaves the previous save readable. `load` verifies the metadata eagerly and each page
//! lazily, when it is first read.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

use super::disk::{read_at, DiskTier, Slot};
use super::{KvStore, LayerBooks, LayerState, OpenPage, PageMeta, RamTier, State, StoreConfig};
use crate::error::{Error, Result};
use crate::pq::ProductQuantizer;

/// Version of the on-disk context format. Version 2 added the window's dtype (bit 1 of the
/// flags byte after the code widths); version 1 files (float32 windows) still load.
pub const STORE_FORMAT_VERSION: u32 = 2;
const MAGIC: &[u8; 8] = b"CTXCKV\0\0";
const META: &str = "meta.ctxkv";

#[derive(Default)]
pub(super) struct W(pub(super) Vec<u8>);

impl W {
    pub(super) fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub(super) fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(super) fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(super) fn bytes(&mut self, b: &[u8]) {
        self.u64(b.len() as u64);
        self.0.extend_from_slice(b);
    }
    pub(super) fn f32s(&mut self, v: &[f32]) {
        self.u64(v.len() as u64);
        for x in v {
            self.0.extend_from_slice(&x.to_le_bytes());
        }
    }
    pub(super) fn f64s(&mut self, v: &[f64]) {
        self.u64(v.len() as u64);
        for x in v {
            self.0.extend_from_slice(&x.to_le_bytes());
        }
    }
}

pub(super) struct R<'a> {
    pub(super) b: &'a [u8],
    pub(super) pos: usize,
    pub(super) file: String,
}

impl<'a> R<'a> {
    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.b.len() - self.pos {
            return Err(Error::corrupt(
                self.file.clone(),
                format!("truncated metadata at byte {}", self.pos),
            ));
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    pub(super) fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    pub(super) fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    pub(super) fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    pub(super) fn usize(&mut self) -> Result<usize> {
        usize::try_from(self.u64()?)
            .map_err(|_| Error::corrupt(self.file.clone(), "size out of range"))
    }
    pub(super) fn len(&mut self, elem: usize) -> Result<usize> {
        let n = self.usize()?;
        if n.checked_mul(elem)
            .is_none_or(|t| t > self.b.len() - self.pos)
        {
            return Err(Error::corrupt(
                self.file.clone(),
                format!("array of {n} elements overruns the file"),
            ));
        }
        Ok(n)
    }
    pub(super) fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.len(1)?;
        self.take(n)
    }
    pub(super) fn f32s(&mut self) -> Result<Vec<f32>> {
        let n = self.len(4)?;
        Ok(self
            .take(4 * n)?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4")))
            .collect())
    }
    pub(super) fn f64s(&mut self) -> Result<Vec<f64>> {
        let n = self.len(8)?;
        Ok(self
            .take(8 * n)?
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8")))
            .collect())
    }
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { context, source }
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(format!("syncing directory {}", dir.display())))
}

/// Sinks, window and open page of a layer (its state outside closed pages), in the order the
/// saved-context metadata and the shared-store tail piece ([`super::parts`]) both keep them.
pub(super) fn write_fp_part(w: &mut W, l: &LayerState) {
    w.f32s(&l.sinks_k);
    w.f32s(&l.sinks_v);
    w.u64(l.window.len() as u64);
    // Window values as float32 whatever the window's dtype (exact for float16 ones).
    for (k, v) in &l.window {
        w.f32s(&k.to_f32());
        w.f32s(&v.to_f32());
    }
    match &l.open {
        None => w.u8(0),
        Some(o) => {
            w.u8(1);
            w.u64(o.filled as u64);
            w.bytes(&o.blob);
            w.f32s(&o.kmin);
            w.f32s(&o.kmax);
            w.f64s(&o.ksum);
        }
    }
}

/// Read what [`write_fp_part`] wrote into `ls`, checking every size against `cfg`.
pub(super) fn read_fp_part(r: &mut R, cfg: &StoreConfig, ls: &mut LayerState) -> Result<()> {
    let hd = cfg.kv_heads * cfg.head_dim;
    ls.sinks_k = r.f32s()?;
    ls.sinks_v = r.f32s()?;
    let nw = r.len(16)?;
    for _ in 0..nw {
        let (k, v) = (r.f32s()?, r.f32s()?);
        if k.len() != hd || v.len() != hd {
            return Err(Error::corrupt(
                r.file.clone(),
                "window token of the wrong size",
            ));
        }
        let row = |x: &[f32]| super::Row::new(x, cfg.window_f16);
        ls.window.push_back((row(&k)?, row(&v)?));
    }
    ls.open = None;
    if r.u8()? == 1 {
        let filled = r.usize()?;
        let blob = r.bytes()?.to_vec();
        let (kmin, kmax, ksum) = (r.f32s()?, r.f32s()?, r.f64s()?);
        // Running key statistics only where pages keep abstracts.
        let stats = if cfg.abstracts { hd } else { 0 };
        if blob.len() != cfg.page_bytes()
            || filled >= cfg.page_size
            || kmin.len() != stats
            || kmax.len() != stats
            || ksum.len() != stats
        {
            return Err(Error::corrupt(
                r.file.clone(),
                "open page of the wrong size",
            ));
        }
        ls.open = Some(OpenPage {
            blob,
            filled,
            kmin,
            kmax,
            ksum,
        });
    }
    Ok(())
}

impl KvStore {
    /// Save everything needed to answer new questions later without a new prefill.
    /// `extra` is caller metadata stored verbatim (e.g. token ids and chunk hashes).
    pub fn save(&self, dir: &Path, extra: &[u8]) -> Result<()> {
        let sh = &self.shared;
        let cfg = &sh.cfg;
        std::fs::create_dir_all(dir)
            .map_err(io(format!("creating context directory {}", dir.display())))?;
        let st = sh.lock()?;
        for (s, seq) in st.seqs.iter().enumerate() {
            for (li, l) in seq.iter().enumerate() {
                st.check_fetched(l, s, li)?;
            }
        }
        let gen = format!(
            "{:016x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        );
        let seg_name = format!("pages-{gen}.seg");
        let seg_path = dir.join(&seg_name);
        let tmp_seg = dir.join(format!("{seg_name}.tmp"));
        let mut seg = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp_seg)
            .map_err(io(format!(
                "creating {} (is the directory writable?)",
                tmp_seg.display()
            )))?;
        // Pages in page-table order, each once (sequences may share pages after select_seqs);
        // the new slot of every page id.
        let mut slot_of = vec![u32::MAX; st.pages.len()];
        let mut next = 0u32;
        let page_bytes = cfg.page_bytes();
        let result = (|| -> Result<()> {
            for seq in &st.seqs {
                for l in seq {
                    for &id in &l.pages {
                        if slot_of[id as usize] != u32::MAX {
                            continue; // shared page, already written
                        }
                        let blob: Vec<u8> = match st.ram.map.get(&id) {
                            Some((b, _)) => b.to_vec(),
                            None => {
                                let slot = st.pages[id as usize].disk.ok_or_else(|| {
                                    Error::Internal(format!("page {id} has no copy"))
                                })?;
                                let (f, off, path) = st.disk.reader(slot)?;
                                let b = read_at(&f, off, page_bytes, &path, id as u64)?;
                                if crc32fast::hash(&b) != st.pages[id as usize].crc {
                                    return Err(Error::corrupt(
                                        format!("page {id} in {}", path.display()),
                                        "checksum mismatch while saving",
                                    ));
                                }
                                b
                            }
                        };
                        seg.write_all(&blob)
                            .map_err(io(format!("writing {}", tmp_seg.display())))?;
                        slot_of[id as usize] = next;
                        next += 1;
                    }
                }
            }
            seg.sync_all()
                .map_err(io(format!("syncing {}", tmp_seg.display())))?;
            Ok(())
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp_seg);
            return Err(e);
        }
        drop(seg);

        let mut w = W::default();
        w.0.extend_from_slice(MAGIC);
        w.u32(STORE_FORMAT_VERSION);
        for v in [
            cfg.layers,
            cfg.kv_heads,
            cfg.head_dim,
            cfg.page_size,
            cfg.window,
            cfg.sinks,
            cfg.k_m,
            cfg.v_m,
            st.seqs.len(),
        ] {
            w.u64(v as u64);
        }
        w.u32(cfg.k_nbits);
        w.u32(cfg.v_nbits);
        w.u8(cfg.keep_full_precision as u8
            | (cfg.window_f16 as u8) << 1
            | (!cfg.abstracts as u8) << 2);
        w.bytes(cfg.model_id.as_bytes());
        w.bytes(seg_name.as_bytes());
        w.u32(next);
        for b in &st.books {
            match b {
                None => w.u8(0),
                Some(b) => {
                    w.u8(1);
                    for pq in b.k.iter().chain(b.v.iter()) {
                        w.bytes(&pq.to_bytes());
                    }
                }
            }
        }
        for seq in &st.seqs {
            for l in seq {
                w.u64(l.n_tokens as u64);
                write_fp_part(&mut w, l);
                w.u64(l.pages.len() as u64);
                for &id in &l.pages {
                    let m = &st.pages[id as usize];
                    w.u32(slot_of[id as usize]);
                    w.u32(m.crc);
                    w.bytes(&m.abstract_);
                }
            }
        }
        w.bytes(extra);
        let crc = crc32fast::hash(&w.0);
        w.u32(crc);
        drop(st);

        let meta_tmp = dir.join(format!("{META}.tmp"));
        let write_meta = || -> Result<()> {
            let mut f =
                File::create(&meta_tmp).map_err(io(format!("creating {}", meta_tmp.display())))?;
            f.write_all(&w.0)
                .map_err(io(format!("writing {}", meta_tmp.display())))?;
            f.sync_all()
                .map_err(io(format!("syncing {}", meta_tmp.display())))?;
            std::fs::rename(&tmp_seg, &seg_path)
                .map_err(io(format!("renaming {}", tmp_seg.display())))?;
            std::fs::rename(&meta_tmp, dir.join(META))
                .map_err(io(format!("renaming {}", meta_tmp.display())))?;
            fsync_dir(dir)
        };
        if let Err(e) = write_meta() {
            let _ = std::fs::remove_file(&meta_tmp);
            let _ = std::fs::remove_file(&tmp_seg);
            return Err(e);
        }
        // Older generations are garbage now (a live store reading one keeps its open handle).
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if name.starts_with("pages-") && name.ends_with(".seg") && name != seg_name {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(())
    }

    /// Load a context saved by [`KvStore::save`], with this process's RAM budget and disk tier
    /// from `opts`. Returns the store and the caller metadata.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<(KvStore, Vec<u8>)> {
        let meta_path = dir.join(META);
        let file = meta_path.display().to_string();
        let b = std::fs::read(&meta_path).map_err(io(format!("reading saved context {file}")))?;
        if b.len() < MAGIC.len() + 8 || &b[..8] != MAGIC {
            return Err(Error::corrupt(
                file,
                "bad magic: not a ctxcore saved context",
            ));
        }
        let version = u32::from_le_bytes(b[8..12].try_into().expect("4"));
        if !(1..=STORE_FORMAT_VERSION).contains(&version) {
            return Err(Error::Version {
                what: file,
                found: version,
                supported: STORE_FORMAT_VERSION,
            });
        }
        let body = &b[..b.len() - 4];
        let stored = u32::from_le_bytes(b[b.len() - 4..].try_into().expect("4"));
        let actual = crc32fast::hash(body);
        if stored != actual {
            return Err(Error::corrupt(
                file,
                format!("checksum mismatch (stored {stored:#010x}, computed {actual:#010x})"),
            ));
        }
        let mut r = R {
            b: body,
            pos: 12,
            file: file.clone(),
        };
        let mut u = [0usize; 9];
        for x in u.iter_mut() {
            *x = r.usize()?;
        }
        let [layers, kv_heads, head_dim, page_size, window, sinks, k_m, v_m, batch] = u;
        let (k_nbits, v_nbits) = (r.u32()?, r.u32()?);
        let flags = r.u8()?;
        if flags > 7 || (version == 1 && flags > 1) {
            return Err(Error::corrupt(
                file,
                format!("unknown flags byte {flags:#04x}"),
            ));
        }
        let (keep, window_f16, abstracts) = (flags & 1 != 0, flags & 2 != 0, flags & 4 == 0);
        let model_id = String::from_utf8_lossy(r.bytes()?).to_string();
        let cfg = StoreConfig {
            layers,
            kv_heads,
            head_dim,
            page_size,
            window,
            sinks,
            k_m,
            k_nbits,
            v_m,
            v_nbits,
            keep_full_precision: keep,
            window_f16,
            abstracts,
            batch,
            ram_budget: opts.ram_budget,
            offload_dir: opts.offload_dir.clone(),
            max_disk_bytes: opts.max_disk_bytes,
            model_id,
        };
        cfg.validate()?;
        let seg_name = String::from_utf8_lossy(r.bytes()?).to_string();
        let slots = r.u32()?;
        let mut disk = DiskTier::new(
            cfg.offload_dir.as_deref(),
            cfg.page_bytes(),
            cfg.max_disk_bytes,
        )?;
        let seg_path = dir.join(&seg_name);
        if seg_name.contains('/') || !seg_path.exists() {
            return Err(Error::corrupt(
                file.clone(),
                format!(
                    "missing segment file {} referenced by the metadata",
                    seg_path.display()
                ),
            ));
        }
        let seg = disk.add_readonly(&seg_path, slots)?;
        let (h, d) = (cfg.kv_heads, cfg.head_dim);
        let mut books = Vec::with_capacity(layers);
        for _ in 0..layers {
            if r.u8()? == 0 {
                books.push(None);
                continue;
            }
            let mut qs = Vec::with_capacity(2 * h);
            for _ in 0..2 * h {
                qs.push(ProductQuantizer::from_bytes(r.bytes()?)?);
            }
            let v = qs.split_off(h);
            books.push(Some(LayerBooks::new(qs, v)));
        }
        let mut pages: Vec<PageMeta> = Vec::new();
        // Page-table entries naming the same slot are one shared page (see `select_seqs`).
        let mut id_of_slot: HashMap<u32, u32> = HashMap::new();
        let mut seqs = Vec::with_capacity(batch);
        for _ in 0..batch {
            let mut ls_all = Vec::with_capacity(layers);
            for _ in 0..layers {
                let mut ls = LayerState {
                    n_tokens: r.usize()?,
                    ..Default::default()
                };
                read_fp_part(&mut r, &cfg, &mut ls)?;
                let np = r.len(16)?;
                for _ in 0..np {
                    let slot = r.u32()?;
                    let crc = r.u32()?;
                    let abs: Box<[u8]> = r.bytes()?.into();
                    if slot >= slots || abs.len() != cfg.abstract_bytes() {
                        return Err(Error::corrupt(
                            file.clone(),
                            format!("page table entry out of range (slot {slot})"),
                        ));
                    }
                    if let Some(&id) = id_of_slot.get(&slot) {
                        let m = &mut pages[id as usize];
                        if m.crc != crc || m.abstract_ != abs {
                            return Err(Error::corrupt(
                                file.clone(),
                                format!("page table entries for slot {slot} disagree"),
                            ));
                        }
                        m.refs = m.refs.saturating_add(1);
                        ls.pages.push(id);
                        continue;
                    }
                    let id = pages.len() as u32;
                    id_of_slot.insert(slot, id);
                    ls.pages.push(id);
                    pages.push(PageMeta {
                        refs: 1,
                        crc,
                        disk: Some(Slot { segment: seg, slot }),
                        abstract_: abs,
                        pending: false,
                    });
                }
                let expect = ls.sinks_k.len() / (h * d)
                    + ls.window.len()
                    + ls.pages.len() * page_size
                    + ls.open.as_ref().map_or(0, |o| o.filled);
                if expect != ls.n_tokens || ls.sinks_k.len() != ls.sinks_v.len() {
                    return Err(Error::corrupt(
                        file.clone(),
                        "page table does not add up to the token count",
                    ));
                }
                ls_all.push(ls);
            }
            seqs.push(ls_all);
        }
        let extra = r.bytes()?.to_vec();
        if r.pos != body.len() {
            return Err(Error::corrupt(file, "trailing bytes after the metadata"));
        }
        let state = State {
            books,
            seqs,
            live: pages.len(),
            pages,
            ram: RamTier::default(),
            disk,
            inflight: Default::default(),
        };
        let store = KvStore::from_parts(cfg, state);
        {
            let mut st = store.shared.lock()?;
            store.shared.enforce_budget(&mut st)?;
        }
        Ok((store, extra))
    }
}

/// Runtime settings of a loaded context (everything else comes from the saved metadata).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadOptions {
    /// Byte budget of everything held in RAM; `None` = unbounded.
    pub ram_budget: Option<u64>,
    /// Directory for pages evicted later; a private temporary directory when `None`.
    pub offload_dir: Option<std::path::PathBuf>,
    /// Cap on disk-tier bytes.
    pub max_disk_bytes: Option<u64>,
}

/// Check a loaded context against what the caller expects, naming both sides on mismatch.
pub fn check_compatible(saved: &StoreConfig, current: &StoreConfig) -> Result<()> {
    let pairs: [(&str, String, String); 4] = [
        ("model", saved.model_id.clone(), current.model_id.clone()),
        (
            "layers",
            saved.layers.to_string(),
            current.layers.to_string(),
        ),
        (
            "kv_heads",
            saved.kv_heads.to_string(),
            current.kv_heads.to_string(),
        ),
        (
            "head_dim",
            saved.head_dim.to_string(),
            current.head_dim.to_string(),
        ),
    ];
    for (what, s, c) in pairs {
        if s != c {
            return Err(Error::Mismatch {
                what: what.into(),
                saved: format!("{what}={s}"),
                current: format!("{what}={c}"),
            });
        }
    }
    Ok(())
}
