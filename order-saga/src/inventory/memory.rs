//! [`MemoryInventory`]: the inventory in one process's memory, the embedded
//! default.
//!
//! One mutex guards every SKU and reservation, so each call is atomic and
//! the calls are serializable: a reservation checks every line and takes
//! them all under one lock, which is what makes "never negative, under any
//! interleaving" hold by construction. Calls never wait on I/O while
//! holding it; the critical sections are a few hash-map operations (see the
//! `inventory` bench for the figures, contended and not).
//!
//! Memory stays bounded: a reservation that has finished (committed,
//! released or expired) is forgotten once it has been finished for the
//! [retention](MemoryInventory::with_retention) (24 h by default, as long
//! as the order service keeps idempotency keys), by the same
//! [`sweep_expired`](Inventory::sweep_expired) calls the sweeper makes. A
//! forgotten id is unknown again: a replayed reserve would reserve anew,
//! which is why the retention must outlast any saga's retries.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use time_kit::SharedClock;

use super::limits::{check_restock, new_sku_without_price, stock_overflow};
use super::{
    Inventory, InventoryError, InventoryLimits, Reservation, ReservationId, ReservationState,
    ReserveRequest, ReservedLine, Restock, StockLevel, expiry, now_micros, same_lines,
    sorted_items,
};
use crate::BoxFuture;
use crate::model::Sku;

/// The inventory in memory. Cheap to share behind an `Arc`; every method
/// is also available synchronously (`*_now`), for callers outside a
/// runtime and for property tests.
#[derive(Debug)]
pub struct MemoryInventory {
    state: Mutex<State>,
    clock: SharedClock,
    limits: InventoryLimits,
    retention: chrono::TimeDelta,
}

/// How long a finished reservation is kept by default: 24 h.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);

#[derive(Debug, Default)]
struct State {
    skus: HashMap<Sku, Stock>,
    reservations: HashMap<ReservationId, Reservation>,
    /// Reservations still `Reserved`, by expiry: what the sweeper walks.
    expiring: BTreeSet<(DateTime<Utc>, ReservationId)>,
    /// Finished reservations, by when they finished: what is forgotten
    /// after the retention.
    finished: BTreeSet<(DateTime<Utc>, ReservationId)>,
    finished_at: HashMap<ReservationId, DateTime<Utc>>,
}

impl State {
    /// Records that `id` reached a final state (or moved from committed to
    /// released) at `now`.
    fn finish(&mut self, id: ReservationId, now: DateTime<Utc>) {
        if let Some(before) = self.finished_at.insert(id, now) {
            self.finished.remove(&(before, id));
        }
        self.finished.insert((now, id));
    }

    /// Forgets up to `limit` reservations finished at or before `cutoff`.
    fn forget(&mut self, cutoff: DateTime<Utc>, limit: usize) -> usize {
        let mut forgotten = 0;
        while forgotten < limit {
            match self.finished.first() {
                Some(&(at, id)) if at <= cutoff => {
                    self.finished.pop_first();
                    self.finished_at.remove(&id);
                    self.reservations.remove(&id);
                    forgotten += 1;
                }
                _ => break,
            }
        }
        forgotten
    }
}

#[derive(Debug, Clone, Copy)]
struct Stock {
    available: i64,
    reserved: i64,
    committed: i64,
    unit_price_cents: i64,
}

/// Which count a reservation's units leave when they go back to
/// `available`.
#[derive(Clone, Copy)]
enum Held {
    Reserved,
    Committed,
}

impl Default for MemoryInventory {
    /// An empty inventory on the system clock.
    fn default() -> MemoryInventory {
        MemoryInventory::new(time_kit::system())
    }
}

impl MemoryInventory {
    /// An empty inventory that reads time from `clock`.
    pub fn new(clock: SharedClock) -> MemoryInventory {
        MemoryInventory {
            state: Mutex::new(State::default()),
            clock,
            limits: InventoryLimits::default(),
            retention: chrono::TimeDelta::from_std(DEFAULT_RETENTION)
                .unwrap_or(chrono::TimeDelta::MAX),
        }
    }

    /// Keeps a finished reservation for `retention` before forgetting it
    /// (default [`DEFAULT_RETENTION`]).
    pub fn with_retention(mut self, retention: Duration) -> MemoryInventory {
        self.retention = chrono::TimeDelta::from_std(retention).unwrap_or(chrono::TimeDelta::MAX);
        self
    }

