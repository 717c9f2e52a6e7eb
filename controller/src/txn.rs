//! Helpers for reading why a Txn's compare failed.

use etcd_client::{KeyValue, TxnOpResponse, TxnResponse};

/// The key read by the `or_else` branch's single `get`, if it exists.
pub(crate) fn else_get(resp: &TxnResponse) -> Option<KeyValue> {
    resp.op_responses().into_iter().find_map(|op| match op {
        TxnOpResponse::Get(g) => g.kvs().first().cloned(),
        _ => None,
    })
}
