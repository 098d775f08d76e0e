//! [`HttpInventory`]: the inventory service's HTTP client, an [`Inventory`]
//! like the in-process ones (feature `http`).
//!
//! Error replies become the typed errors again (`out_of_stock` with its
//! SKU and counts, `reservation_expired`, …). Anything that leaves the
//! outcome unknown or says the service cannot serve (a connection failure,
//! a timeout, a 5xx, a reply that does not parse, a refused token) is
//! [`InventoryError::Unavailable`] with the [`ClientError`] as its source;
//! every call is idempotent, so the saga retries it.

use std::borrow::Cow;

use http::{Method, StatusCode};
use http_kit::ErrorBody;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::client::{ClientConfig, ClientError, JsonClient};
use super::inventory::{RestockBody, SweepReply};
use crate::BoxFuture;
use crate::inventory::{
    Inventory, InventoryError, Reservation, ReservationId, ReserveRequest, Restock, StockLevel,
};
use crate::model::Sku;

/// A client of `inventory_service`. Its token needs the role `service`
/// for the reservation calls and `admin` for
/// [`restock`](Inventory::restock) and
/// [`sweep_expired`](Inventory::sweep_expired) (the service sweeps by
/// itself; the saga never calls it). Cheap to clone.
#[derive(Debug, Clone)]
pub struct HttpInventory {
    client: JsonClient,
}

/// What a reply turned out to be.
enum Reply<R> {
    Ok(R),
    Error(StatusCode, ErrorBody),
}

impl HttpInventory {
    /// A client with `config` (base URL, bearer token, timeout).
    pub fn new(config: ClientConfig) -> Result<HttpInventory, ClientError> {
        Ok(HttpInventory {
            client: JsonClient::new(config)?,
        })
    }

    /// A client over an existing [`JsonClient`].
    pub fn from_client(client: JsonClient) -> HttpInventory {
        HttpInventory { client }
    }

    async fn call<T, R>(
        &self,
        method: Method,
        path: &str,
        body: Option<&T>,
    ) -> Result<Reply<R>, InventoryError>
    where
        T: Serialize + ?Sized,
        R: DeserializeOwned,
    {
        let (status, bytes) = self
            .client
            .send(method, path, body, &[])
            .await
            .map_err(unavailable)?;
        if status.is_success() {
            return serde_json::from_slice(&bytes)
                .map(Reply::Ok)
                .map_err(|e| unavailable(ClientError::Decode(e)));
        }
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => Ok(Reply::Error(status, body)),
            Err(_) => Err(unavailable(super::client::error_from_body(status, &bytes))),
        }
    }
}

fn unavailable(error: ClientError) -> InventoryError {
    InventoryError::Unavailable(Box::new(error))
}

/// The typed error of an error reply; `Unavailable` for codes that are not
/// the inventory's own (a refused token, a 5xx, an unknown route).
fn typed_error(status: StatusCode, body: ErrorBody) -> InventoryError {
    let detail_str = |key: &str| body.details.get(key).and_then(|v| v.as_str());
    let sku = detail_str("sku").and_then(|s| Sku::parse(s).ok());
    let id = detail_str("reservation_id").and_then(|s| uuid::Uuid::parse_str(s).ok());
    let number = |key: &str| body.details.get(key).and_then(serde_json::Value::as_i64);
    let typed = match (body.error.as_str(), sku, id) {
        ("out_of_stock", Some(sku), _) => match (number("requested"), number("available")) {
            (Some(requested), Some(available)) => {
                u32::try_from(requested)
                    .ok()
                    .map(|requested| InventoryError::OutOfStock {
                        sku,
                        requested,
                        available,
                    })
            }
            _ => None,
        },
        ("unknown_sku", Some(sku), _) => Some(InventoryError::UnknownSku(sku)),
        ("reservation_not_found", _, Some(id)) => Some(InventoryError::ReservationNotFound(id)),
        ("reservation_expired", _, Some(id)) => Some(InventoryError::ReservationExpired(id)),
        ("reservation_mismatch", _, Some(id)) => Some(InventoryError::ReservationMismatch(id)),
        (
            "invalid_request" | "malformed_json" | "unsupported_media_type" | "body_too_large",
            ..,
        ) if status.is_client_error() => Some(InventoryError::Invalid(body.message.clone())),
        _ => None,
    };
    typed.unwrap_or_else(|| {
        unavailable(ClientError::Status {
            status,
            code: body.error,
            message: body.message,
        })
    })
}

/// A SKU as a path segment. SKU characters need no escaping, but `.` and
/// `..` would be read as dot-segments by anything that normalizes paths.
fn sku_segment(sku: &Sku) -> Cow<'_, str> {
    match sku.as_str() {
        "." => Cow::Borrowed("%2E"),
        ".." => Cow::Borrowed("%2E%2E"),
        other => Cow::Borrowed(other),
    }
}

const NO_BODY: Option<&()> = None;

