//! `mortar volume set|get|reset`: volume options, kept in the replicated volume configuration
//! and applied by bricks and mounts as they change (the table is `mortar_proto::options`).

use anyhow::{anyhow, Result};
use mortar_client::Volume;
use mortar_proto::options::{self, SPECS};

/// `volume set NAME KEY VALUE`.
pub async fn set(vol: &Volume, key: &str, value: &str) -> Result<()> {
    vol.set_option(key, Some(value))
        .await
        .map_err(|e| anyhow!("volume set {key}: {e}"))?;
    println!("volume set: {key} = {value}");
    Ok(())
}

/// `volume reset NAME KEY|all`: back to the defaults.
pub async fn reset(vol: &Volume, key: &str) -> Result<()> {
    let keys: Vec<&str> = match key {
        "all" => SPECS.iter().map(|s| s.key).collect(),
        k => vec![k],
    };
    for k in keys {
        vol.set_option(k, None)
            .await
            .map_err(|e| anyhow!("volume reset {k}: {e}"))?;
        println!(
            "volume reset: {k} = {} (default)",
            options::spec(k).expect("checked").default
        );
    }
    Ok(())
}

/// `volume get NAME KEY|all`: each option's value in force and its default.
pub async fn get(vol: &Volume, key: &str) -> Result<()> {
    let config = vol.refresh_config().await?;
    let specs: Vec<_> = match key {
        "all" => SPECS.iter().collect(),
        k => {
            options::check(k, None).map_err(|e| anyhow!("volume get: {e}"))?;
            vec![options::spec(k).expect("checked")]
        }
    };
    println!(
        "{:<24} {:<12} {:<12} DESCRIPTION",
        "OPTION", "VALUE", "DEFAULT"
    );
    for s in specs {
        let value = config.options.get(s.key).expect("a key of SPECS");
        println!("{:<24} {:<12} {:<12} {}", s.key, value, s.default, s.help);
    }
    Ok(())
}
