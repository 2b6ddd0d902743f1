//! `decode_object` on arbitrary JSON (what the API server or a watch stream hands the
//! watcher): never panics; an accepted object converts to every version that can express it
//! and back to the same hub object.
#![no_main]

use consul_smi_api::{decode_object, encode_object, served_versions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let Ok(object) = decode_object(&value) else {
        return;
    };
    let kind = object.kind();
    for version in served_versions(kind) {
        let api_version = format!("{}/{version}", kind.group());
        // An older version may be unable to express the object: that is an error, not a panic.
        let Ok(encoded) = encode_object(&object, &api_version) else {
            continue;
        };
        let mut again = decode_object(&encoded)
            .unwrap_or_else(|e| panic!("{api_version} encoding does not decode: {e}\n{encoded}"));
        again.meta_mut().api_version = object.meta().api_version.clone();
        assert_eq!(again, object, "round trip through {api_version}");
    }
});
