//! Guarded writes: every write of desired state is a Txn whose compares
//! guard it (a fencing token, a revision, a key that must not exist). When
//! a compare fails, the `or_else` branch reads the key it was about, so the
//! error can say what stood in the way; [`else_get`] finds that read.

use etcd_client::{KeyValue, TxnOpResponse, TxnResponse};

/// The key read by the `or_else` branch's first operation, a `get`, if it
/// exists. Only the first: when a branch reads more (a spawn's reads the
/// leader key, then a pooled record and its status), a missing leader key
/// must not be answered with the next key read.
pub fn else_get(resp: &TxnResponse) -> Option<KeyValue> {
    match resp.op_responses().into_iter().next()? {
        TxnOpResponse::Get(g) => g.kvs().first().cloned(),
        _ => None,
    }
}
