//! Drives one saga: asks the state machine for the next action, performs
//! it against the services, and records the outcome durably before moving
//! on. Every call to a service carries a key derived from the order and the
//! step, so running a step again after a crash changes nothing.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::service::Inner;
use super::store::{Lease, SagaRecord, SagaUpdate, StoreError, StoredResponse};
use crate::events::{Event, EventEnvelope};
use crate::inventory::{InventoryError, ReservationState, ReserveRequest};
use crate::model::{CancelReason, Order, OrderLine, OrderState};
use crate::payment::{AuthorizeRequest, PaymentError, PaymentState};
use crate::saga::{Action, Compensation, Step};
use crate::shipping::{ScheduleShipment, ShippingError};

/// How a step or compensation ended.
pub(crate) enum Outcome {
    /// It took effect; the order gained these facts.
    Done(Effects),
    /// It will never succeed: roll back for this reason.
    Failed(CancelReason, String),
    /// Like `Failed`, and it surely took no effect: the service refused it
    /// or was never asked (a payment provider that is down, an open
    /// breaker). If this was the step's only run, its compensation is not
    /// needed.
    Refused(CancelReason, String),
    /// It may succeed later (a service is unavailable).
    Retry(String),
    /// The request itself is invalid (an unknown SKU): the create path
    /// removes the order; a resumed saga rolls back as out of stock.
    Invalid(String),
}

/// What a step learned that the order keeps.
#[derive(Default)]
pub(crate) struct Effects {
    lines: Option<Vec<OrderLine>>,
    expires_at: Option<DateTime<Utc>>,
    payment_id: Option<String>,
    shipment_id: Option<String>,
}

/// Where a driver stopped.
#[derive(Debug)]
pub(crate) enum Stop {
    /// Terminal state reached.
    Finished,
    /// Waiting for a retry; the lease was released.
    Waiting,
    /// Another instance holds the lease now.
    LeaseLost,
    /// The store failed; the lease will expire and the saga be resumed.
    StoreFailed(StoreError),
}

pub(crate) fn log_begin(step: Step) -> String {
    format!(
        "begin {} (compensation: {})",
        step.as_str(),
        step.compensation().as_str()
    )
}

/// The step that the last write of `saga` began and that has not run yet,
/// if any: steps are begun in the write that completes the previous one.
pub(crate) fn begun_next(saga: &crate::saga::Saga) -> Option<Step> {
    match saga.next() {
        Action::Run(step) if saga.has_begun(step) => Some(step),
        _ => None,
    }
}

