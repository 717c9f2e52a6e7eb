//! HTTP/1.1 answers read off a raw connection, for tests and attacks that
//! send several requests over one kept-alive connection.

/// Takes the first complete answer (its head and a body of its
/// `Content-Length`, none without one) off the front of `buf`: its status
/// and body. `None` while part of it has still to arrive.
pub fn take_answer(buf: &mut Vec<u8>) -> Option<(u16, String)> {
    let at = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..at]).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    if buf.len() < at + 4 + len {
        return None;
    }
    let status = head.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = String::from_utf8_lossy(&buf[at + 4..at + 4 + len]).to_string();
    buf.drain(..at + 4 + len);
    Some((status, body))
}

#[cfg(test)]
mod tests {
    use super::take_answer;

    #[test]
    fn answers_come_off_whole_and_in_order() {
        let mut buf = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nab".to_vec();
        assert_eq!(take_answer(&mut buf), None, "a body short of its length");
        buf.extend_from_slice(b"cHTTP/1.1 404 Not Found\r\ncontent-length:0\r\n\r\n");
        assert_eq!(take_answer(&mut buf), Some((200, "abc".into())));
        assert_eq!(take_answer(&mut buf), Some((404, String::new())));
        assert!(buf.is_empty());
        assert_eq!(take_answer(&mut buf), None);
    }
}
