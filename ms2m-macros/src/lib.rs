//! `#[derive(ServiceState)]` for ms2m (skeleton: the derive is being written).

use proc_macro::TokenStream;

/// Derives `ms2m_core::ServiceState`.
#[proc_macro_derive(ServiceState, attributes(state))]
pub fn derive_service_state(_input: TokenStream) -> TokenStream {
    TokenStream::new()
}
