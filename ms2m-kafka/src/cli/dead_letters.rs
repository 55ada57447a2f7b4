//! `ms2m dead-letters list|replay|skip`: the records a service set aside
//! under `BadMessagePolicy::DeadLetter`, putting them back once the bug is
//! fixed, and (`skip`) letting a service stopped by a poison record under
//! `BadMessagePolicy::Fail` get past it, with an audit record on the
//! control channel (`ControlBody::SkipInput`: who, why, when). A dead letter is the original record plus `ms2m.*` headers (its
//! coordinates in the input, the error, the stage); a payload over the
//! size limit was cut (`ms2m.truncated`), so replay copies such a record's
//! original from the input at its coordinates instead of the cut payload.

use std::fmt::Write as _;

use clap::Subcommand;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use serde::Serialize;

use super::error::CliError;
use super::output::{self, line};
use super::records::{self, RawRecord};
use crate::{KafkaCluster, KafkaError};

/// The headers the runtime adds to a dead letter (stripped on replay).
pub const MS2M_HEADERS: [&str; 7] = [
    "ms2m.error",
    "ms2m.stage",
    "ms2m.source.topic",
    "ms2m.source.partition",
    "ms2m.source.offset",
    "ms2m.truncated",
    "ms2m.original.bytes",
];

/// `ms2m dead-letters …`
#[derive(Subcommand, Clone, Debug, PartialEq, Eq)]
pub enum DeadLettersCommand {
    /// List the dead letters: their input coordinates, stage and error
    List {
        /// The dead-letter topic (BadMessagePolicy::DeadLetter's)
        #[arg(long, value_name = "TOPIC")]
        topic: String,
    },
    /// Re-produce dead letters' original records into their input partition
    /// (truncated ones are copied whole from the input). Each run produces
    /// again: replaying twice delivers twice.
    Replay {
        /// The dead-letter topic
        #[arg(long, value_name = "TOPIC")]
        topic: String,
        /// A dead letter to replay, PARTITION:OFFSET (or OFFSET) in the dead-letter
        /// topic (partition 0 if omitted; repeatable)
        #[arg(long = "offset", value_name = "[PARTITION:]OFFSET", value_parser = parse_at,
              required_unless_present = "all")]
        offsets: Vec<(i32, i64)>,
        /// Replay every dead letter of the topic
        #[arg(long, conflicts_with = "offsets")]
        all: bool,
    },
    /// Let the service skip one bad input record (one that does not decode
    /// or that apply rejects) whatever its BadMessagePolicy: publishes a
    /// SkipInput audit record (operator, reason, time) on the control topic.
    /// Nodes honour it when they next build an instance: restart a node the
    /// record stopped. A good record at that offset is still applied.
    Skip {
        /// The input topic
        #[arg(long, value_name = "TOPIC")]
        input: String,
        /// The input partition
        #[arg(long)]
        partition: i32,
        /// The bad record's offset (the one in the node's Decode/Apply error)
        #[arg(long)]
        offset: i64,
        /// Why it is skipped (kept in the audit record)
        #[arg(long)]
        reason: String,
        /// Who decides (default: $USER)
        #[arg(long)]
        operator: Option<String>,
    },
}

/// What `skip` recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Skipped {
    /// The input record allowed to be skipped.
    pub record: Coordinates,
    /// Why.
    pub reason: String,
    /// Who.
    pub operator: String,
    /// The control topic holding the audit record.
    pub control_topic: String,
}

/// Parses `[PARTITION:]OFFSET`.
pub fn parse_at(text: &str) -> Result<(i32, i64), String> {
    let bad = || format!("expected [PARTITION:]OFFSET, e.g. 3:1042 or 1042, found `{text}`");
    match text.split_once(':') {
        Some((p, o)) => Ok((
            p.trim().parse().map_err(|_| bad())?,
            o.trim().parse().map_err(|_| bad())?,
        )),
        None => Ok((0, text.trim().parse().map_err(|_| bad())?)),
    }
}

