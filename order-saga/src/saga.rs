//! The saga as a pure state machine: which step runs next, what a step's
//! success or failure does, and which compensations undo what has begun.
//!
//! It knows nothing of storage or services. The orchestrator persists a
//! [`Saga`] with the order (the durable saga log), asks it for the next
//! [`Action`], performs it against the services, and feeds the outcome back.
//!
//! Forward steps, in order, with the state each success reaches:
//!
//! | step | on success | compensation |
//! | --- | --- | --- |
//! | [`Step::ReserveStock`] | `StockReserved` | [`Compensation::ReleaseStock`] |
//! | [`Step::AuthorizePayment`] | `PaymentAuthorized` | [`Compensation::UndoPayment`] |
//! | [`Step::ScheduleShipment`] | `ShipmentScheduled` | [`Compensation::CancelShipment`] |
//! | [`Step::CommitStock`] | (unchanged) | [`Compensation::ReleaseStock`] |
//! | [`Step::CapturePayment`] | `Confirmed` | [`Compensation::UndoPayment`] |
//!
//! A step is marked *begun* (durably, with its compensation) before it runs,
//! so a crash mid-step leaves a record of what may have happened. On
//! rollback every begun step is compensated, whether or not it was seen to
//! finish: each compensation is safe for a step that never took effect
//! (releasing an unknown reservation, voiding a payment the provider has no
//! record of, cancelling a shipment that was never booked all change
//! nothing). Compensations run shipment first, then payment, then stock.

use serde::{Deserialize, Serialize};

use crate::model::{CancelReason, OrderState};

/// A forward step of the saga.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Reserve every line's stock (runs while the create request waits).
    ReserveStock,
    /// Authorize the total with the payment provider.
    AuthorizePayment,
    /// Book the shipment.
    ScheduleShipment,
    /// Turn the reservation into a sale.
    CommitStock,
    /// Capture the authorized payment; the order is then confirmed.
    CapturePayment,
}

impl Step {
    /// The steps in the order they run.
    pub const ALL: [Step; 5] = [
        Step::ReserveStock,
        Step::AuthorizePayment,
        Step::ScheduleShipment,
        Step::CommitStock,
        Step::CapturePayment,
    ];

    const fn bit(self) -> u8 {
        1 << (self as u8)
    }

    /// The step's name (`snake_case`), used in idempotency keys and the log.
    pub const fn as_str(self) -> &'static str {
        match self {
            Step::ReserveStock => "reserve_stock",
            Step::AuthorizePayment => "authorize_payment",
            Step::ScheduleShipment => "schedule_shipment",
            Step::CommitStock => "commit_stock",
            Step::CapturePayment => "capture_payment",
        }
    }

    /// What undoes this step.
    pub const fn compensation(self) -> Compensation {
        match self {
            Step::ReserveStock | Step::CommitStock => Compensation::ReleaseStock,
            Step::AuthorizePayment | Step::CapturePayment => Compensation::UndoPayment,
            Step::ScheduleShipment => Compensation::CancelShipment,
        }
    }

    /// The state the order reaches when this step succeeds.
    const fn state_after(self) -> OrderState {
        match self {
            Step::ReserveStock => OrderState::StockReserved,
            Step::AuthorizePayment => OrderState::PaymentAuthorized,
            Step::ScheduleShipment | Step::CommitStock => OrderState::ShipmentScheduled,
            Step::CapturePayment => OrderState::Confirmed,
        }
    }
}

/// A compensating action.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compensation {
    /// Cancel the shipment (a tombstone if none was booked).
    CancelShipment,
    /// Void the payment if authorized, refund it if captured, nothing if the
    /// provider has no payment for the order.
    UndoPayment,
    /// Give the stock back (reserved or committed).
    ReleaseStock,
}

impl Compensation {
    /// The order compensations run in.
    pub const ALL: [Compensation; 3] = [
        Compensation::CancelShipment,
        Compensation::UndoPayment,
        Compensation::ReleaseStock,
    ];

    const fn bit(self) -> u8 {
        1 << (self as u8)
    }

    /// The compensation's name (`snake_case`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Compensation::CancelShipment => "cancel_shipment",
            Compensation::UndoPayment => "undo_payment",
            Compensation::ReleaseStock => "release_stock",
        }
    }
}

/// What the orchestrator should do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Run this forward step (it has been marked begun).
    Run(Step),
    /// Run this compensation.
    Compensate(Compensation),
    /// Nothing: the saga is in a terminal state.
    Done,
}

