//! The stub impl emitted next to attribute errors (thiserror's
//! `fallback.rs`): with it, code that uses the state as a `ServiceState`
//! type-checks, so the user sees only the real errors, not a cascade of
//! "trait not implemented".

use proc_macro2::TokenStream;
use quote::quote;
use syn::DeriveInput;

pub(crate) fn expand(input: &DeriveInput, krate: &syn::Path) -> TokenStream {
    let ident = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    let mut where_clause = where_clause.cloned().unwrap_or_else(|| syn::parse_quote!(where));
    // The trait's own bounds, assumed rather than checked: generic inputs
    // are already an error, and this impl must not add another.
    where_clause
        .predicates
        .push(syn::parse_quote!(Self: ::core::marker::Send + 'static));
    quote! {
        #[automatically_derived]
        impl #impl_generics #krate::ServiceState for #ident #ty_generics #where_clause {
            const SCHEMA_VERSION: u32 = 0;

            fn snapshot(&self) -> ::core::result::Result<::std::vec::Vec<u8>, #krate::codec::CodecError> {
                ::core::unreachable!()
            }

            fn restore(_: u32, _: &[u8]) -> ::core::result::Result<Self, #krate::StateError> {
                ::core::unreachable!()
            }

            fn digest(&self) -> #krate::StateDigest {
                ::core::unreachable!()
            }
        }
    }
}
