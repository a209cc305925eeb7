#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| datapulse_bridge_fuzz::check_mapping(data));
