//! Arbitrary request bodies through `kvc serve`'s parsing and validation (both endpoints).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    kvc_runtime::api::fuzz(data);
});
