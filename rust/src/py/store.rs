//! Bindings of [`crate::store::KvStore`] as `_ctxcore.KVStore` (wrapped by `ctxcore.KVStore`).

use std::path::PathBuf;

use numpy::ndarray::{Array3, Array4};
use numpy::{
    IntoPyArray, PyArray1, PyArray2, PyArray3, PyArray4, PyReadonlyArray3, PyReadonlyArray4,
    PyUntypedArrayMethods,
};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{PyBytes, PyDict};

use super::error::IntoPy;
use super::pq::PQCodec;
use crate::error::{catch_panic, Error};
use crate::store::{check_compatible, KvStore, LoadOptions, Queries, Region, Step, StoreConfig};

fn internal<E: std::fmt::Display>(e: E) -> PyErr {
    super::error::to_pyerr(Error::Internal(e.to_string()))
}

/// Attention output `[hq, tq, D]` and log-sum-exp `[hq, tq]`.
type OutLse<'py> = (Bound<'py, PyArray3<f32>>, Bound<'py, PyArray2<f32>>);

/// Attention output `[B, hq, tq, D]` and log-sum-exp `[B, hq, tq]`.
type BatchOutLse<'py> = (Bound<'py, PyArray4<f32>>, Bound<'py, PyArray3<f32>>);

/// Key and value centroids, float32 `[H, m, ksub, D / m]` each.
type Centroids<'py> = (Bound<'py, PyArray4<f32>>, Bound<'py, PyArray4<f32>>);

/// Keys and values, float32 `[H, t, D]` each.
type KvPair<'py> = (Bound<'py, PyArray3<f32>>, Bound<'py, PyArray3<f32>>);

/// Paged KV store (see `ctxcore.KVStore`).
#[pyclass(module = "ctxcore._ctxcore")]
pub struct KVStore {
    inner: KvStore,
}

