//! A WebSocket echo server on 0.0.0.0:8080, run inside a test container
//! image (see `tidegate_lab::images::binary_image`): every message comes back.
//!
//! With `WS_EAGER` set it is an eager upgrade server instead: it answers
//! `101 Switching Protocols` the moment it accepts, before the request has
//! arrived, then echoes every byte after the request's head. A proxy that
//! reads the 101 before it has finished the request must keep the tunnel.
//!
//! With `HTTP_ECHO` set it is a keep-alive HTTP/1.1 server instead: every
//! request (no body) gets `200` with `container=<hostname> host=<Host>
//! xff=<X-Forwarded-For or ->`, so a test sees which instance answered
//! each request of one connection, and what the proxy added.

use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind("0.0.0.0:8080").await?;
    if std::env::var_os("HTTP_ECHO").is_some() {
        let me = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
        let me: &'static str = Box::leak(me.trim().to_string().into_boxed_str());
        loop {
            let (stream, _) = listener.accept().await?;
            tokio::spawn(http_echo(stream, me));
        }
    }
    if std::env::var_os("WS_EAGER").is_some() {
        loop {
            let (stream, _) = listener.accept().await?;
            tokio::spawn(eager(stream));
        }
    }
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                return;
            };
            while let Some(Ok(msg)) = ws.next().await {
                if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                    break;
                }
            }
        });
    }
}

async fn eager(mut stream: tokio::net::TcpStream) -> std::io::Result<()> {
    stream
        .write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .await?;
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    let rest = loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() > 64 * 1024 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(at) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break head.split_off(at + 4);
        }
    };
    stream.write_all(&rest).await?;
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        stream.write_all(&buf[..n]).await?;
    }
}

/// Answers every request head on `stream` (requests without bodies) until
/// the client closes.
async fn http_echo(mut stream: tokio::net::TcpStream, me: &str) -> std::io::Result<()> {
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        while let Some(at) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&pending[..at]).into_owned();
            pending.drain(..at + 4);
            let header = |name: &str| {
                head.lines()
                    .skip(1)
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.trim()
                            .eq_ignore_ascii_case(name)
                            .then(|| v.trim().to_string())
                    })
                    .unwrap_or_else(|| "-".into())
            };
            let body = format!(
                "container={me} host={} xff={}\n",
                header("host"),
                header("x-forwarded-for")
            );
            let answer = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(answer.as_bytes()).await?;
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 || pending.len() > 64 * 1024 {
            return Ok(());
        }
        pending.extend_from_slice(&buf[..n]);
    }
}
