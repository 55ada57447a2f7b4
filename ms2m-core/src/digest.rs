//! Order-independent state digests, compared by source and target at
//! migration cutover to prove they hold the same state.
//!
//! Equal states must give equal digests even when a `HashMap` iterates in a
//! different order in another process; that is why this is not simply a hash
//! of the snapshot bytes.
//!
//! # How
//!
//! [`digest_of`] runs the value's `Serialize` impl against a hashing
//! serializer that gives every value a 128-bit xxh3 digest built from its
//! children's digests:
//!
//! * scalars hash their bytes under a per-type tag (so `1u8` and `1u32`
//!   differ, and floats compare bit for bit);
//! * sequences, tuples, structs, enums and options hash their children in
//!   order, with names, variant indices and lengths;
//! * **maps** combine per-entry digests (key and value hashed together) by
//!   wrapping addition plus the entry count, which is commutative: a
//!   `HashMap` digests the same whatever its iteration order, and equal to a
//!   `BTreeMap` with the same entries.
//!
//! # Sets
//!
//! serde serializes a `HashSet` exactly like a `Vec`, so the serializer
//! cannot know a sequence's order is meaningless. [`Digester::unordered_field`]
//! digests a set field order-independently, and `#[derive(ServiceState)]`
//! uses it for every field whose type is a `HashSet` or `BTreeSet` (or is
//! marked `#[state(unordered)]`). A `HashSet` nested inside another type
//! (`Vec<HashSet<_>>`, `HashMap<K, HashSet<V>>`) is digested in iteration
//! order; use a `BTreeSet` there, whose iteration order is its sorted order.

use std::fmt;

use serde::ser;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{xxh3_128_with_seed, Xxh3};

/// A 128-bit digest of a state.
///
/// Displayed, parsed ([`FromStr`](std::str::FromStr)) and serialized in
/// human-readable formats (JSON, YAML, TOML...) as 32 lowercase hex
/// digits: many of those formats have no 128-bit integers
/// (`serde_json::to_value` fails on one above 2⁶⁴). Compact formats
/// (bincode...) get the `u128`. Deserializing from a human-readable format
/// also accepts an integer that fits the format's numbers.
///
/// Compatibility: control records written by builds before this encoding
/// carried the digest as a JSON number. serde_json reads numbers above
/// 2⁶⁴ (almost every digest) only as lossy floats, so such a number is
/// rejected, never misread: the old record no longer decodes and is skipped
/// like any undecodable control record. Run every party of a migration on
/// the same version.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct StateDigest(pub u128);

/// The length of a [`StateDigest`] in hex digits.
const DIGEST_HEX_DIGITS: usize = 32;

/// A string that is not a [`StateDigest`]: 32 hex digits.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a state digest is {DIGEST_HEX_DIGITS} hex digits, got `{0}`")]
pub struct ParseDigestError(String);

impl std::str::FromStr for StateDigest {
    type Err = ParseDigestError;

    fn from_str(s: &str) -> Result<Self, ParseDigestError> {
        let hex = s.len() == DIGEST_HEX_DIGITS && s.bytes().all(|b| b.is_ascii_hexdigit());
        match hex.then(|| u128::from_str_radix(s, 16)) {
            Some(Ok(n)) => Ok(StateDigest(n)),
            _ => Err(ParseDigestError(s.to_string())),
        }
    }
}

impl Serialize for StateDigest {
    fn serialize<S: ser::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.collect_str(self)
        } else {
            serializer.serialize_u128(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for StateDigest {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            deserializer.deserialize_any(DigestVisitor)
        } else {
            u128::deserialize(deserializer).map(StateDigest)
        }
    }
}

/// Reads a [`StateDigest`] from hex digits or an integer.
struct DigestVisitor;

