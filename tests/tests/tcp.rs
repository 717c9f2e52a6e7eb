//! The TCP data plane's userspace path (the fallback of #6): a public port
//! per instance on every agent, spliced to the container.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;

use std::time::Duration;

use common::plane;
use reqwest::Method;
use tidegate_lab::daemons::eventually;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `line`, shuts the write side, and returns everything the server sent back.
async fn echo(addr: &str, line: &str) -> std::io::Result<String> {
    let mut s = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(addr)).await??;
    s.write_all(line.as_bytes()).await?;
    s.shutdown().await?; // half-close: the reply must still arrive whole
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await??;
    Ok(out)
}

#[tokio::test]
async fn a_line_echoes_through_both_agents_and_the_port_closes_after_delete() {
    let p = plane("").await;
    let image = tidegate_lab::images::binary_image(
        "tidegate/test-tcp-echo",
        std::path::Path::new(env!("CARGO_BIN_EXE_tcp-echo")),
        &[],
    )
    .unwrap();
    p.controller
        .put_challenge("echo", serde_json::json!({"image": image, "ports": [{"name": "echo", "port": 1337, "protocol": "tcp"}]}))
        .await;
    let (s, inst) = p.controller.spawn("echo", "t1").await;
    assert_eq!(s, reqwest::StatusCode::CREATED, "{inst}");
    let id = inst["id"].as_str().unwrap().to_string();
    let port = inst["tcp"][0]["port"].as_u64().unwrap();
    let entries = [format!("127.0.0.2:{port}"), format!("127.0.0.3:{port}")];
    for addr in &entries {
        let ok = eventually(30, || async {
            echo(addr, "ping\n").await.is_ok_and(|r| r == "ping\n")
        })
        .await;
        assert!(ok, "no echo through {addr}");
        let big = "x".repeat(100_000) + "\n";
        assert_eq!(
            echo(addr, &big).await.unwrap().len(),
            big.len(),
            "half-closed reply truncated via {addr}"
        );
    }
    // A port no instance holds is refused.
    let unallocated = format!("127.0.0.2:{}", if port == 39999 { 30000 } else { port + 1 });
    assert!(TcpStream::connect(&unallocated).await.is_err());
    // 100 concurrent connections all echo their own line.
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let addr = entries[i % 2].clone();
            tokio::spawn(async move { (i, echo(&addr, &format!("line {i}\n")).await) })
        })
        .collect();
    for t in tasks {
        let (i, r) = t.await.unwrap();
        assert_eq!(r.unwrap(), format!("line {i}\n"));
    }
    // After delete both agents refuse the port.
    p.controller
        .call(Method::DELETE, &format!("/v1/instances/{id}"), None, None)
        .await;
    for addr in &entries {
        let closed = eventually(5, || async {
            TcpStream::connect(addr.as_str()).await.is_err()
        })
        .await;
        assert!(closed, "{addr} still accepts after delete");
    }
}
