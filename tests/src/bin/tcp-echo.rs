//! A TCP echo server on 0.0.0.0:1337 for test images: every byte comes
//! back; the write side is closed when the client's is (half-close kept).
//! busybox `nc -ll -e cat` drops connections under concurrency.

use tokio::io::AsyncWriteExt;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind("0.0.0.0:1337").await?;
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let (mut r, mut w) = stream.into_split();
            if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                let _ = w.shutdown().await;
            }
        });
    }
}