/// One dead letter as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    /// Partition of the dead-letter topic.
    pub partition: i32,
    /// Offset in the dead-letter topic.
    pub offset: i64,
    /// The input record's coordinates (`None`: not written by ms2m).
    pub source: Option<Coordinates>,
    /// `decode` or `apply`.
    pub stage: Option<String>,
    /// The error chain.
    pub error: Option<String>,
    /// Whether the payload was cut (the original stays in the input).
    pub truncated: bool,
    /// The original payload's size, when it was cut.
    pub original_bytes: Option<u64>,
    /// Size of the payload stored in the dead letter.
    pub payload_bytes: usize,
    /// The key, as text or hex.
    pub key: Option<String>,
}

/// Where a record is, or was, in the input.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Coordinates {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
}

/// One replayed dead letter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Replayed {
    /// Partition of the dead letter.
    pub partition: i32,
    /// Offset of the dead letter.
    pub offset: i64,
    /// Where it was originally.
    pub source: Coordinates,
    /// Where the copy was produced.
    pub produced: Coordinates,
    /// Whether the record was copied from the input (truncated dead letter).
    pub from_original: bool,
}

/// Runs a `dead-letters` subcommand.
pub async fn run(cluster: &KafkaCluster, command: &DeadLettersCommand, json: bool) -> Result<(), CliError> {
    match command {
        DeadLettersCommand::List { topic } => {
            let list: Vec<DeadLetter> = read_all(cluster, topic).await?.iter().map(describe).collect();
            output::print(json, &list, |out| list_text(out, topic, &list));
        }
        DeadLettersCommand::Replay { topic, offsets, all } => {
            let chosen = if *all {
                read_all(cluster, topic).await?
            } else {
                pick(cluster, topic, offsets).await?
            };
            let done = replay(cluster, topic, &chosen).await?;
            output::print(json, &done, |out| replay_text(out, &done));
        }
        DeadLettersCommand::Skip {
            input,
            partition,
            offset,
            reason,
            operator,
        } => {
            let record = Coordinates {
                topic: input.clone(),
                partition: *partition,
                offset: *offset,
            };
            let operator = operator
                .clone()
                .or_else(|| std::env::var("USER").ok())
                .unwrap_or_else(|| "unknown".into());
            let done = skip(cluster, record, reason, &operator).await?;
            output::print(json, &done, |out| {
                let r = &done.record;
                line!(
                    out,
                    "{}/{}@{} may be skipped if bad: recorded on {} by {} ({})",
                    r.topic,
                    r.partition,
                    r.offset,
                    done.control_topic,
                    done.operator,
                    done.reason
                );
            });
        }
    }
    Ok(())
}

/// Checks that the record exists, then publishes the `SkipInput` record.
async fn skip(cluster: &KafkaCluster, record: Coordinates, reason: &str, operator: &str) -> Result<Skipped, CliError> {
    let c = &record;
    if records::read_one(cluster, &c.topic, c.partition, c.offset)
        .await?
        .is_none()
    {
        return Err(CliError::NoInputRecord {
            topic: c.topic.clone(),
            partition: c.partition,
            offset: c.offset,
        });
    }
    let Some(control) = super::status::open_control(cluster).await? else {
        return Err(CliError::MissingTopic {
            topic: cluster.config().control_topic(),
            hint: "no node of this service has started (or name the control topic with --control-topic)",
        });
    };
    let body = ms2m_core::ControlBody::SkipInput {
        topic: c.topic.clone(),
        partition: c.partition,
        offset: c.offset,
        reason: reason.to_string(),
        operator: operator.to_string(),
    };
    let message = ms2m_core::ControlMessage {
        service: cluster.config().service().to_string(),
        migration_id: String::new(),
        from: ms2m_core::Role::Operator,
        sent_at_ms: output::now_ms(),
        body,
    };
    ms2m_core::ControlChannel::publish(&control, &message).await?;
    Ok(Skipped {
        record,
        reason: reason.to_string(),
        operator: operator.to_string(),
        control_topic: cluster.config().control_topic(),
    })
}

