//! Strings from a request, quoted for error messages: whole when short,
//! clipped when long.

/// The most of a key (or another string from a request) an error message
/// repeats. Keys that are only looked up are not checked against
/// [`crate::snapshots::MAX_KEY_BYTES`], so a request may name one of
/// megabytes; the message goes back in an HTTP/2 header (`grpc-message`),
/// which clients bound (tonic at 16 KiB): one that repeated it whole would
/// reach the client as a protocol error, not as its code.
pub(crate) const SHOWN_BYTES: usize = 256;

/// `s` quoted for a message: whole up to [`SHOWN_BYTES`], else its start and its length.
pub(crate) fn shown(s: &str) -> String {
    match clipped(s) {
        Some(start) => format!("{start:?}… ({} bytes)", s.len()),
        None => format!("{s:?}"),
    }
}

/// The start of `s` when it is longer than [`SHOWN_BYTES`].
pub(crate) fn clipped(s: &str) -> Option<&str> {
    if s.len() <= SHOWN_BYTES {
        return None;
    }
    let mut end = SHOWN_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Some(&s[..end])
}
