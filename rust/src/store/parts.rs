//! A one-sequence context split into self-checking pieces, for content-addressed shared stores
//! (`ctxcore.shared` keeps them in Redis).
//!
//! ```text
//! books  b"CTXCBOOK"  the codebooks of every layer: the identity of the codes in every page
//! page   b"CTXCPAGE"  one closed page of one layer: its blob and its quantized abstract
//! sinks  b"CTXCSINK"  the leading sink tokens of every layer (float32)
//! tail   b"CTXCTAIL"  per layer: token and closed-page counts, sinks, window, open page
//! ```
//!
//! Every piece is its 8-byte magic, the format version (u32 LE), its body and the CRC-32 of all
//! that (u32 LE), so each is verified on its own wherever it was kept. A closed page depends
//! only on the tokens up to its end and on the codebooks that coded it, which is what makes
//! pages shareable between contexts with a common prefix. [`KvStore::assemble`] rebuilds a
//! store from pieces, checking every one before the store exists.

use super::persist::{read_fp_part, write_fp_part, R, W};
use super::{KvStore, LayerState, StoreConfig};
use crate::error::{Error, Result};
use crate::pq::ProductQuantizer;

/// Version of the piece formats.
pub const PARTS_FORMAT_VERSION: u32 = 1;
const BOOKS: &[u8; 8] = b"CTXCBOOK";
const PAGE: &[u8; 8] = b"CTXCPAGE";
const SINKS: &[u8; 8] = b"CTXCSINK";
const TAIL: &[u8; 8] = b"CTXCTAIL";

fn begin(magic: &[u8; 8]) -> W {
    let mut w = W::default();
    w.0.extend_from_slice(magic);
    w.u32(PARTS_FORMAT_VERSION);
    w
}

fn finish(mut w: W) -> Vec<u8> {
    let crc = crc32fast::hash(&w.0);
    w.u32(crc);
    w.0
}

/// Verify magic, version and checksum of the piece `what`; a reader over its body.
fn open<'a>(b: &'a [u8], magic: &[u8; 8], what: &str) -> Result<R<'a>> {
    if b.len() < 16 || &b[..8] != magic {
        return Err(Error::corrupt(
            what,
            format!(
                "bad magic: not a ctxcore {} piece",
                String::from_utf8_lossy(&magic[4..]).trim_end_matches('\0')
            ),
        ));
    }
    let version = u32::from_le_bytes(b[8..12].try_into().expect("4"));
    if version != PARTS_FORMAT_VERSION {
        return Err(Error::Version {
            what: what.to_string(),
            found: version,
            supported: PARTS_FORMAT_VERSION,
        });
    }
    let body = &b[..b.len() - 4];
    let stored = u32::from_le_bytes(b[b.len() - 4..].try_into().expect("4"));
    let actual = crc32fast::hash(body);
    if stored != actual {
        return Err(Error::corrupt(
            what,
            format!("checksum mismatch (stored {stored:#010x}, computed {actual:#010x})"),
        ));
    }
    Ok(R {
        b: body,
        pos: 12,
        file: what.to_string(),
    })
}

fn done(r: &R) -> Result<()> {
    if r.pos != r.b.len() {
        return Err(Error::corrupt(r.file.clone(), "trailing bytes"));
    }
    Ok(())
}

/// Per layer of a tail piece: its closed-page count and its state without the pages.
fn read_tail(b: &[u8], cfg: &StoreConfig) -> Result<Vec<(usize, LayerState)>> {
    let mut r = open(b, TAIL, "tail")?;
    let layers = r.usize()?;
    if layers != cfg.layers {
        return Err(Error::corrupt(
            "tail",
            format!("{layers} layers, the store has {}", cfg.layers),
        ));
    }
    let mut out = Vec::with_capacity(layers);
    for _ in 0..layers {
        let mut ls = LayerState {
            n_tokens: r.usize()?,
            ..Default::default()
        };
        let n_pages = r.usize()?;
        read_fp_part(&mut r, cfg, &mut ls)?;
        out.push((n_pages, ls));
    }
    done(&r)?;
    Ok(out)
}

fn read_sinks(b: &[u8], cfg: &StoreConfig) -> Result<Vec<(Vec<f32>, Vec<f32>)>> {
    let mut r = open(b, SINKS, "sinks")?;
    let layers = r.usize()?;
    if layers != cfg.layers {
        return Err(Error::corrupt(
            "sinks",
            format!("{layers} layers, the store has {}", cfg.layers),
        ));
    }
    let out = (0..layers)
        .map(|_| Ok((r.f32s()?, r.f32s()?)))
        .collect::<Result<Vec<_>>>()?;
    done(&r)?;
    Ok(out)
}

