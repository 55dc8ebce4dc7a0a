#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| psm_relay::fuzz::ssh_preauth(data));
