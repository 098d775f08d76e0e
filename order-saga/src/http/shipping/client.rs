//! [`HttpShipping`]: the [`Shipping`] trait over HTTP, a client of
//! `shipping_service`.

use bytes::Bytes;
use http::{Method, StatusCode};

use crate::BoxFuture;
use crate::http::client::{ClientConfig, ClientError, JsonClient, error_from_body};
use crate::model::OrderId;
use crate::shipping::{ScheduleOutcome, ScheduleShipment, Shipment, Shipping, ShippingError};

/// The shipping service in another process, reached over HTTP. The order
/// saga uses it exactly as it uses an in-process store:
///
/// | reply | becomes |
/// | --- | --- |
/// | 201 / 200 with a shipment | `Ok` (created / already booked) |
/// | 404 `shipment_not_found` on a lookup | `Ok(None)` |
/// | 409 `shipment_cancelled` | [`ShippingError::Cancelled`] |
/// | 422 `shipping_rejected` | [`ShippingError::Rejected`] with the service's message |
/// | anything else: no connection, a timeout, a 5xx, another 4xx (a wrong token or URL), a malformed reply | [`ShippingError::Unavailable`], the [`ClientError`] as its source |
///
/// A wrong token or URL is reported as unavailable rather than rejected on
/// purpose: it is this deployment's fault, not the order's, so the saga
/// must not cancel the order as undeliverable. It is logged at `warn`.
/// Every call is idempotent, so a caller may retry any `Unavailable`,
/// whether or not the request reached the service; this client does not
/// retry by itself.
#[derive(Debug, Clone)]
pub struct HttpShipping {
    client: JsonClient,
}

impl HttpShipping {
    /// A client over `client` (its base URL is the service's).
    pub fn new(client: JsonClient) -> HttpShipping {
        HttpShipping { client }
    }

    /// A client of the service at `config.base_url`.
    pub fn connect(config: ClientConfig) -> Result<HttpShipping, ClientError> {
        JsonClient::new(config).map(HttpShipping::new)
    }

    async fn schedule_now(
        &self,
        request: ScheduleShipment,
    ) -> Result<ScheduleOutcome, ShippingError> {
        let order_id = request.order_id;
        let (status, body) = self
            .client
            .send(Method::POST, "/v1/shipments", Some(&request), &[])
            .await
            .map_err(|e| shipping_error(e, order_id))?;
        let created = match status {
            StatusCode::CREATED => true,
            StatusCode::OK => false,
            _ => return Err(shipping_error(error_from_body(status, &body), order_id)),
        };
        Ok(ScheduleOutcome {
            shipment: decode(&body)?,
            created,
        })
    }

    async fn cancel_now(&self, order_id: OrderId) -> Result<Shipment, ShippingError> {
        self.client
            .call::<(), Shipment>(
                Method::POST,
                &format!("/v1/shipments/{order_id}/cancel"),
                None,
            )
            .await
            .map_err(|e| shipping_error(e, order_id))
    }

    async fn shipment_now(&self, order_id: OrderId) -> Result<Option<Shipment>, ShippingError> {
        let (status, body) = self
            .client
            .send::<()>(Method::GET, &format!("/v1/shipments/{order_id}"), None, &[])
            .await
            .map_err(|e| shipping_error(e, order_id))?;
        if status == StatusCode::OK {
            return decode(&body).map(Some);
        }
        let error = error_from_body(status, &body);
        // A bare 404 `not_found` is a wrong base URL, not a missing shipment.
        if status == StatusCode::NOT_FOUND && error.code() == Some("shipment_not_found") {
            return Ok(None);
        }
        Err(shipping_error(error, order_id))
    }
}

fn decode(body: &Bytes) -> Result<Shipment, ShippingError> {
    serde_json::from_slice(body)
        .map_err(|e| ShippingError::Unavailable(Box::new(ClientError::Decode(e))))
}

/// The typed error a failed call stands for (see [`HttpShipping`]).
fn shipping_error(error: ClientError, order_id: OrderId) -> ShippingError {
    if let ClientError::Status {
        status,
        code,
        message,
    } = &error
    {
        match (*status, code.as_str()) {
            (StatusCode::CONFLICT, "shipment_cancelled") => {
                return ShippingError::Cancelled(order_id);
            }
            (StatusCode::UNPROCESSABLE_ENTITY, "shipping_rejected") => {
                return ShippingError::Rejected(message.clone());
            }
            (status, _) if status.is_client_error() => {
                tracing::warn!(%order_id, error = %error, "shipping service refused the call; check the client's token and base URL");
            }
            _ => {}
        }
    }
    ShippingError::Unavailable(Box::new(error))
}

impl Shipping for HttpShipping {
    fn schedule(
        &self,
        request: ScheduleShipment,
    ) -> BoxFuture<'_, Result<Shipment, ShippingError>> {
        Box::pin(async move { self.schedule_now(request).await.map(|o| o.shipment) })
    }

    fn schedule_with_outcome(
        &self,
        request: ScheduleShipment,
    ) -> BoxFuture<'_, Result<ScheduleOutcome, ShippingError>> {
        Box::pin(self.schedule_now(request))
    }

    fn cancel(&self, order_id: OrderId) -> BoxFuture<'_, Result<Shipment, ShippingError>> {
        Box::pin(self.cancel_now(order_id))
    }

    fn shipment(
        &self,
        order_id: OrderId,
    ) -> BoxFuture<'_, Result<Option<Shipment>, ShippingError>> {
        Box::pin(self.shipment_now(order_id))
    }
}
