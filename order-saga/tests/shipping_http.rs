//! The shipping service's HTTP contract: every status and error code of
//! `docs/order-saga/shipping.md`, its metrics, and `ROUTES` against the
//! OpenAPI document.
#![cfg(feature = "http")]

mod shipping_support;

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use order_saga::http::shipping::{ROUTES, ShippingService, ShippingServiceConfig};
use order_saga::shipping::MemoryShipping;
use serde_json::{Value, json};
use shipping_support::http::{SECRET, service_token, token_signed, verifier};
use shipping_support::{clock, config, order, request};
use tower::ServiceExt;

fn memory_service() -> ShippingService {
    ShippingService::new(
        Arc::new(MemoryShipping::new(config(), Arc::new(clock()))),
        verifier(),
        ShippingServiceConfig::default().with_max_body_bytes(4 * 1024),
    )
}

struct Call {
    method: Method,
    path: String,
    token: Option<String>,
    content_type: Option<&'static str>,
    body: Bytes,
    content_length: bool,
}

impl Call {
    fn new(method: Method, path: impl Into<String>) -> Call {
        Call {
            method,
            path: path.into(),
            token: Some(service_token()),
            content_type: None,
            body: Bytes::new(),
            content_length: true,
        }
    }

    fn json(mut self, body: &Value) -> Call {
        self.content_type = Some("application/json");
        self.body = Bytes::from(serde_json::to_vec(body).unwrap());
        self
    }

    fn raw(mut self, content_type: &'static str, body: impl Into<Bytes>) -> Call {
        self.content_type = Some(content_type);
        self.body = body.into();
        self
    }

    fn token(mut self, token: Option<String>) -> Call {
        self.token = token;
        self
    }

