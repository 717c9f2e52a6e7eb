//! The eBPF loader: loads tidegate's programs (built from ebpf/programs and
//! embedded at build time), attaches `tidegate_steer` to this network
//! namespace and, for the sockhash data path, `tidegate_splice` to the
//! `PAIRS` sockhash; keeps the `PORTS` map equal to the route table.
//!
//! The programs and their links live as long as the [`Redirector`]: when it
//! is dropped (agent exit, even a crash closes the fds) the kernel detaches
//! them and every port stops being steered.
// The loader is the one place in the agent allowed `unsafe`: two socket
// options no safe wrapper offers (each block says why it is sound).
#![allow(unsafe_code)]

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::{Arc, Mutex};

use aya::maps::{Array, HashMap as BpfHashMap, MapData, SockHash, SockMap};
use aya::programs::{SkLookup, SkSkb};
use aya::{Ebpf, include_bytes_aligned};
use tidegate_ebpf_common as common;
use tidegate_ebpf_common::{Entry, Peer};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use super::Relay;
use super::error::{Result, Step, TcpError};
use crate::routes::SharedRoutes;

/// The object `cargo xtask build-ebpf` (through build.rs) produced.
static OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tidegate-ebpf"));

/// Loaded programs and their maps.
pub struct Redirector {
    _bpf: Ebpf,
    /// The steered address, as `bpf_sk_lookup.local_ip4` holds it.
    ipv4: u32,
    entry: Mutex<Array<MapData, Entry>>,
    listener: Mutex<SockMap<MapData>>,
    /// The map and what we last wrote into it.
    ports: Mutex<(BpfHashMap<MapData, u16, u8>, HashSet<u16>)>,
    splice: Option<Splicer>,
}

impl std::fmt::Debug for Redirector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redirector")
            .field("sockhash", &self.splice.is_some())
            .finish_non_exhaustive()
    }
}

