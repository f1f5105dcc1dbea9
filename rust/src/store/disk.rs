//! Disk tier: fixed-size page slots in segment files, read with `pread`.
//!
//! A segment file holds up to `slots_per_segment` page blobs of `page_bytes` each, at offset
//! `slot * page_bytes`. Integrity is checked by the caller against the CRC kept in RAM.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};

/// Where a page lives on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    /// Index into the tier's segment list.
    pub segment: u32,
    /// Slot within the segment.
    pub slot: u32,
}

/// One segment file.
#[derive(Debug)]
pub struct Segment {
    /// Path of the file (for error messages).
    pub path: PathBuf,
    /// Shared with readers: `pread` needs no exclusive access, so page-in clones the `Arc`
    /// instead of duplicating the descriptor.
    file: Arc<File>,
    /// Slots in use (writable segments fill sequentially).
    pub used: u32,
    writable: bool,
}

/// The set of segment files of a store.
#[derive(Debug)]
pub struct DiskTier {
    dir: Option<PathBuf>,
    page_bytes: usize,
    slots_per_segment: u32,
    segments: Vec<Segment>,
    /// Bytes written (live and dead slots).
    pub bytes: u64,
    max_bytes: Option<u64>,
    /// Where the private directory is made when `dir` is `None` (default: the system's temp
    /// directory).
    tmp_in: Option<PathBuf>,
    _tmp: Option<TempDir>,
}

/// A directory removed on drop (used when no offload directory is given).
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Tell the kernel a segment is read at random (no readahead); advisory only. Pages are read
/// one slot at a time, in the order the attention needs them: selective attention reads a few
/// pages per layer scattered over the file, where readahead would read mostly bytes nobody
/// asked for (measured at 1M tokens with a cold page cache: the first selective step took
/// 15.9 s with POSIX_FADV_SEQUENTIAL).
fn advise_random(file: &File) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid open descriptor; posix_fadvise only reads its arguments.
        unsafe {
            libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = file;
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { context, source }
}

impl DiskTier {
    /// A tier writing into `dir` (created if missing; a private temp dir when `None`).
    pub fn new(dir: Option<&Path>, page_bytes: usize, max_bytes: Option<u64>) -> Result<Self> {
        let slots_per_segment =
            ((256usize << 20) / page_bytes.max(1)).clamp(1, u32::MAX as usize) as u32;
        Ok(DiskTier {
            dir: dir.map(Path::to_path_buf),
            page_bytes,
            slots_per_segment,
            segments: Vec::new(),
            bytes: 0,
            max_bytes,
            tmp_in: None,
            _tmp: None,
        })
    }

    /// A tier that reads every segment of this one (the files are shared, read-only: slots
    /// are never rewritten, and an unlinked file stays readable through its open handle) and
    /// writes new pages into a private directory of its own, made on first write inside this
    /// tier's directory if the user chose it, else in the system's temp directory.
    pub fn fork(&self) -> DiskTier {
        DiskTier {
            dir: None,
            page_bytes: self.page_bytes,
            slots_per_segment: self.slots_per_segment,
            segments: self
                .segments
                .iter()
                .map(|s| Segment {
                    path: s.path.clone(),
                    file: s.file.clone(),
                    used: s.used,
                    writable: false,
                })
                .collect(),
            bytes: self.bytes,
            max_bytes: self.max_bytes,
            tmp_in: if self._tmp.is_none() {
                self.dir.clone()
            } else {
                self.tmp_in.clone()
            },
            _tmp: None,
        }
    }