async fn read_all(cluster: &KafkaCluster, topic: &str) -> Result<Vec<RawRecord>, CliError> {
    if cluster.partition_count(topic).await?.is_none() {
        return Err(CliError::MissingTopic {
            topic: topic.to_string(),
            hint: "name the service's BadMessagePolicy::DeadLetter topic with --topic",
        });
    }
    Ok(records::read_topic(cluster, topic).await?)
}

async fn pick(cluster: &KafkaCluster, topic: &str, at: &[(i32, i64)]) -> Result<Vec<RawRecord>, CliError> {
    let mut out = Vec::with_capacity(at.len());
    for &(partition, offset) in at {
        let record = records::read_one(cluster, topic, partition, offset).await?;
        out.push(record.ok_or_else(|| CliError::NoDeadLetter {
            topic: topic.to_string(),
            partition,
            offset,
        })?);
    }
    Ok(out)
}

/// What a dead letter's headers say.
pub fn describe(r: &RawRecord) -> DeadLetter {
    DeadLetter {
        partition: r.partition,
        offset: r.offset,
        source: coordinates(r).ok(),
        stage: r.header_str("ms2m.stage").map(String::from),
        error: r.header_str("ms2m.error").map(String::from),
        truncated: is_truncated(r),
        original_bytes: r.header_str("ms2m.original.bytes").and_then(|v| v.parse().ok()),
        payload_bytes: r.payload.as_ref().map_or(0, Vec::len),
        key: r.key.as_deref().map(output::text_or_hex),
    }
}

fn is_truncated(r: &RawRecord) -> bool {
    r.header_str("ms2m.truncated") == Some("true")
}

/// The input coordinates of a dead letter, or the header that is missing.
fn coordinates(r: &RawRecord) -> Result<Coordinates, &'static str> {
    let topic = r.header_str("ms2m.source.topic").ok_or("ms2m.source.topic")?;
    let partition = r
        .header_str("ms2m.source.partition")
        .and_then(|v| v.parse().ok())
        .ok_or("ms2m.source.partition")?;
    let offset = r
        .header_str("ms2m.source.offset")
        .and_then(|v| v.parse().ok())
        .ok_or("ms2m.source.offset")?;
    Ok(Coordinates {
        topic: topic.to_string(),
        partition,
        offset,
    })
}

/// The record to put back: the dead letter without the `ms2m.*` headers,
/// or, when it was cut, the original read from the input.
pub async fn original(cluster: &KafkaCluster, dlq: &str, r: &RawRecord) -> Result<(Coordinates, RawRecord), CliError> {
    let source = coordinates(r).map_err(|header| CliError::NotADeadLetter {
        topic: dlq.to_string(),
        partition: r.partition,
        offset: r.offset,
        header,
    })?;
    if !is_truncated(r) {
        let mut copy = r.clone();
        copy.headers.retain(|(k, _)| !MS2M_HEADERS.contains(&k.as_str()));
        return Ok((source, copy));
    }
    let whole = records::read_one(cluster, &source.topic, source.partition, source.offset).await?;
    let whole = whole.ok_or_else(|| CliError::OriginalGone {
        partition: r.partition,
        offset: r.offset,
        source_topic: source.topic.clone(),
        source_partition: source.partition,
        source_offset: source.offset,
    })?;
    Ok((source, whole))
}

async fn replay(cluster: &KafkaCluster, dlq: &str, chosen: &[RawRecord]) -> Result<Vec<Replayed>, CliError> {
    let mut config = cluster.library_client_config();
    config.set("enable.idempotence", "true").set("acks", "all");
    let producer: FutureProducer = config
        .create()
        .map_err(KafkaError::kafka("create the replay producer"))?;
    // Every record is checked and read first: a foreign record or a lost
    // original fails the command before anything is produced.
    let mut originals = Vec::with_capacity(chosen.len());
    for r in chosen {
        originals.push(original(cluster, dlq, r).await?);
    }
    let mut done = Vec::with_capacity(chosen.len());
    for (r, (source, record)) in chosen.iter().zip(originals) {
        let produced = produce(&producer, cluster, &source, &record).await?;
        done.push(Replayed {
            partition: r.partition,
            offset: r.offset,
            from_original: is_truncated(r),
            source,
            produced,
        });
    }
    Ok(done)
}

