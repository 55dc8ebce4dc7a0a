#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| psm_relay::fuzz::rdp_accept(data));
