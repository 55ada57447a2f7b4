//! [`CliError`]: every way an `ms2m` command fails, each message naming the
//! fix, and the exit code it maps to (2: the invocation or configuration
//! is wrong; 1: the cluster or the operation failed).

use std::path::PathBuf;

use crate::KafkaError;

/// A failed `ms2m` command.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CliError {
    /// No service name anywhere.
    #[error(
        "no service given: pass --service NAME (the service's StatefulService::NAME), set MS2M_SERVICE, \
         or put ms2m.service=NAME in the --config file"
    )]
    NoService,
    /// No broker anywhere.
    #[error(
        "no broker given: pass --bootstrap-servers HOST:PORT, set MS2M_BOOTSTRAP_SERVERS, \
         or put bootstrap.servers=HOST:PORT in the --config file"
    )]
    NoBroker,
    /// The configuration file could not be read.
    #[error("cannot read the configuration file `{}`: {source}", path.display())]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A line of the configuration file is not `KEY=VALUE`.
    #[error("{}:{line}: expected KEY=VALUE (a librdkafka property or an ms2m.* key), found `{text}`", path.display())]
    ConfigLine {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
    /// A value of the configuration that cannot be used.
    #[error("invalid setting `{key}={value}`: {reason}")]
    BadSetting {
        /// The key.
        key: String,
        /// Its value.
        value: String,
        /// What is wrong and what to write instead.
        reason: &'static str,
    },
    /// A topic the command reads does not exist.
    #[error("topic `{topic}` does not exist: {hint}")]
    MissingTopic {
        /// The topic.
        topic: String,
        /// How to name the right one.
        hint: &'static str,
    },
    /// `migrate` without `--from` on a service with no recorded owner.
    #[error("no owner is recorded on the control topic yet (no migration decided one): pass --from SOURCE")]
    NoOwner,
    /// A Kafka operation failed.
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    /// A protocol operation (migration, recovery, history) failed.
    #[error(transparent)]
    Core(#[from] ms2m_core::Error),
    /// `snapshots verify` found damaged snapshots (listed in its output).
    #[error("{failed} of {checked} snapshot(s) failed verification")]
    VerifyFailed {
        /// How many failed.
        failed: usize,
        /// How many were checked.
        checked: usize,
    },
    /// `recover` could not decide some migrations (listed in its output).
    #[error("{failed} of {total} undecided migration(s) could not be recovered")]
    RecoverFailed {
        /// How many failed.
        failed: usize,
        /// How many were undecided.
        total: usize,
    },
    /// No record at the given dead-letter coordinates.
    #[error(
        "no record at {topic}/{partition}@{offset}: check the offsets with `ms2m dead-letters list --topic {topic}`"
    )]
    NoDeadLetter {
        /// The dead-letter topic.
        topic: String,
        /// Its partition.
        partition: i32,
        /// The offset.
        offset: i64,
    },
    /// No input record at the coordinates `dead-letters skip` was given.
    #[error(
        "no input record at {topic}/{partition}@{offset}: give the topic, partition and offset of the \
         node's Decode/Apply error"
    )]
    NoInputRecord {
        /// The input topic.
        topic: String,
        /// Its partition.
        partition: i32,
        /// The offset.
        offset: i64,
    },
    /// A record of the dead-letter topic lacks the headers ms2m writes.
    #[error(
        "{topic}/{partition}@{offset} is not a dead letter written by ms2m (header `{header}` missing or \
         malformed): replay only records of a BadMessagePolicy::DeadLetter topic"
    )]
    NotADeadLetter {
        /// The dead-letter topic.
        topic: String,
        /// Its partition.
        partition: i32,
        /// The offset.
        offset: i64,
        /// The header at fault.
        header: &'static str,
    },
    /// The original of a truncated dead letter is no longer in the input.
    #[error(
        "dead letter {partition}@{offset} was truncated, and its original record {source_topic}/{source_partition}@{source_offset} \
         is gone from the input (retention?): it cannot be replayed whole"
    )]
    OriginalGone {
        /// Dead-letter partition.
        partition: i32,
        /// Dead-letter offset.
        offset: i64,
        /// The input topic.
        source_topic: String,
        /// The input partition.
        source_partition: i32,
        /// The input offset.
        source_offset: i64,
    },
    /// `drain` of a host the control topic never names.
    #[error("no host `{host}` on the control topic (hosts: {known:?}): check the id with `ms2m fleet`")]
    UnknownHost {
        /// The id given.
        host: String,
        /// The hosts named.
        known: Vec<String>,
    },
    /// `drain --wait`: the host still owns tasks when the wait ran out.
    #[error(
        "host {host} still owns {owns} task(s) after {waited:?}: check that the fleet has a live leader and \
         another live host (`ms2m fleet`), then wait again with `ms2m drain {host} --wait ...`"
    )]
    DrainTimeout {
        /// The host drained.
        host: String,
        /// How long the command waited.
        waited: std::time::Duration,
        /// Tasks it still owns.
        owns: usize,
    },
}

impl CliError {
    /// The process exit code: 2 when the invocation or configuration is
    /// wrong (like clap's usage errors), 1 for every other failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::NoService
            | CliError::NoBroker
            | CliError::ConfigFile { .. }
            | CliError::ConfigLine { .. }
            | CliError::BadSetting { .. } => 2,
            _ => 1,
        }
    }

    /// Whether the command already printed its result (which lists what
    /// failed): then `--json` prints no separate error document.
    pub fn already_reported(&self) -> bool {
        matches!(self, CliError::VerifyFailed { .. } | CliError::RecoverFailed { .. })
    }

    /// The message with every cause, `a: b: c`.
    pub fn chain(&self) -> String {
        let mut out = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(e) = source {
            let text = e.to_string();
            if !out.contains(&text) {
                out.push_str(": ");
                out.push_str(&text);
            }
            source = e.source();
        }
        out
    }
}