type Books = Vec<Option<(Vec<ProductQuantizer>, Vec<ProductQuantizer>)>>;

fn read_books(b: &[u8], cfg: &StoreConfig) -> Result<Books> {
    let mut r = open(b, BOOKS, "codebooks")?;
    let (layers, heads) = (r.usize()?, r.usize()?);
    if layers != cfg.layers || heads != cfg.kv_heads {
        return Err(Error::Mismatch {
            what: "codebooks".into(),
            saved: format!("layers={layers}, kv_heads={heads}"),
            current: format!("layers={}, kv_heads={}", cfg.layers, cfg.kv_heads),
        });
    }
    let mut out = Vec::with_capacity(layers);
    for _ in 0..layers {
        if r.u8()? == 0 {
            out.push(None);
            continue;
        }
        let mut k = (0..2 * heads)
            .map(|_| ProductQuantizer::from_bytes(r.bytes()?))
            .collect::<Result<Vec<_>>>()?;
        let v = k.split_off(heads);
        out.push(Some((k, v)));
    }
    done(&r)?;
    Ok(out)
}

/// Blob and abstract of a `page` piece, verified against `cfg`.
fn read_page(piece: &[u8], cfg: &StoreConfig, what: &str) -> Result<(Vec<u8>, Box<[u8]>)> {
    let mut r = open(piece, PAGE, what)?;
    let blob = r.bytes()?.to_vec();
    let abs: Box<[u8]> = r.bytes()?.into();
    done(&r)?;
    if blob.len() != cfg.page_bytes() || abs.len() != cfg.abstract_bytes() {
        return Err(Error::corrupt(
            what,
            "page of the wrong size for this configuration",
        ));
    }
    Ok((blob, abs))
}

impl KvStore {
    /// Ids of the pages of `layer` (over every sequence, each once, in page-table order) that
    /// were declared pending by [`KvStore::assemble`] and not filled yet.
    pub fn pending_pages(&self, layer: usize) -> Result<Vec<u32>> {
        self.check_layer(layer)?;
        let st = self.shared.lock()?;
        let mut seen = std::collections::HashSet::new();
        Ok(st
            .seqs
            .iter()
            .flat_map(|seq| seq[layer].pages.iter().copied())
            .filter(|&id| st.pages[id as usize].pending && seen.insert(id))
            .collect())
    }

    /// Install the `page` pieces of pending pages `ids` (see [`KvStore::pending_pages`]).
    /// Every piece is verified before any is installed; ids no longer pending (filled
    /// meanwhile, or dropped) are skipped. Pages beyond the RAM budget spill to disk.
    pub fn fill_pages(&self, ids: &[u32], pieces: &[&[u8]]) -> Result<()> {
        if ids.len() != pieces.len() {
            return Err(Error::config(format!(
                "{} page ids but {} pieces",
                ids.len(),
                pieces.len()
            )));
        }
        let cfg = &self.shared.cfg;
        let pages = ids
            .iter()
            .zip(pieces)
            .map(|(&id, p)| read_page(p, cfg, &format!("page {id}")))
            .collect::<Result<Vec<_>>>()?;
        let mut guard = self.shared.lock()?;
        let st = &mut *guard;
        for (&id, (blob, abs)) in ids.iter().zip(pages) {
            let Some(m) = st.pages.get_mut(id as usize) else {
                return Err(Error::config(format!(
                    "page {id} out of range: the store has {} pages",
                    st.pages.len()
                )));
            };
            if !m.pending || m.refs == 0 {
                continue;
            }
            m.pending = false;
            m.crc = crc32fast::hash(&blob);
            m.abstract_ = abs;
            st.ram.insert(id, std::sync::Arc::new(blob));
        }
        self.shared.enforce_budget(st)
    }

    fn check_one_seq(&self, seq: usize) -> Result<()> {
        let batch = self.batch()?;
        if seq >= batch {
            return Err(Error::config(format!(
                "sequence {seq} out of range: the store holds batch={batch}"
            )));
        }
        Ok(())
    }

    /// The codebooks of every layer as a `books` piece; None when no layer has any yet.
    pub fn export_books(&self) -> Result<Option<Vec<u8>>> {
        let st = self.shared.lock()?;
        if st.books.iter().all(|b| b.is_none()) {
            return Ok(None);
        }
        let cfg = &self.shared.cfg;
        let mut w = begin(BOOKS);
        w.u64(cfg.layers as u64);
        w.u64(cfg.kv_heads as u64);
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
        Ok(Some(finish(w)))
    }

