//! Where outputs go, and how they are committed together with the input
//! position that produced them.

use async_trait::async_trait;

use crate::error::BackendError;
use crate::position::Position;
use crate::record::OutputRecord;

/// Delivery guarantee of an [`OutputSink`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Delivery {
    /// Outputs and the input position commit atomically (Kafka transactions):
    /// after any crash, every output is visible exactly once.
    ExactlyOnce,
    /// Outputs are flushed, then the position is committed: a crash between
    /// the two re-emits the outputs of what the last finished commit did not
    /// cover (one commit's worth, `commit_every` messages or
    /// `commit_interval`; two while a commit finishes in the background).
    AtLeastOnce,
}

/// A commit finishing on its own (see [`OutputSink::commit_in_background`]).
pub type BackgroundCommit<E> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), E>> + Send + 'static>>;

/// A destination for outputs that commits them with the input position.
///
/// The committed position is the *output watermark*: on recovery, messages
/// below it are replayed with outputs suppressed, messages at or above it
/// are processed live.
#[async_trait]
pub trait OutputSink: Send + 'static {
    /// The backend's error. Report a takeover by another owner as
    /// [`ErrorKind::Fenced`](crate::ErrorKind::Fenced).
    type Error: BackendError;

    /// The guarantee this sink gives.
    fn delivery(&self) -> Delivery;

    /// Takes exclusive ownership of the output stream: once this returns,
    /// any sink that claimed it earlier fails to commit with a `Fenced`
    /// error (Kafka: `init_transactions` bumps the producer epoch).
    async fn claim(&mut self) -> Result<(), Self::Error>;

    /// Queues one output; it becomes visible at the next `commit` at the
    /// latest (a sink may show it sooner: see [`flush`](Self::flush)).
    async fn send(&mut self, output: OutputRecord) -> Result<(), Self::Error>;

    /// Makes every output sent so far visible, together with `position` (the
    /// input position that produced them) as the new output watermark.
    async fn commit(&mut self, position: &Position) -> Result<(), Self::Error>;

    /// Starts the same commit as [`commit`](Self::commit) without holding
    /// the caller: the returned future finishes it (waits for the outputs'
    /// acknowledgements, then stores `position`) and owns what it needs, so
    /// the runtime runs it on its own task while the apply loop goes on
    /// sending. On a broker slowed by other traffic (a snapshot upload or
    /// download), waiting for acknowledgements on the apply loop stalled
    /// every output behind it.
    ///
    /// `None` (the default) means the sink only commits through `commit`
    /// (the Kafka sink with exactly-once: a transaction's outputs and
    /// offsets commit together). The runtime runs at most one such commit
    /// at a time and lets it finish before any other call that depends on
    /// what is committed (`commit`, `claim`, `abort`, `committed`).
    fn commit_in_background(&mut self, position: &Position) -> Option<BackgroundCommit<Self::Error>> {
        let _ = position;
        None
    }

    /// Waits until clients can read every output sent so far, without
    /// committing, and answers `true`; answers `false` when outputs show
    /// only at `commit` (a transaction's). The Kafka sink with at-least-once
    /// delivery: its outputs are readable once acknowledged, so it waits
    /// for the acknowledgements (those a background commit took included).
    /// The migration target uses it to time its first outputs after a
    /// handover. Default: `false` (nothing is readable before `commit`, as
    /// [`send`](Self::send) promises), which makes the target time the
    /// commit instead.
    async fn flush(&mut self) -> Result<bool, Self::Error> {
        Ok(false)
    }

    /// Drops outputs sent since the last commit (used when handing back
    /// ownership after a failed cutover).
    async fn abort(&mut self) -> Result<(), Self::Error>;

    /// The last committed position, `None` if nothing was ever committed.
    async fn committed(&mut self) -> Result<Option<Position>, Self::Error>;

    /// Gets ready to emit to `topics` soon, so that the first commit after
    /// going live pays no first-use cost (Kafka: the topics' metadata and
    /// the group coordinator; a producer that first meets a topic while
    /// committing waits about 100 ms for its metadata). Best effort: the
    /// runtime logs a failure and goes on. Default: nothing.
    async fn warm_up(&mut self, topics: &[&str]) -> Result<(), Self::Error> {
        let _ = topics;
        Ok(())
    }
}
