//! The artifact store: plugin blobs by sha256 digest, outside etcd.
//!
//! etcd holds only the digest (the pointer); the blob lives here. Readers
//! verify what they read against the digest, so a store that serves wrong
//! or damaged bytes is an error, never a different policy.
//!
//! [`DirStore`] is a local directory (the default; on several machines a
//! shared mount). Another backend (S3, MinIO, an HTTP server) implements
//! [`ArtifactStore`]; calls are blocking and made off the async runtime.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::Digest;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("artifact {0} is not in the store")]
    Missing(Digest),
    #[error("artifact {digest} in the store is damaged: its bytes hash to {actual}")]
    Damaged { digest: Digest, actual: Digest },
    #[error("artifact store {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// Where plugin blobs are kept, by digest.
pub trait ArtifactStore: Send + Sync + fmt::Debug {
    /// Stores `bytes` under their digest (idempotent).
    fn put(&self, bytes: &[u8]) -> Result<Digest, StoreError>;
    /// The bytes of `digest`, verified.
    fn get(&self, digest: &Digest) -> Result<Vec<u8>, StoreError>;
}

/// A directory of `sha256-<hex>.wasm` files.
#[derive(Debug, Clone)]
pub struct DirStore {
    dir: PathBuf,
}

impl DirStore {
    /// Uses `dir`, creating it if needed.
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|error| StoreError::Io {
            path: dir.clone(),
            error,
        })?;
        Ok(Self { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, digest: &Digest) -> PathBuf {
        let name = digest.as_str().replace(':', "-");
        self.dir.join(format!("{name}.wasm"))
    }
}

impl ArtifactStore for DirStore {
    fn put(&self, bytes: &[u8]) -> Result<Digest, StoreError> {
        let digest = Digest::of(bytes);
        let path = self.path(&digest);
        if self.get(&digest).is_ok() {
            return Ok(digest);
        }
        let io = |error| StoreError::Io {
            path: path.clone(),
            error,
        };
        // Write to a unique temporary name, then rename: a reader never sees
        // half a blob, and concurrent writers of the same digest both win.
        let mut tmp = tempfile_in(&self.dir).map_err(io)?;
        tmp.1.write_all(bytes).map_err(io)?;
        tmp.1.sync_all().map_err(io)?;
        std::fs::rename(&tmp.0, &path).map_err(io)?;
        Ok(digest)
    }

    fn get(&self, digest: &Digest) -> Result<Vec<u8>, StoreError> {
        let path = self.path(digest);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::Missing(digest.clone()));
            }
            Err(error) => return Err(StoreError::Io { path, error }),
        };
        let actual = Digest::of(&bytes);
        if &actual != digest {
            return Err(StoreError::Damaged {
                digest: digest.clone(),
                actual,
            });
        }
        Ok(bytes)
    }
}

fn tempfile_in(dir: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    for _ in 0..16 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = dir.join(format!(".upload-{}-{nanos}", std::process::id()));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(f) => return Ok((path, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other(
        "could not pick a temporary file name",
    ))
}