impl serde::de::Visitor<'_> for DigestVisitor {
    type Value = StateDigest;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a state digest: {DIGEST_HEX_DIGITS} hex digits")
    }

    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<StateDigest, E> {
        s.parse().map_err(E::custom)
    }

    fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<StateDigest, E> {
        Ok(StateDigest(n.into()))
    }

    fn visit_u128<E: serde::de::Error>(self, n: u128) -> Result<StateDigest, E> {
        Ok(StateDigest(n))
    }
}

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
    hasher: Xxh3,
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

    /// Adds one named field, digested with [`digest_of`].
    pub fn field<T: Serialize + ?Sized>(&mut self, name: &str, value: &T) {
        self.named(name, tag::FIELD, digest_of(value).0);
    }

    /// Adds one named field whose items are a set: their order does not
    /// change the digest (for `HashSet`, which serde cannot tell from a
    /// sequence).
    pub fn unordered_field<I>(&mut self, name: &str, items: I)
    where
        I: IntoIterator,
        I::Item: Serialize,
    {
        let mut set = Unordered::new(tag::SET);
        for item in items {
            set.add(digest_of(&item).0);
        }
        self.named(name, tag::UNORDERED_FIELD, set.finish());
    }

    fn named(&mut self, name: &str, kind: u8, digest: u128) {
        self.hasher.update(&[kind]);
        self.hasher.update(&(name.len() as u64).to_le_bytes());
        self.hasher.update(name.as_bytes());
        self.hasher.update(&digest.to_le_bytes());
    }

    /// The digest of everything added.
    pub fn finish(self) -> StateDigest {
        StateDigest(self.hasher.digest128())
    }
}

/// The digest of any serializable value; maps are digested independently of
/// their iteration order (see the [module docs](self)).
///
/// A `Serialize` impl that fails (a custom error) yields the digest of its
/// error message, so two sides failing alike still compare equal and a side
/// failing differently does not.
pub fn digest_of<T: Serialize + ?Sized>(value: &T) -> StateDigest {
    match sub_digest(tag::VALUE, value) {
        Ok(d) => StateDigest(d),
        Err(DigestError(msg)) => StateDigest(xxh3_128_with_seed(msg.as_bytes(), tag::ERROR as u64)),
    }
}

/// Domain-separation tags: every kind of value hashes under its own seed.
mod tag {
    pub(super) const BOOL: u8 = 1;
    pub(super) const I8: u8 = 2;
    pub(super) const I16: u8 = 3;
    pub(super) const I32: u8 = 4;
    pub(super) const I64: u8 = 5;
    pub(super) const I128: u8 = 6;
    pub(super) const U8: u8 = 7;
    pub(super) const U16: u8 = 8;
    pub(super) const U32: u8 = 9;
    pub(super) const U64: u8 = 10;
    pub(super) const U128: u8 = 11;
    pub(super) const F32: u8 = 12;
    pub(super) const F64: u8 = 13;
    pub(super) const CHAR: u8 = 14;
    pub(super) const STR: u8 = 15;
    pub(super) const BYTES: u8 = 16;
    pub(super) const NONE: u8 = 17;
    pub(super) const SOME: u8 = 18;
    pub(super) const UNIT: u8 = 19;
    pub(super) const UNIT_STRUCT: u8 = 20;
    pub(super) const UNIT_VARIANT: u8 = 21;
    pub(super) const NEWTYPE_STRUCT: u8 = 22;
    pub(super) const NEWTYPE_VARIANT: u8 = 23;
    pub(super) const SEQ: u8 = 24;
    pub(super) const TUPLE: u8 = 25;
    pub(super) const TUPLE_STRUCT: u8 = 26;
    pub(super) const TUPLE_VARIANT: u8 = 27;
    pub(super) const MAP: u8 = 28;
    pub(super) const MAP_ENTRY: u8 = 29;
    pub(super) const STRUCT: u8 = 30;
    pub(super) const STRUCT_VARIANT: u8 = 31;
    pub(super) const SET: u8 = 32;
    pub(super) const FIELD: u8 = 33;
    pub(super) const UNORDERED_FIELD: u8 = 34;
    pub(super) const ERROR: u8 = 35;
    pub(super) const NAME: u8 = 36;
    pub(super) const END: u8 = 37;
    pub(super) const SKIPPED: u8 = 38;
    pub(super) const VALUE: u8 = 39;
}

fn leaf(tag: u8, bytes: &[u8]) -> u128 {
    xxh3_128_with_seed(bytes, tag as u64)
}

/// A failing `Serialize` impl's message.
#[derive(Debug)]
struct DigestError(String);

