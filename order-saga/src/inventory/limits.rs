//! What every inventory implementation refuses before it writes anything:
//! the limits on a reservation and on a restock, checked the same way in
//! memory, on PostgreSQL and behind the HTTP service.

use std::collections::HashSet;
use std::time::Duration;

use super::{InventoryError, ReserveRequest, Restock};

/// The highest unit price accepted, in cents (10 billion currency units):
/// far above any real price, and low enough that a line's
/// `quantity × unit price` cannot overflow `i64`.
pub const MAX_UNIT_PRICE_CENTS: i64 = 1_000_000_000_000;

/// Limits on a reservation request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct InventoryLimits {
    /// Most lines in one reservation. Default 100 (the order service's
    /// cart allows 50).
    pub max_lines: usize,
    /// Most units of one SKU in one reservation. Default 10,000 (the cart
    /// allows 100).
    pub max_quantity: u32,
    /// The longest time-to-live. Default 24 h.
    pub max_ttl: Duration,
}

impl Default for InventoryLimits {
    fn default() -> InventoryLimits {
        InventoryLimits {
            max_lines: 100,
            max_quantity: 10_000,
            max_ttl: Duration::from_secs(24 * 60 * 60),
        }
    }
}

impl InventoryLimits {
    /// Sets [`InventoryLimits::max_lines`].
    pub fn with_max_lines(mut self, max: usize) -> InventoryLimits {
        self.max_lines = max;
        self
    }

    /// Sets [`InventoryLimits::max_quantity`].
    pub fn with_max_quantity(mut self, max: u32) -> InventoryLimits {
        self.max_quantity = max;
        self
    }

    /// Sets [`InventoryLimits::max_ttl`].
    pub fn with_max_ttl(mut self, max: Duration) -> InventoryLimits {
        self.max_ttl = max;
        self
    }

    /// Refuses a request with no lines or more than
    /// [`max_lines`](InventoryLimits::max_lines), a SKU on two lines, a
    /// quantity of 0 or over [`max_quantity`](InventoryLimits::max_quantity),
    /// or a TTL under 1 ms or over [`max_ttl`](InventoryLimits::max_ttl).
    pub fn check_reserve(&self, request: &ReserveRequest) -> Result<(), InventoryError> {
        if request.items.is_empty() {
            return Err(invalid("a reservation needs at least one line"));
        }
        if request.items.len() > self.max_lines {
            return Err(invalid(format!(
                "{} lines; at most {} are allowed",
                request.items.len(),
                self.max_lines
            )));
        }
        let mut seen = HashSet::with_capacity(request.items.len());
        for item in &request.items {
            if item.quantity == 0 || item.quantity > self.max_quantity {
                return Err(invalid(format!(
                    "quantity {} of {} is out of range 1..={}",
                    item.quantity, item.sku, self.max_quantity
                )));
            }
            if !seen.insert(&item.sku) {
                return Err(invalid(format!(
                    "{} appears on more than one line",
                    item.sku
                )));
            }
        }
        if request.ttl < Duration::from_millis(1) || request.ttl > self.max_ttl {
            return Err(invalid(format!(
                "ttl {} ms is out of range 1..={} ms",
                request.ttl.as_millis(),
                self.max_ttl.as_millis()
            )));
        }
        Ok(())
    }
}

/// Refuses a negative price or one over [`MAX_UNIT_PRICE_CENTS`]. Whether a
/// new SKU has a price is checked by the store, which knows if it is new.
pub fn check_restock(restock: &Restock) -> Result<(), InventoryError> {
    match restock.unit_price_cents {
        Some(price) if !(0..=MAX_UNIT_PRICE_CENTS).contains(&price) => Err(invalid(format!(
            "unit_price_cents {price} is out of range 0..={MAX_UNIT_PRICE_CENTS}"
        ))),
        _ => Ok(()),
    }
}

/// The error of a restock that would create a SKU without a price.
pub(crate) fn new_sku_without_price(sku: &crate::model::Sku) -> InventoryError {
    invalid(format!("{sku} is a new SKU: unit_price_cents is required"))
}

/// The error of a restock that would overflow the stock counter.
pub(crate) fn stock_overflow(sku: &crate::model::Sku) -> InventoryError {
    invalid(format!("restocking {sku} would overflow its stock"))
}

fn invalid(message: impl Into<String>) -> InventoryError {
    InventoryError::Invalid(message.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{LineItem, Sku};
    use uuid::Uuid;

    fn request(items: &[(&str, u32)], ttl_ms: u64) -> ReserveRequest {
        ReserveRequest {
            reservation_id: Uuid::nil(),
            items: items
                .iter()
                .map(|(sku, quantity)| LineItem {
                    sku: Sku::parse(*sku).unwrap(),
                    quantity: *quantity,
                })
                .collect(),
            ttl: Duration::from_millis(ttl_ms),
        }
    }

    #[test]
    fn reservations_outside_the_limits_are_refused() {
        let limits = InventoryLimits::default()
            .with_max_lines(2)
            .with_max_quantity(5)
            .with_max_ttl(Duration::from_secs(60));
        assert!(limits.check_reserve(&request(&[("a", 5)], 60_000)).is_ok());
        for bad in [
            request(&[], 1000),
            request(&[("a", 1), ("b", 1), ("c", 1)], 1000),
            request(&[("a", 0)], 1000),
            request(&[("a", 6)], 1000),
            request(&[("a", 1), ("a", 1)], 1000),
            request(&[("a", 1)], 0),
            request(&[("a", 1)], 60_001),
        ] {
            let err = limits.check_reserve(&bad).unwrap_err();
            assert_eq!(err.code(), "invalid_request", "{bad:?}");
        }
    }

    #[test]
    fn prices_must_be_in_range() {
        let restock = |price| Restock {
            sku: Sku::parse("a").unwrap(),
            quantity: 1,
            unit_price_cents: price,
        };
        assert!(check_restock(&restock(None)).is_ok());
        assert!(check_restock(&restock(Some(0))).is_ok());
        assert!(check_restock(&restock(Some(MAX_UNIT_PRICE_CENTS))).is_ok());
        assert!(check_restock(&restock(Some(-1))).is_err());
        assert!(check_restock(&restock(Some(MAX_UNIT_PRICE_CENTS + 1))).is_err());
    }
}