/// Drives `record`'s saga until it finishes, must wait, or loses its lease.
///
/// `fresh` is the step the caller's own write began and that has not run
/// anywhere yet (`None` for a saga claimed from the store: an earlier
/// incarnation may have run its current step). A fresh step whose only run
/// is refused ([`Outcome::Refused`]) needs no compensation; any other
/// failure is compensated as usual.
pub(crate) async fn drive(
    inner: Arc<Inner>,
    mut record: SagaRecord,
    lease: Lease,
    mut fresh: Option<Step>,
) -> Stop {
    loop {
        let mut events = Vec::new();
        let mut log = Vec::new();
        if record.cancel_requested {
            record.cancel_requested = false;
            fresh = None;
            let before = record.saga.state();
            record.saga.cancel();
            if record.saga.state() != before {
                log.push("cancel requested".to_owned());
                note_rollback(
                    &inner,
                    &mut record,
                    &mut events,
                    CancelReason::CustomerRequested,
                );
                record.attempts = 0;
            }
            if let Err(stop) =
                persist(&inner, &lease, &mut record, events, log, None, None, true).await
            {
                return stop;
            }
            continue;
        }
        match record.saga.next() {
            Action::Done => return Stop::Finished,
            Action::Run(step) if !record.saga.has_begun(step) => {
                // Steps are begun in the write that completes the previous
                // one; this covers a saga whose begin was not recorded.
                let _ = record.saga.begin(step);
                log.push(log_begin(step));
                if let Err(stop) =
                    persist(&inner, &lease, &mut record, events, log, None, None, false).await
                {
                    return stop;
                }
                fresh = Some(step);
            }
            Action::Run(step) => {
                let only_run = fresh.take() == Some(step);
                inner.fault(&format!("before:{}", step.as_str()));
                let outcome = run_step(&inner, &record, step).await;
                inner.fault(&format!("after:{}", step.as_str()));
                match settle_step(&inner, &lease, &mut record, step, outcome, only_run).await {
                    Ok(Settled::Advanced) => fresh = begun_next(&record.saga),
                    Ok(Settled::Waiting) => return Stop::Waiting,
                    Err(stop) => return stop,
                }
            }
            Action::Compensate(compensation) => {
                inner.fault(&format!("before:{}", compensation.as_str()));
                let outcome = run_compensation(&inner, &record, compensation).await;
                inner.fault(&format!("after:{}", compensation.as_str()));
                match outcome {
                    Outcome::Done(_) => {
                        let _ = record.saga.compensated(compensation);
                        record.attempts = 0;
                        log.push(format!("compensated {}", compensation.as_str()));
                        if record.saga.state() == OrderState::Cancelled {
                            let reason = record
                                .saga
                                .reason()
                                .unwrap_or(CancelReason::CustomerRequested);
                            record.order.cancel_reason = Some(reason);
                            events.push(envelope(
                                &inner,
                                &record.order,
                                Event::OrderCancelled { reason },
                            ));
                            inner.stats.cancelled(reason);
                        }
                    }
                    Outcome::Failed(_, detail)
                    | Outcome::Refused(_, detail)
                    | Outcome::Retry(detail)
                    | Outcome::Invalid(detail) => {
                        record.attempts += 1;
                        if record.attempts >= inner.config.max_compensation_attempts {
                            let _ = record.saga.give_up();
                            record.order.attention = Some(format!(
                                "{} failed {} times: {detail}",
                                compensation.as_str(),
                                record.attempts
                            ));
                            log.push(format!(
                                "needs attention: {} ({detail})",
                                compensation.as_str()
                            ));
                            events.push(envelope(
                                &inner,
                                &record.order,
                                Event::OrderNeedsAttention {
                                    step: compensation.as_str().to_owned(),
                                    error: detail.clone(),
                                },
                            ));
                            inner.stats.needs_attention.fetch_add(1, Relaxed);
                            tracing::warn!(order = %record.order.id, compensation = compensation.as_str(), error = %detail, "compensation keeps failing: order needs attention");
                            record.attempts = 0;
                        } else {
                            inner.stats.compensation_retries.fetch_add(1, Relaxed);
                            log.push(format!("retry {} ({detail})", compensation.as_str()));
                            let delay = inner.config.retry_delay(record.attempts);
                            return match persist(
                                &inner,
                                &lease,
                                &mut record,
                                events,
                                log,
                                None,
                                Some(delay),
                                false,
                            )
                            .await
                            {
                                Ok(()) => Stop::Waiting,
                                Err(stop) => stop,
                            };
                        }
                    }
                }
                if let Err(stop) =
                    persist(&inner, &lease, &mut record, events, log, None, None, false).await
                {
                    return stop;
                }
            }
        }
    }
}

/// Whether a settled step moved the saga on.
pub(crate) enum Settled {
    /// The step succeeded or failed for good; the driver goes on.
    Advanced,
    /// It will be retried later; the lease was released.
    Waiting,
}

