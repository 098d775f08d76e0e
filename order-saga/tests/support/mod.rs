//! Shared fixtures of the order-saga integration tests.
#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::time::Duration;

use order_saga::inventory::{Inventory, Restock};
use order_saga::model::{Address, CreateOrder, CustomerId, LineItem, OrderId, OrderState, Sku};
use order_saga::{Order, OrderService};

pub fn customer(name: &str) -> CustomerId {
    CustomerId::parse(name).unwrap()
}

pub fn sku(name: &str) -> Sku {
    Sku::parse(name).unwrap()
}

pub fn address() -> Address {
    Address {
        name: "Ada Lovelace".into(),
        line1: "12 Analytical Row".into(),
        line2: None,
        city: "London".into(),
        postal_code: "N1 9GU".into(),
        country: "GB".into(),
    }
}

pub fn cart(items: &[(&str, u32)]) -> CreateOrder {
    CreateOrder {
        items: items
            .iter()
            .map(|(s, quantity)| LineItem {
                sku: sku(s),
                quantity: *quantity,
            })
            .collect(),
        ship_to: address(),
    }
}

pub async fn stock(inventory: &Arc<dyn Inventory>, name: &str, quantity: u32, price: i64) {
    inventory
        .restock(Restock {
            sku: sku(name),
            quantity,
            unit_price_cents: Some(price),
        })
        .await
        .unwrap();
}

/// Waits (polling, up to `within`) until the order reaches a terminal
/// state, and returns it. Panics with the last state seen on timeout.
pub async fn settled(service: &OrderService, id: OrderId, within: Duration) -> Order {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let order = service.get_order(id).await.unwrap().expect("order exists");
        if order.state.is_terminal() {
            return order;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "order {id} still {} after {within:?}",
            order.state
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until every order listed is terminal.
pub async fn all_settled(service: &OrderService, ids: &[OrderId], within: Duration) -> Vec<Order> {
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        out.push(settled(service, *id, within).await);
    }
    out
}

pub fn is(order: &Order, state: OrderState) -> bool {
    order.state == state
}
