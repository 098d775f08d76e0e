//! The sample configuration shipped in `examples/gateway.toml` parses and
//! builds a gateway (so the documented sample cannot rot).
#![cfg(feature = "proxy")]

use gateway_mw::config::GatewayConfig;
use gateway_mw::server::GatewayServer;

#[tokio::test]
async fn the_shipped_sample_config_builds_a_gateway() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/gateway.toml");
    let config = GatewayConfig::load(path.as_ref()).expect("examples/gateway.toml parses");
    assert_eq!(config.users.len(), 2);
    assert_eq!(config.admin.permission, "gateway:admin");
    assert!(config.roles.contains_key("operator"));
    GatewayServer::build(config).await.expect("and builds");
}
