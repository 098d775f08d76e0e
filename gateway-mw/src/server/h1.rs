//! The HTTP/1.1 client side of one upstream exchange, without I/O: writing
//! a request head, reading a response head (with `httparse`, the parser
//! hyper uses) and telling how the body that follows is framed, and
//! decoding a chunked body.
//!
//! The upstream pool ([`super::pool`]) drives these over its connections
//! from the request's own task. hyper's client connection runs a task of
//! its own per connection and hands each request to it and the response
//! back through channels; for a proxy that sends one request at a time per
//! connection, that is two cross-task wake-ups and a second HTTP/1
//! dispatcher per request (ADR 0025's amendment).
//!
//! Framing follows RFC 9112 §6.3: no body for a `HEAD` request, a 1xx,
//! 204 or 304; `Transfer-Encoding` ending in `chunked` before
//! `Content-Length`; any other `Transfer-Encoding`, or neither header, reads
//! to the connection's close. A connection is reused only after a body
//! framed by length or chunks was read to its end, and when neither side
//! asked to close it.

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Version};

/// The largest response head read (status line and header fields).
pub(crate) const MAX_HEAD_BYTES: usize = 64 * 1024;

/// The most header fields a response head may carry (hyper's default).
pub(crate) const MAX_HEADERS: usize = 100;

/// Header fields a response may gain after it is read.
const RESPONSE_HEADROOM: usize = 16;

/// The longest chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 4 * 1024;

/// The most bytes of trailer fields after a chunked body (dropped).
const MAX_TRAILERS: usize = 16 * 1024;

/// Why a response from an upstream could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The head did not end within 64 KiB.
    #[error("the response head is longer than {MAX_HEAD_BYTES} bytes")]
    HeadTooLarge,
    /// The status line or a header field is malformed, or there are more
    /// than 100 of them.
    #[error("the response head is malformed")]
    MalformedHead(#[source] httparse::Error),
    /// A header field's name or value is not one `http` accepts.
    #[error("a response header field is invalid")]
    InvalidHeader,
    /// `Content-Length` is not a number, or its values differ.
    #[error("the response's Content-Length is invalid")]
    InvalidContentLength,
    /// A `101 Switching Protocols`: the gateway forwards no upgrades.
    #[error("the upstream switched protocols, which the gateway does not forward")]
    UnexpectedUpgrade,
    /// A chunk-size line is malformed or too long, or a chunk is not
    /// followed by CRLF.
    #[error("the response's chunked body is malformed")]
    InvalidChunk,
    /// The trailer fields after a chunked body are longer than 16 KiB.
    #[error("the response's trailer fields are too long")]
    TrailersTooLarge,
    /// The connection ended inside the response head.
    #[error("the upstream closed the connection inside the response head")]
    IncompleteHead,
    /// The connection ended before the body did.
    #[error("the upstream closed the connection before the end of the body")]
    IncompleteBody,
}

/// How the body after a response head is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Everything until the upstream closes the connection.
    UntilClose,
}

/// A parsed response head.
#[derive(Debug)]
pub(crate) struct Head {
    /// The status and header fields, without a body yet.
    pub(crate) response: Response<()>,
    /// How the body is delimited.
    pub(crate) framing: Framing,
    /// Whether the connection may carry another request once the body is
    /// read to its end.
    pub(crate) reusable: bool,
}

/// Whether a request with `method` may be sent again after the connection
/// failed before any of its response arrived (RFC 9110 §9.2.2).
pub(crate) fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS | Method::TRACE
    )
}

