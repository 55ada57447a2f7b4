//! The derive input, parsed and validated into what expansion needs.
//!
//! Validation never stops at the first problem: everything is checked and
//! reported through the [`Ctxt`], so the user fixes all misuses in one pass.

use syn::ext::IdentExt;
use syn::spanned::Spanned;
use syn::{Data, DeriveInput, ExprPath, Fields, Ident, Member, Path, Type};

use crate::attr::{self, Ctxt, Upgrade};

pub(crate) struct Input<'a> {
    pub(crate) ident: &'a Ident,
    pub(crate) krate: Path,
    pub(crate) version: u32,
    pub(crate) upgrades: Vec<Upgrade>,
    /// `#[state(freeze)]`: the span to report a missing `Clone` at.
    pub(crate) freeze: Option<proc_macro2::Span>,
    pub(crate) body: Body<'a>,
}

pub(crate) enum Body<'a> {
    /// A struct: stored through a generated mirror of its stored fields.
    Struct(Vec<Field<'a>>),
    /// An enum: stored through its own `Serialize`/`Deserialize`.
    Enum,
}

pub(crate) struct Field<'a> {
    /// `self.<member>`.
    pub(crate) member: Member,
    /// The name used in the hidden mirror struct and in the digest.
    pub(crate) mirror: Ident,
    pub(crate) name: String,
    pub(crate) ty: &'a Type,
    pub(crate) kind: FieldKind,
}

// One per field, at compile time: size does not matter.
#[allow(clippy::large_enum_variant)]
pub(crate) enum FieldKind {
    Stored {
        unordered: bool,
    },
    Skipped {
        default: Option<ExprPath>,
        rebuild: Option<ExprPath>,
    },
}

/// `HashSet<..>` / `BTreeSet<..>` by last path segment: digested unordered.
fn is_set(ty: &Type) -> bool {
    match ty {
        Type::Group(g) => is_set(&g.elem),
        Type::Paren(p) => is_set(&p.elem),
        Type::Path(p) => p
            .path
            .segments
            .last()
            .is_some_and(|s| s.ident == "HashSet" || s.ident == "BTreeSet"),
        _ => false,
    }
}

const IN_ENUM: &str =
    "`#[state(...)]` is not supported inside an enum: a `ServiceState` enum is stored through its own \
                       `Serialize`/`Deserialize`, so use `#[serde(skip)]` there";

impl<'a> Input<'a> {
    /// Parses and validates; errors go to `cx`, and the returned value is
    /// still usable for the fallback impl (its crate path in particular).
    pub(crate) fn parse(cx: &mut Ctxt, input: &'a DeriveInput) -> Self {
        let container = attr::container(cx, &input.attrs, &input.ident);
        if !container.version_seen {
            cx.error_spanned(
                &input.ident,
                "missing `#[state(version = N)]`: every snapshot records the schema version of the state it holds",
            );
        }
        if !input.generics.params.is_empty() {
            cx.error_spanned(
                &input.generics,
                "`#[derive(ServiceState)]` does not support generic parameters: a snapshot's schema version \
                 describes one concrete type, so derive it on a struct that names its field types",
            );
        }
        let body = match &input.data {
            Data::Struct(s) => Body::Struct(fields(cx, &s.fields)),
            Data::Enum(e) => {
                for variant in &e.variants {
                    attr::reject(cx, &variant.attrs, IN_ENUM);
                    for f in &variant.fields {
                        attr::reject(cx, &f.attrs, IN_ENUM);
                    }
                }
                Body::Enum
            }
            Data::Union(u) => {
                cx.error_spanned(
                    u.union_token,
                    "`#[derive(ServiceState)]` does not support unions: a union's active field cannot be known, \
                     so it cannot be snapshotted; use a struct or an enum",
                );
                Body::Enum
            }
        };
        Input {
            ident: &input.ident,
            krate: container.krate.unwrap_or_else(|| syn::parse_quote!(::ms2m_core)),
            version: container.version.unwrap_or(0),
            upgrades: container.upgrades,
            freeze: container.freeze,
            body,
        }
    }
}

fn fields<'a>(cx: &mut Ctxt, fields: &'a Fields) -> Vec<Field<'a>> {
    fields
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let attrs = attr::field(cx, &f.attrs);
            let (member, mirror, name) = match &f.ident {
                Some(id) => (Member::Named(id.clone()), id.clone(), id.unraw().to_string()),
                None => (
                    Member::Unnamed(i.into()),
                    Ident::new(&format!("__ms2m_{i}"), f.ty.span()),
                    i.to_string(),
                ),
            };
            let kind = match attrs.skip {
                Some(_) => FieldKind::Skipped {
                    default: attrs.default,
                    rebuild: attrs.rebuild,
                },
                None => FieldKind::Stored {
                    unordered: attrs.unordered.is_some() || is_set(&f.ty),
                },
            };
            Field {
                member,
                mirror,
                name,
                ty: &f.ty,
                kind,
            }
        })
        .collect()
}
