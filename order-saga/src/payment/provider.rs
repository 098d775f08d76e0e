//! [`HttpPaymentProvider`]: the raw HTTP client of the payment provider's
//! API (the API `payment_sim` serves, `docs/order-saga/payment-sim.md`),
//! as a [`Payments`] (feature `http`).
//!
//! It makes one request per call and says exactly what happened; retries,
//! lookups and the circuit breaker belong to
//! [`ResilientPayments`](super::ResilientPayments), which wraps it:
//!
//! | what happened | error |
//! | --- | --- |
//! | connection refused, or `503`/`429`: nothing was done | [`PaymentError::Unavailable`] |
//! | timeout, connection broken after sending, another `5xx`, an unreadable `2xx` | [`PaymentError::OutcomeUnknown`] |
//! | `402 payment_declined` | [`PaymentError::Declined`] |
//! | `404 payment_not_found` | [`PaymentError::NotFound`] (`lookup`: `Ok(None)`) |
//! | `409 invalid_payment_state` | [`PaymentError::InvalidState`] |
//! | `422 idempotency_key_reused` | [`PaymentError::KeyReused`] |
//! | another `4xx` | [`PaymentError::Invalid`] |

use bytes::Bytes;
use http::{Method, StatusCode};
use serde::Serialize;

use super::{AuthorizeRequest, Payment, PaymentError, PaymentState, Payments};
use crate::BoxFuture;
use crate::http::client::error_from_body;
use crate::http::{ClientConfig, ClientError, JsonClient};
use crate::model::OrderId;

/// The idempotency key's header.
pub const IDEMPOTENCY_KEY_HEADER: &str = "Idempotency-Key";

/// A client of the provider's HTTP API. Cheap to clone (one connection
/// pool).
#[derive(Debug, Clone)]
pub struct HttpPaymentProvider {
    client: JsonClient,
}

#[derive(Serialize)]
struct AuthorizeBody<'a> {
    order_id: OrderId,
    amount_cents: i64,
    currency: &'a str,
}

impl HttpPaymentProvider {
    /// A client of the provider at `config.base_url`. Its
    /// `config.timeout` bounds each request; a timeout is an unknown
    /// outcome.
    pub fn new(config: ClientConfig) -> Result<HttpPaymentProvider, ClientError> {
        Ok(HttpPaymentProvider {
            client: JsonClient::new(config)?,
        })
    }

    /// A client over an existing [`JsonClient`].
    pub fn from_client(client: JsonClient) -> HttpPaymentProvider {
        HttpPaymentProvider { client }
    }

    async fn send<T: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        body: Option<&T>,
        key: Option<&str>,
    ) -> Result<(StatusCode, Bytes), PaymentError> {
        let pair;
        let headers: &[(&str, &str)] = match key {
            Some(key) => {
                pair = [(IDEMPOTENCY_KEY_HEADER, key)];
                &pair
            }
            None => &[],
        };
        self.client
            .send(method, path, body, headers)
            .await
            .map_err(transport_error)
    }

    /// Sends a request that returns a payment, mapping the status.
    async fn payment<T: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        body: Option<&T>,
        key: Option<&str>,
        subject: &str,
    ) -> Result<Payment, PaymentError> {
        let (status, bytes) = self.send(method, path, body, key).await?;
        if status.is_success() {
            return serde_json::from_slice(&bytes)
                .map_err(|e| PaymentError::OutcomeUnknown(Box::new(ClientError::Decode(e))));
        }
        Err(status_error(
            status,
            &bytes,
            subject,
            key.unwrap_or(subject),
        ))
    }

    async fn change(
        &self,
        action: &str,
        key: &str,
        payment_id: &str,
    ) -> Result<Payment, PaymentError> {
        let path = format!("/v1/payments/{}/{action}", encode(payment_id));
        self.payment::<()>(Method::POST, &path, None, Some(key), payment_id)
            .await
    }
}

/// A failure of the exchange itself.
fn transport_error(error: ClientError) -> PaymentError {
    match error {
        // Refused before anything was sent: safe to retry.
        e @ ClientError::Connect(_) => PaymentError::Unavailable(Box::new(e)),
        e @ (ClientError::Timeout(_) | ClientError::Transport(_)) => {
            PaymentError::OutcomeUnknown(Box::new(e))
        }
        e => PaymentError::Invalid(e.to_string()),
    }
}

