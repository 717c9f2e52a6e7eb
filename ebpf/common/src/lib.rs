//! What tidegate's eBPF programs and the agent agree on: program and map
//! names and the layout of map values. `no_std` so the eBPF side can use it.
#![no_std]

/// The `sk_lookup` program steering allocated instance ports into the agent's listener.
pub const PROG_STEER: &str = "tidegate_steer";
/// The `sk_skb` stream-verdict program splicing a player socket and its backend in the kernel.
pub const PROG_SPLICE: &str = "tidegate_splice";

/// `u32` index 0 → [`Entry`]: which local address the steering applies to.
pub const MAP_ENTRY: &str = "ENTRY";
/// Public TCP port (host byte order, `u16`) → `u8` 1 while an instance holds it.
pub const MAP_PORTS: &str = "PORTS";
/// SOCKMAP with the agent's single listening socket at index 0.
pub const MAP_LISTENER: &str = "LISTENER";
/// SOCKHASH socket cookie (`u64`) → socket, for the in-kernel splice path.
pub const MAP_PAIRS: &str = "PAIRS";
/// SOCKHASH socket cookie (`u64`) → socket, the redirect targets (no program
/// attached; filled before [`MAP_PAIRS`]).
pub const MAP_TARGETS: &str = "TARGETS";
/// Socket cookie (`u64`) → [`Peer`]: where its bytes go, and how many went.
pub const MAP_PEERS: &str = "PEERS";

/// Most allocated ports one agent steers (every port of a 16-bit space).
pub const MAX_PORTS: u32 = 65536;
/// Most sockets in the in-kernel splice path at once (two per connection).
pub const MAX_SPLICED_SOCKETS: u32 = 65536;

/// The address whose ports are steered.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// IPv4 address in network byte order, as `bpf_sk_lookup.local_ip4`; 0 = any address.
    pub ipv4: u32,
    /// 1 once the agent has put its listener into [`MAP_LISTENER`].
    pub ready: u32,
}

/// A spliced socket's peer and how many bytes were redirected to it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    /// Socket cookie (`SO_COOKIE`) of the socket the bytes are sent out of.
    pub cookie: u64,
    /// Bytes redirected so far (updated by the program).
    pub bytes: u64,
}

#[cfg(feature = "user")]
// SAFETY: Peer is repr(C), Copy, two u64s, no padding.
unsafe impl aya::Pod for Peer {}

#[cfg(feature = "user")]
// SAFETY: Entry is repr(C), Copy, made of plain integers with no padding.
unsafe impl aya::Pod for Entry {}
