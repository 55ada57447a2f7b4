//! Code generation for a validated [`Input`].
//!
//! Everything generated sits in `const _: () = { .. };` and names items by
//! absolute paths through the user's ms2m crate path, so it neither leaks
//! names nor depends on what the user imported.

use proc_macro2::{Literal, TokenStream};
use quote::{format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::DeriveInput;

use crate::ast::{Body, Field, FieldKind, Input};
use crate::attr::Ctxt;
use crate::fallback;

pub(crate) fn derive(input: &DeriveInput) -> TokenStream {
    let mut cx = Ctxt::default();
    let parsed = Input::parse(&mut cx, input);
    match cx.check() {
        Ok(()) => expand(&parsed),
        Err(errors) => {
            let mut out = errors.to_compile_error();
            out.extend(fallback::expand(input, &parsed.krate));
            out
        }
    }
}

fn expand(input: &Input<'_>) -> TokenStream {
    let krate = &input.krate;
    let ident = input.ident;
    let version = Literal::u32_unsuffixed(input.version);
    let state_error = quote!(#krate::StateError);

    let Parts {
        items,
        bounds,
        snapshot,
        snapshot_to,
        current,
        current_read,
        rebuilds,
        digest,
    } = match &input.body {
        Body::Struct(fields) => expand_struct(input, fields),
        Body::Enum => expand_enum(input),
    };

    let upgrade_helpers = if input.upgrades.is_empty() {
        TokenStream::new()
    } else {
        upgrade_helpers(krate)
    };
    let upgrade_arms = input.upgrades.iter().map(|up| {
        let from = Literal::u32_unsuffixed(up.from);
        let via = &up.via;
        // Spanned at `via`, so a missing conversion is reported there.
        let decode = quote_spanned! {via.span()=>
            (&__Ms2mUpgradeVia::<#via>(::core::marker::PhantomData)).__ms2m_restore_old(#from, __ms2m_bytes)?
        };
        let convert = quote_spanned! {via.span()=>
            <Self as ::core::convert::TryFrom<#via>>::try_from(__ms2m_old)
        };
        quote! {
            #from => {
                let __ms2m_old: #via = #decode;
                #convert.map_err(|__ms2m_e| #state_error::Upgrade {
                    from: #from,
                    source: ::core::convert::Into::into(__ms2m_e),
                })?
            }
        }
    });
    let freeze = input.freeze.map(|span| {
        // Spanned at `freeze`, so a state without `Clone` is reported there.
        let clone = quote_spanned! {span=> <Self as ::core::clone::Clone>::clone(self)};
        quote! {
            fn freeze(&self) -> ::core::option::Option<#krate::Frozen> {
                ::core::option::Option::Some(#krate::Frozen::new(#clone))
            }
        }
    });
    let mut froms: Vec<u32> = input.upgrades.iter().map(|u| u.from).collect();
    froms.sort_unstable();

    quote! {
        #[doc(hidden)]
        #[allow(non_camel_case_types, non_snake_case, unused_qualifications, clippy::all)]
        const _: () = {
            #items
            #upgrade_helpers

            #[automatically_derived]
            impl #krate::ServiceState for #ident
            where
                #bounds
            {
                const SCHEMA_VERSION: u32 = #version;

                fn snapshot(&self) -> ::core::result::Result<::std::vec::Vec<u8>, #krate::codec::CodecError> {
                    #snapshot
                }

                fn snapshot_to(
                    &self,
                    __ms2m_out: &mut dyn ::std::io::Write,
                ) -> ::core::result::Result<(), #krate::codec::CodecError> {
                    #snapshot_to
                }

                fn restore_from(
                    __ms2m_version: u32,
                    __ms2m_input: &mut dyn ::std::io::Read,
                ) -> ::core::result::Result<Self, #state_error> {
                    if __ms2m_version != #version {
                        // Older versions are read whole, then upgraded by `restore`.
                        let __ms2m_bytes = #krate::codec::read_all(__ms2m_input)
                            .map_err(|source| #state_error::Decode { version: __ms2m_version, source })?;
                        return <Self as #krate::ServiceState>::restore(__ms2m_version, &__ms2m_bytes);
                    }
                    #[allow(unused_mut)]
                    let mut __ms2m_state: Self = #current_read;
                    #rebuilds
                    ::core::result::Result::Ok(__ms2m_state)
                }

                fn restore(
                    __ms2m_version: u32,
                    __ms2m_bytes: &[u8],
                ) -> ::core::result::Result<Self, #state_error> {
                    #[allow(unused_mut)]
                    let mut __ms2m_state: Self = match __ms2m_version {
                        #version => #current,
                        #(#upgrade_arms)*
                        __ms2m_found => {
                            return ::core::result::Result::Err(#state_error::UnknownSchemaVersion {
                                found: __ms2m_found,
                                current: #version,
                                upgradable: ::std::vec![#(#froms),*],
                            });
                        }
                    };
                    #rebuilds
                    ::core::result::Result::Ok(__ms2m_state)
                }

                fn digest(&self) -> #krate::StateDigest {
                    #digest
                }

                #freeze
            }
        };
    }
}

