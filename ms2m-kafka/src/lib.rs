//! Kafka backends for ms2m (skeleton).
