//! The conversion webhook's logic on arbitrary JSON: never panics, always answers a
//! ConversionReview that echoes the uid and either converts every object or fails as a whole.
#![no_main]

use consul_smi_api::convert_review;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(review) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let answer = convert_review(&review);
    let response = &answer["response"];
    let uid = review["request"]["uid"].as_str().unwrap_or_default();
    assert_eq!(response["uid"].as_str(), Some(uid));
    let converted = response["convertedObjects"].as_array().expect("a list");
    match response["result"]["status"].as_str() {
        Some("Success") => {
            let sent = review["request"]["objects"].as_array().map_or(0, Vec::len);
            assert_eq!(
                converted.len(),
                sent,
                "one converted object per object sent"
            );
        }
        Some("Failure") => {
            assert!(converted.is_empty());
            assert!(
                response["result"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty())
            );
        }
        other => panic!("result.status {other:?}"),
    }
});