impl Inventory for HttpInventory {
    fn reserve(
        &self,
        request: ReserveRequest,
    ) -> BoxFuture<'_, Result<Reservation, InventoryError>> {
        Box::pin(async move {
            match self
                .call(Method::POST, "/v1/reservations", Some(&request))
                .await?
            {
                Reply::Ok(reservation) => Ok(reservation),
                Reply::Error(status, body) => Err(typed_error(status, body)),
            }
        })
    }

    fn commit(&self, id: ReservationId) -> BoxFuture<'_, Result<Reservation, InventoryError>> {
        Box::pin(async move {
            let path = format!("/v1/reservations/{id}/commit");
            match self.call(Method::POST, &path, NO_BODY).await? {
                Reply::Ok(reservation) => Ok(reservation),
                Reply::Error(status, body) => Err(typed_error(status, body)),
            }
        })
    }

    fn release(
        &self,
        id: ReservationId,
    ) -> BoxFuture<'_, Result<Option<Reservation>, InventoryError>> {
        Box::pin(async move {
            let path = format!("/v1/reservations/{id}/release");
            match self.call(Method::POST, &path, NO_BODY).await? {
                Reply::Ok(reservation) => Ok(Some(reservation)),
                Reply::Error(status, body) => match typed_error(status, body) {
                    InventoryError::ReservationNotFound(_) => Ok(None),
                    other => Err(other),
                },
            }
        })
    }

    fn reservation(
        &self,
        id: ReservationId,
    ) -> BoxFuture<'_, Result<Option<Reservation>, InventoryError>> {
        Box::pin(async move {
            let path = format!("/v1/reservations/{id}");
            match self.call(Method::GET, &path, NO_BODY).await? {
                Reply::Ok(reservation) => Ok(Some(reservation)),
                Reply::Error(status, body) => match typed_error(status, body) {
                    InventoryError::ReservationNotFound(_) => Ok(None),
                    other => Err(other),
                },
            }
        })
    }

    fn stock<'a>(&'a self, sku: &'a Sku) -> BoxFuture<'a, Result<StockLevel, InventoryError>> {
        Box::pin(async move {
            let path = format!("/v1/inventory/{}", sku_segment(sku));
            match self.call(Method::GET, &path, NO_BODY).await? {
                Reply::Ok(level) => Ok(level),
                Reply::Error(status, body) => Err(typed_error(status, body)),
            }
        })
    }

    fn restock(&self, restock: Restock) -> BoxFuture<'_, Result<StockLevel, InventoryError>> {
        Box::pin(async move {
            let path = format!("/v1/inventory/{}/restock", sku_segment(&restock.sku));
            let body = RestockBody {
                quantity: restock.quantity,
                unit_price_cents: restock.unit_price_cents,
            };
            match self.call(Method::POST, &path, Some(&body)).await? {
                Reply::Ok(level) => Ok(level),
                Reply::Error(status, body) => Err(typed_error(status, body)),
            }
        })
    }

    fn sweep_expired(&self, limit: usize) -> BoxFuture<'_, Result<usize, InventoryError>> {
        Box::pin(async move {
            if limit == 0 {
                return Ok(0);
            }
            // The service sweeps at most MAX_SWEEP_LIMIT a call; fewer is
            // within "up to `limit`".
            let limit = limit.min(super::inventory::MAX_SWEEP_LIMIT);
            let path = format!("/v1/admin/sweep?limit={limit}");
            match self
                .call::<(), SweepReply>(Method::POST, &path, None)
                .await?
            {
                Reply::Ok(reply) => Ok(reply.swept),
                Reply::Error(status, body) => Err(typed_error(status, body)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(code: &str, details: serde_json::Value) -> ErrorBody {
        ErrorBody {
            error: code.to_owned(),
            message: "m".to_owned(),
            details: details.as_object().cloned().unwrap_or_default(),
        }
    }

    #[test]
    fn error_replies_become_typed_errors_again() {
        let id = "0190a0c4-1f2e-7000-8000-000000000001";
        let typed = typed_error(
            StatusCode::CONFLICT,
            body(
                "out_of_stock",
                serde_json::json!({"sku": "a", "requested": 2, "available": 1}),
            ),
        );
        assert!(
            matches!(typed, InventoryError::OutOfStock { requested: 2, available: 1, ref sku } if sku.as_str() == "a")
        );
        for code in [
            "reservation_not_found",
            "reservation_expired",
            "reservation_mismatch",
        ] {
            let typed = typed_error(
                StatusCode::CONFLICT,
                body(code, serde_json::json!({"reservation_id": id})),
            );
            assert_eq!(typed.code(), code);
        }
        let typed = typed_error(
            StatusCode::BAD_REQUEST,
            body("malformed_json", serde_json::json!({})),
        );
        assert_eq!(typed.code(), "invalid_request");
    }

    #[test]
    fn foreign_codes_and_missing_fields_are_unavailable() {
        for (status, code, details) in [
            (
                StatusCode::UNAUTHORIZED,
                "invalid_token",
                serde_json::json!({}),
            ),
            (StatusCode::FORBIDDEN, "forbidden", serde_json::json!({})),
            (StatusCode::NOT_FOUND, "not_found", serde_json::json!({})),
            (
                StatusCode::CONFLICT,
                "out_of_stock",
                serde_json::json!({"sku": "a"}),
            ),
            (
                StatusCode::BAD_GATEWAY,
                "invalid_request",
                serde_json::json!({}),
            ),
        ] {
            let typed = typed_error(status, body(code, details));
            assert_eq!(typed.code(), "inventory_unavailable", "{code}");
        }
    }

    #[test]
    fn dot_segments_are_escaped() {
        assert_eq!(sku_segment(&Sku::parse("..").unwrap()), "%2E%2E");
        assert_eq!(sku_segment(&Sku::parse(".").unwrap()), "%2E");
        assert_eq!(sku_segment(&Sku::parse("a.b").unwrap()), "a.b");
    }
}