/// A transition the state machine refuses (a bug in the caller, or a
/// stale record): it leaves the saga unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} is not allowed in state {state}")]
pub struct InvalidTransition {
    /// What was attempted.
    pub what: &'static str,
    /// The saga's state.
    pub state: OrderState,
}

/// Whether a cancellation was accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CancelOutcome {
    /// Compensation starts (or had already started).
    Compensating,
    /// Already cancelled or waiting for an operator: nothing to do.
    AlreadyOver(OrderState),
    /// The order is confirmed: stock sold and payment captured; it is not
    /// cancellable (a return is a different process).
    Confirmed,
}

/// One order's saga: the durable part of the orchestrator's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saga {
    state: OrderState,
    begun: u8,
    done: u8,
    compensated: u8,
    reason: Option<CancelReason>,
}

impl Default for Saga {
    fn default() -> Saga {
        Saga::new()
    }
}

impl Saga {
    /// A new saga: `Pending`, nothing begun.
    pub const fn new() -> Saga {
        Saga {
            state: OrderState::Pending,
            begun: 0,
            done: 0,
            compensated: 0,
            reason: None,
        }
    }

    /// Rebuilds a saga from its stored parts (see [`Saga::to_parts`]).
    pub fn from_parts(parts: SagaParts) -> Saga {
        Saga {
            state: parts.state,
            begun: parts.begun & 0x1f,
            done: parts.done & parts.begun & 0x1f,
            compensated: parts.compensated & 0x07,
            reason: parts.reason,
        }
    }

    /// The stored parts.
    pub fn to_parts(&self) -> SagaParts {
        SagaParts {
            state: self.state,
            begun: self.begun,
            done: self.done,
            compensated: self.compensated,
            reason: self.reason,
        }
    }

    /// The order's state.
    pub const fn state(&self) -> OrderState {
        self.state
    }

    /// Why it is being (or was) rolled back.
    pub const fn reason(&self) -> Option<CancelReason> {
        self.reason
    }

    /// Whether `step` was marked begun.
    pub const fn has_begun(&self, step: Step) -> bool {
        self.begun & step.bit() != 0
    }

    /// Whether `step` succeeded.
    pub const fn is_done(&self, step: Step) -> bool {
        self.done & step.bit() != 0
    }

    /// Whether `compensation` has run.
    pub const fn is_compensated(&self, compensation: Compensation) -> bool {
        self.compensated & compensation.bit() != 0
    }

    /// The compensations that the begun steps call for.
    fn compensations_needed(&self) -> u8 {
        Step::ALL
            .into_iter()
            .filter(|step| self.has_begun(*step))
            .fold(0, |bits, step| bits | step.compensation().bit())
    }

    /// What to do next.
    pub fn next(&self) -> Action {
        match self.state {
            OrderState::Confirmed | OrderState::Cancelled | OrderState::NeedsAttention => {
                Action::Done
            }
            OrderState::Compensating => {
                let pending = self.compensations_needed() & !self.compensated;
                Compensation::ALL
                    .into_iter()
                    .find(|c| pending & c.bit() != 0)
                    .map_or(Action::Done, Action::Compensate)
            }
            _ => Step::ALL
                .into_iter()
                .find(|step| !self.is_done(*step))
                .map_or(Action::Done, Action::Run),
        }
    }

    /// Marks `step` begun: recorded (with its compensation) before it runs.
    /// Idempotent.
    pub fn begin(&mut self, step: Step) -> Result<(), InvalidTransition> {
        if self.next() != Action::Run(step) {
            return Err(InvalidTransition {
                what: "beginning a step out of order",
                state: self.state,
            });
        }
        self.begun |= step.bit();
        Ok(())
    }

    /// Records that `step` succeeded.
    pub fn succeeded(&mut self, step: Step) -> Result<(), InvalidTransition> {
        if self.next() != Action::Run(step) || !self.has_begun(step) {
            return Err(InvalidTransition {
                what: "completing a step that is not running",
                state: self.state,
            });
        }
        self.done |= step.bit();
        self.state = step.state_after();
        Ok(())
    }

    /// A step failed for good (or the order must be rolled back for
    /// `reason`): compensation starts. When nothing has begun, the order is
    /// cancelled at once.
    pub fn fail(&mut self, reason: CancelReason) -> Result<(), InvalidTransition> {
        if self.state.is_terminal() || self.state == OrderState::Compensating {
            return Err(InvalidTransition {
                what: "failing a saga that is not running forward",
                state: self.state,
            });
        }
        self.reason = Some(reason);
        self.state = OrderState::Compensating;
        if self.next() == Action::Done {
            self.state = OrderState::Cancelled;
        }
        Ok(())
    }

