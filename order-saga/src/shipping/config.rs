//! What a shipping store accepts, and the pieces every store shares: the
//! acceptance check, shipment ids and timestamps.

use chrono::{DateTime, Utc};
use time_kit::Clock;

use super::{ScheduleOutcome, ScheduleShipment, Shipment, ShipmentState, ShippingError};
use crate::model::{CartLimits, CreateOrder};

/// What the shipping service accepts. The same for every implementation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ShippingConfig {
    /// The ISO 3166-1 alpha-2 codes the carrier delivers to; `None` (the
    /// default) delivers everywhere. A request for any other country is
    /// [`ShippingError::Rejected`]. An empty list delivers nowhere.
    pub deliverable_countries: Option<Vec<String>>,
    /// The cart rules a shipment's items must follow: at most
    /// [`CartLimits::max_lines`] lines, quantities 1 to
    /// [`CartLimits::max_quantity`], each SKU once. Default
    /// [`CartLimits::default`] (50 lines, 100 units), the order service's.
    pub limits: CartLimits,
}

impl ShippingConfig {
    /// Delivers only to `countries` (ISO 3166-1 alpha-2, matched
    /// case-insensitively).
    pub fn with_deliverable_countries<I, S>(mut self, countries: I) -> ShippingConfig
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.deliverable_countries = Some(
            countries
                .into_iter()
                .map(|c| c.as_ref().trim().to_ascii_uppercase())
                .collect(),
        );
        self
    }

    /// Sets [`ShippingConfig::limits`].
    pub fn with_limits(mut self, limits: CartLimits) -> ShippingConfig {
        self.limits = limits;
        self
    }

    /// Checks a new request: the items by the cart's rules, the address, and
    /// its country against [`ShippingConfig::deliverable_countries`].
    pub fn check(&self, request: &ScheduleShipment) -> Result<(), ShippingError> {
        // A shipment is an order's cart sent somewhere: the same rules
        // apply, so they are checked by the same code.
        let cart = CreateOrder {
            items: request.items.clone(),
            ship_to: request.ship_to.clone(),
        };
        cart.validate(&self.limits)
            .map_err(|e| ShippingError::Rejected(e.to_string()))?;
        if let Some(countries) = &self.deliverable_countries
            && !countries.contains(&request.ship_to.country)
        {
            return Err(ShippingError::Rejected(format!(
                "the carrier does not deliver to {}",
                request.ship_to.country
            )));
        }
        Ok(())
    }
}

/// A `schedule` of an order that already has a record.
pub(crate) fn answer_from(existing: &Shipment) -> Result<ScheduleOutcome, ShippingError> {
    match existing.state {
        ShipmentState::Scheduled => Ok(ScheduleOutcome {
            shipment: existing.clone(),
            created: false,
        }),
        ShipmentState::Cancelled => Err(ShippingError::Cancelled(existing.order_id)),
    }
}

/// A new shipment id: `shp_` and a UUIDv7 (time-ordered, so the unique
/// index on ids takes inserts at its right edge) in 32 hex digits.
pub(crate) fn new_shipment_id(clock: &dyn Clock) -> String {
    let millis = u64::try_from(clock.unix_millis()).unwrap_or(0);
    let ts = uuid::Timestamp::from_unix(
        uuid::NoContext,
        millis / 1000,
        ((millis % 1000) * 1_000_000) as u32,
    );
    format!("shp_{}", uuid::Uuid::new_v7(ts).simple())
}

/// The clock's time at PostgreSQL's precision (microseconds), so a
/// shipment reads the same from every store.
pub(crate) fn now(clock: &dyn Clock) -> DateTime<Utc> {
    let micros = time_kit::unix_nanos(clock.now()).div_euclid(1_000);
    DateTime::from_timestamp_micros(micros).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::model::{Address, LineItem, OrderId, Sku};

    fn request(country: &str, items: &[(&str, u32)]) -> ScheduleShipment {
        ScheduleShipment {
            order_id: OrderId::new_at(1_700_000_000_000),
            ship_to: Address {
                name: "Ada".into(),
                line1: "1 Loop Road".into(),
                line2: None,
                city: "London".into(),
                postal_code: "N1".into(),
                country: country.into(),
            },
            items: items
                .iter()
                .map(|(sku, quantity)| LineItem {
                    sku: Sku::parse(*sku).unwrap(),
                    quantity: *quantity,
                })
                .collect(),
        }
    }

    #[test]
    fn requests_are_checked_by_the_cart_rules_and_the_countries() {
        let everywhere = ShippingConfig::default();
        assert!(everywhere.check(&request("JP", &[("a", 1)])).is_ok());
        let some = ShippingConfig::default().with_deliverable_countries(["gb", " FR "]);
        assert_eq!(
            some.deliverable_countries,
            Some(vec!["GB".to_owned(), "FR".to_owned()])
        );
        assert!(some.check(&request("FR", &[("a", 1)])).is_ok());
        let refused = some.check(&request("JP", &[("a", 1)])).unwrap_err();
        assert_eq!(refused.code(), "shipping_rejected");
        assert!(refused.to_string().contains("JP"), "{refused}");
        for bad in [
            request("GB", &[]),
            request("GB", &[("a", 0)]),
            request("GB", &[("a", 101)]),
            request("GB", &[("a", 1), ("a", 1)]),
            request("gb", &[("a", 1)]),
        ] {
            assert!(
                matches!(everywhere.check(&bad), Err(ShippingError::Rejected(_))),
                "{bad:?}"
            );
        }
        let nowhere = ShippingConfig::default().with_deliverable_countries(Vec::<String>::new());
        assert!(nowhere.check(&request("GB", &[("a", 1)])).is_err());
    }

    #[test]
    fn ids_are_unique_and_times_have_microsecond_precision() {
        let clock = time_kit::ManualClock::new(
            SystemTime::UNIX_EPOCH + Duration::from_nanos(1_800_000_000_123_456_789),
        );
        let a = new_shipment_id(&clock);
        let b = new_shipment_id(&clock);
        assert_ne!(a, b);
        assert!(a.starts_with("shp_") && a.len() == 36, "{a}");
        assert_eq!(
            now(&clock).timestamp_nanos_opt(),
            Some(1_800_000_000_123_456_000)
        );
    }
}
