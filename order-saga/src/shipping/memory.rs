//! [`MemoryShipping`]: the shipping service in process memory, the embedded
//! default. Nothing survives a restart.

use std::collections::HashMap;

use parking_lot::Mutex;
use time_kit::SharedClock;

use super::config::{answer_from, new_shipment_id, now};
use super::{
    ScheduleOutcome, ScheduleShipment, Shipment, ShipmentState, Shipping, ShippingConfig,
    ShippingError,
};
use crate::BoxFuture;
use crate::model::OrderId;

/// The shipping service in memory: one record per order (a shipment or a
/// tombstone) behind one lock, so schedule and cancel of an order are
/// serialized and every rule of [the module](super) holds under any
/// interleaving. It keeps the shipment's state only, not its address and
/// items (nothing reads them back).
#[derive(Debug)]
pub struct MemoryShipping {
    config: ShippingConfig,
    clock: SharedClock,
    records: Mutex<HashMap<OrderId, Shipment>>,
}

impl Default for MemoryShipping {
    /// Delivers everywhere, on the system clock.
    fn default() -> MemoryShipping {
        MemoryShipping::new(ShippingConfig::default(), time_kit::system())
    }
}

impl MemoryShipping {
    /// An empty service accepting what `config` allows, timestamping with
    /// `clock`.
    pub fn new(config: ShippingConfig, clock: SharedClock) -> MemoryShipping {
        MemoryShipping {
            config,
            clock,
            records: Mutex::new(HashMap::new()),
        }
    }

    /// What it accepts.
    pub fn config(&self) -> &ShippingConfig {
        &self.config
    }

    /// Every record (shipments and tombstones), ordered by order id: for
    /// tests and reconciliation.
    pub fn snapshot(&self) -> Vec<Shipment> {
        let mut all: Vec<Shipment> = self.records.lock().values().cloned().collect();
        all.sort_by_key(|s| s.order_id);
        all
    }

    fn schedule_now(&self, request: ScheduleShipment) -> Result<ScheduleOutcome, ShippingError> {
        // Checked outside the lock (it is pure); applied inside only when
        // the order has no record yet, since a record answers first.
        let checked = self.config.check(&request);
        let mut records = self.records.lock();
        if let Some(existing) = records.get(&request.order_id) {
            return answer_from(existing);
        }
        checked?;
        let shipment = Shipment {
            id: new_shipment_id(self.clock.as_ref()),
            order_id: request.order_id,
            state: ShipmentState::Scheduled,
            created_at: now(self.clock.as_ref()),
        };
        records.insert(request.order_id, shipment.clone());
        drop(records);
        tracing::debug!(order_id = %shipment.order_id, shipment_id = %shipment.id, "shipment scheduled");
        Ok(ScheduleOutcome {
            shipment,
            created: true,
        })
    }

    fn cancel_now(&self, order_id: OrderId) -> Shipment {
        let mut records = self.records.lock();
        let record = records.entry(order_id).or_insert_with(|| {
            tracing::debug!(%order_id, "tombstone for an order never scheduled");
            Shipment {
                id: new_shipment_id(self.clock.as_ref()),
                order_id,
                state: ShipmentState::Cancelled,
                created_at: now(self.clock.as_ref()),
            }
        });
        record.state = ShipmentState::Cancelled;
        record.clone()
    }
}