    /// The sink tokens of every layer of sequence `seq` as a `sinks` piece.
    pub fn export_sinks(&self, seq: usize) -> Result<Vec<u8>> {
        self.check_one_seq(seq)?;
        let st = self.shared.lock()?;
        let mut w = begin(SINKS);
        w.u64(self.shared.cfg.layers as u64);
        for l in &st.seqs[seq] {
            w.f32s(&l.sinks_k);
            w.f32s(&l.sinks_v);
        }
        Ok(finish(w))
    }

    /// Everything of sequence `seq` but its closed pages, as a `tail` piece.
    pub fn export_tail(&self, seq: usize) -> Result<Vec<u8>> {
        self.check_one_seq(seq)?;
        let st = self.shared.lock()?;
        let mut w = begin(TAIL);
        w.u64(self.shared.cfg.layers as u64);
        for l in &st.seqs[seq] {
            w.u64(l.n_tokens as u64);
            w.u64(l.pages.len() as u64);
            write_fp_part(&mut w, l);
        }
        Ok(finish(w))
    }

    /// Closed pages `idxs` of `(seq, layer)` as `page` pieces (read from RAM or disk, checked).
    pub fn export_pages(&self, seq: usize, layer: usize, idxs: &[usize]) -> Result<Vec<Vec<u8>>> {
        let pages: Vec<(u32, Box<[u8]>)> = {
            let st = self.shared.lock()?;
            self.check_in(&st, seq, layer)?;
            let l = &st.seqs[seq][layer];
            idxs.iter()
                .map(|&i| {
                    let id = *l.pages.get(i).ok_or_else(|| {
                        Error::config(format!(
                            "page {i} out of range: sequence {seq}, layer {layer} has {} closed pages",
                            l.pages.len()
                        ))
                    })?;
                    Ok((id, st.pages[id as usize].abstract_.clone()))
                })
                .collect::<Result<_>>()?
        };
        pages
            .into_iter()
            .map(|(id, abs)| {
                let blob = self.shared.page_in(id, false)?;
                let mut w = begin(PAGE);
                w.bytes(&blob);
                w.bytes(&abs);
                Ok(finish(w))
            })
            .collect()
    }

    /// Keep only the sinks and the first `n_pages` closed pages of every sequence and layer
    /// (window and open page dropped): the page-aligned prefix of `sinks + n_pages * page_size`
    /// tokens. All or nothing.
    pub fn truncate_to_pages(&self, n_pages: usize) -> Result<()> {
        let cfg = &self.shared.cfg;
        let hd = cfg.kv_heads * cfg.head_dim;
        let mut guard = self.shared.lock()?;
        let st = &mut *guard;
        for (s, seq) in st.seqs.iter().enumerate() {
            for (li, l) in seq.iter().enumerate() {
                if l.pages.len() < n_pages {
                    return Err(Error::config(format!(
                        "cannot keep {n_pages} pages: sequence {s}, layer {li} has {} closed pages",
                        l.pages.len()
                    )));
                }
            }
        }
        for s in 0..st.seqs.len() {
            for li in 0..cfg.layers {
                let l = &mut st.seqs[s][li];
                let dropped = l.pages.split_off(n_pages);
                l.window.clear();
                l.open = None;
                l.n_tokens = l.sinks_k.len() / hd + n_pages * cfg.page_size;
                for id in dropped {
                    let m = &mut st.pages[id as usize];
                    m.refs = m.refs.saturating_sub(1);
                    if m.refs == 0 {
                        m.abstract_ = Box::default();
                        st.live -= 1;
                        st.ram.remove(id);
                    }
                }
            }
        }
        Ok(())
    }

    /// [`KvStore::assemble_pending`] with every page given.
    pub fn assemble(
        cfg: StoreConfig,
        books: Option<&[u8]>,
        sinks: Option<&[u8]>,
        pages: &[Vec<&[u8]>],
        tail: Option<&[u8]>,
    ) -> Result<KvStore> {
        let none = vec![0; pages.len()];
        Self::assemble_pending(cfg, books, sinks, pages, &none, tail)
    }

