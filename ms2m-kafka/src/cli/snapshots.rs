//! `ms2m snapshots list|inspect|verify`: what the snapshot topic holds,
//! without the service's code. The state itself can only be decoded by the
//! service type, so the CLI checks what needs no type: the manifest, every
//! chunk's CRC-32C, the whole's, and the envelope (magic, format, header
//! checksum, state length and checksum, service name).

use clap::Subcommand;
use ms2m_core::{Snapshot, SnapshotHeader, SnapshotId, SnapshotStore};
use serde::Serialize;

use super::error::CliError;
use super::output::{self, line};
use super::records;
use crate::{KafkaCluster, KafkaSnapshotStore, Manifest};
use std::fmt::Write as _;

/// `ms2m snapshots …`
#[derive(Subcommand, Clone, Debug, PartialEq, Eq)]
pub enum SnapshotsCommand {
    /// List the stored snapshots, newest first (header from the first chunk)
    List {
        /// Show at most this many
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Show one snapshot's manifest and envelope header
    Inspect {
        /// The snapshot id
        id: SnapshotId,
    },
    /// Read snapshots whole and verify every checksum and the envelope
    /// (not the state: that needs the service's code); exits 1 if any fails
    Verify {
        /// The snapshot to verify (default: all)
        id: Option<SnapshotId>,
    },
}

/// One snapshot as the CLI shows it.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotInfo {
    /// Id.
    pub id: SnapshotId,
    /// Encoded size (envelope + state), bytes.
    pub bytes: u64,
    /// Chunks it is stored in.
    pub chunks: usize,
    /// CRC-32C of the whole encoding, from the manifest.
    pub crc32c: String,
    /// The envelope header, when it could be read.
    pub header: Option<SnapshotHeader>,
    /// Why the header could not be read.
    pub header_error: Option<String>,
}

/// The result of verifying one snapshot.
#[derive(Clone, Debug, Serialize)]
pub struct Verified {
    /// Id.
    pub id: SnapshotId,
    /// Whether every check passed.
    pub ok: bool,
    /// What failed.
    pub error: Option<String>,
    /// Its header, when it verified.
    pub header: Option<SnapshotHeader>,
}

/// Runs a `snapshots` subcommand.
pub async fn run(cluster: &KafkaCluster, command: &SnapshotsCommand, json: bool) -> Result<(), CliError> {
    let store = open(cluster).await?;
    match command {
        SnapshotsCommand::List { limit } => {
            let list = latest(cluster, &store, *limit).await?;
            output::print(json, &list, |out| table(out, &list));
        }
        SnapshotsCommand::Inspect { id } => {
            let manifest = store.manifest(*id).await?;
            let info = info(cluster, &store, manifest.clone()).await;
            let value = serde_json::json!({ "snapshot": info, "manifest": manifest });
            output::print(json, &value, |out| inspect_text(out, &info, &manifest));
        }
        SnapshotsCommand::Verify { id } => return verify(&store, cluster.config().service(), *id, json).await,
    }
    Ok(())
}

/// The snapshot store, refusing to create a missing topic (an operator's
/// typo must not create topics).
pub async fn open(cluster: &KafkaCluster) -> Result<KafkaSnapshotStore, CliError> {
    let topic = cluster.config().snapshot_topic();
    if cluster.partition_count(&topic).await?.is_none() {
        return Err(CliError::MissingTopic {
            topic,
            hint: "check --service, or name the topic with --snapshot-topic",
        });
    }
    Ok(KafkaSnapshotStore::new(cluster).await?)
}

/// The newest `limit` snapshots (all without a limit), newest first.
pub async fn latest(
    cluster: &KafkaCluster,
    store: &KafkaSnapshotStore,
    limit: Option<usize>,
) -> Result<Vec<SnapshotInfo>, CliError> {
    let mut ids = store.list().await?;
    ids.reverse();
    ids.truncate(limit.unwrap_or(usize::MAX));
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        out.push(info(cluster, store, store.manifest(id).await?).await);
    }
    Ok(out)
}

