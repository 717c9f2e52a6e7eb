//! Guarded writes: every write of desired state is a Txn whose compares
//! guard it (a fencing token, a revision, a key that must not exist). When
//! a compare fails, the `or_else` branch reads the key it was about, so the
//! error can say what stood in the way; [`else_get`] finds that read.

use etcd_client::{KeyValue, TxnOpResponse, TxnResponse};

/// The key read by the `or_else` branch's single `get`, if it exists.
pub fn else_get(resp: &TxnResponse) -> Option<KeyValue> {
    resp.op_responses().into_iter().find_map(|op| match op {
        TxnOpResponse::Get(g) => g.kvs().first().cloned(),
        _ => None,
    })
}