    /// Rebuild a one-sequence store from pieces: `books` (needed once any layer has a page),
    /// `pages[layer]` (that layer's first closed pages, in order) followed by `pending[layer]`
    /// pages whose pieces come later ([`KvStore::fill_pages`], before anything reads them), and
    /// either a `tail` (the exact state of a saved context with those closed pages) or `sinks`
    /// (then the store holds the page-aligned prefix `sinks + pages * page_size`). Every piece
    /// given is verified (magic, version, checksum, sizes, counts) before the store is
    /// returned; pages beyond the RAM budget spill to the disk tier.
    pub fn assemble_pending(
        cfg: StoreConfig,
        books: Option<&[u8]>,
        sinks: Option<&[u8]>,
        pages: &[Vec<&[u8]>],
        pending: &[usize],
        tail: Option<&[u8]>,
    ) -> Result<KvStore> {
        if cfg.batch != 1 {
            return Err(Error::config(
                "assemble builds a store of one sequence (batch=1)",
            ));
        }
        if pages.len() != cfg.layers || pending.len() != cfg.layers {
            return Err(Error::config(format!(
                "pages for {} layers and pending counts for {}, the store has {}",
                pages.len(),
                pending.len(),
                cfg.layers
            )));
        }
        let store = KvStore::new(cfg)?;
        let cfg = &store.shared.cfg;
        let hd = cfg.kv_heads * cfg.head_dim;
        if let Some(b) = books {
            for (l, lb) in read_books(b, cfg)?.into_iter().enumerate() {
                if let Some((k, v)) = lb {
                    store.set_codebooks(l, k, v).map_err(|e| match e {
                        Error::Config(msg) => Error::corrupt("codebooks", msg),
                        e => e,
                    })?;
                }
            }
        }
        let mut tail = tail.map(|t| read_tail(t, cfg)).transpose()?;
        let sinks = sinks.map(|s| read_sinks(s, cfg)).transpose()?;
        if tail.is_none() && sinks.is_none() {
            return Err(Error::config("assemble needs a tail or a sinks piece"));
        }
        let mut guard = store.shared.lock()?;
        let st = &mut *guard;
        for (li, layer_pages) in pages.iter().enumerate() {
            let mut ls = match tail.as_mut() {
                Some(t) => {
                    let (n_pages, ls) = std::mem::take(&mut t[li]);
                    if n_pages != layer_pages.len() + pending[li] {
                        return Err(Error::corrupt(
                            "tail",
                            format!(
                                "layer {li} has {} closed pages, its tail counts {n_pages}",
                                layer_pages.len() + pending[li]
                            ),
                        ));
                    }
                    ls
                }
                None => {
                    let (sinks_k, sinks_v) = sinks.as_ref().expect("checked")[li].clone();
                    LayerState {
                        n_tokens: sinks_k.len() / hd
                            + (layer_pages.len() + pending[li]) * cfg.page_size,
                        sinks_k,
                        sinks_v,
                        ..Default::default()
                    }
                }
            };
            let n_sinks = ls.sinks_k.len() / hd;
            let paged = !layer_pages.is_empty() || pending[li] > 0 || ls.open.is_some();
            if ls.sinks_k.len() != n_sinks * hd
                || ls.sinks_v.len() != ls.sinks_k.len()
                || n_sinks > cfg.sinks
                || (paged && n_sinks != cfg.sinks)
                || ls.window.len() > cfg.window
            {
                return Err(Error::corrupt(
                    if tail.is_some() { "tail" } else { "sinks" },
                    format!("layer {li}: sinks or window of the wrong size for this configuration"),
                ));
            }
            if paged && st.books[li].is_none() {
                return Err(Error::corrupt(
                    "codebooks",
                    format!("layer {li} has pages but no codebooks"),
                ));
            }
            let expect = n_sinks
                + ls.window.len()
                + (layer_pages.len() + pending[li]) * cfg.page_size
                + ls.open.as_ref().map_or(0, |o| o.filled);
            if expect != ls.n_tokens {
                return Err(Error::corrupt(
                    "tail",
                    format!(
                        "layer {li}: the pieces hold {expect} tokens, the tail counts {}",
                        ls.n_tokens
                    ),
                ));
            }
            for (j, piece) in layer_pages.iter().enumerate() {
                let (blob, abs) = read_page(piece, cfg, &format!("page {j} of layer {li}"))?;
                ls.pages.push(st.add_page(blob, abs));
            }
            for _ in 0..pending[li] {
                ls.pages.push(st.add_pending());
            }
            st.seqs[0][li] = ls;
        }
        store.shared.enforce_budget(st)?;
        drop(guard);
        Ok(store)
    }
}
