//! The daemons' config files, written from their typed structs
//! (`tidegate_schema::config`): every tool that starts a daemon fills the
//! struct and writes it here, so no config is ever formatted by hand.

use std::path::Path;

use tidegate_schema::config::ConfigFile;

use crate::Result;

/// The cluster's hop key in `dir/hop-key` (64 hex characters, mode 0600
/// from creation), made once and shared by every agent given `dir`.
pub fn hop_key_file(dir: &Path) -> Result<std::path::PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("hop-key");
    match std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(&path)
    {
        Ok(mut file) => {
            let key = format!(
                "{:032x}{:032x}",
                rand::random::<u128>(),
                rand::random::<u128>()
            );
            file.write_all(key.as_bytes())?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e.into()),
    }
    Ok(path)
}

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
