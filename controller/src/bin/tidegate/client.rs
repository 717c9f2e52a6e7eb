//! Talking to the API: where it is, which token, and the requests.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use reqwest::Method;
use serde_json::Value;

use crate::Cli;

/// Where the API is and which token to send.
fn target(cli: &Cli) -> Result<(String, String)> {
    let local = find_local_json(&std::env::current_dir()?);
    let local: Option<Value> = local
        .as_deref()
        .and_then(|p| std::fs::read(p).ok())
        .and_then(|b| serde_json::from_slice(&b).ok());
    let api = cli
        .api
        .clone()
        .or_else(|| local.as_ref()?["api"].as_str().map(String::from))
        .context(
            "no API address: pass --api, set TIDEGATE_API, or run `cargo xtask deploy local`",
        )?;
    let token = cli
        .token
        .clone()
        .or_else(|| local.as_ref()?["admin_token"].as_str().map(String::from))
        .context("no token: pass --token or set TIDEGATE_TOKEN")?;
    Ok((api.trim_end_matches('/').to_string(), token))
}

fn find_local_json(start: &Path) -> Option<PathBuf> {
    start
        .ancestors()
        .map(|d| d.join(".tidegate/local.json"))
        .find(|p| p.exists())
}

/// A request body and its content type.
pub(crate) struct Body {
    bytes: Vec<u8>,
    content_type: &'static str,
}

impl Body {
    pub(crate) fn json(v: &Value) -> Self {
        Self {
            bytes: v.to_string().into_bytes(),
            content_type: "application/json",
        }
    }

    pub(crate) fn wasm(bytes: Vec<u8>) -> Self {
        Self {
            bytes,
            content_type: "application/wasm",
        }
    }
}

/// Sends a request; the answer's JSON, or an error saying what the API said.
pub(crate) async fn send(
    cli: &Cli,
    method: Method,
    path: &str,
    body: Option<Body>,
    if_match: Option<i64>,
) -> Result<Value> {
    let (api, token) = target(cli)?;
    let mut req = reqwest::Client::new()
        .request(method.clone(), format!("{api}{path}"))
        .bearer_auth(token);
    if let Some(Body {
        bytes,
        content_type,
    }) = body
    {
        req = req.header("Content-Type", content_type).body(bytes);
    }
    if let Some(r) = if_match {
        req = req.header("If-Match", format!("\"{r}\""));
    }
    let resp = req
        .send()
        .await
        .with_context(|| format!("{method} {api}{path}"))?;
    let status = resp.status();
    let text = resp.text().await?;
    let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    if !status.is_success() {
        let msg = value["error"].as_str().unwrap_or(text.as_str());
        match value["field"].as_str() {
            Some(f) => bail!("{status}: {msg} (field {f})"),
            None => bail!("{status}: {msg}"),
        }
    }
    Ok(value)
}

/// Reads a challenge file; returns its name and the spec to send.
pub(crate) fn read_challenge(path: &Path) -> Result<(String, Value)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut spec: Value = if path.extension().is_some_and(|e| e == "toml") {
        let t: toml::Value = toml::from_str(&text)
            .with_context(|| format!("{} is not valid TOML", path.display()))?;
        serde_json::to_value(t)?
    } else {
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?
    };
    let from_file = spec.as_object_mut().and_then(|o| o.remove("name"));
    let name = match from_file {
        Some(Value::String(n)) => n,
        Some(other) => bail!("{}: `name` must be a string, not {other}", path.display()),
        None => path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .context("the file has no name")?,
    };
    Ok((name, spec))
}
