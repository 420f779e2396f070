//! An artifact's `program.json` on arbitrary bytes.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kvc_compiler::fuzzing::artifact(data));