impl fmt::Display for DigestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DigestError {}

impl ser::Error for DigestError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DigestError(msg.to_string())
    }
}

/// A streaming hasher fed a canonical, self-delimiting encoding: every value
/// starts with its tag, strings and bytes carry their length, compound
/// values end with an end tag and their item count. Writes are buffered so
/// that a long sequence of small scalars costs a copy each, not a hash each.
struct Sink {
    hasher: Xxh3,
    buf: Vec<u8>,
}

const SINK_BUFFER: usize = 16 * 1024;

impl Sink {
    fn new(seed: u8) -> Self {
        Sink {
            hasher: Xxh3::with_seed(seed as u64),
            buf: Vec::with_capacity(SINK_BUFFER),
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        if self.buf.len() + bytes.len() > SINK_BUFFER {
            self.hasher.update(&self.buf);
            self.buf.clear();
        }
        if bytes.len() > SINK_BUFFER {
            self.hasher.update(bytes);
        } else {
            self.buf.extend_from_slice(bytes);
        }
    }

    fn tagged(&mut self, tag: u8, bytes: &[u8]) {
        self.write(&[tag]);
        self.write(bytes);
    }

    fn sized(&mut self, tag: u8, bytes: &[u8]) {
        self.write(&[tag]);
        self.write(&(bytes.len() as u64).to_le_bytes());
        self.write(bytes);
    }

    fn finish(mut self) -> u128 {
        self.hasher.update(&self.buf);
        self.hasher.digest128()
    }
}

/// The digest of one value on its own (map keys, values, set items).
fn sub_digest<T: Serialize + ?Sized>(seed: u8, value: &T) -> Result<u128, DigestError> {
    let mut sink = Sink::new(seed);
    value.serialize(DigestSerializer { sink: &mut sink })?;
    Ok(sink.finish())
}

/// Serializes one value into a [`Sink`].
struct DigestSerializer<'a> {
    sink: &'a mut Sink,
}

/// Children written in order: sequences, tuples, structs, variants.
struct Ordered<'a> {
    sink: &'a mut Sink,
    len: u64,
}

impl<'a> Ordered<'a> {
    fn start(sink: &'a mut Sink, tag: u8) -> Self {
        sink.write(&[tag]);
        Ordered { sink, len: 0 }
    }

    fn name(self, name: &str) -> Self {
        self.sink.sized(tag::NAME, name.as_bytes());
        self
    }

    fn variant(self, name: &str, index: u32, variant: &str) -> Self {
        let this = self.name(name).name(variant);
        this.sink.write(&index.to_le_bytes());
        this
    }

    fn child<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), DigestError> {
        value.serialize(DigestSerializer { sink: self.sink })?;
        self.len += 1;
        Ok(())
    }

    fn named_child<T: Serialize + ?Sized>(&mut self, key: &str, value: &T) -> Result<(), DigestError> {
        self.sink.sized(tag::NAME, key.as_bytes());
        self.child(value)
    }

    fn finish(self) {
        self.sink.tagged(tag::END, &self.len.to_le_bytes());
    }
}

/// Children combined commutatively: maps and sets.
struct Unordered {
    tag: u8,
    sum: u128,
    len: u64,
}

impl Unordered {
    fn new(tag: u8) -> Self {
        Unordered { tag, sum: 0, len: 0 }
    }

    fn add(&mut self, digest: u128) {
        self.sum = self.sum.wrapping_add(digest);
        self.len += 1;
    }

    fn bytes(&self) -> [u8; 24] {
        let mut bytes = [0u8; 24];
        bytes[..16].copy_from_slice(&self.sum.to_le_bytes());
        bytes[16..].copy_from_slice(&self.len.to_le_bytes());
        bytes
    }

    fn finish(self) -> u128 {
        leaf(self.tag, &self.bytes())
    }
}

/// A map being digested: each entry (key and value hashed together) is
/// digested on its own and the entries are summed, so order does not matter.
struct MapDigest<'a> {
    parent: &'a mut Sink,
    entries: Unordered,
    key: Option<u128>,
}