/// Appends the request head for `method` `target` with `headers`, and a
/// `Content-Length` for a body of `body_len` bytes, to `out`.
///
/// The caller's `Content-Length` and `Transfer-Encoding` are not written:
/// the body is sent whole, framed by its length (always for a method that
/// carries one, otherwise only when it is not empty, as hyper does).
pub(crate) fn encode_request_head(
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    body_len: usize,
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        if name == CONTENT_LENGTH || name == TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if body_len > 0 || matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(itoa::Buffer::new().format(body_len).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Reads a final response head from the front of `buf`, skipping interim
/// (1xx) responses: `Ok(None)` when more bytes are needed. What is read is
/// taken off `buf`; the body's first bytes stay in it.
///
/// # Errors
/// [`ProtocolError`] for a malformed or oversized head, an invalid
/// `Content-Length` or a `101`.
pub(crate) fn parse_response_head(
    buf: &mut BytesMut,
    method: &Method,
) -> Result<Option<Head>, ProtocolError> {
    loop {
        // Uninitialised: httparse writes the fields it finds, and 3 KiB of
        // empty ones would otherwise be written before every parse.
        let mut fields =
            [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut parsed,
            buf,
            &mut fields,
        ) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD_BYTES => {
                return Err(ProtocolError::HeadTooLarge);
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(ProtocolError::MalformedHead(e)),
        };
        if len > MAX_HEAD_BYTES {
            return Err(ProtocolError::HeadTooLarge);
        }
        let code = parsed.code.unwrap_or_default();
        let status = StatusCode::from_u16(code)
            .map_err(|_| ProtocolError::MalformedHead(httparse::Error::Status))?;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(ProtocolError::UnexpectedUpgrade);
        }
        if status.is_informational() {
            // 100 Continue, 103 Early Hints: the final response follows.
            buf.advance(len);
            continue;
        }
        let version = if parsed.version == Some(1) {
            Version::HTTP_11
        } else {
            Version::HTTP_10
        };
        // Where each value lies in the head, so that the values can share
        // the head's bytes once it is split off instead of each being
        // copied.
        let base = buf.as_ptr() as usize;
        let mut names = Vec::with_capacity(parsed.headers.len());
        let mut spans = Vec::with_capacity(parsed.headers.len());
        for field in parsed.headers.iter() {
            names.push(
                HeaderName::from_bytes(field.name.as_bytes())
                    .map_err(|_| ProtocolError::InvalidHeader)?,
            );
            let start = field.value.as_ptr() as usize - base;
            spans.push(start..start + field.value.len());
        }
        let head = buf.split_to(len).freeze();
        // Room for what the gateway adds to a response on its way out (the
        // security, rate-limit and request-id headers), so that the map
        // does not grow twice on the way.
        let mut headers = HeaderMap::with_capacity(names.len() + RESPONSE_HEADROOM);
        for (name, span) in names.into_iter().zip(spans) {
            let value = HeaderValue::from_maybe_shared(head.slice(span))
                .map_err(|_| ProtocolError::InvalidHeader)?;
            headers.append(name, value);
        }
        let (framing, mut reusable) = framing(method, status, &mut headers)?;
        // HTTP/1.0 has no transfer codings (RFC 9112 §6.1): such framing
        // is faulty, and the connection is closed after it.
        reusable &= keeps_alive(version, &headers)
            && !(version == Version::HTTP_10
                && framing != Framing::Empty
                && headers.contains_key(TRANSFER_ENCODING));
        let mut response = Response::new(());
        *response.status_mut() = status;
        *response.version_mut() = version;
        *response.headers_mut() = headers;
        return Ok(Some(Head {
            response,
            framing,
            reusable,
        }));
    }
}

/// The body's framing, and whether it leaves the connection reusable.
/// A `Content-Length` beside a `Transfer-Encoding` is removed (RFC 9112
/// §6.3 rule 3): it does not describe what follows.
fn framing(
    method: &Method,
    status: StatusCode,
    headers: &mut HeaderMap,
) -> Result<(Framing, bool), ProtocolError> {
    if *method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok((Framing::Empty, true));
    }
    if headers.contains_key(TRANSFER_ENCODING) {
        let chunked_last = headers
            .get_all(TRANSFER_ENCODING)
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .is_some_and(|coding| coding.trim().eq_ignore_ascii_case("chunked"));
        let had_length = headers.remove(CONTENT_LENGTH).is_some();
        return Ok(if chunked_last {
            (Framing::Chunked, !had_length)
        } else {
            (Framing::UntilClose, false)
        });
    }
    let mut length: Option<u64> = None;
    for value in headers.get_all(CONTENT_LENGTH) {
        let text = value
            .to_str()
            .map_err(|_| ProtocolError::InvalidContentLength)?;
        for part in text.split(',') {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(ProtocolError::InvalidContentLength);
            }
            let n: u64 = part
                .parse()
                .map_err(|_| ProtocolError::InvalidContentLength)?;
            if length.is_some_and(|l| l != n) {
                return Err(ProtocolError::InvalidContentLength);
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(0) => (Framing::Empty, true),
        Some(n) => (Framing::Length(n), true),
        None => (Framing::UntilClose, false),
    })
}