    fn ensure_dir(&mut self) -> Result<PathBuf> {
        if self.dir.is_none() {
            // A fresh directory with a random name, mode 0700: it holds KV derived from the
            // user's documents.
            let mut builder = tempfile::Builder::new();
            builder.prefix("ctxcore-offload-");
            let parent = self.tmp_in.clone().unwrap_or_else(std::env::temp_dir);
            std::fs::create_dir_all(&parent).map_err(io(format!(
                "creating offload directory {}",
                parent.display()
            )))?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                builder.permissions(std::fs::Permissions::from_mode(0o700));
            }
            let base = builder
                .tempdir_in(&parent)
                .map_err(io(format!(
                    "creating an offload directory in {}",
                    parent.display()
                )))?
                .keep();
            self._tmp = Some(TempDir(base.clone()));
            self.dir = Some(base);
        }
        let dir = self.dir.clone().expect("set above");
        std::fs::create_dir_all(&dir)
            .map_err(io(format!("creating offload directory {}", dir.display())))?;
        Ok(dir)
    }

    /// Check that the offload directory can be written (create and remove a probe file).
    pub fn check_writable(&mut self) -> Result<()> {
        let dir = self.ensure_dir()?;
        let probe = dir.join(".ctxcore-write-probe");
        std::fs::write(&probe, b"ok").map_err(io(format!(
            "offload directory {} is not writable",
            dir.display()
        )))?;
        let _ = std::fs::remove_file(probe);
        Ok(())
    }

    /// Register an existing read-only segment (from a saved context); returns its index.
    pub fn add_readonly(&mut self, path: &Path, slots: u32) -> Result<u32> {
        let file =
            File::open(path).map_err(io(format!("opening saved segment {}", path.display())))?;
        let len = file
            .metadata()
            .map_err(io(format!("reading size of {}", path.display())))?
            .len();
        let need = slots as u64 * self.page_bytes as u64;
        if len < need {
            return Err(Error::corrupt(
                format!("segment {}", path.display()),
                format!("truncated: {len} bytes, the saved page table needs {need}"),
            ));
        }
        advise_random(&file);
        self.segments.push(Segment {
            path: path.to_path_buf(),
            file: Arc::new(file),
            used: slots,
            writable: false,
        });
        Ok((self.segments.len() - 1) as u32)
    }

    /// Write a page blob to a new slot.
    pub fn write(&mut self, blob: &[u8]) -> Result<Slot> {
        debug_assert_eq!(blob.len(), self.page_bytes);
        if let Some(max) = self.max_bytes {
            if self.bytes + blob.len() as u64 > max {
                return Err(Error::Io {
                    context: format!("writing a page to the disk tier (limit {max} bytes reached)"),
                    source: std::io::Error::new(ErrorKind::StorageFull, "disk tier full"),
                });
            }
        }
        let need_new = match self.segments.last() {
            Some(s) => !s.writable || s.used >= self.slots_per_segment,
            None => true,
        };
        if need_new {
            let dir = self.ensure_dir()?;
            let path = dir.join(format!("offload-{:05}.seg", self.segments.len()));
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .map_err(io(format!("creating segment {}", path.display())))?;
            advise_random(&file);
            self.segments.push(Segment {
                path,
                file: Arc::new(file),
                used: 0,
                writable: true,
            });
        }
        let idx = self.segments.len() - 1;
        let seg = &mut self.segments[idx];
        let off = seg.used as u64 * self.page_bytes as u64;
        seg.file.write_all_at(blob, off).map_err(io(format!(
            "writing page slot {} of {}",
            seg.used,
            seg.path.display()
        )))?;
        let slot = Slot {
            segment: idx as u32,
            slot: seg.used,
        };
        seg.used += 1;
        self.bytes += blob.len() as u64;
        Ok(slot)
    }

    /// A handle for reading `slot` without holding the tier (for lock-free page-in).
    pub fn reader(&self, slot: Slot) -> Result<(Arc<File>, u64, PathBuf)> {
        let seg = self
            .segments
            .get(slot.segment as usize)
            .ok_or_else(|| Error::Internal(format!("no segment {}", slot.segment)))?;
        Ok((
            seg.file.clone(),
            slot.slot as u64 * self.page_bytes as u64,
            seg.path.clone(),
        ))
    }
}

/// Read one page blob at `off` of `file` into a new buffer.
pub fn read_at(file: &File, off: u64, len: usize, path: &Path, page: u64) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, off).map_err(|source| {
        if source.kind() == ErrorKind::UnexpectedEof {
            Error::corrupt(
                format!("page {page} in {}", path.display()),
                format!(
                    "the file is truncated (page needs bytes {off}..{})",
                    off + len as u64
                ),
            )
        } else {
            Error::Io {
                context: format!("page {page}: reading {}", path.display()),
                source,
            }
        }
    })?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_offload_directory_is_private_random_and_removed() {
        let mut a = DiskTier::new(None, 4096, None).unwrap();
        let mut b = DiskTier::new(None, 4096, None).unwrap();
        let (da, db) = (a.ensure_dir().unwrap(), b.ensure_dir().unwrap());
        assert_ne!(da, db);
        let name = da.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("ctxcore-offload-"), "{name}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&da).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "offload directory mode {mode:o}");
        }
        drop(a);
        assert!(!da.exists());
        assert!(db.exists());
    }
}