impl MapDigest<'_> {
    fn entry(&mut self, key: u128, value: u128) {
        let mut bytes = [0u8; 32];
        bytes[..16].copy_from_slice(&key.to_le_bytes());
        bytes[16..].copy_from_slice(&value.to_le_bytes());
        self.entries.add(leaf(tag::MAP_ENTRY, &bytes));
    }
}

/// Integer serializers: the tag, then the little-endian bytes.
macro_rules! integers {
    ($($method:ident($ty:ty) => $tag:ident),*) => {$(
        fn $method(self, v: $ty) -> Result<(), DigestError> {
            self.sink.tagged(tag::$tag, &v.to_le_bytes());
            Ok(())
        }
    )*};
}

impl<'a> ser::Serializer for DigestSerializer<'a> {
    type Ok = ();
    type Error = DigestError;
    type SerializeSeq = Ordered<'a>;
    type SerializeTuple = Ordered<'a>;
    type SerializeTupleStruct = Ordered<'a>;
    type SerializeTupleVariant = Ordered<'a>;
    type SerializeMap = MapDigest<'a>;
    type SerializeStruct = Ordered<'a>;
    type SerializeStructVariant = Ordered<'a>;

    // Same as the binary codec, so types with a compact form use it.
    fn is_human_readable(&self) -> bool {
        false
    }

    fn serialize_bool(self, v: bool) -> Result<(), DigestError> {
        self.sink.tagged(tag::BOOL, &[v as u8]);
        Ok(())
    }
    integers!(
        serialize_i8(i8) => I8,
        serialize_i16(i16) => I16,
        serialize_i32(i32) => I32,
        serialize_i64(i64) => I64,
        serialize_i128(i128) => I128,
        serialize_u8(u8) => U8,
        serialize_u16(u16) => U16,
        serialize_u32(u32) => U32,
        serialize_u64(u64) => U64,
        serialize_u128(u128) => U128
    );
    fn serialize_f32(self, v: f32) -> Result<(), DigestError> {
        self.sink.tagged(tag::F32, &v.to_bits().to_le_bytes());
        Ok(())
    }
    fn serialize_f64(self, v: f64) -> Result<(), DigestError> {
        self.sink.tagged(tag::F64, &v.to_bits().to_le_bytes());
        Ok(())
    }
    fn serialize_char(self, v: char) -> Result<(), DigestError> {
        self.sink.tagged(tag::CHAR, &u32::from(v).to_le_bytes());
        Ok(())
    }
    fn serialize_str(self, v: &str) -> Result<(), DigestError> {
        self.sink.sized(tag::STR, v.as_bytes());
        Ok(())
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<(), DigestError> {
        self.sink.sized(tag::BYTES, v);
        Ok(())
    }
    fn serialize_none(self) -> Result<(), DigestError> {
        self.sink.write(&[tag::NONE]);
        Ok(())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), DigestError> {
        let mut o = Ordered::start(self.sink, tag::SOME);
        o.child(value)?;
        o.finish();
        Ok(())
    }
    fn serialize_unit(self) -> Result<(), DigestError> {
        self.sink.write(&[tag::UNIT]);
        Ok(())
    }
    fn serialize_unit_struct(self, name: &'static str) -> Result<(), DigestError> {
        Ordered::start(self.sink, tag::UNIT_STRUCT).name(name).finish();
        Ok(())
    }
    fn serialize_unit_variant(self, name: &'static str, index: u32, variant: &'static str) -> Result<(), DigestError> {
        Ordered::start(self.sink, tag::UNIT_VARIANT)
            .variant(name, index, variant)
            .finish();
        Ok(())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, name: &'static str, value: &T) -> Result<(), DigestError> {
        let mut o = Ordered::start(self.sink, tag::NEWTYPE_STRUCT).name(name);
        o.child(value)?;
        o.finish();
        Ok(())
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), DigestError> {
        let mut o = Ordered::start(self.sink, tag::NEWTYPE_VARIANT).variant(name, index, variant);
        o.child(value)?;
        o.finish();
        Ok(())
    }
    fn serialize_seq(self, _len: Option<usize>) -> Result<Ordered<'a>, DigestError> {
        Ok(Ordered::start(self.sink, tag::SEQ))
    }
    fn serialize_tuple(self, _len: usize) -> Result<Ordered<'a>, DigestError> {
        Ok(Ordered::start(self.sink, tag::TUPLE))
    }
    fn serialize_tuple_struct(self, name: &'static str, _len: usize) -> Result<Ordered<'a>, DigestError> {
        Ok(Ordered::start(self.sink, tag::TUPLE_STRUCT).name(name))
    }
    fn serialize_tuple_variant(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Ordered<'a>, DigestError> {
        Ok(Ordered::start(self.sink, tag::TUPLE_VARIANT).variant(name, index, variant))
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<MapDigest<'a>, DigestError> {
        Ok(MapDigest {
            parent: self.sink,
            entries: Unordered::new(tag::MAP),
            key: None,
        })
    }
    fn serialize_struct(self, name: &'static str, _len: usize) -> Result<Ordered<'a>, DigestError> {
        Ok(Ordered::start(self.sink, tag::STRUCT).name(name))
    }
    fn serialize_struct_variant(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<Ordered<'a>, DigestError> {
        Ok(Ordered::start(self.sink, tag::STRUCT_VARIANT).variant(name, index, variant))
    }
}

/// The compound serializer traits all write children in order.
macro_rules! ordered_compound {
    ($($trait:ident :: $method:ident),*) => {$(
        impl ser::$trait for Ordered<'_> {
            type Ok = ();
            type Error = DigestError;
            fn $method<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), DigestError> {
                self.child(value)
            }
            fn end(self) -> Result<(), DigestError> {
                self.finish();
                Ok(())
            }
        }
    )*};
}