/// The in-kernel splice path's maps.
struct Splicer {
    /// Pairs handed to the kernel, and pairs it refused (served by splice(2)).
    spliced: std::sync::atomic::AtomicU64,
    refused: std::sync::atomic::AtomicU64,
    /// Kernel ids of the maps (for bpftool).
    ids: Vec<(&'static str, u32)>,
    pairs: Mutex<SockHash<MapData, u64>>,
    targets: Mutex<SockHash<MapData, u64>>,
    peers: Mutex<BpfHashMap<MapData, u64, Peer>>,
}

fn ipv4_of(host: IpAddr) -> Result<u32> {
    match host {
        // bpf_sk_lookup.local_ip4 is in network byte order: the address's
        // bytes as they are, read as a native integer.
        IpAddr::V4(v4) => Ok(u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(_) => Err(TcpError::new(
            "tcp_host",
            format!("eBPF steering serves an IPv4 tcp_host only, not {host}"),
        )),
    }
}

impl Redirector {
    /// Loads and attaches the programs; `sockhash` also loads the splice program.
    pub fn load(host: IpAddr, sockhash: bool) -> Result<Self> {
        let ipv4 = ipv4_of(host)?;
        let mut bpf = Ebpf::load(OBJECT)
            .step("loading the eBPF object (needs CAP_BPF and CAP_NET_ADMIN, or root)")?;
        let mut ids = Vec::new();
        let mut take = |bpf: &mut Ebpf, name: &'static str| {
            let step = format!("taking map {name} from the eBPF object");
            let map = bpf.take_map(name).step(&step)?;
            if let aya::maps::Map::SockHash(data) | aya::maps::Map::HashMap(data) = &map {
                ids.push((name, data.info().step(&step)?.id()));
            }
            Ok::<_, TcpError>(map)
        };
        let typed = |name: &str| format!("map {name} has the wrong type");
        let mut entry: Array<MapData, Entry> = take(&mut bpf, common::MAP_ENTRY)?
            .try_into()
            .step(typed(common::MAP_ENTRY))?;
        let listener: SockMap<MapData> = take(&mut bpf, common::MAP_LISTENER)?
            .try_into()
            .step(typed(common::MAP_LISTENER))?;
        let ports: BpfHashMap<MapData, u16, u8> = take(&mut bpf, common::MAP_PORTS)?
            .try_into()
            .step(typed(common::MAP_PORTS))?;
        let pairs: SockHash<MapData, u64> = take(&mut bpf, common::MAP_PAIRS)?
            .try_into()
            .step(typed(common::MAP_PAIRS))?;
        let targets: SockHash<MapData, u64> = take(&mut bpf, common::MAP_TARGETS)?
            .try_into()
            .step(typed(common::MAP_TARGETS))?;
        let peers: BpfHashMap<MapData, u64, Peer> = take(&mut bpf, common::MAP_PEERS)?
            .try_into()
            .step(typed(common::MAP_PEERS))?;
        entry
            .set(0, Entry { ipv4, ready: 0 }, 0)
            .step("writing the steered address")?;
        tracing::debug!(?ids, "eBPF maps created");

        let netns = std::fs::File::open("/proc/self/ns/net").step("opening /proc/self/ns/net")?;
        let steer: &mut SkLookup = bpf
            .program_mut(common::PROG_STEER)
            .step("finding the steering program in the eBPF object")?
            .try_into()
            .step("the steering program has the wrong type")?;
        steer.load().step("loading the sk_lookup program")?;
        steer
            .attach(netns.as_fd())
            .step("attaching the sk_lookup program to this network namespace")?;

        let splice = if sockhash {
            let prog: &mut SkSkb = bpf
                .program_mut(common::PROG_SPLICE)
                .step("finding the splice program in the eBPF object")?
                .try_into()
                .step("the splice program has the wrong type")?;
            prog.load().step("loading the sk_skb program")?;
            prog.attach(pairs.fd())
                .step("attaching the sk_skb program to the sockhash")?;
            Some(Splicer {
                spliced: Default::default(),
                refused: Default::default(),
                ids,
                pairs: Mutex::new(pairs),
                targets: Mutex::new(targets),
                peers: Mutex::new(peers),
            })
        } else {
            None
        };
        Ok(Self {
            _bpf: bpf,
            ipv4,
            entry: Mutex::new(entry),
            listener: Mutex::new(listener),
            ports: Mutex::new((ports, HashSet::new())),
            splice,
        })
    }

    /// Makes `listener` the socket steered connections land on, and turns steering on.
    fn set_listener(&self, listener: &TcpListener) -> Result<()> {
        lock(&self.listener)
            .set(0, &listener.as_raw_fd(), 0)
            .step("putting the listener into the sockmap")?;
        let ready = Entry {
            ipv4: self.ipv4,
            ready: 1,
        };
        lock(&self.entry)
            .set(0, ready, 0)
            .step("turning steering on")
    }

    /// Makes the steered ports exactly `want`; returns how many changed.
    pub fn sync_ports(&self, want: &HashSet<u16>) -> usize {
        let mut guard = lock(&self.ports);
        let (map, have) = &mut *guard;
        let add: Vec<u16> = want.difference(have).copied().collect();
        let remove: Vec<u16> = have.difference(want).copied().collect();
        let mut changed = 0;
        for port in add {
            match map.insert(port, 1, 0) {
                Ok(()) => {
                    have.insert(port);
                    changed += 1;
                }
                Err(e) => tracing::warn!(port, error = %e, "cannot open a TCP port in the BPF map"),
            }
        }
        for port in remove {
            match map.remove(&port) {
                Ok(()) => {
                    have.remove(&port);
                    changed += 1;
                }
                Err(e) => {
                    tracing::warn!(port, error = %e, "cannot close a TCP port in the BPF map")
                }
            }
        }
        changed
    }

    /// Ports steered now, read back from the kernel's map.
    pub fn steered_ports(&self) -> Vec<u16> {
        let guard = lock(&self.ports);
        guard.0.keys().filter_map(Result::ok).collect()
    }

    /// Pairs spliced in the kernel so far, and pairs it refused.
    pub fn spliced_pairs(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        self.splice.as_ref().map_or((0, 0), |s| {
            (s.spliced.load(Relaxed), s.refused.load(Relaxed))
        })
    }

    /// Kernel ids of the splice path's maps (`bpftool map dump id N` reads them).
    pub fn spliced_map_ids(&self) -> Vec<(&'static str, u32)> {
        self.splice
            .as_ref()
            .map(|s| s.ids.clone())
            .unwrap_or_default()
    }

    /// Entries of the in-kernel splice path's maps now (PAIRS, TARGETS,
    /// PEERS), read back from the kernel.
    pub fn spliced_entries(&self) -> [usize; 3] {
        let Some(s) = &self.splice else { return [0; 3] };
        [
            lock(&s.pairs).keys().filter(Result::is_ok).count(),
            lock(&s.targets).keys().filter(Result::is_ok).count(),
            lock(&s.peers).keys().filter(Result::is_ok).count(),
        ]
    }

    /// Hands a connected pair to the kernel: bytes arriving on either socket
    /// are sent out of the other. On error nothing stays in the maps.
    pub(crate) fn pair(&self, a: &TcpStream, b: &TcpStream) -> Result<Pair> {
        let s = self.splice.as_ref().step("the sockhash path")?;
        let ca = rustix::net::sockopt::socket_cookie(a).step("reading a socket cookie")?;
        let cb = rustix::net::sockopt::socket_cookie(b).step("reading a socket cookie")?;
        let pair = Pair { a: ca, b: cb };
        // Peers first: a socket may receive data the moment it is in PAIRS.
        let result = (|| -> std::result::Result<(), aya::maps::MapError> {
            let mut peers = lock(&s.peers);
            peers.insert(
                ca,
                Peer {
                    cookie: cb,
                    bytes: 0,
                },
                0,
            )?;
            peers.insert(
                cb,
                Peer {
                    cookie: ca,
                    bytes: 0,
                },
                0,
            )?;
            drop(peers);
            // Targets next (no program: inserting changes nothing for the
            // socket), then PAIRS, where the verdict starts to run.
            let mut targets = lock(&s.targets);
            targets.insert(ca, a.as_raw_fd(), 0)?;
            targets.insert(cb, b.as_raw_fd(), 0)?;
            drop(targets);
            let mut pairs = lock(&s.pairs);
            pairs.insert(ca, a.as_raw_fd(), 0)?;
            pairs.insert(cb, b.as_raw_fd(), 0)?;
            Ok(())
        })();
        if let Err(e) = result {
            self.unpair(&pair);
            s.refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(TcpError::new("inserting a pair into the sockhash maps", e));
        }
        s.spliced.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Bytes that arrived before the insert wait for a data-ready call;
        // setting the receive low-water mark makes one.
        set_rcvlowat(a, 1).step("setting SO_RCVLOWAT")?;
        set_rcvlowat(b, 1).step("setting SO_RCVLOWAT")?;
        Ok(pair)
    }

    /// Bytes the kernel has redirected out of `cookie`'s receive side.
    pub(crate) fn redirected(&self, cookie: u64) -> u64 {
        self.splice
            .as_ref()
            .and_then(|s| lock(&s.peers).get(&cookie, 0).ok())
            .map_or(0, |p| p.bytes)
    }

    /// Removes a pair from both maps (the sockhash also drops closed sockets itself).
    pub(crate) fn unpair(&self, pair: &Pair) {
        if let Some(s) = &self.splice {
            let mut pairs = lock(&s.pairs);
            let _ = pairs.remove(&pair.a);
            let _ = pairs.remove(&pair.b);
            drop(pairs);
            let mut targets = lock(&s.targets);
            let _ = targets.remove(&pair.a);
            let _ = targets.remove(&pair.b);
            drop(targets);
            let mut peers = lock(&s.peers);
            let _ = peers.remove(&pair.a);
            let _ = peers.remove(&pair.b);
        }
    }
}

/// The socket cookies of a spliced pair.
#[derive(Debug)]
pub(crate) struct Pair {
    pub a: u64,
    pub b: u64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn set_rcvlowat(s: &TcpStream, value: libc::c_int) -> std::io::Result<()> {
    // SAFETY: `s` is an open socket for the whole call; the option value is a
    // c_int that lives on the stack across the call, its size passed exactly.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Two of a socket's TCP counters (`struct tcp_info`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct TcpCounters {
    /// Data bytes the remote end has acknowledged.
    pub bytes_acked: u64,
    /// Data bytes received in order, plus one once the FIN arrived (it takes a sequence number).
    pub bytes_received: u64,
}

pub(crate) fn tcp_counters(s: &impl AsRawFd) -> std::io::Result<TcpCounters> {
    // struct tcp_info: 8 one-byte fields, 24 u32s, pacing_rate and
    // max_pacing_rate (u64 each), then tcpi_bytes_acked at byte 120 and
    // tcpi_bytes_received at byte 128 (both since Linux 4.1).
    const BYTES_ACKED: usize = 120 / 8;
    const BYTES_RECEIVED: usize = 128 / 8;
    let mut info = [0u64; 32];
    let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: `info` is a writable buffer of `len` bytes and `len` a valid
    // in/out length, both alive across the call; `s` is an open socket.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if (len as usize) < (BYTES_RECEIVED + 1) * 8 {
        return Err(std::io::Error::other(
            "this kernel's tcp_info has no bytes_acked/bytes_received",
        ));
    }
    Ok(TcpCounters {
        bytes_acked: info[BYTES_ACKED],
        bytes_received: info[BYTES_RECEIVED],
    })
}

/// Steers connections into one listener until `builds` closes.
pub async fn serve(
    redirector: Arc<Redirector>,
    host: IpAddr,
    relay: Arc<Relay>,
    routes: SharedRoutes,
    mut builds: tokio::sync::watch::Receiver<u64>,
) -> Result<()> {
    let listener = TcpSocket::new_v4()
        .and_then(|socket| {
            socket.bind(SocketAddr::new(host, 0))?;
            super::relay::player_options(&socket)?;
            socket.listen(super::LISTEN_BACKLOG)
        })
        .step(format!("the steered listener on {host}"))?;
    redirector.set_listener(&listener)?;
    let accept = tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((client, peer)) => {
                    // sk_lookup keeps the original destination as the local address.
                    let Ok(local) = client.local_addr() else {
                        continue;
                    };
                    let relay = relay.clone();
                    tokio::spawn(async move { relay.serve(client, peer, local).await });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a TCP connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    });
    loop {
        let want: HashSet<u16> = routes.load().by_port.keys().copied().collect();
        let changed = redirector.sync_ports(&want);
        if changed > 0 {
            tracing::debug!(changed, ports = want.len(), "steered TCP ports updated");
        }
        if builds.changed().await.is_err() {
            break;
        }
    }
    accept.abort();
    Ok(())
}