/// Records how `step` ended (success with the next step begun, rollback, or
/// a retry later) in one write. `only_run`: this was the step's first and
/// only run (see [`drive`]).
pub(crate) async fn settle_step(
    inner: &Inner,
    lease: &Lease,
    record: &mut SagaRecord,
    step: Step,
    outcome: Outcome,
    only_run: bool,
) -> Result<Settled, Stop> {
    let mut events = Vec::new();
    let mut log = Vec::new();
    let mut response = None;
    let outcome = match outcome {
        Outcome::Invalid(detail) => Outcome::Failed(CancelReason::OutOfStock, detail),
        Outcome::Refused(reason, detail) if !only_run => Outcome::Failed(reason, detail),
        other => other,
    };
    match outcome {
        Outcome::Done(effects) => {
            apply_effects(&mut record.order, &effects);
            if record.saga.succeeded(step).is_err() {
                tracing::error!(order = %record.order.id, step = step.as_str(), "saga refused its own step");
                return Err(Stop::Finished);
            }
            record.attempts = 0;
            log.push(format!("done {}", step.as_str()));
            record.order.state = record.saga.state();
            events.extend(step_events(inner, &record.order, step, &effects));
            if let Action::Run(next) = record.saga.next()
                && record.saga.begin(next).is_ok()
            {
                log.push(log_begin(next));
            }
            if step == Step::ReserveStock {
                response = Some(Answer::Created);
            }
            if record.saga.state() == OrderState::Confirmed {
                inner.stats.confirmed.fetch_add(1, Relaxed);
            }
        }
        Outcome::Failed(reason, detail) => {
            log.push(format!("failed {}: {detail}", step.as_str()));
            let _ = record.saga.fail(reason);
            note_rollback(inner, record, &mut events, reason);
            record.attempts = 0;
            if step == Step::ReserveStock {
                response = Some(Answer::OutOfStock(detail));
            }
        }
        Outcome::Refused(reason, detail) => {
            // The step's only run did nothing, so there is nothing for its
            // compensation to undo (e.g. no payment to look up and void
            // while the provider is down): the rollback does not wait for
            // the service to come back.
            log.push(format!("refused {}: {detail}", step.as_str()));
            let _ = record.saga.fail(reason);
            let compensation = step.compensation();
            let shared = Step::ALL
                .into_iter()
                .any(|s| s != step && record.saga.has_begun(s) && s.compensation() == compensation);
            if !shared
                && record.saga.next() == Action::Compensate(compensation)
                && record.saga.compensated(compensation).is_ok()
            {
                log.push(format!(
                    "skipped {}: {} never took effect",
                    compensation.as_str(),
                    step.as_str()
                ));
            }
            note_rollback(inner, record, &mut events, reason);
            record.attempts = 0;
        }
        Outcome::Retry(detail) => {
            record.attempts += 1;
            if record.attempts >= inner.config.max_step_attempts {
                let reason = unavailable_reason(step);
                log.push(format!(
                    "gave up {} after {} attempts: {detail}",
                    step.as_str(),
                    record.attempts
                ));
                let _ = record.saga.fail(reason);
                note_rollback(inner, record, &mut events, reason);
                record.attempts = 0;
                if step == Step::ReserveStock {
                    // The create request's key must not stay "in progress"
                    // until it expires: this is its outcome.
                    response = Some(Answer::GaveUp);
                }
            } else {
                inner.stats.step_retries.fetch_add(1, Relaxed);
                log.push(format!("retry {} ({detail})", step.as_str()));
                let delay = inner.config.retry_delay(record.attempts);
                persist(inner, lease, record, events, log, None, Some(delay), false).await?;
                return Ok(Settled::Waiting);
            }
        }
        // Mapped to `Failed` above.
        Outcome::Invalid(_) => {}
    }
    persist(inner, lease, record, events, log, response, None, false).await?;
    Ok(Settled::Advanced)
}

/// The answer to store for the create request's idempotency key, built
/// from the order as written (a replay returns the very body first sent).
pub(crate) enum Answer {
    /// 201 with the order.
    Created,
    /// 409 `out_of_stock`, with the inventory's detail.
    OutOfStock(String),
    /// 409 `order_cancelled`: the reservation was given up (the inventory
    /// stayed unavailable).
    GaveUp,
}

