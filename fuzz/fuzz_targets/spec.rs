//! Spec text on arbitrary bytes: parse, validate, and compile what is small.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kvc_compiler::fuzzing::spec(data));
