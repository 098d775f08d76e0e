//! A small JSON-over-HTTP client: what the services' clients (and the
//! payment provider's) are built on. It keeps a pool of keep-alive
//! connections, sends a bearer token, bounds every call with a timeout, and
//! turns the suite's error body back into its code.

use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Client settings. `Debug` shows whether a token is set, never the token.
#[derive(Clone)]
pub struct ClientConfig {
    /// The service's base URL, e.g. `http://127.0.0.1:8082`.
    pub base_url: String,
    /// Sent as `Authorization: Bearer <token>` when set.
    pub bearer_token: Option<String>,
    /// Bound on one call, connect included. Default 2 s.
    pub timeout: Duration,
    /// Idle keep-alive connections kept per host. Default 64.
    pub max_idle_per_host: usize,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("base_url", &self.base_url)
            .field(
                "bearer_token",
                &self.bearer_token.as_ref().map(|_| "<redacted>"),
            )
            .field("timeout", &self.timeout)
            .field("max_idle_per_host", &self.max_idle_per_host)
            .finish()
    }
}

impl ClientConfig {
    /// Settings for `base_url` with the defaults.
    pub fn new(base_url: impl Into<String>) -> ClientConfig {
        ClientConfig {
            base_url: base_url.into(),
            bearer_token: None,
            timeout: Duration::from_secs(2),
            max_idle_per_host: 64,
        }
    }

    /// Sends `token` as a bearer token.
    pub fn with_bearer_token(mut self, token: impl Into<String>) -> ClientConfig {
        self.bearer_token = Some(token.into());
        self
    }

    /// Bounds each call by `timeout`.
    pub fn with_timeout(mut self, timeout: Duration) -> ClientConfig {
        self.timeout = timeout;
        self
    }
}

/// What a call fails with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The base URL or a path did not make a valid URI.
    #[error("invalid URL {0}")]
    InvalidUrl(String),
    /// The bearer token is not a valid header value.
    #[error("invalid bearer token")]
    InvalidToken,
    /// The connection could not be made: the request was not sent.
    #[error("could not connect")]
    Connect(#[source] hyper_util::client::legacy::Error),
    /// The connection failed after the request may have been sent: the
    /// outcome is unknown.
    #[error("connection failed")]
    Transport(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// No reply within the timeout: the outcome is unknown.
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    /// The service answered with an error body.
    #[error("{status}: {code}: {message}")]
    Status {
        /// The HTTP status.
        status: StatusCode,
        /// The body's `error` code.
        code: String,
        /// The body's `message`.
        message: String,
    },
    /// The reply's body was not the JSON expected.
    #[error("malformed reply")]
    Decode(#[source] serde_json::Error),
}

impl ClientError {
    /// Whether the request surely did not take effect (nothing was sent, or
    /// the service answered 503 or 429): safe to retry anything.
    pub fn not_sent(&self) -> bool {
        match self {
            ClientError::Connect(e) => e.is_connect(),
            ClientError::Status { status, .. } => {
                *status == StatusCode::SERVICE_UNAVAILABLE
                    || *status == StatusCode::TOO_MANY_REQUESTS
            }
            _ => false,
        }
    }

    /// The error body's code, when the service answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Status { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// A JSON client of one service.
#[derive(Debug, Clone)]
pub struct JsonClient {
    client: Client<HttpConnector, Full<Bytes>>,
    base_url: String,
    bearer: Option<HeaderValue>,
    timeout: Duration,
}

impl JsonClient {
    /// A client with `config`.
    pub fn new(config: ClientConfig) -> Result<JsonClient, ClientError> {
        let bearer = match &config.bearer_token {
            Some(token) => {
                let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
                    .map_err(|_| ClientError::InvalidToken)?;
                // Keeps the token out of `Debug` output (and HPACK tables).
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        let base_url = config.base_url.trim_end_matches('/').to_owned();
        base_url
            .parse::<Uri>()
            .map_err(|_| ClientError::InvalidUrl(base_url.clone()))?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(config.max_idle_per_host)
            .build(connector);
        Ok(JsonClient {
            client,
            base_url,
            bearer,
            timeout: config.timeout,
        })
    }

    /// Sends `body` (as JSON, when given) with `method` to `path` (which
    /// starts with `/` and is already percent-encoded), and decodes a 2xx
    /// reply's JSON body into `R`.
    pub async fn call<T, R>(
        &self,
        method: Method,
        path: &str,
        body: Option<&T>,
    ) -> Result<R, ClientError>
    where
        T: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let (status, bytes) = self.send(method, path, body, &[]).await?;
        if status.is_success() {
            serde_json::from_slice(&bytes).map_err(ClientError::Decode)
        } else {
            Err(error_from_body(status, &bytes))
        }
    }

    /// Like [`JsonClient::call`] with extra headers, returning the status
    /// and the raw body whatever the status.
    pub async fn send<T>(
        &self,
        method: Method,
        path: &str,
        body: Option<&T>,
        headers: &[(&str, &str)],
    ) -> Result<(StatusCode, Bytes), ClientError>
    where
        T: Serialize + ?Sized,
    {
        let url = format!("{}{path}", self.base_url);
        let uri: Uri = url
            .parse()
            .map_err(|_| ClientError::InvalidUrl(url.clone()))?;
        let mut builder = Request::builder().method(method).uri(uri);
        if let Some(bearer) = &self.bearer {
            builder = builder.header(AUTHORIZATION, bearer.clone());
        }
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let payload = match body {
            Some(body) => {
                builder = builder.header(CONTENT_TYPE, "application/json");
                Bytes::from(serde_json::to_vec(body).map_err(ClientError::Decode)?)
            }
            None => Bytes::new(),
        };
        let request = builder
            .body(Full::new(payload))
            .map_err(|_| ClientError::InvalidUrl(url.clone()))?;
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| {
                if e.is_connect() {
                    ClientError::Connect(e)
                } else {
                    ClientError::Transport(Box::new(e))
                }
            })?;
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| ClientError::Transport(Box::new(e)))?
                .to_bytes();
            Ok((status, bytes))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ClientError::Timeout(self.timeout))?
    }
}

/// The suite's error body, read back into a [`ClientError::Status`].
pub(crate) fn error_from_body(status: StatusCode, bytes: &[u8]) -> ClientError {
    #[derive(serde::Deserialize)]
    struct ErrorBody {
        error: String,
        #[serde(default)]
        message: String,
    }
    match serde_json::from_slice::<ErrorBody>(bytes) {
        Ok(body) => ClientError::Status {
            status,
            code: body.error,
            message: body.message,
        },
        Err(_) => ClientError::Status {
            status,
            code: "http_error".to_owned(),
            message: String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned(),
        },
    }
}