struct Parts {
    items: TokenStream,
    bounds: TokenStream,
    /// Encodes into a `Vec`.
    snapshot: TokenStream,
    /// Encodes into `__ms2m_out`.
    snapshot_to: TokenStream,
    /// The current version, decoded from `__ms2m_bytes`.
    current: TokenStream,
    /// The current version, decoded from `__ms2m_input` as it is read.
    current_read: TokenStream,
    rebuilds: TokenStream,
    digest: TokenStream,
}

/// A struct is stored as a hidden mirror of its stored fields, generic over
/// their types: instantiated with references for snapshot, owned for
/// restore. The user's type needs no serde impls.
///
/// Field types are checked once each, by a bound on the impl spanned at the
/// field's type; the body relies on those bounds, so a missing impl is one
/// clear error and not one per use.
fn expand_struct(input: &Input<'_>, fields: &[Field<'_>]) -> Parts {
    let krate = &input.krate;
    let ident = input.ident;
    let version = Literal::u32_unsuffixed(input.version);
    let serde = quote!(#krate::__private::serde);
    let serde_str = serde.to_string();
    let stored: Vec<&Field<'_>> = fields
        .iter()
        .filter(|f| matches!(f.kind, FieldKind::Stored { .. }))
        .collect();
    let names: Vec<_> = stored.iter().map(|f| &f.mirror).collect();
    let members: Vec<_> = stored.iter().map(|f| &f.member).collect();
    let tys: Vec<_> = stored.iter().map(|f| f.ty).collect();
    let params: Vec<_> = (0..stored.len()).map(|i| format_ident!("__T{}", i)).collect();

    let serde_bound = serde_bound(krate);
    let items = quote! {
        #[derive(#serde::Serialize, #serde::Deserialize)]
        #[serde(crate = #serde_str)]
        struct __Ms2mStored<#(#params),*> {
            #(#names: #params,)*
        }

        #serde_bound

        #[diagnostic::on_unimplemented(
            message = "skipped field type `{Self}` does not implement `Default`",
            label = "restored as `Default::default()`",
            note = "a `rebuild` field also holds this value until its rebuild function runs",
            note = "implement `Default` for it, or name a constructor with `#[state(skip, default = path)]`"
        )]
        trait __Ms2mSkipDefault: ::core::marker::Sized {
            fn __ms2m_default() -> Self;
        }
        impl<__T: ::core::default::Default> __Ms2mSkipDefault for __T {
            fn __ms2m_default() -> Self {
                <__T as ::core::default::Default>::default()
            }
        }
    };

    let bounds = tys
        .iter()
        .map(|ty| quote_spanned!(ty.span()=> #ty: __Ms2mSerde,))
        .collect();

    let stored_value = quote! {
        &__Ms2mStored {
            #(#names: &self.#members,)*
        }
    };
    let snapshot = quote!(#krate::codec::encode(#stored_value));
    let snapshot_to = quote!(#krate::codec::encode_to(#stored_value, __ms2m_out));

    let skipped_inits = fields.iter().filter_map(|f| {
        let FieldKind::Skipped { default, .. } = &f.kind else {
            return None;
        };
        let member = &f.member;
        let ty = f.ty;
        let init = match default {
            Some(path) => quote_spanned!(path.span()=> (#path)()),
            None => quote_spanned!(ty.span()=> <#ty as __Ms2mSkipDefault>::__ms2m_default()),
        };
        Some(quote!(#member: #init))
    });
    let skipped_inits: Vec<_> = skipped_inits.collect();
    let current_by = |decode: TokenStream| {
        quote! {{
            let __ms2m_stored: __Ms2mStored<#(#tys),*> = #decode
                .map_err(|source| #krate::StateError::Decode { version: #version, source })?;
            #ident {
                #(#members: __ms2m_stored.#names,)*
                #(#skipped_inits,)*
            }
        }}
    };
    let current = current_by(quote!(#krate::codec::decode(__ms2m_bytes)));
    let current_read = current_by(quote!(#krate::codec::decode_from(__ms2m_input)));

    let rebuilds = fields
        .iter()
        .filter_map(|f| match &f.kind {
            FieldKind::Skipped {
                rebuild: Some(path), ..
            } => {
                let member = &f.member;
                Some(quote_spanned!(path.span()=> __ms2m_state.#member = (#path)(&__ms2m_state);))
            }
            _ => None,
        })
        .collect();

    let digest_fields = stored.iter().map(|f| {
        let name = &f.name;
        let member = &f.member;
        match f.kind {
            FieldKind::Stored { unordered: true } => {
                quote_spanned!(f.ty.span()=> __ms2m_digester.unordered_field(#name, &self.#member);)
            }
            _ => quote!(__ms2m_digester.field(#name, &self.#member);),
        }
    });
    let digest = quote! {
        let mut __ms2m_digester = #krate::Digester::new();
        #(#digest_fields)*
        __ms2m_digester.finish()
    };

    Parts {
        items,
        bounds,
        snapshot,
        snapshot_to,
        current,
        current_read,
        rebuilds,
        digest,
    }
}

/// An enum is stored through its own serde impls, required by one bound
/// spanned at the enum's name.
fn expand_enum(input: &Input<'_>) -> Parts {
    let krate = &input.krate;
    let ident = input.ident;
    let version = Literal::u32_unsuffixed(input.version);
    let bounds = quote_spanned!(ident.span()=> #ident: __Ms2mSerde,);
    let snapshot = quote!(#krate::codec::encode::<Self>(self));
    let snapshot_to = quote!(#krate::codec::encode_to::<Self>(self, __ms2m_out));
    let current_by = |decode: TokenStream| {
        quote! {
            #decode.map_err(|source| #krate::StateError::Decode { version: #version, source })?
        }
    };
    let current = current_by(quote!(#krate::codec::decode::<Self>(__ms2m_bytes)));
    let current_read = current_by(quote!(#krate::codec::decode_from::<Self>(__ms2m_input)));
    let digest = quote!(#krate::digest::digest_of::<Self>(self));
    Parts {
        items: serde_bound(krate),
        bounds,
        snapshot,
        snapshot_to,
        current,
        current_read,
        rebuilds: TokenStream::new(),
        digest,
    }
}

/// `Serialize + DeserializeOwned` under one local name, so a bound on it
/// can carry the span of the type it checks.
fn serde_bound(krate: &syn::Path) -> TokenStream {
    let serde = quote!(#krate::__private::serde);
    quote! {
        trait __Ms2mSerde: #serde::Serialize + #serde::de::DeserializeOwned {}
        impl<__T: #serde::Serialize + #serde::de::DeserializeOwned> __Ms2mSerde for __T {}
    }
}

/// Decoding an upgrade's old type: through its own `ServiceState::restore`
/// when it has one (so upgrades chain), else through serde. Chosen by
/// autoref specialization: the `ServiceState` impl sits one reference
/// closer to the receiver, so method lookup finds it first when it applies.
fn upgrade_helpers(krate: &syn::Path) -> TokenStream {
    let serde = quote!(#krate::__private::serde);
    let result = quote!(::core::result::Result<__T, #krate::StateError>);
    quote! {
        struct __Ms2mUpgradeVia<__T>(::core::marker::PhantomData<__T>);

        trait __Ms2mViaServiceState<__T> {
            fn __ms2m_restore_old(&self, version: u32, bytes: &[u8]) -> #result;
        }

        impl<__T: #krate::ServiceState> __Ms2mViaServiceState<__T> for __Ms2mUpgradeVia<__T> {
            fn __ms2m_restore_old(&self, version: u32, bytes: &[u8]) -> #result {
                <__T as #krate::ServiceState>::restore(version, bytes)
            }
        }

        trait __Ms2mViaDeserialize<__T> {
            fn __ms2m_restore_old(&self, version: u32, bytes: &[u8]) -> #result;
        }

        impl<__T: #serde::de::DeserializeOwned> __Ms2mViaDeserialize<__T> for &__Ms2mUpgradeVia<__T> {
            fn __ms2m_restore_old(&self, version: u32, bytes: &[u8]) -> #result {
                #krate::codec::decode::<__T>(bytes)
                    .map_err(|source| #krate::StateError::Decode { version, source })
            }
        }
    }
}
