//! `mortar volume stop|start|delete`: the volume's state, kept in the replicated volume
//! configuration, and its end.

use anyhow::{anyhow, bail, Result};
use mortar_client::volume_admin;
use mortar_client::Volume;
use mortar_proto::wire::MetaOp;

/// `volume stop NAME` (true) or `volume start NAME` (false).
pub async fn stop(vol: &Volume, stopped: bool) -> Result<()> {
    let name = vol.config().name.clone();
    let (verb, done) = if stopped {
        ("stop", "stopped")
    } else {
        ("start", "started")
    };
    if vol.config().stopped == stopped {
        println!("volume {verb}: {name} is already {done}");
        return Ok(());
    }
    vol.admin_op(MetaOp::SetStopped { stopped })
        .await
        .map_err(|e| anyhow!("volume {verb} {name}: {e}"))?;
    println!("volume {verb}: {name}: success");
    Ok(())
}

/// `volume delete NAME`: only a stopped volume whose bricks all answer; asks first unless
/// `yes`. Each brick is released: it stops and comes up empty at its next start. A clone is
/// erased from the bricks it shares, in one change, while they keep serving.
pub async fn delete(vol: &Volume, yes: bool) -> Result<()> {
    if let Some(clone) = vol.clone_info() {
        let name = &clone.name;
        if !yes
            && !confirmed(&format!(
                "Deleting clone {name} erases its files and snapshots (the volume it was cloned \
             from keeps its own). Do you want to continue? (y/n) "
            ))?
        {
            bail!("volume delete {name}: not confirmed; nothing changed");
        }
        vol.admin_op(MetaOp::DropClone { name: name.clone() })
            .await
            .map_err(|e| anyhow!("volume delete {name}: {e}"))?;
        println!("volume delete: {name}: success (the next heal frees the chunks only it named)");
        return Ok(());
    }
    let config = vol.refresh_config().await?;
    let name = &config.name;
    if !config.stopped {
        bail!("volume delete {name}: {name} is started: stop it first (mortar volume stop {name})");
    }
    let bricks: Vec<_> = config.bricks().cloned().collect();
    for b in &bricks {
        volume_admin::status(vol.pool(), &b.addr)
            .await
            .map_err(|e| {
                anyhow!(
                    "volume delete {name}: brick {} does not answer ({e}); every brick must be up",
                    b.addr
                )
            })?;
    }
    let clones = vol
        .clones()
        .await
        .map_err(|e| anyhow!("volume delete {name}: {e}"))?;
    let and_clones = match clones.len() {
        0 => String::new(),
        n => format!(" and its {n} clones"),
    };
    if !yes && !confirmed(&format!(
        "Deleting volume {name} erases all its files and snapshots{and_clones} on its {} bricks. Do you want to continue? (y/n) ",
        bricks.len()
    ))? {
        bail!("volume delete {name}: not confirmed; nothing changed");
    }
    for b in &bricks {
        volume_admin::release_volume(vol.pool(), &b.addr, name)
            .await
            .map_err(|e| anyhow!("volume delete {name}: brick {}: {e}", b.addr))?;
        println!(
            "released brick {} (id {}): it stops and starts empty",
            b.addr, b.id
        );
    }
    println!("volume delete: {name}: success");
    Ok(())
}

/// Ask `question` on the terminal; true for y or yes.
fn confirmed(question: &str) -> Result<bool> {
    use std::io::Write;
    print!("{question}");
    std::io::stdout().flush()?;
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}
