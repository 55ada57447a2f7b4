//! Parsing of `#[state(...)]` attributes.
//!
//! Every problem is pushed into a [`Ctxt`] and parsing goes on, so one
//! compile reports every misuse at its own span (serde's `Ctxt`).

use proc_macro2::{Span, TokenTree};
use syn::meta::ParseNestedMeta;
use syn::parse::ParseStream;
use syn::spanned::Spanned;
use syn::{Attribute, ExprPath, LitStr, Path, Token, Type};

/// Collects errors; checked once at the end.
#[derive(Default)]
pub(crate) struct Ctxt {
    errors: Option<syn::Error>,
}

impl Ctxt {
    pub(crate) fn push(&mut self, error: syn::Error) {
        match &mut self.errors {
            Some(all) => all.combine(error),
            None => self.errors = Some(error),
        }
    }

    pub(crate) fn error_at(&mut self, span: Span, msg: impl std::fmt::Display) {
        self.push(syn::Error::new(span, msg));
    }

    pub(crate) fn error_spanned(&mut self, tokens: impl quote::ToTokens, msg: impl std::fmt::Display) {
        self.push(syn::Error::new_spanned(tokens, msg));
    }

    pub(crate) fn check(self) -> Result<(), syn::Error> {
        self.errors.map_or(Ok(()), Err)
    }
}

/// `#[state(...)]` on the struct or enum.
#[derive(Default)]
pub(crate) struct Container {
    pub(crate) version: Option<u32>,
    /// Whether `version` was written at all (its value may have been bad).
    pub(crate) version_seen: bool,
    pub(crate) upgrades: Vec<Upgrade>,
    pub(crate) krate: Option<Path>,
    /// Span of `freeze`: snapshots clone the state and encode the clone
    /// off the apply loop.
    pub(crate) freeze: Option<Span>,
}

/// `upgrade(from = M, via = OldType)`.
pub(crate) struct Upgrade {
    pub(crate) from: u32,
    pub(crate) via: Type,
}

/// `#[state(...)]` on a field.
#[derive(Default)]
pub(crate) struct FieldAttrs {
    /// Span of the `skip` keyword.
    pub(crate) skip: Option<Span>,
    /// `default = path`: `fn() -> T`, instead of `Default::default()`.
    pub(crate) default: Option<ExprPath>,
    /// `rebuild = path`: `fn(&Self) -> T`, run after restore.
    pub(crate) rebuild: Option<ExprPath>,
    /// `unordered`: digest the field as a set.
    pub(crate) unordered: Option<Span>,
}

fn is_state(attr: &Attribute) -> bool {
    attr.path().is_ident("state")
}