async fn info(cluster: &KafkaCluster, store: &KafkaSnapshotStore, manifest: Manifest) -> SnapshotInfo {
    let (header, header_error) = match read_header(cluster, store.topic(), &manifest).await {
        Ok(h) => (Some(h), None),
        Err(e) => (None, Some(e)),
    };
    SnapshotInfo {
        id: manifest.id,
        bytes: manifest.total_len,
        chunks: manifest.chunks.len(),
        crc32c: format!("{:#010x}", manifest.crc32c),
        header,
        header_error,
    }
}

async fn verify(store: &KafkaSnapshotStore, service: &str, id: Option<SnapshotId>, json: bool) -> Result<(), CliError> {
    let ids = match id {
        Some(id) => vec![id],
        None => store.list().await?,
    };
    let mut results = Vec::with_capacity(ids.len());
    for id in ids {
        results.push(verify_one(store, service, id).await);
    }
    output::print(json, &results, |out| verified_text(out, &results));
    let failed = results.iter().filter(|r| !r.ok).count();
    if failed > 0 {
        return Err(CliError::VerifyFailed {
            failed,
            checked: results.len(),
        });
    }
    Ok(())
}

async fn verify_one(store: &KafkaSnapshotStore, service: &str, id: SnapshotId) -> Verified {
    let checked = match store.get(id).await {
        Err(e) => Err(CliError::from(e).chain()),
        Ok(bytes) => Snapshot::decode(bytes)
            .and_then(|s| s.check_service(service).map(|()| s.header))
            .map_err(|e| e.to_string()),
    };
    match checked {
        Ok(header) => Verified {
            id,
            ok: true,
            error: None,
            header: Some(header),
        },
        Err(e) => Verified {
            id,
            ok: false,
            error: Some(e),
            header: None,
        },
    }
}

/// Snapshots as a table, newest first.
pub fn table(out: &mut String, list: &[SnapshotInfo]) {
    if list.is_empty() {
        line!(out, "  (no snapshots)");
    }
    for s in list {
        match &s.header {
            Some(h) => line!(
                out,
                "  #{:<5} {:>10}  {}  by {:<16} schema v{}  at {}",
                s.id,
                output::bytes(s.bytes),
                output::time(h.created_at_ms),
                h.instance_id,
                h.schema_version,
                output::position(&h.position)
            ),
            None => line!(
                out,
                "  #{:<5} {:>10}  header unreadable: {}",
                s.id,
                output::bytes(s.bytes),
                s.header_error.as_deref().unwrap_or("?")
            ),
        }
    }
}

fn inspect_text(out: &mut String, info: &SnapshotInfo, manifest: &Manifest) {
    line!(out, "snapshot #{} of service {}", info.id, manifest.service);
    line!(
        out,
        "  encoded size   {} ({} bytes)",
        output::bytes(info.bytes),
        info.bytes
    );
    line!(
        out,
        "  chunks         {} of up to {} bytes",
        info.chunks,
        manifest.chunk_size
    );
    line!(out, "  crc32c         {} (whole encoding)", info.crc32c);
    let Some(h) = &info.header else {
        line!(
            out,
            "  header         unreadable: {}",
            info.header_error.as_deref().unwrap_or("?")
        );
        return;
    };
    line!(out, "  position       {}", output::position(&h.position));
    line!(out, "  schema version {}", h.schema_version);
    line!(out, "  created        {}", output::time(h.created_at_ms));
    line!(out, "  instance       {}", h.instance_id);
    line!(out, "  codec          {:?}", h.codec);
    line!(
        out,
        "  state          {} ({} bytes), crc32c {:#010x}",
        output::bytes(h.state_len),
        h.state_len,
        h.state_crc32c
    );
}

fn verified_text(out: &mut String, results: &[Verified]) {
    if results.is_empty() {
        line!(out, "no snapshots to verify");
    }
    for r in results {
        match &r.error {
            None => line!(
                out,
                "#{:<5} ok (chunks, whole and envelope checksums; state not decoded)",
                r.id
            ),
            Some(e) => line!(out, "#{:<5} FAILED: {e}", r.id),
        }
    }
}

