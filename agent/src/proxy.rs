//! The Pingora server of `tidegate-agent`, on its own threads; stopped on
//! shutdown through our own signal instead of Unix signals.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tidegate_agent::http::guard::{Connections, Guard};
use tidegate_agent::http::pinned::Pinning;
use tidegate_agent::http::{EdgeProxy, HttpLimits};
use tidegate_agent::policy::EdgePolicy;
use tidegate_agent::routes::SharedRoutes;
use tidegate_schema::config::AgentConfig;

/// The running proxy.
pub(crate) struct Proxy {
    stop: tokio::sync::watch::Sender<bool>,
}

impl Proxy {
    pub(crate) fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

/// Pingora's shutdown signal: our own channel.
struct StopSignal(tokio::sync::watch::Receiver<bool>);

#[async_trait::async_trait]
impl pingora::server::ShutdownSignalWatch for StopSignal {
    async fn recv(&self) -> pingora::server::ShutdownSignal {
        let mut rx = self.0.clone();
        let _ = rx.wait_for(|stop| *stop).await;
        pingora::server::ShutdownSignal::FastShutdown
    }
}

/// Binds `http_entry` (and `https_entry`) and starts serving.
pub(crate) fn start(
    cfg: &AgentConfig,
    routes: SharedRoutes,
    forward_from: Option<std::net::IpAddr>,
    policy: Arc<dyn EdgePolicy>,
    hops: Arc<tidegate_agent::hop::Hops>,
    conns: Arc<Connections>,
    builds: tokio::sync::watch::Receiver<u64>,
) -> anyhow::Result<Proxy> {
    use pingora::server::configuration::ServerConf;
    let conf = ServerConf {
        threads: cfg.http_threads(),
        ..ServerConf::default()
    };
    let mut server = pingora::server::Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let routes_for_guard = routes.clone();
    let connect_timeout = Duration::from_millis(cfg.upstream_connect_timeout_ms);
    let read_timeout = Duration::from_millis(cfg.upstream_read_timeout_ms);
    let pinning = Arc::new(Pinning {
        routes: routes.clone(),
        policy: policy.clone(),
        hops: hops.clone(),
        forward_from,
        mode: cfg.http_mode,
        max_body_bytes: cfg.max_body_bytes,
        connect_timeout,
        idle: read_timeout.max(Duration::from_secs(cfg.http_keepalive_timeout_secs)),
        pipe_bytes: cfg.tcp_pipe_bytes,
        builds,
    });
    let proxy = EdgeProxy {
        routes,
        forward_from,
        limits: HttpLimits {
            max_body_bytes: cfg.max_body_bytes,
            max_header_bytes: cfg.max_header_bytes,
            keepalive_secs: cfg.http_keepalive_timeout_secs,
            connect_timeout,
            read_timeout,
            http_mode: cfg.http_mode,
        },
        policy,
        hops,
    };
    let mut app = pingora::proxy::http_proxy(&server.configuration, proxy);
    let mut options = pingora::apps::HttpServerOptions::default();
    options.h2_idle_timeout = Some(Duration::from_secs(cfg.http_keepalive_timeout_secs));
    app.server_options = Some(options);
    // Bind now so a taken port fails the start with a clear error.
    std::net::TcpListener::bind(cfg.http_entry)
        .with_context(|| format!("http_entry {}", cfg.http_entry))?;
    if tidegate_schema::config::planted("http-limits") {
        let mut service = pingora::services::listening::Service::new("tidegate edge".into(), app);
        service.add_tcp(&cfg.http_entry.to_string());
        server.add_service(service);
        return Ok(run(server)?);
    }
    let guard = Guard {
        app: Arc::new(app),
        conns,
        routes: routes_for_guard,
        pinning,
    };
    let mut service = pingora::services::listening::Service::new("tidegate edge".into(), guard);
    // No read buffer of its own on plain HTTP: Pingora's default (64 KiB
    // per connection) made 5,000 idle connections cost 470 MB; the request
    // head has its own buffer and bodies theirs. Pinned HTTP relies on it:
    // it takes the socket from under Pingora's stream.
    let unbuffered_read = pingora::listeners::L4BufferSettings::default().read(0);
    service.add_listener(
        pingora::listeners::ListenerConfig::tcp(cfg.http_entry.to_string())
            .l4_buffer(unbuffered_read),
    );
    if let (Some(addr), Some(cert), Some(key)) = (cfg.https_entry, &cfg.tls_cert, &cfg.tls_key) {
        let mut tls = pingora::listeners::tls::TlsSettings::intermediate(
            &cert.display().to_string(),
            &key.display().to_string(),
        )
        .map_err(|e| anyhow::anyhow!("TLS certificate {}: {e}", cert.display()))?;
        tls.enable_h2();
        service.add_tls_with_settings(&addr.to_string(), None, tls);
    }
    server.add_service(service);
    let proxy = run(server)?;
    tracing::info!(http = %cfg.http_entry, https = ?cfg.https_entry, "HTTP proxy listening");
    Ok(proxy)
}

/// Runs `server` on a thread of its own until the proxy is stopped.
fn run(server: pingora::server::Server) -> std::io::Result<Proxy> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    std::thread::Builder::new()
        .name("pingora".into())
        .spawn(move || {
            server.run(pingora::server::RunArgs {
                shutdown_signal: Box::new(StopSignal(rx)),
            })
        })?;
    Ok(Proxy { stop: tx })
}
