//! A [`SnapshotStore`] on the local filesystem, for users who do not want
//! snapshots in Kafka (or whose snapshots live on a shared volume).
//!
//! Each snapshot is one file `<id>.ms2m` in the store's directory. `put`
//! writes `<id>.ms2m.tmp`, fsyncs it, renames it into place and fsyncs the
//! directory, so a crash never leaves a half-written file listed.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::{BackendError, ErrorKind};
use crate::snapshot::EncodedSnapshot;
use crate::store::{SnapshotId, SnapshotStore};

const EXT: &str = "ms2m";

/// Errors of the [`FsSnapshotStore`].
#[derive(Debug, thiserror::Error)]
#[error("filesystem snapshot store: {op} {path}")]
pub struct FsStoreError {
    op: &'static str,
    path: PathBuf,
    #[source]
    source: io::Error,
}

impl BackendError for FsStoreError {
    fn kind(&self) -> ErrorKind {
        match self.source.kind() {
            io::ErrorKind::NotFound => ErrorKind::NotFound,
            io::ErrorKind::UnexpectedEof | io::ErrorKind::InvalidData => ErrorKind::Corrupt,
            _ => ErrorKind::Other,
        }
    }
}

/// Snapshots as files in one directory.
#[derive(Clone, Debug)]
pub struct FsSnapshotStore {
    dir: Arc<PathBuf>,
}

impl FsSnapshotStore {
    /// A store in `dir` (created if missing).
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, FsStoreError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|source| FsStoreError {
            op: "create directory",
            path: dir.clone(),
            source,
        })?;
        Ok(Self { dir: Arc::new(dir) })
    }

    fn path(&self, id: SnapshotId) -> PathBuf {
        self.dir.join(format!("{id:020}.{EXT}"))
    }

    fn list_sync(dir: &Path) -> Result<Vec<SnapshotId>, FsStoreError> {
        let err = |source| FsStoreError {
            op: "list",
            path: dir.to_path_buf(),
            source,
        };
        let mut ids = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(err)? {
            let name = entry.map_err(err)?.file_name();
            let name = name.to_string_lossy();
            if let Some(id) = name.strip_suffix(".ms2m").and_then(|s| s.parse().ok()) {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        Ok(ids)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Path) -> Result<T, FsStoreError> + Send + 'static,
    ) -> Result<T, FsStoreError> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || f(&dir))
            .await
            .unwrap_or_else(|join| {
                Err(FsStoreError {
                    op: "run blocking task",
                    path: PathBuf::new(),
                    source: io::Error::other(join),
                })
            })
    }
}

#[async_trait]
impl SnapshotStore for FsSnapshotStore {
    type Error = FsStoreError;

    async fn put(&self, snapshot: &EncodedSnapshot) -> Result<SnapshotId, FsStoreError> {
        let parts = [snapshot.prefix.clone(), snapshot.state.clone()];
        let this = self.clone();
        self.blocking(move |dir| {
            let id = Self::list_sync(dir)?.last().map_or(1, |last| last + 1);
            let path = this.path(id);
            let tmp = path.with_extension(format!("{EXT}.tmp"));
            let err = |op, source| FsStoreError {
                op,
                path: tmp.clone(),
                source,
            };
            let mut file = std::fs::File::create(&tmp).map_err(|e| err("create", e))?;
            for part in &parts {
                file.write_all(part).map_err(|e| err("write", e))?;
            }
            file.sync_all().map_err(|e| err("fsync", e))?;
            drop(file);
            std::fs::rename(&tmp, &path).map_err(|e| err("rename", e))?;
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| err("fsync directory", e))?;
            Ok(id)
        })
        .await
    }

    async fn list(&self) -> Result<Vec<SnapshotId>, FsStoreError> {
        self.blocking(Self::list_sync).await
    }

    async fn get(&self, id: SnapshotId) -> Result<Bytes, FsStoreError> {
        let path = self.path(id);
        self.blocking(move |_| {
            std::fs::read(&path).map(Bytes::from).map_err(|source| FsStoreError {
                op: "read",
                path,
                source,
            })
        })
        .await
    }

    async fn delete(&self, id: SnapshotId) -> Result<(), FsStoreError> {
        let path = self.path(id);
        self.blocking(move |_| match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(FsStoreError {
                op: "delete",
                path,
                source: e,
            }),
            _ => Ok(()),
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::position::Position;
    use crate::snapshot::Snapshot;

    #[tokio::test]
    async fn put_list_get_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsSnapshotStore::open(dir.path()).unwrap();
        let snap = Snapshot::seal("svc", 1, Position::new(), "i", Bytes::from_static(b"abc"));
        let a = store.put(&snap.encode().unwrap()).await.unwrap();
        let b = store.put(&snap.encode().unwrap()).await.unwrap();
        assert!(b > a);
        // A leftover temporary file (crash mid-write) is never listed.
        std::fs::write(dir.path().join("00000000000000000099.ms2m.tmp"), b"half").unwrap();
        assert_eq!(store.list().await.unwrap(), vec![a, b]);
        assert_eq!(Snapshot::decode(store.get(b).await.unwrap()).unwrap(), snap);
        store.delete(a).await.unwrap();
        assert_eq!(store.list().await.unwrap(), vec![b]);
        let missing = store.get(a).await.unwrap_err();
        assert_eq!(missing.kind(), ErrorKind::NotFound);
    }
}