/// Produces `record` to the partition it came from (keeps per-key order).
async fn produce(
    producer: &FutureProducer,
    cluster: &KafkaCluster,
    to: &Coordinates,
    record: &RawRecord,
) -> Result<Coordinates, CliError> {
    let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
    for (key, value) in &record.headers {
        headers = headers.insert(Header {
            key,
            value: Some(value.as_slice()),
        });
    }
    let mut out = FutureRecord::<[u8], [u8]>::to(&to.topic)
        .partition(to.partition)
        .headers(headers);
    if let Some(k) = &record.key {
        out = out.key(k.as_slice());
    }
    if let Some(p) = &record.payload {
        out = out.payload(p.as_slice());
    }
    let delivered = producer
        .send(out, Timeout::After(cluster.config().timeout()))
        .await
        .map_err(|(e, _)| KafkaError::kafka("re-produce a dead letter")(e))?;
    Ok(Coordinates {
        topic: to.topic.clone(),
        partition: delivered.partition,
        offset: delivered.offset,
    })
}

fn list_text(out: &mut String, topic: &str, list: &[DeadLetter]) {
    line!(out, "{} dead letter(s) in {topic}", list.len());
    for d in list {
        let from = d.source.as_ref().map_or("(not written by ms2m)".to_string(), |c| {
            format!("{}/{}@{}", c.topic, c.partition, c.offset)
        });
        let cut = match (d.truncated, d.original_bytes) {
            (true, Some(n)) => format!(", truncated from {}", output::bytes(n)),
            (true, None) => ", truncated".to_string(),
            _ => String::new(),
        };
        line!(
            out,
            "  {}:{}  from {from}  [{}] {}  ({}{cut})",
            d.partition,
            d.offset,
            d.stage.as_deref().unwrap_or("?"),
            d.error.as_deref().unwrap_or(""),
            output::bytes(d.payload_bytes as u64)
        );
    }
}

fn replay_text(out: &mut String, done: &[Replayed]) {
    line!(out, "replayed {} dead letter(s)", done.len());
    for r in done {
        let whole = if r.from_original {
            " (whole original, from the input)"
        } else {
            ""
        };
        line!(
            out,
            "  {}:{} -> {}/{}@{}{whole}",
            r.partition,
            r.offset,
            r.produced.topic,
            r.produced.partition,
            r.produced.offset
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dead_letter(headers: &[(&str, &str)]) -> RawRecord {
        RawRecord {
            partition: 1,
            offset: 9,
            key: Some(b"k".to_vec()),
            payload: Some(b"cut".to_vec()),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                .collect(),
        }
    }

    #[test]
    fn coordinates_and_flags_come_from_the_headers() {
        let r = dead_letter(&[
            ("trace", "t-1"),
            ("ms2m.truncated", "true"),
            ("ms2m.original.bytes", "2000000"),
            ("ms2m.error", "bad json"),
            ("ms2m.stage", "decode"),
            ("ms2m.source.topic", "orders"),
            ("ms2m.source.partition", "3"),
            ("ms2m.source.offset", "42"),
        ]);
        let d = describe(&r);
        let want = Coordinates {
            topic: "orders".into(),
            partition: 3,
            offset: 42,
        };
        assert_eq!(d.source, Some(want));
        assert!(d.truncated);
        assert_eq!(
            (d.original_bytes, d.stage.as_deref()),
            (Some(2_000_000), Some("decode"))
        );
        assert_eq!(
            coordinates(&dead_letter(&[("ms2m.source.topic", "t")])),
            Err("ms2m.source.partition")
        );
    }

    #[test]
    fn offsets_parse_with_an_optional_partition() {
        assert_eq!(parse_at("3:1042").unwrap(), (3, 1042));
        assert_eq!(parse_at("17").unwrap(), (0, 17));
        assert!(parse_at("x:1").is_err() && parse_at("").is_err());
    }
}
