//! Reading request bodies with a byte limit.

use bytes::Bytes;
use http::HeaderMap;
use http::header::CONTENT_LENGTH;
use http_body_util::{BodyExt, LengthLimitError, Limited};

use crate::error::ApiError;
use crate::response::BoxError;

/// Why a body could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BodyError {
    /// The body is larger than the limit (declared in `Content-Length`, or
    /// found while reading).
    #[error("request body exceeds {max_bytes} bytes")]
    TooLarge {
        /// The limit.
        max_bytes: usize,
    },
    /// The connection failed or the body was malformed while reading.
    #[error("could not read the request body")]
    Read(#[source] BoxError),
}

impl BodyError {
    /// The answer to send: 413 `body_too_large` or 400 `bad_body`.
    pub fn to_api_error(&self) -> ApiError {
        match self {
            BodyError::TooLarge { max_bytes } => ApiError::body_too_large(*max_bytes),
            BodyError::Read(e) => {
                ApiError::bad_request("bad_body", format!("could not read the request body: {e}"))
            }
        }
    }
}

impl From<BodyError> for ApiError {
    fn from(error: BodyError) -> ApiError {
        error.to_api_error()
    }
}

/// Reads `body` whole, refusing more than `max_bytes`. A `Content-Length`
/// in `headers` above the limit is refused before a byte is read; a chunked
/// body is cut off as soon as it passes the limit, so memory stays bounded
/// by `max_bytes` whatever the client sends.
pub async fn collect_limited<B>(
    headers: &HeaderMap,
    body: B,
    max_bytes: usize,
) -> Result<Bytes, BodyError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|len| len > max_bytes as u64) {
        return Err(BodyError::TooLarge { max_bytes });
    }
    match Limited::new(body, max_bytes).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(BodyError::TooLarge { max_bytes }),
        Err(e) => Err(BodyError::Read(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Frame;
    use http_body_util::{Full, StreamBody};

    #[tokio::test]
    async fn a_declared_length_over_the_limit_is_refused_unread() {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_LENGTH, "11".parse().unwrap());
        let err = collect_limited(&headers, Full::new(Bytes::from_static(b"tiny")), 10)
            .await
            .unwrap_err();
        assert!(matches!(err, BodyError::TooLarge { max_bytes: 10 }));
        assert_eq!(
            err.to_api_error().status(),
            http::StatusCode::PAYLOAD_TOO_LARGE
        );
    }

    #[tokio::test]
    async fn a_streamed_body_is_cut_at_the_limit() {
        let chunks = (0..100)
            .map(|_| Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(b"0123456789"))));
        let body = StreamBody::new(futures_util::stream::iter(chunks));
        let err = collect_limited(&HeaderMap::new(), body, 55)
            .await
            .unwrap_err();
        assert!(matches!(err, BodyError::TooLarge { max_bytes: 55 }));
    }

    #[tokio::test]
    async fn a_body_at_the_limit_is_read_whole() {
        let body = Full::new(Bytes::from_static(b"0123456789"));
        assert_eq!(
            &collect_limited(&HeaderMap::new(), body, 10).await.unwrap()[..],
            b"0123456789"
        );
    }
}