/// An error reply, by status; `subject` is the payment id (or the
/// authorization key), `key` the request's idempotency key.
fn status_error(status: StatusCode, bytes: &[u8], subject: &str, key: &str) -> PaymentError {
    let detail = |name: &str| -> Option<serde_json::Value> {
        serde_json::from_slice::<http_kit::ErrorBody>(bytes)
            .ok()
            .and_then(|body| body.details.get(name).cloned())
    };
    let error = error_from_body(status, bytes);
    let message = match &error {
        ClientError::Status { message, .. } => message.clone(),
        other => other.to_string(),
    };
    match status {
        StatusCode::PAYMENT_REQUIRED => PaymentError::Declined {
            reason: detail("decline_reason")
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or(message),
        },
        StatusCode::NOT_FOUND => PaymentError::NotFound(subject.to_owned()),
        StatusCode::CONFLICT => {
            match detail("state").and_then(|v| serde_json::from_value::<PaymentState>(v).ok()) {
                Some(state) => PaymentError::InvalidState {
                    id: subject.to_owned(),
                    state,
                },
                None => PaymentError::Invalid(message),
            }
        }
        StatusCode::UNPROCESSABLE_ENTITY => PaymentError::KeyReused(key.to_owned()),
        StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS => {
            PaymentError::Unavailable(Box::new(error))
        }
        s if s.is_client_error() => PaymentError::Invalid(message),
        // A 500 or a gateway's 502/504: the provider may have acted.
        _ => PaymentError::OutcomeUnknown(Box::new(error)),
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters, so an
/// id or a key is one path segment or one query value.
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

impl Payments for HttpPaymentProvider {
    fn authorize(&self, request: AuthorizeRequest) -> BoxFuture<'_, Result<Payment, PaymentError>> {
        Box::pin(async move {
            let body = AuthorizeBody {
                order_id: request.order_id,
                amount_cents: request.amount_cents,
                currency: &request.currency,
            };
            let key = request.idempotency_key.as_str();
            self.payment(
                Method::POST,
                "/v1/authorizations",
                Some(&body),
                Some(key),
                key,
            )
            .await
        })
    }

    fn capture<'a>(
        &'a self,
        idempotency_key: &'a str,
        payment_id: &'a str,
    ) -> BoxFuture<'a, Result<Payment, PaymentError>> {
        Box::pin(self.change("capture", idempotency_key, payment_id))
    }

    fn void<'a>(
        &'a self,
        idempotency_key: &'a str,
        payment_id: &'a str,
    ) -> BoxFuture<'a, Result<Payment, PaymentError>> {
        Box::pin(self.change("void", idempotency_key, payment_id))
    }

    fn refund<'a>(
        &'a self,
        idempotency_key: &'a str,
        payment_id: &'a str,
    ) -> BoxFuture<'a, Result<Payment, PaymentError>> {
        Box::pin(self.change("refund", idempotency_key, payment_id))
    }

    fn lookup<'a>(
        &'a self,
        authorize_key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Payment>, PaymentError>> {
        Box::pin(async move {
            let path = format!("/v1/payments?authorize_key={}", encode(authorize_key));
            match self
                .payment::<()>(Method::GET, &path, None, None, authorize_key)
                .await
            {
                Ok(payment) => Ok(Some(payment)),
                Err(PaymentError::NotFound(_)) => Ok(None),
                Err(e) => Err(e),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_keys_are_one_segment() {
        assert_eq!(encode("pay_00ff"), "pay_00ff");
        assert_eq!(encode("a/b?c=d e"), "a%2Fb%3Fc%3Dd%20e");
        assert_eq!(encode("ü"), "%C3%BC");
    }

    #[test]
    fn statuses_map_to_typed_errors() {
        let body = |code: &str, extra: serde_json::Value| {
            let mut v = serde_json::json!({"error": code, "message": "m"});
            if let (Some(map), Some(extra)) = (v.as_object_mut(), extra.as_object()) {
                map.extend(extra.clone());
            }
            serde_json::to_vec(&v).unwrap()
        };
        let declined = status_error(
            StatusCode::PAYMENT_REQUIRED,
            &body(
                "payment_declined",
                serde_json::json!({"decline_reason": "do_not_honor"}),
            ),
            "k",
            "k",
        );
        assert!(matches!(declined, PaymentError::Declined { reason } if reason == "do_not_honor"));
        let conflict = status_error(
            StatusCode::CONFLICT,
            &body(
                "invalid_payment_state",
                serde_json::json!({"state": "voided"}),
            ),
            "pay_1",
            "c",
        );
        assert!(matches!(
            conflict,
            PaymentError::InvalidState { id, state: PaymentState::Voided } if id == "pay_1"
        ));
        assert!(matches!(
            status_error(StatusCode::UNPROCESSABLE_ENTITY, b"{}", "pay_1", "c"),
            PaymentError::KeyReused(k) if k == "c"
        ));
        assert!(matches!(
            status_error(StatusCode::NOT_FOUND, b"", "pay_1", "c"),
            PaymentError::NotFound(id) if id == "pay_1"
        ));
        assert!(matches!(
            status_error(StatusCode::SERVICE_UNAVAILABLE, b"", "p", "k"),
            PaymentError::Unavailable(_)
        ));
        assert!(matches!(
            status_error(StatusCode::BAD_GATEWAY, b"", "p", "k"),
            PaymentError::OutcomeUnknown(_)
        ));
        assert!(matches!(
            status_error(StatusCode::BAD_REQUEST, &body("invalid_request", serde_json::json!({})), "p", "k"),
            PaymentError::Invalid(m) if m == "m"
        ));
    }
}