    /// Checks requests against `limits` instead of the defaults.
    pub fn with_limits(mut self, limits: InventoryLimits) -> MemoryInventory {
        self.limits = limits;
        self
    }

    /// The limits requests are checked against.
    pub fn limits(&self) -> &InventoryLimits {
        &self.limits
    }

    /// [`Inventory::reserve`], synchronously.
    pub fn reserve_now(&self, request: &ReserveRequest) -> Result<Reservation, InventoryError> {
        self.limits.check_reserve(request)?;
        let now = now_micros(&self.clock);
        let mut state = self.state.lock();
        if let Some(existing) = state.reservations.get(&request.reservation_id) {
            return if same_lines(existing, &request.items) {
                Ok(existing.clone())
            } else {
                Err(InventoryError::ReservationMismatch(request.reservation_id))
            };
        }
        let items = sorted_items(&request.items);
        let mut lines = Vec::with_capacity(items.len());
        for item in &items {
            let Some(stock) = state.skus.get(&item.sku) else {
                return Err(InventoryError::UnknownSku(item.sku.clone()));
            };
            if stock.available < i64::from(item.quantity) {
                return Err(InventoryError::OutOfStock {
                    sku: item.sku.clone(),
                    requested: item.quantity,
                    available: stock.available,
                });
            }
            lines.push(ReservedLine {
                sku: item.sku.clone(),
                quantity: item.quantity,
                unit_price_cents: stock.unit_price_cents,
            });
        }
        // Every line was checked under this same lock: taking them cannot
        // fail half-way.
        for line in &lines {
            if let Some(stock) = state.skus.get_mut(&line.sku) {
                let quantity = i64::from(line.quantity);
                stock.available -= quantity;
                stock.reserved += quantity;
            }
        }
        let reservation = Reservation {
            id: request.reservation_id,
            state: ReservationState::Reserved,
            lines,
            expires_at: expiry(now, request.ttl),
        };
        state
            .expiring
            .insert((reservation.expires_at, reservation.id));
        state
            .reservations
            .insert(reservation.id, reservation.clone());
        Ok(reservation)
    }

    /// [`Inventory::commit`], synchronously.
    pub fn commit_now(&self, id: ReservationId) -> Result<Reservation, InventoryError> {
        let now = now_micros(&self.clock);
        let mut state = self.state.lock();
        let State {
            skus,
            reservations,
            expiring,
            ..
        } = &mut *state;
        let Some(reservation) = reservations.get_mut(&id) else {
            return Err(InventoryError::ReservationNotFound(id));
        };
        let result = match reservation.state {
            ReservationState::Committed => return Ok(reservation.clone()),
            ReservationState::Released | ReservationState::Expired => {
                return Err(InventoryError::ReservationExpired(id));
            }
            ReservationState::Reserved => {
                expiring.remove(&(reservation.expires_at, id));
                if reservation.expires_at <= now {
                    // Past its expiry the stock is no longer promised: give
                    // it back now rather than leave it to the sweeper, so
                    // the outcome does not depend on when the sweeper ran.
                    give_back(skus, &reservation.lines, Held::Reserved);
                    reservation.state = ReservationState::Expired;
                    Err(InventoryError::ReservationExpired(id))
                } else {
                    for line in &reservation.lines {
                        if let Some(stock) = skus.get_mut(&line.sku) {
                            let quantity = i64::from(line.quantity);
                            stock.reserved -= quantity;
                            stock.committed += quantity;
                        }
                    }
                    reservation.state = ReservationState::Committed;
                    Ok(reservation.clone())
                }
            }
        };
        state.finish(id, now);
        result
    }

    /// [`Inventory::release`], synchronously.
    pub fn release_now(&self, id: ReservationId) -> Result<Option<Reservation>, InventoryError> {
        let now = now_micros(&self.clock);
        let mut state = self.state.lock();
        let State {
            skus,
            reservations,
            expiring,
            ..
        } = &mut *state;
        let Some(reservation) = reservations.get_mut(&id) else {
            return Ok(None);
        };
        let held = match reservation.state {
            ReservationState::Released | ReservationState::Expired => {
                return Ok(Some(reservation.clone()));
            }
            ReservationState::Reserved => {
                expiring.remove(&(reservation.expires_at, id));
                Held::Reserved
            }
            ReservationState::Committed => Held::Committed,
        };
        give_back(skus, &reservation.lines, held);
        reservation.state = ReservationState::Released;
        let released = reservation.clone();
        state.finish(id, now);
        Ok(Some(released))
    }

