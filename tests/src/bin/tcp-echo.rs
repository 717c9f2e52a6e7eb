//! A TCP server on 0.0.0.0:1337 for test images.
//!
//! - default: echo — every byte comes back; the write side is closed when
//!   the client's is (half-close kept). busybox `nc -ll -e cat` drops
//!   connections under concurrency.
//! - `--sink <bytes per second>`: a slow reader — reads at most that rate
//!   and every 100 ms writes the total read so far as a decimal line, so a
//!   client can see how much is still in flight.
//!
//! `--listen <addr:port>` (first) binds elsewhere (the TCP benchmark's backend).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let mut args: Vec<String> = std::env::args().collect();
    let mut listen = "0.0.0.0:1337".to_string();
    if args.get(1).map(String::as_str) == Some("--listen") {
        listen = args
            .get(2)
            .cloned()
            .ok_or_else(|| std::io::Error::other("--listen needs an address"))?;
        args.drain(1..3);
    }
    let sink_rate = match args.get(1).map(String::as_str) {
        None => None,
        Some("--sink") => Some(
            args.get(2)
                .and_then(|r| r.parse::<u64>().ok())
                .filter(|r| *r > 0)
                .ok_or_else(|| std::io::Error::other("--sink needs a rate in bytes per second"))?,
        ),
        Some(other) => return Err(std::io::Error::other(format!("unknown argument {other}"))),
    };
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            match sink_rate {
                Some(rate) => sink(stream, rate).await,
                None => echo(stream).await,
            }
        });
    }
}

async fn echo(stream: TcpStream) {
    let (mut r, mut w) = stream.into_split();
    if tokio::io::copy(&mut r, &mut w).await.is_ok() {
        let _ = w.shutdown().await;
    }
}

async fn sink(stream: TcpStream, rate: u64) {
    let (mut r, mut w) = stream.into_split();
    let tick = Duration::from_millis(100);
    let per_tick = (rate / 10).max(1) as usize;
    let mut buf = vec![0u8; per_tick];
    let mut total = 0u64;
    let mut next = tokio::time::Instant::now();
    loop {
        let mut got = 0;
        while got < per_tick {
            match r.read(&mut buf[got..]).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got += n,
            }
        }
        total += got as u64;
        if w.write_all(format!("{total}\n").as_bytes()).await.is_err() {
            return;
        }
        next += tick;
        tokio::time::sleep_until(next).await;
    }
}
