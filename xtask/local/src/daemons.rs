//! The daemons' config files, written from their typed structs
//! (`tidegate_schema::config`): every tool that starts a daemon fills the
//! struct and writes it here, so no config is ever formatted by hand.

use std::path::Path;

use tidegate_schema::config::ConfigFile;

use crate::Result;

/// Writes `bytes` to `path`, readable by its owner only from the moment
/// it exists (an existing file is made 0600 before it is written).
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(bytes)?;
    Ok(())
}

/// The cluster's hop key in `dir/hop-key`, made once and shared by every
/// agent given `dir`.
pub fn hop_key_file(dir: &Path) -> Result<std::path::PathBuf> {
    secret_file(dir, "hop-key")
}

/// The agents' scrape token in `dir/scrape-token`, shared by every agent
/// and controller given `dir`.
pub fn scrape_token_file(dir: &Path) -> Result<std::path::PathBuf> {
    secret_file(dir, "scrape-token")
}

/// `dir/name`: 64 random hex characters, mode 0600 from creation; made
/// once, then read as it is.
fn secret_file(dir: &Path, name: &str) -> Result<std::path::PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(name);
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
    let text = config
        .to_toml()
        .map_err(|e| crate::Error::NotReady(format!("{}: {e}", path.display())))?;
    write_private(path, text.as_bytes())
}
