//! tidegate's eBPF programs (see ebpf/README.md).
//!
//! - `tidegate_steer` (`sk_lookup`, attached to the agent's network
//!   namespace): a TCP connection to the entry address on a port marked in
//!   `PORTS` is handed to the agent's one listening socket (`LISTENER[0]`),
//!   so no instance port is ever bound. Every other lookup is left alone.
//! - `tidegate_splice` (`sk_skb` stream verdict on `PAIRS`): bytes arriving
//!   on a spliced socket are sent out of its peer socket without a trip
//!   through userspace. The peer is looked up in `TARGETS`, a second
//!   sockhash without programs that the agent fills before `PAIRS`, so a
//!   byte arriving while the pair is being inserted always finds its peer.
//!   Zero-length skbs (the FIN) are dropped: the agent
//!   forwards half-close itself.
#![no_std]
#![no_main]

use aya_ebpf::bindings::sk_action::{SK_DROP, SK_PASS};
use aya_ebpf::helpers::bpf_get_socket_cookie;
use aya_ebpf::macros::{map, sk_lookup, stream_verdict};
use aya_ebpf::maps::{Array, HashMap, SockHash, SockMap};
use aya_ebpf::programs::{SkBuffContext, SkLookupContext};
use tidegate_ebpf_common::{Entry, MAX_PORTS, MAX_SPLICED_SOCKETS, Peer};

const AF_INET: u32 = 2;
const IPPROTO_TCP: u32 = 6;

#[map]
static ENTRY: Array<Entry> = Array::with_max_entries(1, 0);
#[map]
static PORTS: HashMap<u16, u8> = HashMap::with_max_entries(MAX_PORTS, 0);
#[map]
static LISTENER: SockMap = SockMap::with_max_entries(1, 0);
#[map]
static PAIRS: SockHash<u64> = SockHash::with_max_entries(MAX_SPLICED_SOCKETS, 0);
#[map]
static TARGETS: SockHash<u64> = SockHash::with_max_entries(MAX_SPLICED_SOCKETS, 0);
#[map]
static PEERS: HashMap<u64, Peer> = HashMap::with_max_entries(MAX_SPLICED_SOCKETS, 0);

#[sk_lookup]
pub fn tidegate_steer(ctx: SkLookupContext) -> u32 {
    // SAFETY: the kernel passes a valid, readable bpf_sk_lookup for the
    // duration of the program; only plain fields are read.
    let (family, protocol, local_ip4, local_port) = unsafe {
        let l = &*ctx.lookup;
        (l.family, l.protocol, l.local_ip4, l.local_port)
    };
    if family != AF_INET || protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    let Some(entry) = ENTRY.get(0) else {
        return SK_PASS;
    };
    if entry.ready == 0 || (entry.ipv4 != 0 && entry.ipv4 != local_ip4) {
        return SK_PASS;
    }
    let port = local_port as u16;
    // SAFETY: a hash-map lookup returns a pointer valid for this program run;
    // it is only tested for presence.
    if unsafe { PORTS.get(&port) }.is_none() {
        return SK_PASS;
    }
    // Not found or not assignable: the kernel's own lookup decides (refused).
    let _ = LISTENER.redirect_sk_lookup(&ctx, 0, 0);
    SK_PASS
}

#[stream_verdict]
pub fn tidegate_splice(ctx: SkBuffContext) -> u32 {
    if ctx.len() == 0 {
        return SK_DROP;
    }
    // SAFETY: the skb pointer is the program's own context, valid for the run.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let Some(peer) = PEERS.get_ptr_mut(&cookie) else {
        // Not paired (yet): deliver to the socket itself; the agent reads it.
        return SK_PASS;
    };
    // SAFETY: the pointer is the map value's, valid for this run; the
    // counter is only ever added to here, and one socket's skbs are
    // processed one at a time. The agent reads it for half-close and bytes.
    let target = unsafe {
        (*peer).bytes += u64::from(ctx.len());
        (*peer).cookie
    };
    TARGETS.redirect_skb(&ctx, target, 0) as u32
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