    /// The customer (or an operator) asks to cancel.
    pub fn cancel(&mut self) -> CancelOutcome {
        match self.state {
            OrderState::Confirmed => CancelOutcome::Confirmed,
            OrderState::Cancelled | OrderState::NeedsAttention => {
                CancelOutcome::AlreadyOver(self.state)
            }
            OrderState::Compensating => CancelOutcome::Compensating,
            _ => {
                // `fail` cannot refuse a forward state.
                let _ = self.fail(CancelReason::CustomerRequested);
                CancelOutcome::Compensating
            }
        }
    }

    /// Records that `compensation` ran; the saga is `Cancelled` once every
    /// needed compensation has.
    pub fn compensated(&mut self, compensation: Compensation) -> Result<(), InvalidTransition> {
        if self.next() != Action::Compensate(compensation) {
            return Err(InvalidTransition {
                what: "recording a compensation that is not due",
                state: self.state,
            });
        }
        self.compensated |= compensation.bit();
        if self.next() == Action::Done {
            self.state = OrderState::Cancelled;
        }
        Ok(())
    }

    /// A compensation kept failing: the saga stops in `NeedsAttention`,
    /// keeping what is still to undo.
    pub fn give_up(&mut self) -> Result<(), InvalidTransition> {
        if self.state != OrderState::Compensating {
            return Err(InvalidTransition {
                what: "giving up outside compensation",
                state: self.state,
            });
        }
        self.state = OrderState::NeedsAttention;
        Ok(())
    }

    /// An operator retries the compensations of a `NeedsAttention` saga.
    pub fn retry_compensation(&mut self) -> Result<(), InvalidTransition> {
        if self.state != OrderState::NeedsAttention {
            return Err(InvalidTransition {
                what: "retrying compensation of a saga that needs no attention",
                state: self.state,
            });
        }
        self.state = OrderState::Compensating;
        Ok(())
    }
}