/// Whether the response lets the connection stay open: HTTP/1.1 unless it
/// says `close`, HTTP/1.0 only when it says `keep-alive`.
fn keeps_alive(version: Version, headers: &HeaderMap) -> bool {
    let has = |token: &str| {
        headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if version == Version::HTTP_11 {
        !has("close")
    } else {
        has("keep-alive")
    }
}

/// What [`ChunkedDecoder::decode`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decoded {
    /// Body bytes.
    Data(Bytes),
    /// More input is needed.
    NeedMore,
    /// The body ended (last chunk and trailers read).
    End,
}

/// Decodes a chunked body from a buffer that the caller keeps filling.
#[derive(Debug, Clone, Default)]
pub(crate) struct ChunkedDecoder {
    state: ChunkState,
    trailer_bytes: usize,
}

#[derive(Debug, Clone, Copy, Default)]
enum ChunkState {
    /// Before a chunk-size line.
    #[default]
    Size,
    /// Inside a chunk's data, this many bytes left.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last chunk: trailer lines up to an empty one.
    Trailers,
    /// Done.
    End,
}

impl ChunkedDecoder {
    /// Takes what it can decode off the front of `buf`.
    ///
    /// # Errors
    /// [`ProtocolError::InvalidChunk`] or
    /// [`ProtocolError::TrailersTooLarge`]; the body cannot go on then.
    pub(crate) fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, ProtocolError> {
        loop {
            match self.state {
                // httparse reads a line without digits as size 0, which
                // would end the body early: a size starts with a digit.
                ChunkState::Size if buf.first().is_some_and(|b| !b.is_ascii_hexdigit()) => {
                    return Err(ProtocolError::InvalidChunk);
                }
                ChunkState::Size => match httparse::parse_chunk_size(buf) {
                    Ok(httparse::Status::Complete((used, _))) if used > MAX_CHUNK_LINE => {
                        return Err(ProtocolError::InvalidChunk);
                    }
                    Ok(httparse::Status::Complete((used, size))) => {
                        buf.advance(used);
                        self.state = if size == 0 {
                            ChunkState::Trailers
                        } else {
                            ChunkState::Data(size)
                        };
                    }
                    Ok(httparse::Status::Partial) if buf.len() > MAX_CHUNK_LINE => {
                        return Err(ProtocolError::InvalidChunk);
                    }
                    Ok(httparse::Status::Partial) => return Ok(Decoded::NeedMore),
                    Err(httparse::InvalidChunkSize) => return Err(ProtocolError::InvalidChunk),
                },
                ChunkState::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let data = buf.split_to(take).freeze();
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    };
                    return Ok(Decoded::Data(data));
                }
                ChunkState::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(ProtocolError::InvalidChunk);
                    }
                    buf.advance(2);
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
                        if self.trailer_bytes + buf.len() > MAX_TRAILERS {
                            return Err(ProtocolError::TrailersTooLarge);
                        }
                        return Ok(Decoded::NeedMore);
                    };
                    self.trailer_bytes += end + 2;
                    if self.trailer_bytes > MAX_TRAILERS {
                        return Err(ProtocolError::TrailersTooLarge);
                    }
                    buf.advance(end + 2);
                    if end == 0 {
                        self.state = ChunkState::End;
                    }
                }
                ChunkState::End => return Ok(Decoded::End),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn head(text: &str, method: &Method) -> Result<Option<Head>, ProtocolError> {
        parse_response_head(&mut BytesMut::from(text.as_bytes()), method)
    }

    fn framing_of(text: &str) -> (Framing, bool) {
        let h = head(text, &Method::GET).unwrap().unwrap();
        (h.framing, h.reusable)
    }

    #[test]
    fn a_request_head_in_origin_form_with_its_length() {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("api.example"));
        headers.append("x-a", HeaderValue::from_static("1"));
        headers.append("x-a", HeaderValue::from_static("2"));
        headers.insert("content-length", HeaderValue::from_static("999"));
        headers.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        let mut out = Vec::new();
        encode_request_head(&Method::POST, "/v1/o?x=1", &headers, 5, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /v1/o?x=1 HTTP/1.1\r\nhost: api.example\r\nx-a: 1\r\nx-a: 2\r\n\
             content-length: 5\r\n\r\n"
        );
        let mut out = Vec::new();
        encode_request_head(&Method::GET, "/", &HeaderMap::new(), 0, &mut out);
        assert_eq!(out, b"GET / HTTP/1.1\r\n\r\n");
        let mut out = Vec::new();
        encode_request_head(&Method::PUT, "/", &HeaderMap::new(), 0, &mut out);
        assert_eq!(out, b"PUT / HTTP/1.1\r\ncontent-length: 0\r\n\r\n");
    }

    #[test]
    fn a_head_in_pieces_then_the_bodys_first_bytes_stay() {
        let text = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Y: z\r\n\r\nhello";
        let mut buf = BytesMut::new();
        for (i, byte) in text.iter().enumerate() {
            buf.extend_from_slice(&[*byte]);
            let parsed = parse_response_head(&mut buf, &Method::GET).unwrap();
            let head_end = text.len() - 5;
            match parsed {
                None => assert!(i + 1 < head_end, "complete at {i}"),
                Some(h) => {
                    assert_eq!(i + 1, head_end);
                    assert_eq!(h.response.status(), 200);
                    assert_eq!(h.response.headers()["x-y"], "z");
                    assert_eq!((h.framing, h.reusable), (Framing::Length(5), true));
                    break;
                }
            }
        }
        assert!(buf.is_empty());
        let mut buf = BytesMut::from(&text[..]);
        parse_response_head(&mut buf, &Method::GET)
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..], b"hello");
    }

    #[test]
    fn framing_by_rfc_9112() {
        assert_eq!(
            framing_of("HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n"),
            (Framing::Length(12), true)
        );
        assert_eq!(
            framing_of("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
            (Framing::Empty, true)
        );
        assert_eq!(
            framing_of("HTTP/1.1 200 OK\r\nContent-Length: 7, 7\r\n\r\n"),
            (Framing::Length(7), true)
        );
        assert_eq!(
            framing_of("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            (Framing::Chunked, true)
        );
        // Both: chunked wins, the length goes, and the connection with it.
        let h = head(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            &Method::GET,
        )
        .unwrap()
        .unwrap();
        assert_eq!((h.framing, h.reusable), (Framing::Chunked, false));
        assert!(!h.response.headers().contains_key(CONTENT_LENGTH));
        assert_eq!(
            framing_of("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n"),
            (Framing::UntilClose, false)
        );
        assert_eq!(
            framing_of("HTTP/1.1 200 OK\r\n\r\n"),
            (Framing::UntilClose, false)
        );
        assert_eq!(
            framing_of("HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n"),
            (Framing::Empty, true)
        );
        assert_eq!(
            framing_of("HTTP/1.1 304 Not Modified\r\n\r\n"),
            (Framing::Empty, true)
        );
        let h = head(
            "HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n",
            &Method::HEAD,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.framing, Framing::Empty);
        // Who asked to close.
        assert_eq!(
            framing_of("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: Close\r\n\r\n"),
            (Framing::Length(1), false)
        );
        assert_eq!(
            framing_of("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n"),
            (Framing::Length(1), false)
        );
        assert_eq!(
            framing_of("HTTP/1.0 200 OK\r\nContent-Length: 1\r\nConnection: keep-alive\r\n\r\n"),
            (Framing::Length(1), true)
        );
        // HTTP/1.0 with a transfer coding: read, then closed.
        assert_eq!(
            framing_of(
                "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"
            ),
            (Framing::Chunked, false)
        );
    }

    #[test]
    fn interim_responses_are_skipped_and_upgrades_refused() {
        let h = head(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n\
             HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
            &Method::POST,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.response.status(), 201);
        assert!(!h.response.headers().contains_key("link"));
        assert_eq!(
            head(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
                &Method::GET
            )
            .unwrap_err(),
            ProtocolError::UnexpectedUpgrade
        );
    }

    #[test]
    fn malformed_heads_are_typed_errors() {
        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        ] {
            assert_eq!(
                head(bad, &Method::GET).unwrap_err(),
                ProtocolError::InvalidContentLength,
                "{bad:?}"
            );
        }
        for bad in [
            "HTTP/1.1 2000 OK\r\n\r\n",
            "SMTP 220 hello\r\n\r\n",
            "HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
        ] {
            assert!(
                matches!(
                    head(bad, &Method::GET),
                    Err(ProtocolError::MalformedHead(_))
                ),
                "{bad:?}"
            );
        }
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-{i}: v\r\n")).collect();
        assert_eq!(
            head(&format!("HTTP/1.1 200 OK\r\n{many}\r\n"), &Method::GET).unwrap_err(),
            ProtocolError::MalformedHead(httparse::Error::TooManyHeaders)
        );
        let long = format!("HTTP/1.1 200 OK\r\nx-long: {}", "a".repeat(MAX_HEAD_BYTES));
        assert_eq!(
            head(&long, &Method::GET).unwrap_err(),
            ProtocolError::HeadTooLarge
        );
    }

    /// Decodes `input` fed in `cuts`-sized pieces; the body, or the error.
    fn decode_in_pieces(input: &[u8], cuts: &[usize]) -> Result<(Vec<u8>, Vec<u8>), ProtocolError> {
        let mut decoder = ChunkedDecoder::default();
        let (mut buf, mut body) = (BytesMut::new(), Vec::new());
        let (mut fed, mut cut) = (0, cuts.iter().cycle());
        loop {
            match decoder.decode(&mut buf)? {
                Decoded::Data(data) => body.extend_from_slice(&data),
                Decoded::End => return Ok((body, buf.to_vec())),
                Decoded::NeedMore => {
                    if fed == input.len() {
                        return Err(ProtocolError::IncompleteBody);
                    }
                    let n = (*cut.next().unwrap()).clamp(1, input.len() - fed);
                    buf.extend_from_slice(&input[fed..fed + n]);
                    fed += n;
                }
            }
        }
    }

    #[test]
    fn chunked_bodies_with_extensions_and_trailers() {
        let input = b"5;ext=1\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\n0\r\nx-t: 1\r\n\r\nNEXT";
        let (body, rest) = decode_in_pieces(input, &[usize::MAX]).unwrap();
        assert_eq!(body, b"hello 0123456789");
        assert_eq!(rest, b"NEXT", "the decoder stops at the body's end");
        assert_eq!(
            decode_in_pieces(b"5\r\nhelloXX0\r\n\r\n", &[64]).unwrap_err(),
            ProtocolError::InvalidChunk
        );
        assert_eq!(
            decode_in_pieces(b"zz\r\n", &[64]).unwrap_err(),
            ProtocolError::InvalidChunk
        );
        // No digits is not a last chunk.
        for bad in [
            &b"\r\n\r\nrest"[..],
            b";ext\r\n\r\n",
            b" 5\r\nhello\r\n0\r\n\r\n",
        ] {
            assert_eq!(
                decode_in_pieces(bad, &[64]).unwrap_err(),
                ProtocolError::InvalidChunk,
                "{bad:?}"
            );
        }
        assert_eq!(
            decode_in_pieces(b"5\r\nhel", &[64]).unwrap_err(),
            ProtocolError::IncompleteBody
        );
        let long_line = format!("1;{}\r\n", "e".repeat(MAX_CHUNK_LINE));
        assert_eq!(
            decode_in_pieces(long_line.as_bytes(), &[1024]).unwrap_err(),
            ProtocolError::InvalidChunk
        );
        let trailers = format!("0\r\n{}\r\n\r\n", "x-t: 1\r\n".repeat(MAX_TRAILERS / 8 + 1));
        assert_eq!(
            decode_in_pieces(trailers.as_bytes(), &[512]).unwrap_err(),
            ProtocolError::TrailersTooLarge
        );
    }

    fn chunked(chunks: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in chunks.iter().filter(|c| !c.is_empty()) {
            out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            out.extend_from_slice(chunk);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
        out
    }

    proptest! {
        /// Any body, chunked any way and fed in any pieces, decodes to
        /// itself and leaves what follows it untouched.
        #[test]
        fn chunked_round_trip(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..8),
            cuts in proptest::collection::vec(1usize..64, 1..8),
            after in proptest::collection::vec(any::<u8>(), 0..16),
        ) {
            let mut input = chunked(&chunks);
            input.extend_from_slice(&after);
            let (body, rest) = decode_in_pieces(&input, &cuts).unwrap();
            prop_assert_eq!(body, chunks.concat());
            // Whatever was fed past the end is left in the buffer.
            prop_assert!(after.starts_with(&rest));
        }

        /// Arbitrary bytes never panic the head parser or the decoder.
        #[test]
        fn garbage_is_an_error_or_a_wait_never_a_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let _ = parse_response_head(&mut BytesMut::from(&bytes[..]), &Method::GET);
            let _ = decode_in_pieces(&bytes, &[7]);
        }
    }
}
