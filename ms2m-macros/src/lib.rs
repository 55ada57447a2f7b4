//! `#[derive(ServiceState)]` for ms2m: a service author writes `apply` and
//! nothing about bytes.
//!
//! Use it through `ms2m_core` (feature `derive`, on by default), which
//! re-exports it the way serde re-exports its derive; the generated code
//! names `::ms2m_core` paths. The derive's own docs list the attributes.
//!
//! # Layout
//!
//! * `attr`: parsing of `#[state(...)]`, collecting every error.
//! * `ast`: the input validated into fields and their roles.
//! * `expand`: the generated impl; `fallback`: the stub emitted beside
//!   errors so they do not cascade.

#![warn(missing_docs, rust_2018_idioms, unreachable_pub)]
#![forbid(unsafe_code)]

mod ast;
mod attr;
mod expand;
mod fallback;

use proc_macro::TokenStream;

/// Derives `ms2m_core::ServiceState`: snapshot, restore and digest.
///
/// ```
/// use std::collections::{HashMap, HashSet};
/// use ms2m_core::ServiceState;
///
/// #[derive(serde::Deserialize)]
/// struct AccountsV1 { balances: HashMap<String, u64> }
///
/// #[derive(ServiceState)]
/// #[state(version = 2, upgrade(from = 1, via = AccountsV1))]
/// struct Accounts {
///     balances: HashMap<String, i64>,
///     frozen: HashSet<String>,
///     #[state(skip, rebuild = Accounts::total_of)]
///     total: i64,
/// }
///
/// impl Accounts {
///     fn total_of(&self) -> i64 { self.balances.values().sum() }
/// }
///
/// impl From<AccountsV1> for Accounts {
///     fn from(v1: AccountsV1) -> Self {
///         let balances = v1.balances.into_iter().map(|(k, v)| (k, v as i64)).collect();
///         Accounts { balances, frozen: HashSet::new(), total: 0 }
///     }
/// }
///
/// let a = Accounts { balances: [("ann".into(), 5)].into(), frozen: HashSet::new(), total: 5 };
/// let b = Accounts::restore(Accounts::SCHEMA_VERSION, &a.snapshot().unwrap()).unwrap();
/// assert_eq!((b.total, a.digest()), (5, b.digest()));
/// ```
///
/// # Container attributes
///
/// * `#[state(version = N)]` (required): the schema version written into
///   every snapshot. Bump it whenever the stored fields change.
/// * `#[state(upgrade(from = M, via = OldType))]`, once per older version
///   `M < N`: bytes written at version `M` are decoded as `OldType` and
///   converted with `TryFrom<OldType> for Self` (any `From` impl provides
///   it; a `TryFrom` error becomes `StateError::Upgrade`). `OldType` is
///   decoded through its own `ServiceState::restore(M, ..)` when it has one,
///   so upgrades chain (v1 → v2 → v3 by declaring `via = V2` for both
///   `from = 1` and `from = 2`), and otherwise through its
///   `serde::Deserialize` (fields in the old order; leave out fields the old
///   version skipped).
/// * `#[state(freeze)]`: snapshots clone the state (the type must be
///   `Clone`) and encode the clone on a blocking thread, so the apply loop
///   pauses only for the clone (`ServiceState::freeze`). Worth it when the
///   clone is cheap: persistent collections (`imbl::HashMap`,
///   `imbl::Vector`, `rpds`) and shared blobs (`bytes::Bytes`) clone in
///   O(1); plain `std` collections clone in O(state), a memory copy that is
///   still cheaper than encoding but doubles the memory while a snapshot is
///   written.
/// * `#[state(crate = "path")]`: where `ms2m_core` is, for users who renamed
///   the dependency (default `::ms2m_core`).
///
/// Restoring a version that is neither `N` nor upgradable, including a
/// newer one, is `StateError::UnknownSchemaVersion`, never a guess.
///
/// # Field attributes (structs)
///
/// * `#[state(skip)]`: not stored and not digested; restored as
///   `Default::default()`.
/// * `#[state(skip, default = path)]`: restored as `path()` instead, for a
///   type without `Default`.
/// * `#[state(skip, rebuild = path)]`: after every restore (upgrades
///   included), `self.field = path(&self)`, with `path: fn(&Self) -> T`,
///   for caches and indexes derived from other fields. Rebuild functions run
///   in field order once every field has a value; until its own rebuild the
///   field holds its `default`/`Default` value (a `&Self` needs every field
///   in place, so a rebuilt field still needs one of the two).
/// * `#[state(unordered)]`: digest the field as a set (order-independent).
///   Implied for fields whose type's last path segment is `HashSet` or
///   `BTreeSet`; use it for a set behind a type alias.
///
/// # What is generated
///
/// * Structs (named, tuple or unit) are stored through a hidden mirror of
///   their stored fields, so the struct itself needs no serde impls; each
///   stored field type must be `Serialize + DeserializeOwned`. Encoding is
///   the core's codec (`ms2m_core::codec`).
/// * Enums are stored through their own `Serialize`/`Deserialize`, which they
///   must implement; `#[state]` is not accepted inside an enum (use
///   `#[serde(skip)]`).
/// * The digest hashes every stored field by name with
///   `ms2m_core::digest::digest_of`: maps are digested independently of
///   iteration order, set fields as above. A `HashSet` nested inside another
///   type is digested in iteration order: use a `BTreeSet` there.
///
/// Generic parameters and unions are rejected: a schema version describes
/// one concrete type.
#[proc_macro_derive(ServiceState, attributes(state))]
pub fn derive_service_state(input: TokenStream) -> TokenStream {
    let input = syn::parse_macro_input!(input as syn::DeriveInput);
    expand::derive(&input).into()
}