impl Shipping for MemoryShipping {
    fn schedule(
        &self,
        request: ScheduleShipment,
    ) -> BoxFuture<'_, Result<Shipment, ShippingError>> {
        Box::pin(async move { self.schedule_now(request).map(|o| o.shipment) })
    }

    fn schedule_with_outcome(
        &self,
        request: ScheduleShipment,
    ) -> BoxFuture<'_, Result<ScheduleOutcome, ShippingError>> {
        Box::pin(async move { self.schedule_now(request) })
    }

    fn cancel(&self, order_id: OrderId) -> BoxFuture<'_, Result<Shipment, ShippingError>> {
        Box::pin(async move { Ok(self.cancel_now(order_id)) })
    }

    fn shipment(
        &self,
        order_id: OrderId,
    ) -> BoxFuture<'_, Result<Option<Shipment>, ShippingError>> {
        Box::pin(async move { Ok(self.records.lock().get(&order_id).cloned()) })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use proptest::prelude::*;
    use time_kit::ManualClock;

    use super::*;
    use crate::model::{Address, LineItem, Sku};

    fn request(order_id: OrderId, country: &str) -> ScheduleShipment {
        ScheduleShipment {
            order_id,
            ship_to: Address {
                name: "Ada".into(),
                line1: "1 Loop Road".into(),
                line2: None,
                city: "London".into(),
                postal_code: "N1".into(),
                country: country.into(),
            },
            items: vec![LineItem {
                sku: Sku::parse("SKU-1").unwrap(),
                quantity: 1,
            }],
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Schedule { order: usize, deliverable: bool },
        Cancel { order: usize },
        Look { order: usize },
        Tick,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..4usize, any::<bool>())
                .prop_map(|(order, deliverable)| Op::Schedule { order, deliverable }),
            (0..4usize).prop_map(|order| Op::Cancel { order }),
            (0..4usize).prop_map(|order| Op::Look { order }),
            Just(Op::Tick),
        ]
    }

    /// The reference model: per order, nothing, a live shipment, or a
    /// cancelled record, each with the id it was given.
    #[derive(Debug, Clone, PartialEq)]
    enum Model {
        Live(String),
        Cancelled(String),
    }

    proptest! {
        #[test]
        fn any_sequence_of_calls_follows_the_rules(ops in proptest::collection::vec(op(), 1..60)) {
            let clock = ManualClock::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000));
            let shipping = MemoryShipping::new(
                ShippingConfig::default().with_deliverable_countries(["GB"]),
                Arc::new(clock.clone()),
            );
            let orders: Vec<OrderId> = (0..4).map(|i| OrderId::new_at(1_700_000_000_000 + i)).collect();
            let mut model: HashMap<OrderId, Model> = HashMap::new();
            for op in ops {
                match op {
                    Op::Schedule { order, deliverable } => {
                        let id = orders[order];
                        let country = if deliverable { "GB" } else { "JP" };
                        let got = shipping.schedule_now(request(id, country));
                        match (model.get(&id), got) {
                            (Some(Model::Live(known)), Ok(outcome)) => {
                                prop_assert!(!outcome.created);
                                prop_assert_eq!(&outcome.shipment.id, known);
                            }
                            (Some(Model::Cancelled(_)), Err(ShippingError::Cancelled(o))) => {
                                prop_assert_eq!(o, id);
                            }
                            (None, Ok(outcome)) if deliverable => {
                                prop_assert!(outcome.created);
                                prop_assert_eq!(outcome.shipment.state, ShipmentState::Scheduled);
                                model.insert(id, Model::Live(outcome.shipment.id));
                            }
                            (None, Err(ShippingError::Rejected(_))) if !deliverable => {}
                            (state, got) => prop_assert!(false, "{state:?} then {got:?}"),
                        }
                    }
                    Op::Cancel { order } => {
                        let id = orders[order];
                        let got = shipping.cancel_now(id);
                        prop_assert_eq!(got.state, ShipmentState::Cancelled);
                        if let Some(Model::Live(known) | Model::Cancelled(known)) = model.get(&id) {
                            prop_assert_eq!(&got.id, known);
                        }
                        model.insert(id, Model::Cancelled(got.id));
                    }
                    Op::Look { order } => {
                        let id = orders[order];
                        let got = shipping.records.lock().get(&id).cloned();
                        let seen = got.map(|s| match s.state {
                            ShipmentState::Scheduled => Model::Live(s.id),
                            ShipmentState::Cancelled => Model::Cancelled(s.id),
                        });
                        prop_assert_eq!(seen.as_ref(), model.get(&id));
                    }
                    Op::Tick => clock.advance(Duration::from_millis(1)),
                }
            }
            prop_assert_eq!(shipping.snapshot().len(), model.len());
        }
    }

    #[tokio::test]
    async fn a_cancel_keeps_the_shipment_and_its_booking_time() {
        let clock = ManualClock::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000));
        let shipping = MemoryShipping::new(ShippingConfig::default(), Arc::new(clock.clone()));
        let id = OrderId::new_at(1_700_000_000_000);
        let booked = shipping.schedule(request(id, "GB")).await.unwrap();
        clock.advance(Duration::from_secs(60));
        let cancelled = shipping.cancel(id).await.unwrap();
        assert_eq!(cancelled.id, booked.id);
        assert_eq!(cancelled.created_at, booked.created_at);
        assert_eq!(cancelled.state, ShipmentState::Cancelled);
        assert_eq!(shipping.snapshot(), vec![cancelled]);
    }
}