/// Writes the record; a terminal state releases the lease.
#[allow(clippy::too_many_arguments)]
async fn persist(
    inner: &Inner,
    lease: &Lease,
    record: &mut SagaRecord,
    events: Vec<EventEnvelope>,
    log: Vec<String>,
    response: Option<Answer>,
    release_after: Option<Duration>,
    cancel_applied: bool,
) -> Result<(), Stop> {
    record.order.state = record.saga.state();
    record.order.updated_at = inner.now();
    let response = response.map(|answer| match answer {
        Answer::Created => created_response(&record.order),
        Answer::OutOfStock(detail) => out_of_stock_response(&record.order, &detail),
        Answer::GaveUp => gave_up_response(&record.order),
    });
    let release_after =
        release_after.or_else(|| record.saga.state().is_terminal().then_some(Duration::ZERO));
    let update = SagaUpdate {
        order: record.order.clone(),
        saga: record.saga,
        attempts: record.attempts,
        events,
        log,
        response,
        release_after,
        cancel_applied,
    };
    match inner.store.update(lease, update).await {
        Ok(cancel_requested) => {
            record.cancel_requested = cancel_requested;
            Ok(())
        }
        Err(StoreError::LeaseLost(id)) => {
            inner.stats.leases_lost.fetch_add(1, Relaxed);
            tracing::info!(order = %id, "lease lost: another instance drives this saga now");
            Err(Stop::LeaseLost)
        }
        Err(e) => {
            tracing::warn!(order = %record.order.id, error = %e, "could not record the saga; it resumes when the lease expires");
            Err(Stop::StoreFailed(e))
        }
    }
}

fn note_rollback(
    inner: &Inner,
    record: &mut SagaRecord,
    events: &mut Vec<EventEnvelope>,
    reason: CancelReason,
) {
    record.order.cancel_reason = Some(reason);
    record.order.state = record.saga.state();
    if record.saga.state() == OrderState::Cancelled {
        events.push(envelope(
            inner,
            &record.order,
            Event::OrderCancelled { reason },
        ));
        inner.stats.cancelled(reason);
    } else {
        events.push(envelope(
            inner,
            &record.order,
            Event::CompensationStarted { reason },
        ));
    }
}

fn envelope(inner: &Inner, order: &Order, event: Event) -> EventEnvelope {
    EventEnvelope::new(order.id, inner.now(), event)
}

fn step_events(inner: &Inner, order: &Order, step: Step, effects: &Effects) -> Vec<EventEnvelope> {
    let event = match step {
        Step::ReserveStock => {
            return vec![
                envelope(
                    inner,
                    order,
                    Event::OrderCreated {
                        customer: order.customer.clone(),
                        items: order.items.clone(),
                    },
                ),
                envelope(
                    inner,
                    order,
                    Event::StockReserved {
                        lines: order.lines.clone(),
                        total_cents: order.total_cents,
                        expires_at: effects.expires_at.unwrap_or(order.created_at),
                    },
                ),
            ];
        }
        Step::AuthorizePayment => Event::PaymentAuthorized {
            payment_id: order.payment_id.clone().unwrap_or_default(),
            amount_cents: order.total_cents,
        },
        Step::ScheduleShipment => Event::ShipmentScheduled {
            shipment_id: order.shipment_id.clone().unwrap_or_default(),
        },
        Step::CommitStock => return Vec::new(),
        Step::CapturePayment => Event::OrderConfirmed {
            total_cents: order.total_cents,
        },
    };
    vec![envelope(inner, order, event)]
}

fn apply_effects(order: &mut Order, effects: &Effects) {
    if let Some(lines) = &effects.lines {
        order.total_cents = lines
            .iter()
            .map(|l| i64::from(l.quantity).saturating_mul(l.unit_price_cents))
            .fold(0, i64::saturating_add);
        order.lines = lines.clone();
    }
    if let Some(id) = &effects.payment_id {
        order.payment_id = Some(id.clone());
    }
    if let Some(id) = &effects.shipment_id {
        order.shipment_id = Some(id.clone());
    }
}

/// The answer to the create request: 201 with the order.
pub(crate) fn created_response(order: &Order) -> StoredResponse {
    StoredResponse {
        status: 201,
        body: serde_json::to_value(order).unwrap_or(serde_json::Value::Null),
    }
}

