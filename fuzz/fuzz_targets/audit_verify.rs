#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| psm_evidence::fuzz::audit_log(data));