    /// [`Inventory::reservation`], synchronously.
    pub fn reservation_now(&self, id: ReservationId) -> Option<Reservation> {
        self.state.lock().reservations.get(&id).cloned()
    }

    /// [`Inventory::stock`], synchronously.
    pub fn stock_now(&self, sku: &Sku) -> Result<StockLevel, InventoryError> {
        let state = self.state.lock();
        match state.skus.get(sku) {
            Some(stock) => Ok(level(sku, stock)),
            None => Err(InventoryError::UnknownSku(sku.clone())),
        }
    }

    /// [`Inventory::restock`], synchronously.
    pub fn restock_now(&self, restock: &Restock) -> Result<StockLevel, InventoryError> {
        check_restock(restock)?;
        let mut state = self.state.lock();
        let stock = match state.skus.get_mut(&restock.sku) {
            Some(stock) => stock,
            None => {
                let Some(unit_price_cents) = restock.unit_price_cents else {
                    return Err(new_sku_without_price(&restock.sku));
                };
                state.skus.entry(restock.sku.clone()).or_insert(Stock {
                    available: 0,
                    reserved: 0,
                    committed: 0,
                    unit_price_cents,
                })
            }
        };
        let Some(available) = stock.available.checked_add(i64::from(restock.quantity)) else {
            return Err(stock_overflow(&restock.sku));
        };
        stock.available = available;
        if let Some(price) = restock.unit_price_cents {
            stock.unit_price_cents = price;
        }
        Ok(level(&restock.sku, stock))
    }

    /// [`Inventory::sweep_expired`], synchronously. Also forgets up to
    /// `limit` reservations finished longer ago than the retention.
    pub fn sweep_expired_now(&self, limit: usize) -> usize {
        let now = now_micros(&self.clock);
        let mut state = self.state.lock();
        let mut swept = 0;
        while swept < limit {
            let Some(&(expires_at, id)) = state.expiring.first() else {
                break;
            };
            if expires_at > now {
                break;
            }
            state.expiring.pop_first();
            let State {
                skus, reservations, ..
            } = &mut *state;
            if let Some(reservation) = reservations.get_mut(&id)
                && reservation.state == ReservationState::Reserved
            {
                give_back(skus, &reservation.lines, Held::Reserved);
                reservation.state = ReservationState::Expired;
                state.finish(id, now);
                swept += 1;
            }
        }
        if let Some(cutoff) = now.checked_sub_signed(self.retention) {
            state.forget(cutoff, limit);
        }
        swept
    }

    /// Reservations held in memory, finished ones included (until the
    /// retention forgets them).
    pub fn reservation_count(&self) -> usize {
        self.state.lock().reservations.len()
    }

    /// Every SKU's stock, ordered by SKU: for audits and tests.
    pub fn stock_levels(&self) -> Vec<StockLevel> {
        let state = self.state.lock();
        let mut levels: Vec<StockLevel> = state
            .skus
            .iter()
            .map(|(sku, stock)| level(sku, stock))
            .collect();
        levels.sort_unstable_by(|a, b| a.sku.cmp(&b.sku));
        levels
    }
}

fn give_back(skus: &mut HashMap<Sku, Stock>, lines: &[ReservedLine], held: Held) {
    for line in lines {
        if let Some(stock) = skus.get_mut(&line.sku) {
            let quantity = i64::from(line.quantity);
            match held {
                Held::Reserved => stock.reserved -= quantity,
                Held::Committed => stock.committed -= quantity,
            }
            stock.available += quantity;
        }
    }
}

fn level(sku: &Sku, stock: &Stock) -> StockLevel {
    StockLevel {
        sku: sku.clone(),
        available: stock.available,
        reserved: stock.reserved,
        committed: stock.committed,
        unit_price_cents: stock.unit_price_cents,
    }
}

