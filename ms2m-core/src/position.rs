//! Positions in the input log: for every `(topic, partition)`, the next
//! offset to apply. A state *is* the fold of every message below its
//! position, which is what lets a snapshot say exactly where replay starts.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// A topic and partition, ordered by topic name, then partition.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TopicPartition {
    /// Topic name.
    pub topic: Arc<str>,
    /// Partition number.
    pub partition: i32,
}

impl TopicPartition {
    /// Creates a topic-partition.
    pub fn new(topic: impl Into<Arc<str>>, partition: i32) -> Self {
        Self {
            topic: topic.into(),
            partition,
        }
    }
}

/// Positions are looked up once or twice per applied message, and the
/// topic names of a log's records and of the instance's position are one
/// shared allocation: comparing them by pointer first saves a string
/// comparison per map node visited.
impl Ord for TopicPartition {
    fn cmp(&self, other: &Self) -> Ordering {
        let topic = if Arc::ptr_eq(&self.topic, &other.topic) {
            Ordering::Equal
        } else {
            self.topic.cmp(&other.topic)
        };
        topic.then(self.partition.cmp(&other.partition))
    }
}

impl PartialOrd for TopicPartition {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// For each partition, the next offset to apply.
///
/// A partition that is absent is at the start of its log (see
/// [`StartFrom`](crate::StartFrom)).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "Vec<PositionEntry>", into = "Vec<PositionEntry>")]
pub struct Position {
    offsets: BTreeMap<TopicPartition, i64>,
}

/// How a position is serialized: a list, so that JSON (whose map keys must
/// be strings) can carry it on the control channel and in reports.
#[derive(Serialize, Deserialize)]
struct PositionEntry {
    topic: Arc<str>,
    partition: i32,
    offset: i64,
}

impl From<Vec<PositionEntry>> for Position {
    fn from(entries: Vec<PositionEntry>) -> Self {
        entries
            .into_iter()
            .map(|e| (TopicPartition::new(e.topic, e.partition), e.offset))
            .collect()
    }
}

impl From<Position> for Vec<PositionEntry> {
    fn from(p: Position) -> Self {
        p.offsets
            .into_iter()
            .map(|(tp, offset)| PositionEntry {
                topic: tp.topic,
                partition: tp.partition,
                offset,
            })
            .collect()
    }
}

impl Position {
    /// An empty position.
    pub fn new() -> Self {
        Self::default()
    }

    /// The next offset to apply on `tp`, if known.
    pub fn get(&self, tp: &TopicPartition) -> Option<i64> {
        self.offsets.get(tp).copied()
    }

    /// Sets the next offset to apply on `tp`.
    pub fn set(&mut self, tp: TopicPartition, next_offset: i64) {
        self.offsets.insert(tp, next_offset);
    }

    /// Records that the message at `offset` on `tp` was applied.
    pub fn advance(&mut self, tp: &TopicPartition, offset: i64) {
        match self.offsets.get_mut(tp) {
            Some(next) => *next = (*next).max(offset + 1),
            None => {
                self.offsets.insert(tp.clone(), offset + 1);
            }
        }
    }

    /// Iterates over `(partition, next offset)`.
    pub fn iter(&self) -> impl Iterator<Item = (&TopicPartition, i64)> {
        self.offsets.iter().map(|(tp, o)| (tp, *o))
    }

    /// Number of partitions recorded.
    pub fn len(&self) -> usize {
        self.offsets.len()
    }

    /// Whether no partition is recorded.
    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }

    /// Whether this position is at or beyond `other` on every partition
    /// `other` names (absent partitions count as offset 0).
    pub fn reaches(&self, other: &Position) -> bool {
        other.iter().all(|(tp, o)| self.get(tp).unwrap_or(0) >= o)
    }

    /// Messages between this position and `ahead`, summed over partitions
    /// (0 where this position is already past `ahead`).
    pub fn distance_to(&self, ahead: &Position) -> u64 {
        ahead
            .iter()
            .map(|(tp, o)| (o - self.get(tp).unwrap_or(0)).max(0) as u64)
            .sum()
    }

    /// Total of all offsets; a cheap scalar for progress displays.
    pub fn total(&self) -> i64 {
        self.offsets.values().sum()
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{")?;
        for (i, (tp, o)) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{tp}@{o}")?;
        }
        f.write_str("}")
    }
}

impl FromIterator<(TopicPartition, i64)> for Position {
    fn from_iter<I: IntoIterator<Item = (TopicPartition, i64)>>(iter: I) -> Self {
        Self {
            offsets: iter.into_iter().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_as_json_and_bincode() {
        let p: Position = [(TopicPartition::new("t", 0), 10), (TopicPartition::new("u", 3), 4)]
            .into_iter()
            .collect();
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<Position>(&json).unwrap(), p);
        let bin = crate::codec::encode(&p).unwrap();
        assert_eq!(crate::codec::decode::<Position>(&bin).unwrap(), p);
    }

    #[test]
    fn topic_partitions_order_by_name_whether_shared_or_not() {
        let shared: Arc<str> = Arc::from("b");
        let a0 = TopicPartition::new("a", 0);
        let b1 = TopicPartition::new(shared.clone(), 1);
        let b2 = TopicPartition::new(shared, 2);
        let b1_copy = TopicPartition::new("b", 1);
        assert_eq!(a0.cmp(&b1), Ordering::Less);
        assert_eq!(b2.cmp(&b1), Ordering::Greater);
        assert_eq!(b1.cmp(&b1_copy), Ordering::Equal);
        assert_eq!(b1_copy.cmp(&b2), Ordering::Less);
    }

    #[test]
    fn advance_never_moves_backwards() {
        let tp = TopicPartition::new("t", 0);
        let mut p = Position::new();
        p.advance(&tp, 5);
        p.advance(&tp, 3);
        assert_eq!(p.get(&tp), Some(6));
    }

    #[test]
    fn reaches_and_distance() {
        let a: Position = [(TopicPartition::new("t", 0), 10), (TopicPartition::new("t", 1), 4)]
            .into_iter()
            .collect();
        let b: Position = [(TopicPartition::new("t", 0), 12)].into_iter().collect();
        assert!(!a.reaches(&b));
        assert!(b.reaches(&[(TopicPartition::new("t", 0), 12)].into_iter().collect()));
        assert_eq!(a.distance_to(&b), 2);
        assert_eq!(b.distance_to(&a), 4);
    }
}