#[pymethods]
impl KVStore {
    #[new]
    #[pyo3(signature = (layers, kv_heads, head_dim, page_size, window, sinks, k_m, k_nbits, v_m, v_nbits,
                        keep_full_precision, batch, ram_budget, offload_dir, max_disk_bytes, model_id,
                        window_f16=false, abstracts=true))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        page_size: usize,
        window: usize,
        sinks: usize,
        k_m: usize,
        k_nbits: u32,
        v_m: usize,
        v_nbits: u32,
        keep_full_precision: bool,
        batch: usize,
        ram_budget: Option<u64>,
        offload_dir: Option<PathBuf>,
        max_disk_bytes: Option<u64>,
        model_id: String,
        window_f16: bool,
        abstracts: bool,
    ) -> PyResult<Self> {
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
            keep_full_precision,
            window_f16,
            abstracts,
            batch,
            ram_budget,
            offload_dir,
            max_disk_bytes,
            model_id,
        };
        Ok(KVStore {
            inner: catch_panic(|| KvStore::new(cfg)).py()?,
        })
    }

    /// Configuration as a dict.
    #[getter]
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = self.inner.config();
        let d = PyDict::new(py);
        d.set_item("layers", c.layers)?;
        d.set_item("kv_heads", c.kv_heads)?;
        d.set_item("head_dim", c.head_dim)?;
        d.set_item("page_size", c.page_size)?;
        d.set_item("window", c.window)?;
        d.set_item("sinks", c.sinks)?;
        d.set_item("k_m", c.k_m)?;
        d.set_item("k_nbits", c.k_nbits)?;
        d.set_item("v_m", c.v_m)?;
        d.set_item("v_nbits", c.v_nbits)?;
        d.set_item("keep_full_precision", c.keep_full_precision)?;
        d.set_item(
            "window_dtype",
            if c.window_f16 { "float16" } else { "float32" },
        )?;
        d.set_item("abstracts", c.abstracts)?;
        d.set_item("batch", c.batch)?;
        d.set_item("ram_budget", c.ram_budget)?;
        d.set_item(
            "offload_dir",
            c.offload_dir.as_ref().map(|p| p.display().to_string()),
        )?;
        d.set_item("max_disk_bytes", c.max_disk_bytes)?;
        d.set_item("model_id", &c.model_id)?;
        d.set_item("page_bytes", c.page_bytes())?;
        d.set_item("abstract_bytes", c.abstract_bytes())?;
        d.set_item("min_ram_budget", c.min_ram_budget())?;
        Ok(d)
    }

    /// Set one layer's codebooks: one trained PQCodec per KV head for keys and for values.
    fn set_codebooks(
        &self,
        layer: usize,
        keys: Vec<PyRef<'_, PQCodec>>,
        values: Vec<PyRef<'_, PQCodec>>,
    ) -> PyResult<()> {
        let k = keys.iter().map(|c| c.inner.clone()).collect();
        let v = values.iter().map(|c| c.inner.clone()).collect();
        self.inner.set_codebooks(layer, k, v).py()
    }

    /// Codebooks of a layer: ``(k_centroids, v_centroids)`` float32 ``[H, m, ksub, D // m]``, or
    /// None before they are set.
    fn codebooks<'py>(&self, py: Python<'py>, layer: usize) -> PyResult<Option<Centroids<'py>>> {
        let Some((k, v)) = self.inner.codebooks(layer).py()? else {
            return Ok(None);
        };
        let stack = |qs: &[crate::pq::ProductQuantizer]| -> PyResult<Bound<'py, PyArray4<f32>>> {
            let (m, ksub, dsub) = (qs[0].m(), qs[0].ksub(), qs[0].dsub());
            let data: Vec<f32> = qs
                .iter()
                .flat_map(|q| q.centroids().unwrap_or_default().into_owned())
                .collect();
            Ok(Array4::from_shape_vec((qs.len(), m, ksub, dsub), data)
                .map_err(internal)?
                .into_pyarray(py))
        };
        Ok(Some((stack(&k)?, stack(&v)?)))
    }

    fn has_codebooks(&self, layer: usize) -> bool {
        self.inner.has_codebooks(layer)
    }

    /// Append float32 keys/values ``[kv_heads, t, head_dim]``.
    fn append(
        &self,
        py: Python<'_>,
        seq: usize,
        layer: usize,
        k: PyReadonlyArray3<'_, f32>,
        v: PyReadonlyArray3<'_, f32>,
    ) -> PyResult<()> {
        let c = self.inner.config();
        let want = [c.kv_heads, k.shape()[1], c.head_dim];
        for (what, a) in [("keys", &k), ("values", &v)] {
            if a.shape() != want {
                return Err(Error::shape(
                    what,
                    format!("{want:?}"),
                    format!("{:?}", a.shape()),
                ))
                .py();
            }
        }
        let t = want[1];
        let ks = k.as_slice().map_err(internal)?;
        let vs = v.as_slice().map_err(internal)?;
        let store = &self.inner;
        py.detach(|| catch_panic(|| store.append(seq, layer, ks, vs, t)))
            .py()
    }

    fn num_tokens(&self, seq: usize, layer: usize) -> PyResult<usize> {
        self.inner.num_tokens(seq, layer).py()
    }

    fn num_pages(&self, seq: usize, layer: usize) -> PyResult<usize> {
        self.inner.num_pages(seq, layer).py()
    }

    fn paged_tokens(&self, seq: usize, layer: usize) -> PyResult<usize> {
        self.inner.paged_tokens(seq, layer).py()
    }

    /// Read a page: ``(blob, tokens)`` where ``blob`` is the page's bytes, uint8 ``[page_bytes]``
    /// (layout in ``ctxcore.store``); one copy out of the store, sliced by the Python wrapper.
    fn page<'py>(
        &self,
        py: Python<'py>,
        seq: usize,
        layer: usize,
        idx: usize,
    ) -> PyResult<(Bound<'py, PyArray1<u8>>, usize)> {
        let store = &self.inner;
        let view = py
            .detach(|| catch_panic(|| store.page(seq, layer, idx)))
            .py()?;
        Ok((PyArray1::from_slice(py, view.blob()), view.tokens))
    }

    /// Full-precision region (``"sinks"`` or ``"window"``): ``(k, v)`` float32 ``[H, t, D]``.
    fn full_precision<'py>(
        &self,
        py: Python<'py>,
        seq: usize,
        layer: usize,
        region: &str,
    ) -> PyResult<KvPair<'py>> {
        let which = match region {
            "sinks" => Region::Sinks,
            "window" => Region::Window,
            other => {
                return Err(Error::config(format!(
                    "region must be 'sinks' or 'window', got {other:?}"
                )))
                .py()
            }
        };
        let (k, v, t) = self.inner.full_precision(seq, layer, which).py()?;
        let c = self.inner.config();
        let shape = (c.kv_heads, t, c.head_dim);
        Ok((
            Array3::from_shape_vec(shape, k)
                .map_err(internal)?
                .into_pyarray(py),
            Array3::from_shape_vec(shape, v)
                .map_err(internal)?
                .into_pyarray(py),
        ))
    }

    /// Page abstracts float32 ``[pages, H, 3, D]`` (min, max, mean of the keys).
    fn abstracts<'py>(
        &self,
        py: Python<'py>,
        seq: usize,
        layer: usize,
    ) -> PyResult<Bound<'py, PyArray4<f32>>> {
        let (a, n) = self.inner.abstracts(seq, layer).py()?;
        let c = self.inner.config();
        Ok(Array4::from_shape_vec((n, c.kv_heads, 3, c.head_dim), a)
            .map_err(internal)?
            .into_pyarray(py))
    }

    /// Attention of ``q`` float32 ``[hq, tq, D]`` over the stored context of ``(seq, layer)``:
    /// ``method="dense"`` (every page through its codes) or ``"quest"`` (``budget_pages`` pages
    /// per KV head by their abstracts, over their codes or fp16 copies; ``fallback``: the exact
    /// fallback's share, see ``KvStore::attend_quest``). Tokens at positions ``< start`` (left
    /// padding) are ignored. Returns ``(out, lse)``.
    #[pyo3(signature = (seq, layer, q, scale, causal, method, budget_pages, start, fallback=None))]
    #[allow(clippy::too_many_arguments)]
    fn attend<'py>(
        &self,
        py: Python<'py>,
        seq: usize,
        layer: usize,
        q: PyReadonlyArray3<'py, f32>,
        scale: f32,
        causal: bool,
        method: &str,
        budget_pages: usize,
        start: usize,
        fallback: Option<f32>,
    ) -> PyResult<OutLse<'py>> {
        let shape = q.shape().to_vec();
        let (hq, tq) = (shape[0], shape[1]);
        let qs = q.as_slice().map_err(internal)?;
        let store = &self.inner;
        let dense = match method {
            "dense" => true,
            "quest" => false,
            other => {
                return Err(Error::config(format!(
                    "method must be 'dense' or 'quest', got {other:?}"
                )))
                .py()
            }
        };
        let (out, lse) = py
            .detach(|| {
                catch_panic(|| {
                    let queries = Queries {
                        q: qs,
                        hq,
                        tq,
                        scale,
                        causal,
                        start,
                    };
                    if dense {
                        store.attend_dense(seq, layer, &queries)
                    } else {
                        store.attend_quest(seq, layer, &queries, budget_pages, fallback)
                    }
                })
            })
            .py()?;
        let out = Array3::from_shape_vec((hq, tq, shape[2]), out).map_err(internal)?;
        let lse = numpy::ndarray::Array2::from_shape_vec((hq, tq), lse).map_err(internal)?;
        Ok((out.into_pyarray(py), lse.into_pyarray(py)))
    }

    /// Append one step's K/V ``[B, H, tq, D]`` to every sequence of ``layer`` and attend
    /// ``q`` ``[B, Hq, tq, D]`` over each whole context (causal over the new tokens; positions
    /// ``< starts[b]`` skipped): one call per layer and step. Returns ``(out [B, Hq, tq, D],
    /// lse [B, Hq, tq])``.
    #[allow(clippy::too_many_arguments)]
    fn append_attend<'py>(
        &self,
        py: Python<'py>,
        layer: usize,
        q: PyReadonlyArray4<'py, f32>,
        k: PyReadonlyArray4<'py, f32>,
        v: PyReadonlyArray4<'py, f32>,
        scale: f32,
        starts: Vec<usize>,
    ) -> PyResult<BatchOutLse<'py>> {
        let qshape = q.shape().to_vec();
        let (b, hq, tq, d) = (qshape[0], qshape[1], qshape[2], qshape[3]);
        if k.shape() != v.shape() || k.shape()[0] != b || k.shape()[2] != tq || k.shape()[3] != d {
            return Err(Error::shape(
                "k/v",
                format!("[{b}, kv_heads, {tq}, {d}] each (q is {qshape:?})"),
                format!("{:?} and {:?}", k.shape(), v.shape()),
            ))
            .py();
        }
        let (qs, ks, vs) = (
            q.as_slice().map_err(internal)?,
            k.as_slice().map_err(internal)?,
            v.as_slice().map_err(internal)?,
        );
        let store = &self.inner;
        let (out, lse) = py
            .detach(|| {
                catch_panic(|| {
                    store.append_attend(
                        layer,
                        &Step {
                            q: qs,
                            k: ks,
                            v: vs,
                            hq,
                            tq,
                            scale,
                            starts: &starts,
                        },
                    )
                })
            })
            .py()?;
        let out = Array4::from_shape_vec((b, hq, tq, d), out).map_err(internal)?;
        let lse = Array3::from_shape_vec((b, hq, tq), lse).map_err(internal)?;
        Ok((out.into_pyarray(py), lse.into_pyarray(py)))
    }

    fn prefetch(&self, seq: usize, layer: usize, pages: Vec<usize>) -> PyResult<()> {
        self.inner.prefetch(seq, layer, &pages).py()
    }

    fn evict_all(&self, py: Python<'_>) -> PyResult<()> {
        let store = &self.inner;
        py.detach(|| catch_panic(|| store.evict_all())).py()
    }

    /// Current number of sequences (changed by ``select_seqs``).
    #[getter]
    fn batch(&self) -> PyResult<usize> {
        self.inner.batch().py()
    }

    /// An independent copy: closed pages shared copy-on-write, the rest copied.
    fn fork(&self, py: Python<'_>) -> PyResult<KVStore> {
        let store = &self.inner;
        let inner = py.detach(|| catch_panic(|| store.fork())).py()?;
        Ok(KVStore { inner })
    }

    /// New sequence ``i`` = copy of old sequence ``indices[i]`` (closed pages shared).
    fn select_seqs(&self, py: Python<'_>, indices: Vec<usize>) -> PyResult<()> {
        let store = &self.inner;
        py.detach(|| catch_panic(|| store.select_seqs(&indices)))
            .py()
    }

    /// Remove the last ``n`` tokens of every ``(seq, layer)`` in ``targets``, all or nothing.
    fn crop(&self, n: usize, targets: Vec<(usize, usize)>) -> PyResult<()> {
        self.inner.crop_many(&targets, n).py()
    }

    /// Counters and RAM / disk use.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats().py()?;
        let d = PyDict::new(py);
        d.set_item("hits", s.hits)?;
        d.set_item("misses", s.misses)?;
        d.set_item("prefetched", s.prefetched)?;
        d.set_item("prefetch_requested", s.prefetch_requested)?;
        d.set_item("evictions", s.evictions)?;
        d.set_item("bytes_read", s.bytes_read)?;
        d.set_item("bytes_written", s.bytes_written)?;
        d.set_item("fallbacks", s.fallbacks)?;
        d.set_item("ram_bytes", s.ram_bytes)?;
        d.set_item("ram_page_bytes", s.ram_page_bytes)?;
        d.set_item("disk_bytes", s.disk_bytes)?;
        d.set_item("pages", s.pages)?;
        Ok(d)
    }

    /// Save to a directory (atomic replace of an earlier save); ``extra``: caller metadata.
    fn save(&self, py: Python<'_>, path: PathBuf, extra: &[u8]) -> PyResult<()> {
        let store = &self.inner;
        py.detach(|| catch_panic(|| store.save(&path, extra))).py()
    }

    /// The codebooks of every layer as one self-checking piece, or None before any.
    fn export_books<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let b = self.inner.export_books().py()?;
        Ok(b.map(|b| PyBytes::new(py, &b)))
    }

    /// The sink tokens of every layer of ``seq`` as one self-checking piece.
    fn export_sinks<'py>(&self, py: Python<'py>, seq: usize) -> PyResult<Bound<'py, PyBytes>> {
        let b = self.inner.export_sinks(seq).py()?;
        Ok(PyBytes::new(py, &b))
    }

    /// Everything of ``seq`` but its closed pages (counts, sinks, window, open page).
    fn export_tail<'py>(&self, py: Python<'py>, seq: usize) -> PyResult<Bound<'py, PyBytes>> {
        let b = self.inner.export_tail(seq).py()?;
        Ok(PyBytes::new(py, &b))
    }

    /// Closed pages ``idxs`` of ``(seq, layer)``, each one self-checking piece.
    fn export_pages<'py>(
        &self,
        py: Python<'py>,
        seq: usize,
        layer: usize,
        idxs: Vec<usize>,
    ) -> PyResult<Vec<Bound<'py, PyBytes>>> {
        let store = &self.inner;
        let pages = py
            .detach(|| catch_panic(|| store.export_pages(seq, layer, &idxs)))
            .py()?;
        Ok(pages.iter().map(|p| PyBytes::new(py, p)).collect())
    }

    /// Ids of ``layer``'s pages declared by ``assemble(pending=...)`` and not filled yet.
    fn pending_pages(&self, layer: usize) -> PyResult<Vec<u32>> {
        self.inner.pending_pages(layer).py()
    }

    /// Install the ``page`` pieces of pending pages ``ids`` (each verified first).
    fn fill_pages(
        &self,
        py: Python<'_>,
        ids: Vec<u32>,
        pieces: Vec<PyBackedBytes>,
    ) -> PyResult<()> {
        let store = &self.inner;
        py.detach(|| {
            catch_panic(|| {
                let p: Vec<&[u8]> = pieces.iter().map(|p| p.as_ref()).collect();
                store.fill_pages(&ids, &p)
            })
        })
        .py()
    }

    /// Keep the sinks and the first ``n_pages`` closed pages of every sequence and layer.
    fn truncate_to_pages(&self, n_pages: usize) -> PyResult<()> {
        self.inner.truncate_to_pages(n_pages).py()
    }

    /// A one-sequence store rebuilt from pieces (see ``ctxcore.shared``), every piece verified.
    #[staticmethod]
    #[pyo3(signature = (layers, kv_heads, head_dim, page_size, window, sinks, k_m, k_nbits, v_m, v_nbits,
                        keep_full_precision, ram_budget, offload_dir, max_disk_bytes, model_id,
                        books, sink_piece, pages, tail, pending=None, window_f16=false,
                        abstracts=true))]
    #[allow(clippy::too_many_arguments)]
    fn assemble(
        py: Python<'_>,
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        page_size: usize,
        window: usize,
        sinks: usize,
        k_m: usize,
        k_nbits: u32,
        v_m: usize,
        v_nbits: u32,
        keep_full_precision: bool,
        ram_budget: Option<u64>,
        offload_dir: Option<PathBuf>,
        max_disk_bytes: Option<u64>,
        model_id: String,
        books: Option<PyBackedBytes>,
        sink_piece: Option<PyBackedBytes>,
        pages: Vec<Vec<PyBackedBytes>>,
        tail: Option<PyBackedBytes>,
        pending: Option<Vec<usize>>,
        window_f16: bool,
        abstracts: bool,
    ) -> PyResult<KVStore> {
        let pending = pending.unwrap_or_else(|| vec![0; pages.len()]);
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
            keep_full_precision,
            window_f16,
            abstracts,
            batch: 1,
            ram_budget,
            offload_dir,
            max_disk_bytes,
            model_id,
        };
        let inner = py
            .detach(|| {
                catch_panic(|| {
                    let pages: Vec<Vec<&[u8]>> = pages
                        .iter()
                        .map(|l| l.iter().map(|p| p.as_ref()).collect())
                        .collect();
                    KvStore::assemble_pending(
                        cfg,
                        books.as_deref(),
                        sink_piece.as_deref(),
                        &pages,
                        &pending,
                        tail.as_deref(),
                    )
                })
            })
            .py()?;
        Ok(KVStore { inner })
    }

    /// Load a saved context; returns ``(store, extra)``.
    #[staticmethod]
    #[pyo3(signature = (path, ram_budget, offload_dir, max_disk_bytes, expect_model_id, expect_layers, expect_kv_heads, expect_head_dim))]
    #[allow(clippy::too_many_arguments)]
    fn load<'py>(
        py: Python<'py>,
        path: PathBuf,
        ram_budget: Option<u64>,
        offload_dir: Option<PathBuf>,
        max_disk_bytes: Option<u64>,
        expect_model_id: Option<String>,
        expect_layers: Option<usize>,
        expect_kv_heads: Option<usize>,
        expect_head_dim: Option<usize>,
    ) -> PyResult<(KVStore, Bound<'py, PyBytes>)> {
        let (store, extra) = py
            .detach(|| {
                catch_panic(|| {
                    let opts = LoadOptions {
                        ram_budget,
                        offload_dir,
                        max_disk_bytes,
                    };
                    let (store, extra) = KvStore::load(&path, &opts)?;
                    let saved = store.config();
                    let mut current = saved.clone();
                    if let Some(m) = expect_model_id {
                        current.model_id = m;
                    }
                    current.layers = expect_layers.unwrap_or(saved.layers);
                    current.kv_heads = expect_kv_heads.unwrap_or(saved.kv_heads);
                    current.head_dim = expect_head_dim.unwrap_or(saved.head_dim);
                    check_compatible(saved, &current)?;
                    Ok((store, extra))
                })
            })
            .py()?;
        Ok((KVStore { inner: store }, PyBytes::new(py, &extra)))
    }
}