impl Inventory for MemoryInventory {
    fn reserve(
        &self,
        request: ReserveRequest,
    ) -> BoxFuture<'_, Result<Reservation, InventoryError>> {
        Box::pin(std::future::ready(self.reserve_now(&request)))
    }

    fn commit(&self, id: ReservationId) -> BoxFuture<'_, Result<Reservation, InventoryError>> {
        Box::pin(std::future::ready(self.commit_now(id)))
    }

    fn release(
        &self,
        id: ReservationId,
    ) -> BoxFuture<'_, Result<Option<Reservation>, InventoryError>> {
        Box::pin(std::future::ready(self.release_now(id)))
    }

    fn reservation(
        &self,
        id: ReservationId,
    ) -> BoxFuture<'_, Result<Option<Reservation>, InventoryError>> {
        Box::pin(std::future::ready(Ok(self.reservation_now(id))))
    }

    fn stock<'a>(&'a self, sku: &'a Sku) -> BoxFuture<'a, Result<StockLevel, InventoryError>> {
        Box::pin(std::future::ready(self.stock_now(sku)))
    }

    fn restock(&self, restock: Restock) -> BoxFuture<'_, Result<StockLevel, InventoryError>> {
        Box::pin(std::future::ready(self.restock_now(&restock)))
    }

    fn sweep_expired(&self, limit: usize) -> BoxFuture<'_, Result<usize, InventoryError>> {
        Box::pin(std::future::ready(Ok(self.sweep_expired_now(limit))))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use proptest::prelude::*;
    use time_kit::ManualClock;
    use uuid::Uuid;

    use super::*;
    use crate::model::LineItem;

    fn sku(s: &str) -> Sku {
        Sku::parse(s).unwrap()
    }

    fn setup() -> (ManualClock, MemoryInventory) {
        let clock = ManualClock::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000));
        let inventory = MemoryInventory::new(Arc::new(clock.clone()));
        (clock, inventory)
    }

    fn restock(inventory: &MemoryInventory, name: &str, quantity: u32) {
        inventory
            .restock_now(&Restock {
                sku: sku(name),
                quantity,
                unit_price_cents: Some(100),
            })
            .unwrap();
    }

    fn request(id: u128, items: &[(&str, u32)], ttl: Duration) -> ReserveRequest {
        ReserveRequest {
            reservation_id: Uuid::from_u128(id),
            items: items
                .iter()
                .map(|(s, quantity)| LineItem {
                    sku: sku(s),
                    quantity: *quantity,
                })
                .collect(),
            ttl,
        }
    }

    #[test]
    fn the_expiry_index_forgets_reservations_that_leave_reserved() {
        let (clock, inventory) = setup();
        restock(&inventory, "a", 10);
        let ttl = Duration::from_secs(5);
        inventory
            .reserve_now(&request(1, &[("a", 1)], ttl))
            .unwrap();
        inventory
            .reserve_now(&request(2, &[("a", 1)], ttl))
            .unwrap();
        inventory
            .reserve_now(&request(3, &[("a", 1)], ttl))
            .unwrap();
        inventory.commit_now(Uuid::from_u128(1)).unwrap();
        inventory.release_now(Uuid::from_u128(2)).unwrap();
        assert_eq!(inventory.state.lock().expiring.len(), 1);
        clock.advance(ttl);
        assert_eq!(inventory.sweep_expired_now(10), 1);
        assert!(inventory.state.lock().expiring.is_empty());
        let stock = inventory.stock_now(&sku("a")).unwrap();
        assert_eq!(
            (stock.available, stock.reserved, stock.committed),
            (9, 0, 1)
        );
    }

    #[test]
    fn sweeping_honours_the_limit_and_the_expiry_order() {
        let (clock, inventory) = setup();
        restock(&inventory, "a", 10);
        for (id, secs) in [(1, 3), (2, 1), (3, 2), (4, 60)] {
            inventory
                .reserve_now(&request(id, &[("a", 1)], Duration::from_secs(secs)))
                .unwrap();
        }
        clock.advance(Duration::from_secs(3));
        assert_eq!(inventory.sweep_expired_now(2), 2);
        let state = |id| {
            inventory
                .reservation_now(Uuid::from_u128(id))
                .unwrap()
                .state
        };
        assert_eq!(state(2), ReservationState::Expired);
        assert_eq!(state(3), ReservationState::Expired);
        assert_eq!(state(1), ReservationState::Reserved);
        assert_eq!(inventory.sweep_expired_now(10), 1);
        assert_eq!(state(4), ReservationState::Reserved);
        assert_eq!(inventory.stock_now(&sku("a")).unwrap().available, 9);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Reserve {
            id: u8,
            lines: Vec<(u8, u32)>,
            ttl_ms: u64,
        },
        Commit(u8),
        Release(u8),
        Advance(u64),
        Sweep(usize),
        Restock(u8, u32),
    }

    const SKUS: [&str; 4] = ["s0", "s1", "s2", "s3"];

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..16, prop::collection::vec((0u8..4, 1u32..6), 1..4), 1u64..5_000)
                .prop_map(|(id, lines, ttl_ms)| Op::Reserve { id, lines, ttl_ms }),
            2 => (0u8..16).prop_map(Op::Commit),
            2 => (0u8..16).prop_map(Op::Release),
            2 => (0u64..3_000).prop_map(Op::Advance),
            1 => (0usize..5).prop_map(Op::Sweep),
            1 => (0u8..4, 0u32..5).prop_map(|(s, q)| Op::Restock(s, q)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Random interleavings of reserve, commit, release, expiry and
        /// restock: per SKU, `available + reserved + committed` is what was
        /// ever restocked, nothing is negative, `reserved` is what the
        /// `Reserved` reservations hold and `committed` what the
        /// `Committed` ones hold.
        #[test]
        fn stock_is_conserved_and_never_negative(
            initial in prop::collection::vec(0u32..20, 4),
            ops in prop::collection::vec(op(), 1..80),
        ) {
            let (clock, inventory) = setup();
            let mut total: HashMap<Sku, i64> = HashMap::new();
            for (name, quantity) in SKUS.iter().zip(&initial) {
                restock(&inventory, name, *quantity);
                total.insert(sku(name), i64::from(*quantity));
            }
            for op in ops {
                match op {
                    Op::Reserve { id, lines, ttl_ms } => {
                        let mut items: Vec<(&str, u32)> = Vec::new();
                        for (s, q) in lines {
                            if !items.iter().any(|(n, _)| *n == SKUS[usize::from(s)]) {
                                items.push((SKUS[usize::from(s)], q));
                            }
                        }
                        let before = inventory.stock_levels();
                        let req = request(u128::from(id), &items, Duration::from_millis(ttl_ms));
                        let existed = inventory.reservation_now(req.reservation_id);
                        match inventory.reserve_now(&req) {
                            Ok(r) => {
                                prop_assert!(same_lines(&r, &req.items));
                                if existed.is_some() {
                                    prop_assert_eq!(inventory.stock_levels(), before);
                                }
                            }
                            // All or nothing: a refusal changes no stock.
                            Err(_) => prop_assert_eq!(inventory.stock_levels(), before),
                        }
                    }
                    Op::Commit(id) => {
                        let before = inventory.reservation_now(Uuid::from_u128(u128::from(id)));
                        let result = inventory.commit_now(Uuid::from_u128(u128::from(id)));
                        match (before.map(|r| r.state), &result) {
                            (None, Err(InventoryError::ReservationNotFound(_))) => {}
                            (Some(ReservationState::Committed), Ok(_)) => {}
                            (Some(ReservationState::Reserved), Ok(r)) => {
                                prop_assert_eq!(r.state, ReservationState::Committed);
                            }
                            (Some(_), Err(InventoryError::ReservationExpired(_))) => {}
                            (state, result) => prop_assert!(false, "commit of {state:?} gave {result:?}"),
                        }
                    }
                    Op::Release(id) => {
                        let released = inventory.release_now(Uuid::from_u128(u128::from(id))).unwrap();
                        if let Some(r) = released {
                            prop_assert!(matches!(
                                r.state,
                                ReservationState::Released | ReservationState::Expired
                            ));
                        }
                    }
                    Op::Advance(ms) => clock.advance(Duration::from_millis(ms)),
                    Op::Sweep(limit) => {
                        prop_assert!(inventory.sweep_expired_now(limit) <= limit);
                    }
                    Op::Restock(s, quantity) => {
                        restock(&inventory, SKUS[usize::from(s)], quantity);
                        *total.entry(sku(SKUS[usize::from(s)])).or_default() += i64::from(quantity);
                    }
                }
                check_invariants(&inventory, &total)?;
            }
            // Everything still reserved goes back once it has expired.
            clock.advance(Duration::from_secs(10));
            inventory.sweep_expired_now(usize::MAX);
            for level in inventory.stock_levels() {
                prop_assert_eq!(level.reserved, 0);
            }
            check_invariants(&inventory, &total)?;
        }
    }

    fn check_invariants(
        inventory: &MemoryInventory,
        total: &HashMap<Sku, i64>,
    ) -> Result<(), TestCaseError> {
        let state = inventory.state.lock();
        let mut reserved: HashMap<&Sku, i64> = HashMap::new();
        let mut committed: HashMap<&Sku, i64> = HashMap::new();
        for reservation in state.reservations.values() {
            let bucket = match reservation.state {
                ReservationState::Reserved => &mut reserved,
                ReservationState::Committed => &mut committed,
                _ => continue,
            };
            for line in &reservation.lines {
                *bucket.entry(&line.sku).or_default() += i64::from(line.quantity);
            }
        }
        for (sku, stock) in &state.skus {
            prop_assert!(stock.available >= 0 && stock.reserved >= 0 && stock.committed >= 0);
            prop_assert_eq!(
                stock.available + stock.reserved + stock.committed,
                total[sku],
                "{}",
                sku
            );
            prop_assert_eq!(stock.reserved, reserved.get(sku).copied().unwrap_or(0));
            prop_assert_eq!(stock.committed, committed.get(sku).copied().unwrap_or(0));
        }
        let indexed = state
            .reservations
            .values()
            .filter(|r| r.state == ReservationState::Reserved)
            .count();
        prop_assert_eq!(state.expiring.len(), indexed);
        // Nothing is forgotten within the retention (24 h; these runs
        // last minutes): every finished reservation is indexed once.
        prop_assert_eq!(state.finished.len(), state.reservations.len() - indexed);
        prop_assert_eq!(state.finished_at.len(), state.finished.len());
        Ok(())
    }

    #[test]
    fn finished_reservations_are_forgotten_after_the_retention() {
        let clock = ManualClock::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000));
        let inventory =
            MemoryInventory::new(Arc::new(clock.clone())).with_retention(Duration::from_secs(3600));
        restock(&inventory, "a", 10);
        let hour = Duration::from_secs(3600);
        let ttl = Duration::from_secs(2 * 3600);
        inventory
            .reserve_now(&request(1, &[("a", 1)], ttl))
            .unwrap();
        inventory
            .reserve_now(&request(2, &[("a", 1)], ttl))
            .unwrap();
        inventory
            .reserve_now(&request(3, &[("a", 1)], 3 * hour))
            .unwrap();
        inventory
            .reserve_now(&request(4, &[("a", 1)], Duration::from_secs(5400)))
            .unwrap();
        inventory.commit_now(Uuid::from_u128(1)).unwrap();
        inventory.commit_now(Uuid::from_u128(2)).unwrap();
        clock.advance(Duration::from_secs(1800));
        // Released after the commit: kept for the retention from now.
        inventory.release_now(Uuid::from_u128(2)).unwrap();
        clock.advance(Duration::from_secs(1800));
        assert_eq!(inventory.sweep_expired_now(100), 0);
        assert_eq!(inventory.reservation_count(), 3);
        assert_eq!(inventory.reservation_now(Uuid::from_u128(1)), None);
        clock.advance(Duration::from_secs(1800));
        assert_eq!(inventory.sweep_expired_now(100), 1, "4 expires");
        assert_eq!(inventory.reservation_count(), 2, "2 forgotten");
        assert_eq!(
            inventory.reservation_now(Uuid::from_u128(3)).unwrap().state,
            ReservationState::Reserved
        );
        // The sales stay counted; a forgotten id is unknown again.
        let stock = inventory.stock_now(&sku("a")).unwrap();
        assert_eq!(
            (stock.available, stock.reserved, stock.committed),
            (8, 1, 1)
        );
        assert_eq!(inventory.release_now(Uuid::from_u128(1)).unwrap(), None);
        clock.advance(hour);
        inventory.sweep_expired_now(100);
        assert_eq!(inventory.reservation_count(), 1);
        let state = inventory.state.lock();
        assert!(state.finished.is_empty());
        assert!(state.finished_at.is_empty());
    }
}
