//! consul-smi's Consul client against clusters as users run them: three servers (Raft on disk)
//! and a client agent, ACLs on with `default_policy = "deny"`, on both intention APIs (real
//! 1.8.7 and real 1.14.11). The client talks to the client agent, so every write is forwarded
//! and every refusal comes back in its forwarded shape (`rpc error making call: ...`).

use std::time::Duration;

use anyhow::Result;
use consul_smi_consul::{Call, ConsulClient, ConsulConfig, ConsulError};
use consul_smi_e2e::cluster::ConsulCluster;
use consul_smi_e2e::consul::ConsulRelease;
use serde_json::json;

/// The least-privilege policy the README documents for consul-writer.
const WRITER_POLICY: &str = r#"service_prefix "" {
  policy     = "write"
  intentions = "write"
}"#;

fn client(cluster: &ConsulCluster, token: &str) -> ConsulClient {
    consul_smi_consul::install_crypto_provider();
    let mut config = ConsulConfig::for_address(cluster.client_http_addr());
    config.token = Some(token.to_string());
    config.retry_base = Duration::from_millis(5);
    ConsulClient::new(&config).expect("client config")
}

/// What a validation refusal through a client agent must be: final, not retried as if the
/// cluster had trouble.
fn assert_final_validation(result: Result<consul_smi_consul::RawResponse, ConsulError>) {
    match result {
        Err(ConsulError::Validation { message, .. }) => {
            assert!(
                !message.contains("rpc error"),
                "the forwarding prefix is not part of Consul's reason: {message:?}"
            );
        }
        other => panic!("expected a final validation error, got {other:?}"),
    }
}

async fn forwarded_validation_errors_are_final(release: ConsulRelease) -> Result<()> {
    let cluster = ConsulCluster::start(release, true)?;
    let token = cluster.create_token("consul-smi-writer", WRITER_POLICY)?;
    let consul = client(&cluster, &token);

    let invalid = match release {
        ConsulRelease::Legacy => Call::new(
            reqwest::Method::POST,
            "/v1/connect/intentions",
            "create intention",
        )
        .json(&json!({"SourceName": "web", "DestinationName": "api", "Action": "bogus"}))?,
        ConsulRelease::Modern => Call::new(reqwest::Method::PUT, "/v1/config", "write entry")
            .json(&json!({"Kind": "service-intentions", "Name": "api",
                          "Sources": [{"Name": "web", "Action": "bogus"}]}))?,
    };
    assert_final_validation(consul.send(invalid).await);

    // A refusal that names a service whose name holds a transient-looking word ("videofeed"
    // holds "eof") is still a refusal.
    if release == ConsulRelease::Legacy {
        let create = || {
            Call::new(
                reqwest::Method::POST,
                "/v1/connect/intentions",
                "create intention",
            )
            .json(&json!({"SourceName": "videofeed", "DestinationName": "api", "Action": "allow"}))
        };
        consul.send(create()?).await?;
        assert_final_validation(consul.send(create()?).await);
    }

    // The API-flavour probe works with the least-privilege token through the client agent.
    let flavor = consul.flavor().await?;
    assert_eq!(
        flavor,
        match release {
            ConsulRelease::Legacy => consul_smi_consul::ApiFlavor::Legacy,
            ConsulRelease::Modern => consul_smi_consul::ApiFlavor::Modern,
        }
    );
    Ok(())
}

#[tokio::test]
async fn forwarded_validation_errors_are_final_on_1_8() -> Result<()> {
    forwarded_validation_errors_are_final(ConsulRelease::Legacy).await
}

#[tokio::test]
async fn forwarded_validation_errors_are_final_on_1_14() -> Result<()> {
    forwarded_validation_errors_are_final(ConsulRelease::Modern).await
}
