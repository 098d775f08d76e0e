//! The browser demo client (`GET /demo`) in headless Chromium: a
//! notification sent through the HTTP API appears in the page, and after the
//! page goes away and comes back it resumes after the last one it showed.
//!
//! Chromium is driven over the DevTools protocol on a WebSocket. Without a
//! `chromium` binary the browser test skips, unless `REQUIRE_SERVICES=1`
//! (set by `scripts/test`, which installs Debian's `chromium`), in which
//! case it fails.
#![cfg(all(feature = "server", feature = "jwt"))]

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::http;
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{EncodingKey, Header};
use jwt_kit::{JwtConfig, JwtVerifier, KeySet, VerifyingKey};
use notify_hub::server::{NotifyServer, ServerConfig};
use notify_hub::{Hub, HubConfig};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "browser-test-secret-0123456789abcdef";
const WAIT: Duration = Duration::from_secs(30);

fn token(sub: &str, roles: &[&str]) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    jsonwebtoken::encode(
        &Header::default(),
        &json!({"sub": sub, "exp": exp, "roles": roles}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

async fn start(demo_page: bool) -> (SocketAddr, Hub) {
    let hub = Hub::in_memory(HubConfig::default()).await.unwrap();
    let keys = KeySet::new()
        .with_key(VerifyingKey::hs256("k", SECRET.as_bytes()))
        .unwrap()
        .with_default_kid("k");
    let server = NotifyServer::new(
        hub.clone(),
        JwtVerifier::new(keys, JwtConfig::default()),
        ServerConfig::default().with_demo_page(demo_page),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(server.serve(listener, std::future::pending()));
    (addr, hub)
}

async fn send(addr: SocketAddr, user: &str, title: &str) {
    let service = token("svc", &["notify:send"]);
    let body = json!({"user_ids": [user], "notification": {"type": "demo", "title": title, "message": "from the test"}});
    let (status, _, answer) = http(
        addr,
        "POST",
        "/v1/notifications",
        Some(&service),
        &body.to_string(),
    )
    .await;
    assert_eq!(status, 201, "{answer}");
}

#[tokio::test]
async fn the_demo_page_is_served_only_when_turned_on_and_loads_nothing_foreign() {
    let (off, _hub) = start(false).await;
    assert_eq!(http(off, "GET", "/demo", None, "").await.0, 404);
    assert_eq!(http(off, "GET", "/demo.js", None, "").await.0, 404);

    let (on, _hub) = start(true).await;
    let (status, head, page) = http(on, "GET", "/demo", None, "").await;
    assert_eq!(status, 200);
    assert!(
        head.contains("content-type: text/html; charset=utf-8"),
        "{head}"
    );
    assert!(
        head.contains(
            "content-security-policy: default-src 'none'; script-src 'self'; connect-src 'self'"
        ),
        "{head}"
    );
    assert!(page.contains(r#"<script src="/demo.js"></script>"#));
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "no foreign resources"
    );
    let (status, head, script) = http(on, "GET", "/demo.js", None, "").await;
    assert_eq!(status, 200);
    assert!(head.contains("content-type: text/javascript"), "{head}");
    assert!(
        script.contains(r#""bearer." + token"#),
        "token by subprotocol"
    );
    assert!(script.contains("?since="), "resumes with since");
    assert_eq!(http(on, "POST", "/demo", None, "").await.0, 404);
}

/// A Chromium started headless, with a DevTools session on one page.
struct Browser {
    child: tokio::process::Child,
    devtools: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    session: String,
    next_id: u64,
    /// Events that arrived while a command waited for its reply.
    events: std::collections::VecDeque<Value>,
    _profile: TempDir,
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn chromium() -> Option<std::path::PathBuf> {
    if let Some(path) = std::env::var_os("CHROMIUM") {
        return Some(path.into());
    }
    [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ]
    .iter()
    .map(std::path::PathBuf::from)
    .find(|p| p.exists())
}

impl Browser {
    async fn launch() -> Option<Browser> {
        let Some(binary) = chromium() else {
            assert!(
                !testkit::services_required(),
                "Chromium is required (REQUIRE_SERVICES=1) but not found: install Debian's chromium or set CHROMIUM"
            );
            // The real stderr: the harness's capture would swallow the reason.
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                b"skipping: no chromium (install Debian's chromium, or run scripts/test)\n",
            );
            return None;
        };
        let profile = TempDir(std::env::temp_dir().join(testkit::unique_name("chromium")));
        std::fs::create_dir_all(&profile.0).unwrap();
        let mut child = tokio::process::Command::new(binary)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.0.display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("chromium starts");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let url = tokio::time::timeout(WAIT, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    return url.trim().to_owned();
                }
            }
            panic!("chromium exited without a DevTools endpoint");
        })
        .await
        .expect("chromium's DevTools endpoint within 30 s");
        // Keep reading stderr so that Chromium never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let (devtools, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .unwrap();
        let mut browser = Browser {
            child,
            devtools,
            session: String::new(),
            next_id: 0,
            events: std::collections::VecDeque::new(),
            _profile: profile,
        };
        let target = browser
            .call(None, "Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let attached = browser
            .call(
                None,
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await;
        browser.session = attached["sessionId"].as_str().unwrap().to_owned();
        browser.command("Page.enable", json!({})).await;
        Some(browser)
    }

    /// Sends one DevTools command and returns its result, skipping events.
    async fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            message["sessionId"] = json!(session);
        }
        self.devtools
            .send(Message::text(message.to_string()))
            .await
            .unwrap();
        loop {
            let reply = self.next_message().await;
            if reply["id"] == json!(id) {
                assert!(reply.get("error").is_none(), "{method}: {reply}");
                return reply["result"].clone();
            }
            if reply.get("method").is_some() {
                // An event (it may come before the reply): kept for `open`.
                self.events.push_back(reply);
            }
        }
    }

    async fn command(&mut self, method: &str, params: Value) -> Value {
        let session = self.session.clone();
        self.call(Some(&session), method, params).await
    }

    async fn next_message(&mut self) -> Value {
        loop {
            let message = tokio::time::timeout(WAIT, self.devtools.next())
                .await
                .expect("a DevTools message within 30 s")
                .expect("DevTools connection open")
                .unwrap();
            if let Message::Text(text) = message {
                return serde_json::from_str(&text).unwrap();
            }
        }
    }

    /// Navigates the page and waits for its `load` event (which may have
    /// arrived before the navigation's reply).
    async fn open(&mut self, url: &str) {
        self.events.clear();
        self.command("Page.navigate", json!({"url": url})).await;
        loop {
            let event = match self.events.pop_front() {
                Some(event) => event,
                None => self.next_message().await,
            };
            if event["method"] == "Page.loadEventFired" && event["sessionId"] == json!(self.session)
            {
                return;
            }
        }
    }

    /// Evaluates `expression` in the page and returns its value.
    async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .command(
                "Runtime.evaluate",
                json!({"expression": expression, "awaitPromise": true, "returnByValue": true}),
            )
            .await;
        assert!(result.get("exceptionDetails").is_none(), "{result}");
        result["result"]["value"].clone()
    }

    /// Waits until the page's `condition` (a JavaScript expression) holds,
    /// re-checked on every DOM change rather than on a timer.
    async fn until(&mut self, condition: &str) {
        let expression = format!(
            "new Promise((resolve) => {{
                const ok = () => {{ try {{ return !!({condition}); }} catch (e) {{ return false; }} }};
                if (ok()) return resolve(true);
                const observer = new MutationObserver(() => {{ if (ok()) {{ observer.disconnect(); resolve(true); }} }});
                observer.observe(document.documentElement, {{subtree: true, childList: true, characterData: true, attributes: true}});
            }})"
        );
        let done = tokio::time::timeout(WAIT, self.eval(&expression)).await;
        let state = match done {
            Ok(Value::Bool(true)) => return,
            Ok(value) => format!("{value}"),
            Err(_) => "timed out".to_owned(),
        };
        panic!("the page never satisfied `{condition}` ({state})");
    }

    async fn titles(&mut self) -> Vec<String> {
        let value = self
            .eval("[...document.querySelectorAll('#notifications li strong')].map(e => e.textContent)")
            .await;
        serde_json::from_value(value).unwrap()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

#[tokio::test]
async fn a_notification_sent_through_the_api_appears_in_the_page_and_a_reload_resumes() {
    let Some(mut browser) = Browser::launch().await else {
        return;
    };
    let (addr, hub) = start(true).await;
    let page = format!("http://{addr}/demo#token={}", token("alice", &[]));

    browser.open(&page).await;
    browser
        .until("document.body.dataset.state === 'connected'")
        .await;
    assert_eq!(
        browser
            .eval("document.getElementById('user').textContent")
            .await,
        "alice"
    );

    // Live: sent through the HTTP API, shown by the page.
    send(addr, "alice", "First, live").await;
    browser
        .until("document.querySelectorAll('#notifications li').length === 1")
        .await;
    assert_eq!(browser.titles().await, ["First, live"]);
    assert_eq!(
        browser
            .eval("localStorage.getItem('notify-demo:last:alice')")
            .await,
        "1"
    );

    // Away: the page is gone while the second one is sent.
    browser.open("about:blank").await;
    connections_settle_at(&hub, 0).await;
    send(addr, "alice", "Second, sent while away").await;

    // Back: the page resumes after seq 1, so it shows the second (from the
    // store) and then a third (live), and never the first again.
    browser.open(&page).await;
    browser
        .until("document.querySelectorAll('#notifications li').length === 1")
        .await;
    assert_eq!(browser.titles().await, ["Second, sent while away"]);
    send(addr, "alice", "Third, live again").await;
    browser
        .until("document.querySelectorAll('#notifications li').length === 2")
        .await;
    assert_eq!(
        browser.titles().await,
        ["Third, live again", "Second, sent while away"],
        "newest first, nothing twice"
    );
    assert_eq!(
        browser
            .eval("localStorage.getItem('notify-demo:last:alice')")
            .await,
        "3"
    );
    // One page, one connection: the earlier socket is gone, none leaked.
    assert_eq!(hub.connection_count(), 1);
}

/// Waits until the hub holds exactly `n` connections: the server notices a
/// closed socket asynchronously.
async fn connections_settle_at(hub: &Hub, n: usize) {
    for _ in 0..250 {
        if hub.connection_count() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{} connections, not {n}, after 5 s", hub.connection_count());
}

#[tokio::test]
async fn submitting_a_token_again_replaces_the_socket_and_leaks_none() {
    let Some(mut browser) = Browser::launch().await else {
        return;
    };
    let (addr, hub) = start(true).await;
    let alice = token("alice", &[]);
    browser
        .open(&format!("http://{addr}/demo#token={alice}"))
        .await;
    browser
        .until("document.body.dataset.state === 'connected'")
        .await;
    for _ in 0..3 {
        browser
            .eval(&format!(
                "document.getElementById('token').value = '{alice}'; \
                 document.getElementById('login').requestSubmit(); true"
            ))
            .await;
        browser
            .until("document.body.dataset.state === 'connected'")
            .await;
    }
    connections_settle_at(&hub, 1).await;
    send(addr, "alice", "Once").await;
    browser
        .until("document.querySelectorAll('#notifications li').length === 1")
        .await;
    assert_eq!(browser.titles().await, ["Once"]);
    // The token left the address bar.
    assert_eq!(browser.eval("location.hash").await, "");
    assert_eq!(hub.connection_count(), 1);
}

#[tokio::test]
async fn a_forged_token_leaves_the_page_refused_and_unconnected() {
    let Some(mut browser) = Browser::launch().await else {
        return;
    };
    let (addr, hub) = start(true).await;
    let forged = jsonwebtoken::encode(
        &Header::default(),
        &json!({"sub": "mallory", "exp": 4_000_000_000u64}),
        &EncodingKey::from_secret(b"not-the-server-secret-0123456789abcdef"),
    )
    .unwrap();
    browser
        .open(&format!("http://{addr}/demo#token={forged}"))
        .await;
    browser
        .until("document.body.dataset.state === 'refused'")
        .await;
    assert_eq!(hub.connection_count(), 0);
}
