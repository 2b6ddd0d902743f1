//! Debugging aid for the conversion webhook, without a cluster or a server:
//!
//! - `cargo run -p consul-smi-api --example conversion_tool -- review < review.json` answers a
//!   ConversionReview read from stdin, exactly as smi-watcher's `/convert` does;
//! - `... -- crds <https-url> <ca.pem>` prints the CRDs wired to a webhook at that URL.

use std::io::Read;

use consul_smi_api::crd::{CrdConversion, WebhookTarget, crd_manifest};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["review"] => {
            let mut input = String::new();
            std::io::stdin().read_to_string(&mut input)?;
            let review: serde_json::Value = serde_json::from_str(&input)?;
            println!("{}", consul_smi_api::convert_review(&review));
        }
        ["crds", url, ca_file] => {
            let conversion = CrdConversion::Webhook {
                client_config: WebhookTarget::Url(url.to_string()),
                ca_bundle_pem: Some(std::fs::read(ca_file)?),
            };
            for crd in consul_smi_api::crds(&conversion) {
                println!("---\n{}", serde_saphyr::to_string(&crd_manifest(&crd))?);
            }
        }
        _ => {
            return Err(
                "usage: conversion_tool review < review.json | conversion_tool crds <url> <ca.pem>"
                    .into(),
            );
        }
    }
    Ok(())
}