/// The envelope's fixed prefix: magic, format u16, header length u32.
const FIXED_PREFIX: usize = 4 + 2 + 4;

/// Reads the envelope header from the first chunk(s) only, verifying their
/// CRC-32C and the header's own checksum (the layout of
/// [`ms2m_core::snapshot`]): listing never downloads whole states.
async fn read_header(cluster: &KafkaCluster, topic: &str, manifest: &Manifest) -> Result<SnapshotHeader, String> {
    let mut prefix = Vec::new();
    for (i, &(p, o, len, crc)) in manifest.chunks.iter().enumerate() {
        let record = records::read_one(cluster, topic, p, o)
            .await
            .map_err(|e| CliError::from(e).chain())?
            .ok_or_else(|| format!("chunk {i} at {topic}/{p}@{o} is gone"))?;
        let payload = record.payload.unwrap_or_default();
        if payload.len() != len as usize || crc32c::crc32c(&payload) != crc {
            return Err(format!("chunk {i} at {topic}/{p}@{o} fails its checksum"));
        }
        prefix.extend_from_slice(&payload);
        if let Some(header) = parse_header(&prefix)? {
            return Ok(header);
        }
    }
    Err("the snapshot is shorter than its envelope header".into())
}

/// The header, once `bytes` holds all of it; `None` while it needs more.
fn parse_header(bytes: &[u8]) -> Result<Option<SnapshotHeader>, String> {
    if bytes.len() < FIXED_PREFIX {
        return Ok(None);
    }
    if &bytes[..4] != b"MS2M" {
        return Err("not an ms2m snapshot (bad magic bytes)".into());
    }
    let format = u16::from_le_bytes([bytes[4], bytes[5]]);
    if format != ms2m_core::snapshot::FORMAT_VERSION {
        return Err(format!("unsupported snapshot format version {format}"));
    }
    let header_len = u32::from_le_bytes(bytes[6..10].try_into().expect("4 bytes")) as usize;
    let end = FIXED_PREFIX + header_len;
    if bytes.len() < end + 4 {
        return Ok(None);
    }
    let stored = u32::from_le_bytes(bytes[end..end + 4].try_into().expect("4 bytes"));
    if crc32c::crc32c(&bytes[FIXED_PREFIX..end]) != stored {
        return Err("snapshot header checksum mismatch".into());
    }
    ms2m_core::codec::decode(&bytes[FIXED_PREFIX..end])
        .map(Some)
        .map_err(|e| format!("snapshot header is malformed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use ms2m_core::{Position, TopicPartition};

    /// Decodes a whole envelope's header the core's way.
    fn header_of_whole(bytes: &[u8]) -> SnapshotHeader {
        Snapshot::decode(Bytes::copy_from_slice(bytes)).unwrap().header
    }

    fn encoded() -> Vec<u8> {
        let position: Position = [(TopicPartition::new("in", 0), 42)].into_iter().collect();
        let snapshot = Snapshot::seal("svc", 3, position, "i-1", Bytes::from_static(b"state bytes"));
        snapshot.encode().unwrap().to_bytes().to_vec()
    }

    #[test]
    fn the_header_is_read_from_a_prefix_as_the_core_reads_it_whole() {
        let bytes = encoded();
        let whole = header_of_whole(&bytes);
        let header_end = bytes.len() - b"state bytes".len();
        assert_eq!(parse_header(&bytes[..header_end - 1]).unwrap(), None);
        assert_eq!(parse_header(&bytes[..header_end]).unwrap(), Some(whole.clone()));
        assert_eq!(whole.schema_version, 3);
    }

    #[test]
    fn a_damaged_header_is_refused() {
        let mut bytes = encoded();
        bytes[FIXED_PREFIX + 1] ^= 0xff;
        assert!(parse_header(&bytes).unwrap_err().contains("checksum"));
        assert!(parse_header(b"NOPE0000000000").unwrap_err().contains("magic"));
    }
}
