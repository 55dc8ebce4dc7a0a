#![no_main]
libfuzzer_sys::fuzz_target!(|s: &str| psm_control_api::fuzz::login(s));
