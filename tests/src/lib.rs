//! Shared helpers for the integration tests: broker selection from the
//! environment, unique topic names, reference services.