/// The answer to a create request refused for lack of stock: 409.
pub(crate) fn out_of_stock_response(order: &Order, detail: &str) -> StoredResponse {
    StoredResponse {
        status: 409,
        body: serde_json::json!({
            "error": "out_of_stock",
            "message": detail,
            "order_id": order.id,
        }),
    }
}

/// The answer to a create request whose reservation was given up after
/// every attempt found the inventory unavailable: 409, final for the key.
pub(crate) fn gave_up_response(order: &Order) -> StoredResponse {
    StoredResponse {
        status: 409,
        body: serde_json::json!({
            "error": "order_cancelled",
            "message": format!(
                "the inventory stayed unavailable and order {} was cancelled; \
                 send the request again with a new Idempotency-Key",
                order.id
            ),
            "order_id": order.id,
            "cancel_reason": order.cancel_reason,
        }),
    }
}

fn unavailable_reason(step: Step) -> CancelReason {
    match step {
        Step::ReserveStock | Step::CommitStock => CancelReason::ReservationExpired,
        Step::AuthorizePayment | Step::CapturePayment => CancelReason::PaymentUnavailable,
        Step::ScheduleShipment => CancelReason::ShippingUnavailable,
    }
}

pub(crate) fn key(order: &Order, what: &str) -> String {
    format!("{}:{what}", order.id)
}

/// Performs a forward step.
pub(crate) async fn run_step(inner: &Inner, record: &SagaRecord, step: Step) -> Outcome {
    let order = &record.order;
    let services = &inner.services;
    match step {
        Step::ReserveStock => {
            let request = ReserveRequest {
                reservation_id: order.id.as_uuid(),
                items: order.items.clone(),
                ttl: inner.config.reservation_ttl,
            };
            match services.inventory.reserve(request).await {
                Ok(reservation)
                    if reservation.state == ReservationState::Reserved
                        || reservation.state == ReservationState::Committed =>
                {
                    let lines = reservation
                        .lines
                        .into_iter()
                        .map(|l| OrderLine {
                            sku: l.sku,
                            quantity: l.quantity,
                            unit_price_cents: l.unit_price_cents,
                        })
                        .collect();
                    Outcome::Done(Effects {
                        lines: Some(lines),
                        expires_at: Some(reservation.expires_at),
                        ..Effects::default()
                    })
                }
                Ok(reservation) => Outcome::Failed(
                    CancelReason::ReservationExpired,
                    format!("reservation is {}", reservation.state.as_str()),
                ),
                Err(e @ InventoryError::OutOfStock { .. }) => {
                    Outcome::Failed(CancelReason::OutOfStock, e.to_string())
                }
                Err(InventoryError::UnknownSku(sku)) => Outcome::Invalid(sku.to_string()),
                Err(e @ InventoryError::Unavailable(_)) => Outcome::Retry(error_chain(&e)),
                Err(e) => Outcome::Failed(CancelReason::OutOfStock, e.to_string()),
            }
        }
        Step::AuthorizePayment => {
            let request = AuthorizeRequest {
                idempotency_key: key(order, "authorize"),
                order_id: order.id,
                amount_cents: order.total_cents,
                currency: order.currency.clone(),
            };
            match services.payments.authorize(request).await {
                Ok(payment) if payment.state == PaymentState::Declined => Outcome::Failed(
                    CancelReason::PaymentDeclined,
                    payment
                        .decline_reason
                        .unwrap_or_else(|| "declined".to_owned()),
                ),
                Ok(payment) => Outcome::Done(Effects {
                    payment_id: Some(payment.id),
                    ..Effects::default()
                }),
                Err(PaymentError::Declined { reason }) => {
                    Outcome::Failed(CancelReason::PaymentDeclined, reason)
                }
                // Refused by the provider or never sent (the resilient
                // client reports `OutcomeUnknown` instead when any attempt
                // may have acted): no authorization exists.
                Err(e @ (PaymentError::Unavailable(_) | PaymentError::CircuitOpen)) => {
                    Outcome::Refused(CancelReason::PaymentUnavailable, error_chain(&e))
                }
                // The resilient client has already retried (and looked up
                // unknown outcomes); what is left means the provider is down
                // and may hold a payment: the rollback looks it up.
                Err(e) => Outcome::Failed(CancelReason::PaymentUnavailable, error_chain(&e)),
            }
        }
        Step::ScheduleShipment => {
            let request = ScheduleShipment {
                order_id: order.id,
                ship_to: order.ship_to.clone(),
                items: order.items.clone(),
            };
            match services.shipping.schedule(request).await {
                Ok(shipment) => Outcome::Done(Effects {
                    shipment_id: Some(shipment.id),
                    ..Effects::default()
                }),
                Err(e @ (ShippingError::Rejected(_) | ShippingError::Cancelled(_))) => {
                    Outcome::Failed(CancelReason::ShippingRejected, e.to_string())
                }
                Err(e) => Outcome::Retry(error_chain(&e)),
            }
        }
        Step::CommitStock => match services.inventory.commit(order.id.as_uuid()).await {
            Ok(_) => Outcome::Done(Effects::default()),
            Err(e @ InventoryError::Unavailable(_)) => Outcome::Retry(error_chain(&e)),
            // Expired (the sweeper gave the stock back while payment ran) or
            // gone: the payment is voided by the rollback.
            Err(e) => Outcome::Failed(CancelReason::ReservationExpired, e.to_string()),
        },
        Step::CapturePayment => {
            let Some(payment_id) = &order.payment_id else {
                return Outcome::Failed(
                    CancelReason::PaymentUnavailable,
                    "no payment to capture".to_owned(),
                );
            };
            match services
                .payments
                .capture(&key(order, "capture"), payment_id)
                .await
            {
                Ok(_) => Outcome::Done(Effects::default()),
                Err(e) if e.is_transient() || matches!(e, PaymentError::CircuitOpen) => {
                    Outcome::Retry(error_chain(&e))
                }
                Err(e) => Outcome::Failed(CancelReason::PaymentUnavailable, error_chain(&e)),
            }
        }
    }
}

