//! KV cache policies: how each one declares its state, which slots a query may see, and
//! how new keys and values enter the cache. One file per policy.

pub mod dense;