    async fn send(self, service: &ShippingService) -> (Response<http_kit::Body>, Value) {
        let mut builder = Request::builder().method(self.method).uri(self.path);
        if let Some(token) = self.token {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        if let Some(content_type) = self.content_type {
            builder = builder.header("content-type", content_type);
        }
        if self.content_length {
            builder = builder.header("content-length", self.body.len());
        }
        let request = builder.body(Full::new(self.body)).unwrap();
        let response = service.clone().oneshot(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (
            Response::from_parts(parts, http_kit::empty(StatusCode::OK).into_body()),
            value,
        )
    }
}

/// The suite's error body, exactly: `error` and `message`, plus `extra`.
#[track_caller]
fn assert_error((response, body): &(Response<http_kit::Body>, Value), status: u16, code: &str) {
    assert_eq!(response.status().as_u16(), status, "{body}");
    assert_eq!(body["error"], code, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert_eq!(response.headers()["content-type"], "application/json");
}

fn schedule_body(n: u64, country: &str) -> Value {
    serde_json::to_value(request(order(n), country)).unwrap()
}

#[tokio::test]
async fn schedule_answers_201_then_200_with_the_same_shipment() {
    let service = memory_service();
    let body = schedule_body(1, "GB");
    let (created, first) = Call::new(Method::POST, "/v1/shipments")
        .json(&body)
        .send(&service)
        .await;
    assert_eq!(created.status(), StatusCode::CREATED, "{first}");
    let keys: BTreeSet<&str> = first
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from(["id", "order_id", "state", "created_at"])
    );
    assert_eq!(first["order_id"], order(1).to_string());
    assert_eq!(first["state"], "scheduled");
    assert_eq!(first["created_at"], "2027-01-15T08:00:00.123456Z");
    let (again, second) = Call::new(Method::POST, "/v1/shipments")
        .json(&body)
        .send(&service)
        .await;
    assert_eq!(again.status(), StatusCode::OK);
    assert_eq!(second, first);
    let (found, third) = Call::new(Method::GET, format!("/v1/shipments/{}", order(1)))
        .send(&service)
        .await;
    assert_eq!(found.status(), StatusCode::OK);
    assert_eq!(third, first);
}

#[tokio::test]
async fn cancel_answers_the_cancelled_shipment_and_blocks_a_later_schedule() {
    let service = memory_service();
    // A tombstone: cancel before any schedule.
    let (ok, tombstone) = Call::new(Method::POST, format!("/v1/shipments/{}/cancel", order(1)))
        .send(&service)
        .await;
    assert_eq!(ok.status(), StatusCode::OK, "{tombstone}");
    assert_eq!(tombstone["state"], "cancelled");
    let conflict = Call::new(Method::POST, "/v1/shipments")
        .json(&schedule_body(1, "GB"))
        .send(&service)
        .await;
    assert_error(&conflict, 409, "shipment_cancelled");
    assert_eq!(conflict.1["order_id"], order(1).to_string());
    // A booked shipment, then cancelled twice.
    let (_, booked) = Call::new(Method::POST, "/v1/shipments")
        .json(&schedule_body(2, "FR"))
        .send(&service)
        .await;
    for _ in 0..2 {
        let (ok, cancelled) = Call::new(Method::POST, format!("/v1/shipments/{}/cancel", order(2)))
            .send(&service)
            .await;
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(cancelled["id"], booked["id"]);
        assert_eq!(cancelled["state"], "cancelled");
    }
}

#[tokio::test]
async fn refusals_are_422_or_404_and_write_nothing() {
    let service = memory_service();
    let rejected = Call::new(Method::POST, "/v1/shipments")
        .json(&schedule_body(1, "JP"))
        .send(&service)
        .await;
    assert_error(&rejected, 422, "shipping_rejected");
    assert!(rejected.1["message"].as_str().unwrap().contains("JP"));
    let mut empty_name = schedule_body(1, "GB");
    empty_name["ship_to"]["name"] = json!("");
    assert_error(
        &Call::new(Method::POST, "/v1/shipments")
            .json(&empty_name)
            .send(&service)
            .await,
        422,
        "shipping_rejected",
    );
    let missing = Call::new(Method::GET, format!("/v1/shipments/{}", order(1)))
        .send(&service)
        .await;
    assert_error(&missing, 404, "shipment_not_found");
}

#[tokio::test]
async fn bad_bodies_are_400_413_or_415() {
    let service = memory_service();
    let post = || Call::new(Method::POST, "/v1/shipments");
    assert_error(
        &post()
            .raw("application/json", "{\"order_id\":")
            .send(&service)
            .await,
        400,
        "malformed_json",
    );
    // Well-formed JSON of the wrong shape: a missing field, a bad SKU, an
    // unknown address field.
    let mut no_items = schedule_body(1, "GB");
    no_items.as_object_mut().unwrap().remove("items");
    let mut bad_sku = schedule_body(1, "GB");
    bad_sku["items"][0]["sku"] = json!("not a sku");
    let mut extra = schedule_body(1, "GB");
    extra["ship_to"]["planet"] = json!("Mars");
    let mut bad_id = schedule_body(1, "GB");
    bad_id["order_id"] = json!("42");
    for body in [no_items, bad_sku, extra, bad_id] {
        assert_error(
            &post().json(&body).send(&service).await,
            400,
            "malformed_json",
        );
    }
    assert_error(
        &post().raw("text/plain", "{}").send(&service).await,
        415,
        "unsupported_media_type",
    );
    let mut no_type = post().json(&schedule_body(1, "GB"));
    no_type.content_type = None;
    assert_error(&no_type.send(&service).await, 415, "unsupported_media_type");
    // Over the limit (4 KiB here), declared or not.
    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(5 * 1024));
    assert_error(
        &post()
            .raw("application/json", big.clone())
            .send(&service)
            .await,
        413,
        "body_too_large",
    );
    let mut undeclared = post().raw("application/json", big);
    undeclared.content_length = false;
    assert_error(&undeclared.send(&service).await, 413, "body_too_large");
    // None of it was written.
    assert_error(
        &Call::new(Method::GET, format!("/v1/shipments/{}", order(1)))
            .send(&service)
            .await,
        404,
        "shipment_not_found",
    );
}

#[tokio::test]
async fn every_v1_route_needs_a_valid_service_token_before_anything_else() {
    let service = memory_service();
    let routes = [
        (Method::POST, "/v1/shipments".to_owned()),
        (Method::GET, format!("/v1/shipments/{}", order(1))),
        (Method::POST, format!("/v1/shipments/{}/cancel", order(1))),
        // A bad order id is not revealed to a stranger either.
        (Method::GET, "/v1/shipments/not-a-uuid".to_owned()),
    ];
    for (method, path) in routes {
        let call = || Call::new(method.clone(), path.clone()).json(&schedule_body(1, "GB"));
        let missing = call().token(None).send(&service).await;
        assert_error(&missing, 401, "missing_token");
        assert_eq!(missing.0.headers()["www-authenticate"], "Bearer");
        assert_error(
            &call().token(Some("not.a.jwt".into())).send(&service).await,
            401,
            "invalid_token",
        );
        assert_error(
            &call()
                .token(Some(token_signed(
                    b"a-different-secret-also-32-bytes-long!",
                    &["service"],
                )))
                .send(&service)
                .await,
            401,
            "invalid_token",
        );
        assert_error(
            &call()
                .token(Some(token_signed(SECRET, &["customer"])))
                .send(&service)
                .await,
            403,
            "forbidden",
        );
    }
    assert_error(
        &Call::new(Method::GET, "/v1/shipments/not-a-uuid")
            .send(&service)
            .await,
        400,
        "invalid_order_id",
    );
    assert_error(
        &Call::new(Method::POST, "/v1/shipments/42/cancel")
            .send(&service)
            .await,
        400,
        "invalid_order_id",
    );
    // Nothing was written by the refused calls.
    assert_error(
        &Call::new(Method::GET, format!("/v1/shipments/{}", order(1)))
            .send(&service)
            .await,
        404,
        "shipment_not_found",
    );
}

#[tokio::test]
async fn wrong_methods_are_405_with_allow_and_unknown_paths_404() {
    let service = memory_service();
    let id = order(1);
    for (method, path, allow) in [
        (Method::GET, "/v1/shipments".to_owned(), "POST"),
        (Method::PUT, "/v1/shipments".to_owned(), "POST"),
        (Method::DELETE, format!("/v1/shipments/{id}"), "GET"),
        (Method::POST, format!("/v1/shipments/{id}"), "GET"),
        (Method::GET, format!("/v1/shipments/{id}/cancel"), "POST"),
        (Method::POST, "/healthz".to_owned(), "GET"),
        (Method::POST, "/readyz".to_owned(), "GET"),
        (Method::DELETE, "/metrics".to_owned(), "GET"),
    ] {
        // No token: the method is checked first.
        let answer = Call::new(method, path).token(None).send(&service).await;
        assert_error(&answer, 405, "method_not_allowed");
        assert_eq!(answer.0.headers()["allow"], allow);
    }
    for path in [
        "/".to_owned(),
        "/v2/shipments".to_owned(),
        "/v1/shipments/".to_owned(),
        format!("/v1/shipments/{id}/cancel/now"),
        format!("/v1/shipments/{id}/refund"),
        "/v1/shipment".to_owned(),
    ] {
        assert_error(
            &Call::new(Method::GET, path)
                .token(None)
                .send(&service)
                .await,
            404,
            "not_found",
        );
    }
}

#[tokio::test]
async fn probes_and_metrics_need_no_token() {
    let service = memory_service();
    let (ok, body) = Call::new(Method::GET, "/healthz")
        .token(None)
        .send(&service)
        .await;
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(body, json!({"status": "ok"}));
    let (ready, body) = Call::new(Method::GET, "/readyz")
        .token(None)
        .send(&service)
        .await;
    assert_eq!(ready.status(), StatusCode::OK);
    assert_eq!(body, json!({"status": "ready"}));

    // A readiness check that fails: 503 naming the dependency.
    let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probe = Arc::clone(&flag);
    let checked = memory_service().with_readiness("postgresql", move || {
        let up = probe.load(std::sync::atomic::Ordering::SeqCst);
        async move { up }
    });
    let down = Call::new(Method::GET, "/readyz")
        .token(None)
        .send(&checked)
        .await;
    assert_error(&down, 503, "not_ready");
    assert_eq!(down.1["dependency"], "postgresql");
    flag.store(true, std::sync::atomic::Ordering::SeqCst);
    let (up, _) = Call::new(Method::GET, "/readyz")
        .token(None)
        .send(&checked)
        .await;
    assert_eq!(up.status(), StatusCode::OK);
}

#[tokio::test]
async fn metrics_count_bookings_cancels_rejections_and_requests() {
    let service = memory_service();
    for n in [1, 1, 2] {
        Call::new(Method::POST, "/v1/shipments")
            .json(&schedule_body(n, "GB"))
            .send(&service)
            .await;
    }
    Call::new(Method::POST, "/v1/shipments")
        .json(&schedule_body(3, "JP"))
        .send(&service)
        .await;
    Call::new(Method::POST, format!("/v1/shipments/{}/cancel", order(1)))
        .send(&service)
        .await;
    Call::new(Method::GET, "/nowhere").send(&service).await;
    let (response, text) = Call::new(Method::GET, "/metrics")
        .token(None)
        .send(&service)
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-type"],
        http_kit::prometheus::CONTENT_TYPE
    );
    let text = text.as_str().unwrap().to_owned();
    for line in [
        "order_saga_shipping_scheduled_total 2",
        "order_saga_shipping_cancelled_total 1",
        "order_saga_shipping_rejected_total 1",
        "order_saga_shipping_http_requests_total{route=\"/v1/shipments\",status=\"201\"} 2",
        "order_saga_shipping_http_requests_total{route=\"/v1/shipments\",status=\"200\"} 1",
        "order_saga_shipping_http_requests_total{route=\"/v1/shipments\",status=\"422\"} 1",
        "order_saga_shipping_http_requests_total{route=\"/v1/shipments/{order_id}/cancel\",status=\"200\"} 1",
        "order_saga_shipping_http_requests_total{route=\"other\",status=\"404\"} 1",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    assert!(
        service
            .metrics_text()
            .contains("order_saga_shipping_scheduled_total 2")
    );
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn a_store_outage_is_503_shipping_unavailable() {
    let store = shipping_support::pg::down(Arc::new(clock()));
    let service = ShippingService::new(
        Arc::new(store),
        verifier(),
        ShippingServiceConfig::default(),
    );
    for call in [
        Call::new(Method::POST, "/v1/shipments").json(&schedule_body(1, "GB")),
        Call::new(Method::GET, format!("/v1/shipments/{}", order(1))),
        Call::new(Method::POST, format!("/v1/shipments/{}/cancel", order(1))),
    ] {
        let answer = call.send(&service).await;
        assert_error(&answer, 503, "shipping_unavailable");
        // The cause (an address, a driver message) stays in the log.
        assert!(!answer.1["message"].as_str().unwrap().contains("127.0.0.1"));
    }
}

#[test]
fn routes_match_the_openapi_document_both_ways() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/order-saga/shipping.openapi.json"
    );
    let text = std::fs::read_to_string(path).unwrap();
    let doc: Value = serde_json::from_str(&text).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    let mut documented = BTreeSet::new();
    for (template, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if [
                "get", "put", "post", "delete", "patch", "head", "options", "trace",
            ]
            .contains(&method.as_str())
            {
                documented.insert((method.to_uppercase(), template.clone()));
            }
        }
    }
    let served: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    assert_eq!(
        served.difference(&documented).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "served but not documented"
    );
    assert_eq!(
        documented.difference(&served).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "documented but not served"
    );
}

#[tokio::test]
async fn every_route_in_routes_is_served() {
    let service = memory_service();
    for (method, template) in ROUTES {
        let path = template.replace("{order_id}", &order(9).to_string());
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let call = if method == Method::POST && !path.ends_with("/cancel") {
            Call::new(method, path).json(&schedule_body(9, "GB"))
        } else {
            Call::new(method, path)
        };
        let (response, body) = call.send(&service).await;
        let status = response.status().as_u16();
        // 404 only as the documented "no shipment", never "no such route".
        assert!(
            status < 400 || body["error"] == "shipment_not_found",
            "{template}: {status} {body}"
        );
    }
}