/// A [`Saga`]'s stored form: the state, three bit sets and the reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SagaParts {
    /// The order's state.
    pub state: OrderState,
    /// Begun steps, bit `i` for [`Step::ALL`]`[i]`.
    pub begun: u8,
    /// Succeeded steps, same bits.
    pub done: u8,
    /// Compensations run, bit `i` for [`Compensation::ALL`]`[i]`.
    pub compensated: u8,
    /// Why it rolls back.
    pub reason: Option<CancelReason>,
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn run_forward(saga: &mut Saga, upto: usize) {
        for step in Step::ALL.into_iter().take(upto) {
            saga.begin(step).unwrap();
            saga.succeeded(step).unwrap();
        }
    }

    #[test]
    fn the_happy_path_reaches_confirmed_through_every_state() {
        let mut saga = Saga::new();
        let mut states = vec![saga.state()];
        while let Action::Run(step) = saga.next() {
            saga.begin(step).unwrap();
            saga.succeeded(step).unwrap();
            if states.last() != Some(&saga.state()) {
                states.push(saga.state());
            }
        }
        assert_eq!(
            states,
            [
                OrderState::Pending,
                OrderState::StockReserved,
                OrderState::PaymentAuthorized,
                OrderState::ShipmentScheduled,
                OrderState::Confirmed
            ]
        );
        assert_eq!(saga.cancel(), CancelOutcome::Confirmed);
    }

    #[test]
    fn a_payment_failure_releases_the_stock_and_voids_a_maybe_authorization() {
        let mut saga = Saga::new();
        run_forward(&mut saga, 1);
        saga.begin(Step::AuthorizePayment).unwrap();
        saga.fail(CancelReason::PaymentDeclined).unwrap();
        assert_eq!(saga.state(), OrderState::Compensating);
        assert_eq!(saga.next(), Action::Compensate(Compensation::UndoPayment));
        saga.compensated(Compensation::UndoPayment).unwrap();
        assert_eq!(saga.next(), Action::Compensate(Compensation::ReleaseStock));
        saga.compensated(Compensation::ReleaseStock).unwrap();
        assert_eq!(saga.state(), OrderState::Cancelled);
        assert_eq!(saga.reason(), Some(CancelReason::PaymentDeclined));
        assert_eq!(saga.next(), Action::Done);
    }

    #[test]
    fn failing_before_anything_began_cancels_at_once() {
        let mut saga = Saga::new();
        saga.fail(CancelReason::OutOfStock).unwrap();
        assert_eq!(saga.state(), OrderState::Cancelled);
    }

    #[test]
    fn a_compensation_that_keeps_failing_needs_attention_and_can_be_retried() {
        let mut saga = Saga::new();
        run_forward(&mut saga, 3);
        assert_eq!(saga.cancel(), CancelOutcome::Compensating);
        assert_eq!(
            saga.next(),
            Action::Compensate(Compensation::CancelShipment)
        );
        saga.give_up().unwrap();
        assert_eq!(saga.state(), OrderState::NeedsAttention);
        assert_eq!(saga.next(), Action::Done);
        assert!(matches!(
            saga.cancel(),
            CancelOutcome::AlreadyOver(OrderState::NeedsAttention)
        ));
        saga.retry_compensation().unwrap();
        assert_eq!(
            saga.next(),
            Action::Compensate(Compensation::CancelShipment)
        );
    }

    #[test]
    fn out_of_order_transitions_are_refused_and_change_nothing() {
        let mut saga = Saga::new();
        let before = saga;
        assert!(saga.begin(Step::CapturePayment).is_err());
        assert!(saga.succeeded(Step::ReserveStock).is_err(), "not begun");
        assert!(saga.compensated(Compensation::ReleaseStock).is_err());
        assert!(saga.give_up().is_err());
        assert_eq!(saga, before);
    }

    #[test]
    fn parts_round_trip() {
        let mut saga = Saga::new();
        run_forward(&mut saga, 2);
        saga.begin(Step::ScheduleShipment).unwrap();
        saga.fail(CancelReason::ShippingRejected).unwrap();
        assert_eq!(Saga::from_parts(saga.to_parts()), saga);
    }

    #[derive(Debug, Clone)]
    enum Input {
        Succeed,
        BeginOnly,
        Fail(usize),
        Cancel,
        Compensate,
        GiveUp,
        Retry,
    }

    fn input() -> impl Strategy<Value = Input> {
        prop_oneof![
            4 => Just(Input::Succeed),
            1 => Just(Input::BeginOnly),
            1 => (0..CancelReason::ALL.len()).prop_map(Input::Fail),
            1 => Just(Input::Cancel),
            3 => Just(Input::Compensate),
            1 => Just(Input::GiveUp),
            1 => Just(Input::Retry),
        ]
    }

    proptest! {
        /// Whatever happens, a saga that ends `Cancelled` has compensated
        /// every step it began; a `Confirmed` one ran every step; and the
        /// state always agrees with the steps done.
        #[test]
        fn rollback_is_complete_under_any_sequence(inputs in proptest::collection::vec(input(), 0..40)) {
            let mut saga = Saga::new();
            for input in inputs {
                match input {
                    Input::Succeed => if let Action::Run(step) = saga.next() {
                        saga.begin(step).unwrap();
                        saga.succeeded(step).unwrap();
                    },
                    Input::BeginOnly => if let Action::Run(step) = saga.next() {
                        saga.begin(step).unwrap();
                    },
                    Input::Fail(i) => { let _ = saga.fail(CancelReason::ALL[i]); }
                    Input::Cancel => { let _ = saga.cancel(); }
                    Input::Compensate => if let Action::Compensate(c) = saga.next() {
                        saga.compensated(c).unwrap();
                    },
                    Input::GiveUp => { let _ = saga.give_up(); }
                    Input::Retry => { let _ = saga.retry_compensation(); }
                }
                prop_assert_eq!(Saga::from_parts(saga.to_parts()), saga);
                match saga.state() {
                    OrderState::Cancelled => {
                        for step in Step::ALL.into_iter().filter(|s| saga.has_begun(*s)) {
                            prop_assert!(saga.is_compensated(step.compensation()), "{step:?} not compensated");
                        }
                        prop_assert!(saga.reason().is_some());
                    }
                    OrderState::Confirmed => {
                        prop_assert!(Step::ALL.into_iter().all(|s| saga.is_done(s)));
                    }
                    OrderState::Compensating | OrderState::NeedsAttention => {
                        prop_assert!(saga.reason().is_some());
                    }
                    forward => {
                        let done = Step::ALL.into_iter().filter(|s| saga.is_done(*s)).count();
                        let expected = match forward {
                            OrderState::Pending => 0..=0,
                            OrderState::StockReserved => 1..=1,
                            OrderState::PaymentAuthorized => 2..=2,
                            _ => 3..=4,
                        };
                        prop_assert!(expected.contains(&done), "{forward:?} with {done} done");
                    }
                }
            }
        }
    }
}
