//! Path segments.

use std::borrow::Cow;

/// A path segment percent-decoded once, as an upstream or a router decodes
/// it: `%XX` escapes become bytes (a malformed escape stays as written) and
/// `+` stays `+` (form encoding is for query strings, not paths). `None`
/// when the decoded bytes are not UTF-8.
///
/// ```
/// use http_kit::path::decode_segment;
/// assert_eq!(decode_segment("user%201").as_deref(), Some("user 1"));
/// assert_eq!(decode_segment("a+b").as_deref(), Some("a+b"));
/// assert_eq!(decode_segment("%zz").as_deref(), Some("%zz"));
/// assert_eq!(decode_segment("%ff"), None);
/// ```
pub fn decode_segment(segment: &str) -> Option<Cow<'_, str>> {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .ok()
}
