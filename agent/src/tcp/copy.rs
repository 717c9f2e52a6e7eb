//! The userspace copy data path (`tcp_data_path = "copy"`, and TCP over TLS).

use std::sync::atomic::Ordering;

use tokio::net::TcpStream;

use crate::metrics::traffic::InstanceTraffic;

/// The userspace copy path (also TLS's): bytes are counted, and the
/// instance marked active, chunk by chunk as they move, so a long session
/// counts for the idle policy while it lasts.
pub(super) async fn copy<C>(
    client: C,
    mut server: TcpStream,
    traffic: &InstanceTraffic,
) -> std::io::Result<()>
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut client = Counted {
        inner: client,
        traffic,
    };
    tokio::io::copy_bidirectional(&mut client, &mut server).await?;
    Ok(())
}

/// The player's side of a copied connection: reads count as bytes in,
/// writes as bytes out.
struct Counted<'a, S> {
    inner: S,
    traffic: &'a InstanceTraffic,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counted<'_, S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.traffic
                .tcp_bytes_in
                .fetch_add(n as u64, Ordering::Relaxed);
            self.traffic.touch();
        }
        polled
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counted<'_, S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &polled {
            self.traffic
                .tcp_bytes_out
                .fetch_add(*n as u64, Ordering::Relaxed);
            self.traffic.touch();
        }
        polled
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