fn key(meta: &ParseNestedMeta<'_>) -> String {
    let path = &meta.path;
    quote::quote!(#path).to_string().replace(' ', "")
}

/// Consumes the rest of an item we rejected (`= value` or `(...)`), so the
/// items after it are still checked.
fn skip_item(input: ParseStream<'_>) -> syn::Result<()> {
    while !input.is_empty() && !input.peek(Token![,]) {
        input.parse::<TokenTree>()?;
    }
    Ok(())
}

/// A `u32` literal; anything else is an error at the value.
fn parse_u32(meta: &ParseNestedMeta<'_>, what: &str) -> syn::Result<(u32, Span)> {
    let expr: syn::Expr = meta.value()?.parse()?;
    let lit = match &expr {
        syn::Expr::Lit(syn::ExprLit {
            lit: syn::Lit::Int(lit),
            ..
        }) if lit.suffix().is_empty() || lit.suffix() == "u32" => lit,
        _ => {
            return Err(syn::Error::new_spanned(
                &expr,
                format_args!("{what} must be an integer literal, like `2`"),
            ))
        }
    };
    let value = lit
        .base10_parse::<u32>()
        .map_err(|_| syn::Error::new(lit.span(), format_args!("{what} must fit in a `u32`")))?;
    Ok((value, lit.span()))
}

/// Parses every `#[state(...)]` on the container.
pub(crate) fn container(cx: &mut Ctxt, attrs: &[Attribute], self_ident: &syn::Ident) -> Container {
    let mut out = Container::default();
    let mut version_seen = false;
    let mut from_spans: Vec<Span> = Vec::new();
    for attr in attrs.iter().filter(|a| is_state(a)) {
        let res = attr.parse_nested_meta(|meta| {
            match key(&meta).as_str() {
                "version" => {
                    if version_seen {
                        cx.error_spanned(&meta.path, "duplicate `version`: a state has one schema version");
                        skip_item(meta.input)?;
                    } else {
                        // Seen even if its value is bad, so it is not also reported missing.
                        version_seen = true;
                        match parse_u32(&meta, "`version`") {
                            Ok((v, _)) => out.version = Some(v),
                            Err(e) => {
                                cx.push(e);
                                skip_item(meta.input)?;
                            }
                        }
                    }
                }
                "upgrade" => {
                    if let Some((up, from_span)) = upgrade(cx, &meta, self_ident)? {
                        if out.upgrades.iter().any(|u| u.from == up.from) {
                            cx.error_at(
                                from_span,
                                format_args!(
                                    "duplicate `upgrade(from = {})`: one upgrade path per older version",
                                    up.from
                                ),
                            );
                        } else {
                            out.upgrades.push(up);
                            from_spans.push(from_span);
                        }
                    }
                }
                "freeze" => {
                    if out.freeze.is_some() {
                        cx.error_spanned(&meta.path, "duplicate `freeze`");
                    } else {
                        out.freeze = Some(meta.path.span());
                    }
                }
                "crate" => {
                    let value = meta.value()?;
                    let path = if value.peek(LitStr) {
                        value.parse::<LitStr>()?.parse::<Path>()?
                    } else {
                        value.parse::<Path>()?
                    };
                    if out.krate.is_some() {
                        cx.error_spanned(&meta.path, "duplicate `crate`");
                    } else {
                        out.krate = Some(path);
                    }
                }
                other => {
                    cx.error_spanned(
                        &meta.path,
                        format_args!(
                            "unknown `state` attribute `{other}`; expected `version`, `upgrade`, `freeze` or `crate`"
                        ),
                    );
                    skip_item(meta.input)?;
                }
            }
            Ok(())
        });
        if let Err(e) = res {
            cx.push(e);
        }
    }
    out.version_seen = version_seen;
    if let Some(version) = out.version {
        for (up, span) in out.upgrades.iter().zip(&from_spans) {
            if up.from >= version {
                cx.error_at(
                    *span,
                    format_args!(
                        "`upgrade(from = {})` must name a version older than the current `version = {version}`",
                        up.from
                    ),
                );
            }
        }
    }
    out
}

/// `upgrade(from = M, via = T)`; `None` when it was reported as incomplete.
fn upgrade(cx: &mut Ctxt, meta: &ParseNestedMeta<'_>, self_ident: &syn::Ident) -> syn::Result<Option<(Upgrade, Span)>> {
    let mut from = None;
    let mut via: Option<Type> = None;
    let mut bad = false;
    meta.parse_nested_meta(|inner| {
        match key(&inner).as_str() {
            "from" if from.is_some() => {
                cx.error_spanned(&inner.path, "duplicate `from`");
                skip_item(inner.input)?;
            }
            "from" => match parse_u32(&inner, "`from`") {
                Ok(v) => from = Some(v),
                Err(e) => {
                    cx.push(e);
                    bad = true;
                    skip_item(inner.input)?;
                }
            },
            "via" if via.is_some() => {
                cx.error_spanned(&inner.path, "duplicate `via`");
                skip_item(inner.input)?;
            }
            "via" => via = Some(inner.value()?.parse()?),
            other => {
                bad = true;
                cx.error_spanned(
                    &inner.path,
                    format_args!("unknown `upgrade` argument `{other}`; expected `from` or `via`"),
                );
                skip_item(inner.input)?;
            }
        }
        Ok(())
    })?;
    let (Some((from, from_span)), Some(via)) = (from, via) else {
        if bad {
            // Already reported: a misspelt or invalid argument.
            return Ok(None);
        }
        cx.error_spanned(
            &meta.path,
            "`upgrade` needs both arguments: `upgrade(from = OLD_VERSION, via = OldType)`",
        );
        return Ok(None);
    };
    if let Type::Path(p) = &via {
        if p.qself.is_none() && (p.path.is_ident("Self") || p.path.is_ident(self_ident)) {
            cx.error_spanned(
                &via,
                "`via` must be the old state type, not this type: restoring through itself would never end",
            );
            return Ok(None);
        }
    }
    Ok(Some((Upgrade { from, via }, from_span)))
}

/// Parses every `#[state(...)]` on a struct field.
pub(crate) fn field(cx: &mut Ctxt, attrs: &[Attribute]) -> FieldAttrs {
    let mut out = FieldAttrs::default();
    for attr in attrs.iter().filter(|a| is_state(a)) {
        let res = attr.parse_nested_meta(|meta| {
            let k = key(&meta);
            match k.as_str() {
                "skip" if out.skip.is_some() => cx.error_spanned(&meta.path, "duplicate `skip`"),
                "skip" => out.skip = Some(meta.path.span()),
                "unordered" if out.unordered.is_some() => cx.error_spanned(&meta.path, "duplicate `unordered`"),
                "unordered" => out.unordered = Some(meta.path.span()),
                "default" | "rebuild" => {
                    let path: ExprPath = meta.value()?.parse()?;
                    let slot = if k == "default" { &mut out.default } else { &mut out.rebuild };
                    if slot.is_some() {
                        cx.error_spanned(&meta.path, format_args!("duplicate `{k}`"));
                    } else {
                        *slot = Some(path);
                    }
                }
                other => {
                    cx.error_spanned(
                        &meta.path,
                        format_args!(
                            "unknown `state` field attribute `{other}`; expected `skip`, `default`, `rebuild` or `unordered`"
                        ),
                    );
                    skip_item(meta.input)?;
                }
            }
            Ok(())
        });
        if let Err(e) = res {
            cx.push(e);
        }
    }
    if out.skip.is_none() {
        for (name, path) in [("default", &out.default), ("rebuild", &out.rebuild)] {
            if let Some(path) = path {
                cx.error_spanned(
                    path,
                    format_args!("`{name}` applies only to a skipped field: write `#[state(skip, {name} = ...)]`"),
                );
            }
        }
    } else if let Some(span) = out.unordered {
        cx.error_at(
            span,
            "`unordered` has no effect on a skipped field: skipped fields are not digested",
        );
    }
    out
}

/// Rejects any `#[state(...)]` where the derive does not read it.
pub(crate) fn reject(cx: &mut Ctxt, attrs: &[Attribute], msg: &str) {
    for attr in attrs.iter().filter(|a| is_state(a)) {
        cx.error_spanned(attr, msg);
    }
}
