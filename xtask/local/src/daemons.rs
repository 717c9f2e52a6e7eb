//! The daemons' config files, written from their typed structs
//! (`tidegate_schema::config`): every tool that starts a daemon fills the
//! struct and writes it here, so no config is ever formatted by hand.

use std::path::Path;

use tidegate_schema::config::ConfigFile;

use crate::Result;

/// Writes `config` as the TOML file `path` (readable by its owner only:
/// configs may hold tokens and secrets).
pub fn write_config(config: &impl ConfigFile, path: &Path) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    let text = config
        .to_toml()
        .map_err(|e| crate::Error::NotReady(format!("{}: {e}", path.display())))?;
    file.write_all(text.as_bytes())?;
    Ok(())
}
