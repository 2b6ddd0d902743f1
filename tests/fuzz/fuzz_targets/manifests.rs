//! `decode_manifests` on arbitrary text: never panics, never hangs, and every object it
//! accepts survives a trip through its own version (`encode_object` + `decode_object`).
#![no_main]

use consul_smi_api::{decode_manifests, decode_object, encode_object};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for result in decode_manifests(text) {
        match result {
            Ok(object) => {
                let api_version = object.meta().api_version.clone();
                let encoded = encode_object(&object, &api_version)
                    .unwrap_or_else(|e| panic!("decoded as {api_version} but cannot encode: {e}"));
                let again = decode_object(&encoded)
                    .unwrap_or_else(|e| panic!("own encoding does not decode: {e}\n{encoded}"));
                assert_eq!(again, object, "round trip through {api_version}");
            }
            // Every error names something: at least a message.
            Err(e) => assert!(!e.message.is_empty(), "{e:?}"),
        }
    }
});