ordered_compound!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field
);

/// Structs and struct variants write each field's name before its value.
macro_rules! named_compound {
    ($($trait:ident),*) => {$(
        impl ser::$trait for Ordered<'_> {
            type Ok = ();
            type Error = DigestError;
            fn serialize_field<T: Serialize + ?Sized>(&mut self, key: &'static str, value: &T) -> Result<(), DigestError> {
                self.named_child(key, value)
            }
            fn skip_field(&mut self, key: &'static str) -> Result<(), DigestError> {
                self.sink.sized(tag::SKIPPED, key.as_bytes());
                Ok(())
            }
            fn end(self) -> Result<(), DigestError> {
                self.finish();
                Ok(())
            }
        }
    )*};
}

named_compound!(SerializeStruct, SerializeStructVariant);

impl ser::SerializeMap for MapDigest<'_> {
    type Ok = ();
    type Error = DigestError;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), DigestError> {
        self.key = Some(sub_digest(tag::MAP_ENTRY, key)?);
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), DigestError> {
        let key = self
            .key
            .take()
            .ok_or_else(|| DigestError("map value without a key".into()))?;
        let value = sub_digest(tag::MAP_ENTRY, value)?;
        self.entry(key, value);
        Ok(())
    }
    fn end(self) -> Result<(), DigestError> {
        self.parent.tagged(self.entries.tag, &self.entries.bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

    use proptest::prelude::*;

    #[test]
    fn a_digest_is_32_hex_digits_in_json_and_a_u128_in_bincode() {
        let digest = StateDigest(u128::MAX - 0xfe);
        let value = serde_json::to_value(digest).expect("to a JSON value");
        assert_eq!(value, serde_json::json!("ffffffffffffffffffffffffffffff01"));
        assert_eq!(serde_json::from_value::<StateDigest>(value).unwrap(), digest);
        let small = StateDigest(7);
        assert_eq!(
            serde_json::to_string(&small).unwrap(),
            "\"00000000000000000000000000000007\""
        );
        assert_eq!(serde_json::from_str::<StateDigest>("7").unwrap(), small);
        let old_json_number = u128::MAX.to_string();
        assert!(
            serde_json::from_str::<StateDigest>(&old_json_number).is_err(),
            "a number serde_json can only read as a float is rejected, not rounded"
        );
        let config = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(digest, config).unwrap();
        let (back, _): (StateDigest, usize) = bincode::serde::decode_from_slice(&bytes, config).unwrap();
        assert_eq!(back, digest);
    }

    #[test]
    fn only_32_hex_digits_parse_as_a_digest() {
        for bad in [
            "",
            "ff",
            "+fffffffffffffffffffffffffffff01",
            "gfffffffffffffffffffffffffffff01",
        ] {
            assert!(bad.parse::<StateDigest>().is_err(), "{bad:?}");
            assert!(
                serde_json::from_value::<StateDigest>(serde_json::json!(bad)).is_err(),
                "{bad:?}"
            );
        }
        let digest = StateDigest(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        assert_eq!(digest.to_string().parse::<StateDigest>().unwrap(), digest);
    }

    #[test]
    fn hash_map_order_does_not_matter() {
        let pairs: Vec<(String, u64)> = (0..200).map(|i| (format!("k{i}"), i * 7)).collect();
        let forward: HashMap<_, _> = pairs.iter().cloned().collect();
        // A map with a different capacity and insertion order iterates differently.
        let mut backward = HashMap::with_capacity(4096);
        for (k, v) in pairs.iter().rev() {
            backward.insert(k.clone(), *v);
        }
        assert_ne!(
            forward.keys().collect::<Vec<_>>(),
            backward.keys().collect::<Vec<_>>(),
            "test needs two iteration orders"
        );
        assert_eq!(digest_of(&forward), digest_of(&backward));
        let sorted: BTreeMap<_, _> = pairs.into_iter().collect();
        assert_eq!(digest_of(&forward), digest_of(&sorted));
    }

    #[test]
    fn nested_maps_are_order_independent() {
        let mut a: HashMap<u32, HashMap<String, Vec<u8>>> = HashMap::new();
        let mut b: HashMap<u32, HashMap<String, Vec<u8>>> = HashMap::with_capacity(1000);
        for i in 0..50u32 {
            for j in 0..10u32 {
                a.entry(i).or_default().insert(format!("{j}"), vec![i as u8, j as u8]);
            }
        }
        for i in (0..50u32).rev() {
            for j in (0..10u32).rev() {
                b.entry(i).or_default().insert(format!("{j}"), vec![i as u8, j as u8]);
            }
        }
        assert_eq!(digest_of(&(1u8, &a)), digest_of(&(1u8, &b)));
        b.get_mut(&3).unwrap().insert("4".into(), vec![0]);
        assert_ne!(digest_of(&a), digest_of(&b));
    }

    #[test]
    fn sequences_are_ordered() {
        assert_ne!(digest_of(&vec![1u32, 2]), digest_of(&vec![2u32, 1]));
        assert_ne!(digest_of(&(1u32, 2u32)), digest_of(&(2u32, 1u32)));
    }

    #[test]
    fn map_entries_are_bound_to_their_keys() {
        // Same keys and same values, paired differently.
        let a: BTreeMap<u8, u8> = [(1, 10), (2, 20)].into();
        let b: BTreeMap<u8, u8> = [(1, 20), (2, 10)].into();
        assert_ne!(digest_of(&a), digest_of(&b));
        // Map vs the sequence of its entries.
        let pairs: Vec<(u8, u8)> = a.clone().into_iter().collect();
        assert_ne!(digest_of(&a), digest_of(&pairs));
    }

    #[test]
    fn distinct_shapes_are_distinct() {
        let values = [
            digest_of(&0u32),
            digest_of(&0u64),
            digest_of(&0i32),
            digest_of(&false),
            digest_of(&()),
            digest_of(&None::<u32>),
            digest_of(&Some(0u32)),
            digest_of(&Some(None::<u32>)),
            digest_of(""),
            digest_of(&Vec::<u8>::new()),
            digest_of(&BTreeMap::<u8, u8>::new()),
            digest_of(&vec![String::new()]),
            digest_of(&(String::new(), String::new())),
            digest_of("ab"),
            digest_of(&("a", "b")),
            digest_of(&0.0f64),
            digest_of(&-0.0f64),
        ];
        let unique: HashSet<u128> = values.iter().map(|d| d.0).collect();
        assert_eq!(unique.len(), values.len(), "{values:?}");
    }

    #[derive(Serialize)]
    enum Shape {
        Unit,
        Newtype(u32),
        Tuple(u32, u32),
        Struct { a: u32, b: u32 },
    }

    #[derive(Serialize)]
    struct Pair {
        a: u32,
        b: u32,
    }

    #[test]
    fn enums_and_structs_are_structural() {
        let shapes = [
            digest_of(&Shape::Unit),
            digest_of(&Shape::Newtype(1)),
            digest_of(&Shape::Newtype(2)),
            digest_of(&Shape::Tuple(1, 2)),
            digest_of(&Shape::Tuple(2, 1)),
            digest_of(&Shape::Struct { a: 1, b: 2 }),
            digest_of(&Shape::Struct { a: 2, b: 1 }),
            digest_of(&Pair { a: 1, b: 2 }),
            digest_of(&(1u32, 2u32)),
        ];
        let unique: HashSet<u128> = shapes.iter().map(|d| d.0).collect();
        assert_eq!(unique.len(), shapes.len());
        assert_eq!(digest_of(&Shape::Tuple(1, 2)), digest_of(&Shape::Tuple(1, 2)));
    }

    struct Failing(&'static str);

    impl Serialize for Failing {
        fn serialize<S: ser::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            Err(ser::Error::custom(self.0))
        }
    }

    #[test]
    fn failing_serialize_digests_its_error() {
        assert_eq!(digest_of(&Failing("x")), digest_of(&Failing("x")));
        assert_ne!(digest_of(&Failing("x")), digest_of(&Failing("y")));
        assert_ne!(digest_of(&Failing("x")), digest_of("x"));
    }

    #[test]
    fn digester_fields() {
        let digest = |name: &str, v: u32| {
            let mut d = Digester::new();
            d.field(name, &v);
            d.finish()
        };
        assert_eq!(digest("a", 1), digest("a", 1));
        assert_ne!(digest("a", 1), digest("b", 1));
        assert_ne!(digest("a", 1), digest("a", 2));
        // Field boundaries are unambiguous.
        let mut ab = Digester::new();
        ab.field("ab", "");
        ab.field("c", "");
        let mut a_bc = Digester::new();
        a_bc.field("a", "");
        a_bc.field("bc", "");
        assert_ne!(ab.finish(), a_bc.finish());
    }

    #[test]
    fn unordered_field_ignores_set_order() {
        let set = |items: &[u64], cap: usize| {
            let mut s = HashSet::with_capacity(cap);
            s.extend(items.iter().copied());
            let mut d = Digester::new();
            d.unordered_field("s", &s);
            d.finish()
        };
        let items: Vec<u64> = (0..300).collect();
        let rev: Vec<u64> = items.iter().rev().copied().collect();
        assert_eq!(set(&items, 0), set(&rev, 5000));
        assert_ne!(set(&items, 0), set(&items[1..], 0));
        let sorted: BTreeSet<u64> = items.iter().copied().collect();
        let mut d = Digester::new();
        d.unordered_field("s", &sorted);
        assert_eq!(d.finish(), set(&items, 0));
        // Unordered differs from ordered for the same items.
        let mut d = Digester::new();
        d.field("s", &sorted);
        assert_ne!(d.finish(), set(&items, 0));
    }

    proptest! {
        #[test]
        fn map_digest_is_insertion_order_independent(
            entries in proptest::collection::vec((any::<u16>(), any::<i64>()), 0..64),
            seed in any::<u64>(),
        ) {
            let forward: HashMap<u16, i64> = entries.iter().copied().collect();
            let mut shuffled: Vec<(u16, i64)> = forward.iter().map(|(k, v)| (*k, *v)).collect();
            // Deterministic shuffle from the seed.
            let mut x = seed | 1;
            for i in (1..shuffled.len()).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                shuffled.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let mut other = HashMap::with_capacity(shuffled.len() * 3);
            other.extend(shuffled);
            prop_assert_eq!(digest_of(&forward), digest_of(&other));
        }

        #[test]
        fn different_maps_digest_differently(
            a in proptest::collection::btree_map(any::<u8>(), any::<u8>(), 0..16),
            b in proptest::collection::btree_map(any::<u8>(), any::<u8>(), 0..16),
        ) {
            prop_assert_eq!(a == b, digest_of(&a) == digest_of(&b));
        }
    }
}