/// Performs a compensation. Each is safe when its step never took effect.
pub(crate) async fn run_compensation(
    inner: &Inner,
    record: &SagaRecord,
    compensation: Compensation,
) -> Outcome {
    let order = &record.order;
    let services = &inner.services;
    let result = match compensation {
        Compensation::CancelShipment => services
            .shipping
            .cancel(order.id)
            .await
            .map(|_| ())
            .map_err(|e| error_chain(&e)),
        Compensation::ReleaseStock => services
            .inventory
            .release(order.id.as_uuid())
            .await
            .map(|_| ())
            .map_err(|e| error_chain(&e)),
        Compensation::UndoPayment => undo_payment(inner, order).await,
    };
    match result {
        Ok(()) => Outcome::Done(Effects::default()),
        Err(detail) => Outcome::Retry(detail),
    }
}

/// Voids an authorized payment, refunds a captured one, and does nothing
/// when the provider has none for this order (the authorization never took
/// effect). The payment is found by its authorization key, so an
/// authorization whose reply was lost is undone too.
async fn undo_payment(inner: &Inner, order: &Order) -> Result<(), String> {
    let payments = &inner.services.payments;
    let payment = match payments.lookup(&key(order, "authorize")).await {
        Ok(Some(payment)) => payment,
        Ok(None) => return Ok(()),
        Err(e) => return Err(error_chain(&e)),
    };
    let result = match payment.state {
        PaymentState::Authorized => payments.void(&key(order, "void"), &payment.id).await,
        PaymentState::Captured => payments.refund(&key(order, "refund"), &payment.id).await,
        PaymentState::Voided | PaymentState::Refunded | PaymentState::Declined => return Ok(()),
    };
    match result {
        Ok(_) => Ok(()),
        // Captured meanwhile (a capture whose reply was lost): refund on the next try.
        Err(e) => Err(error_chain(&e)),
    }
}

/// An error with its sources, for logs and the order's attention note.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
