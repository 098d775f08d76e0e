//! The Redis Streams bus (feature `redis`): [`RedisStreamPublisher`], what
//! the outbox relay publishes to, and [`StreamConsumer`], a member of a
//! consumer group that runs an [`EventHandler`] on each event.
//!
//! One stream carries every order event (default key
//! `{prefix}order-events`). Each entry has the fields:
//!
//! | field | value |
//! |---|---|
//! | `event` | the [`EventEnvelope`] as JSON |
//! | `type` | its type (`OrderCreated`, …) |
//! | `order_id` | the order's id |
//! | `schema_version` | the envelope's schema version |
//!
//! A consumer acknowledges (`XACK`) an entry only after its handler
//! succeeded. Entries another consumer of the group left pending longer
//! than [`StreamConsumerConfig::min_idle`] (it died, or hangs) are taken
//! over with `XAUTOCLAIM`. An entry that cannot be handled (its handler
//! keeps failing, its payload does not parse, or its schema version is
//! unknown) is moved, after [`ConsumerPolicy::max_deliveries`] deliveries,
//! to the dead-letter stream (`{stream}:dead`) with its original id, the
//! error and the delivery count, and acknowledged. See
//! `docs/order-saga/MESSAGING.md`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use fred::prelude::{Client, ClientLike, Options, StreamsInterface, Value};
use fred::types::CustomCommand;
use fred::types::scripts::Script;
use fred::types::streams::{XID, XPendingArgs};
use redis_kit::RedisSetup;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::handler::{
    ConsumerPolicy, ConsumerStats, EventHandler, HandlerError, backoff, sleep_or_stop,
};
use super::{BusError, EventPublisher};
use crate::BoxFuture;
use crate::events::EventEnvelope;

/// The stream's name under the key prefix, unless configured otherwise.
pub const DEFAULT_STREAM: &str = "order-events";

/// The suffix of the dead-letter stream's key.
pub const DEAD_LETTER_SUFFIX: &str = ":dead";

/// What setting up or talking to the Redis Streams bus fails with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// Connecting failed, or the key prefix is not allowed.
    #[error(transparent)]
    Setup(#[from] redis_kit::RedisError),
    /// A command failed (Redis down, or it refused the command).
    #[error("Redis command failed")]
    Redis(#[source] fred::error::Error),
    /// A configuration value is out of range.
    #[error("invalid stream configuration: {0}")]
    Config(String),
    /// Redis answered something this client does not understand.
    #[error("unexpected Redis reply to {0}")]
    Protocol(&'static str),
}

impl From<fred::error::Error> for StreamError {
    fn from(e: fred::error::Error) -> StreamError {
        StreamError::Redis(e)
    }
}

fn stream_key(prefix: &str) -> Result<String, StreamError> {
    redis_kit::check_prefix(prefix)?;
    Ok(format!("{prefix}{DEFAULT_STREAM}"))
}

/// Commands fail at once while the connection is down (instead of queuing
/// to be replayed after a reconnect, which would publish twice once the
/// relay has retried), are bounded in time, and are written once.
fn command_options(timeout: Duration) -> Options {
    Options {
        fail_fast: true,
        timeout: Some(timeout),
        max_attempts: Some(1),
        ..Options::default()
    }
}

/// Runs a Lua script by hash, loading it on `NOSCRIPT` (after a restart
/// or `SCRIPT FLUSH`). `key` routes it in a cluster.
async fn eval_script(
    client: &Client,
    options: &Options,
    script: &Script,
    key: &str,
    keys: Vec<String>,
    args: Vec<Value>,
) -> Result<Value, fred::error::Error> {
    let mut call: Vec<Value> = Vec::with_capacity(2 + keys.len() + args.len());
    call.push(Value::from(script.sha1().clone()));
    call.push(Value::from(keys.len() as i64));
    call.extend(keys.into_iter().map(Value::from));
    call.extend(args);
    let client = client.with_options(options);
    match client
        .custom::<Value, Value>(CustomCommand::new("EVALSHA", key, false), call.clone())
        .await
    {
        Err(e) if e.details().starts_with("NOSCRIPT") => {
            call[0] = Value::from(script.lua().cloned().unwrap_or_default());
            client
                .custom(CustomCommand::new("EVAL", key, false), call)
                .await
        }
        other => other,
    }
}

/// Where and how [`RedisStreamPublisher`] writes.
#[derive(Debug, Clone)]
pub struct StreamPublisherConfig {
    /// The stream's key. Default `{prefix}order-events`.
    pub stream: String,
    /// Approximate cap on the stream's length (`XADD MAXLEN ~`), so Redis'
    /// memory stays bounded; entries beyond are trimmed oldest first,
    /// whether or not every group has read them. `None`: no cap.
    /// Default 1,000,000.
    pub max_len: Option<u64>,
    /// Bound on each publish command. Default 5 s.
    pub command_timeout: Duration,
}

impl StreamPublisherConfig {
    /// The defaults, with the stream under `prefix` (checked by
    /// [`redis_kit::check_prefix`]: empty, or ending in `:`).
    pub fn new(prefix: &str) -> Result<StreamPublisherConfig, StreamError> {
        Ok(StreamPublisherConfig {
            stream: stream_key(prefix)?,
            max_len: Some(1_000_000),
            command_timeout: Duration::from_secs(5),
        })
    }
}

/// Appends a batch to the stream in one round trip, atomically (a script):
/// either the whole batch is in the stream, in order, or none of it.
const PUBLISH_LUA: &str = r#"
local maxlen = tonumber(ARGV[1])
for i = 2, #ARGV, 4 do
  if maxlen > 0 then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*',
      'event', ARGV[i], 'type', ARGV[i + 1], 'order_id', ARGV[i + 2], 'schema_version', ARGV[i + 3])
  else
    redis.call('XADD', KEYS[1], '*',
      'event', ARGV[i], 'type', ARGV[i + 1], 'order_id', ARGV[i + 2], 'schema_version', ARGV[i + 3])
  end
end
return (#ARGV - 1) / 4
"#;

/// Publishes events to a Redis stream: the outbox relay's
/// [`EventPublisher`] in a durable deployment.
#[derive(Clone)]
pub struct RedisStreamPublisher {
    client: Client,
    options: Options,
    config: StreamPublisherConfig,
    script: Script,
}

impl std::fmt::Debug for RedisStreamPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStreamPublisher")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl RedisStreamPublisher {
    /// A publisher on a connected `client`.
    pub fn new(client: Client, config: StreamPublisherConfig) -> RedisStreamPublisher {
        RedisStreamPublisher {
            client,
            options: command_options(config.command_timeout),
            config,
            script: Script::from_lua(PUBLISH_LUA),
        }
    }

    /// Connects through `setup` (the suite's one Redis setup) and returns a
    /// publisher. Fails if Redis does not answer at start-up; after that a
    /// lost connection is re-established in the background and publishes
    /// fail meanwhile (the relay retries).
    pub async fn connect(
        setup: &RedisSetup,
        config: StreamPublisherConfig,
    ) -> Result<RedisStreamPublisher, StreamError> {
        Ok(RedisStreamPublisher::new(setup.connect().await?, config))
    }

    /// The stream's key.
    pub fn stream(&self) -> &str {
        &self.config.stream
    }

    /// Publishes `events` (see [`EventPublisher::publish`]).
    pub async fn publish_batch(&self, events: &[EventEnvelope]) -> Result<(), BusError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut args: Vec<Value> = Vec::with_capacity(1 + 4 * events.len());
        args.push(Value::from(self.config.max_len.unwrap_or(0) as i64));
        for event in events {
            let json =
                serde_json::to_string(event).map_err(|e| BusError::Malformed(Box::new(e)))?;
            args.push(Value::from(json));
            args.push(Value::from(event.event.type_name()));
            args.push(Value::from(event.order_id.to_string()));
            args.push(Value::from(i64::from(event.schema_version)));
        }
        eval_script(
            &self.client,
            &self.options,
            &self.script,
            &self.config.stream,
            vec![self.config.stream.clone()],
            args,
        )
        .await
        .map(|_| ())
        .map_err(|e| BusError::Unavailable(Box::new(e)))
    }
}

impl EventPublisher for RedisStreamPublisher {
    fn publish<'a>(&'a self, events: &'a [EventEnvelope]) -> BoxFuture<'a, Result<(), BusError>> {
        Box::pin(self.publish_batch(events))
    }
}

/// How many entries of `stream` were delivered to `group` and not yet
/// acknowledged (`XPENDING` summary): a gauge for a consumer group's
/// backlog in hand. A missing group is an error (`NOGROUP`).
pub async fn pending_count(client: &Client, stream: &str, group: &str) -> Result<u64, StreamError> {
    let summary: Value = client.xpending(stream, group, ()).await?;
    match summary {
        Value::Array(parts) => parts
            .first()
            .and_then(Value::as_u64)
            .ok_or(StreamError::Protocol("XPENDING")),
        _ => Err(StreamError::Protocol("XPENDING")),
    }
}

/// Where a new consumer group starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum GroupStart {
    /// From the oldest entry still in the stream (`0`). The default: a new
    /// consumer sees the history the stream retains.
    #[default]
    Beginning,
    /// Only entries added after the group was created (`$`).
    New,
}

/// How a [`StreamConsumer`] reads, retries and gives up.
#[derive(Debug, Clone)]
pub struct StreamConsumerConfig {
    /// The stream's key. Default `{prefix}order-events`.
    pub stream: String,
    /// The dead-letter stream's key. Default `{stream}:dead`.
    pub dead_letter_stream: String,
    /// The consumer group: every group sees every event. Required.
    pub group: String,
    /// This consumer's name, unique within the group (two live consumers
    /// with one name would share their pending entries). Default
    /// `{host}-{pid}-{random}`.
    pub consumer: String,
    /// Most entries read (or claimed) per command. Default 64.
    pub batch_size: u64,
    /// How long one `XREADGROUP` waits for new entries (also the longest
    /// a shutdown waits). Default 2 s.
    pub block: Duration,
    /// An entry pending on a consumer this long (it died, or hangs) is
    /// taken over by another. It must exceed the longest a handler runs,
    /// or a slow handler's entries are handled twice (the inbox makes that
    /// harmless, but wasteful). Default 60 s.
    pub min_idle: Duration,
    /// How often this consumer looks for entries to take over. Default 5 s.
    pub claim_interval: Duration,
    /// Where a newly created group starts. Default [`GroupStart::Beginning`].
    pub start: GroupStart,
    /// Approximate cap on the dead-letter stream's length. Default 100,000.
    pub dead_letter_max_len: u64,
    /// Bound on each command beyond its blocking time. Default 5 s.
    pub command_timeout: Duration,
    /// Retries, dead-lettering and accepted schema versions.
    pub policy: ConsumerPolicy,
}

impl StreamConsumerConfig {
    /// The defaults for `group`, with the stream under `prefix` (checked
    /// by [`redis_kit::check_prefix`]).
    pub fn new(prefix: &str, group: &str) -> Result<StreamConsumerConfig, StreamError> {
        let stream = stream_key(prefix)?;
        Ok(StreamConsumerConfig {
            dead_letter_stream: format!("{stream}{DEAD_LETTER_SUFFIX}"),
            stream,
            group: group.to_owned(),
            consumer: default_consumer_name(),
            batch_size: 64,
            block: Duration::from_secs(2),
            min_idle: Duration::from_secs(60),
            claim_interval: Duration::from_secs(5),
            start: GroupStart::Beginning,
            dead_letter_max_len: 100_000,
            command_timeout: Duration::from_secs(5),
            policy: ConsumerPolicy::default(),
        })
    }

    /// Checks the values against each other.
    pub fn validate(&self) -> Result<(), StreamError> {
        let bad = |why: &str| Err(StreamError::Config(why.to_owned()));
        if self.stream.is_empty() || self.group.is_empty() || self.consumer.is_empty() {
            return bad("stream, group and consumer must not be empty");
        }
        if self.dead_letter_stream == self.stream {
            return bad("the dead-letter stream must differ from the stream");
        }
        if self.batch_size == 0 {
            return bad("batch_size must be at least 1");
        }
        if self.block < Duration::from_millis(1) || self.min_idle < Duration::from_millis(1) {
            return bad("block and min_idle must be at least 1 ms");
        }
        if self.policy.max_deliveries == 0 {
            return bad("policy.max_deliveries must be at least 1");
        }
        // A retry waits up to twice retry_max (jitter) while its entry is
        // pending; other consumers must not take it over meanwhile.
        if self.policy.retry_max.saturating_mul(2) >= self.min_idle {
            return bad("min_idle must exceed twice policy.retry_max");
        }
        Ok(())
    }
}

fn default_consumer_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".to_owned());
    format!(
        "{host}-{}-{:06x}",
        std::process::id(),
        fastrand::u32(..0x0100_0000)
    )
}

/// Moves an entry to the dead letters and acknowledges it, atomically, if
/// it is still pending in the group (so two consumers giving up on the same
/// entry write one dead letter).
const DEAD_LETTER_LUA: &str = r#"
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #pending == 0 then
  return 0
end
local fields = {}
for i = 4, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(fields))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return 1
"#;

/// Field names of a dead letter's own data; an original field with one of
/// these names is kept as `original.{name}`.
const DEAD_FIELDS: [&str; 6] = [
    "original_id",
    "error",
    "deliveries",
    "group",
    "consumer",
    "stream",
];

/// An entry read from a stream.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    id: String,
    /// `None`: the entry was deleted (trimmed) while pending.
    fields: Option<Vec<(String, String)>>,
}

/// Why an entry cannot be handled at all.
#[derive(Debug, Clone, PartialEq)]
enum Poison {
    Malformed(String),
    UnknownVersion(String),
}

impl std::fmt::Display for Poison {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Poison::Malformed(why) => write!(f, "malformed event: {why}"),
            Poison::UnknownVersion(v) => write!(f, "unknown schema version {v}"),
        }
    }
}

/// Decodes an entry's event, checking its schema version first (a newer
/// version may not parse at all).
fn decode(fields: &[(String, String)], policy: &ConsumerPolicy) -> Result<EventEnvelope, Poison> {
    let field = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v);
    if let Some(version) = field("schema_version") {
        match version.parse::<u16>() {
            Ok(v) if policy.accepts(v) => {}
            _ => return Err(Poison::UnknownVersion(version.clone())),
        }
    }
    let json = field("event").ok_or_else(|| Poison::Malformed("no `event` field".to_owned()))?;
    let envelope: EventEnvelope =
        serde_json::from_str(json).map_err(|e| Poison::Malformed(e.to_string()))?;
    if !policy.accepts(envelope.schema_version) {
        return Err(Poison::UnknownVersion(envelope.schema_version.to_string()));
    }
    Ok(envelope)
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.to_string()),
        Value::Bytes(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::Integer(i) => Some(i.to_string()),
        Value::Double(d) => Some(d.to_string()),
        _ => None,
    }
}

fn field_pairs(value: Value) -> Option<Vec<(String, String)>> {
    match value {
        Value::Array(flat) => Some(
            flat.chunks(2)
                .filter_map(|pair| match pair {
                    [k, v] => Some((text(k)?, text(v).unwrap_or_default())),
                    _ => None,
                })
                .collect(),
        ),
        Value::Map(map) => Some(
            map.inner()
                .into_iter()
                .filter_map(|(k, v)| Some((k.as_str()?.to_owned(), text(&v).unwrap_or_default())))
                .collect(),
        ),
        _ => None,
    }
}

/// `[[id, [field, value, …]], …]`.
fn parse_entries(value: Value) -> Result<Vec<Entry>, StreamError> {
    match value {
        Value::Null => Ok(Vec::new()),
        Value::Array(entries) => entries
            .into_iter()
            .map(|entry| match entry {
                Value::Array(mut parts) if parts.len() == 2 => {
                    let fields = parts.pop().and_then(field_pairs);
                    let id = parts.pop().as_ref().and_then(text);
                    id.map(|id| Entry { id, fields })
                        .ok_or(StreamError::Protocol("a stream entry"))
                }
                _ => Err(StreamError::Protocol("a stream entry")),
            })
            .collect(),
        _ => Err(StreamError::Protocol("a stream entry list")),
    }
}

/// XREADGROUP's reply: nil, `[[stream, entries], …]` (RESP2) or
/// `{stream: entries}` (RESP3).
fn parse_read(value: Value) -> Result<Vec<Entry>, StreamError> {
    match value {
        Value::Null => Ok(Vec::new()),
        Value::Array(streams) => {
            let mut all = Vec::new();
            for stream in streams {
                match stream {
                    Value::Array(mut parts) if parts.len() == 2 => {
                        all.extend(parse_entries(parts.pop().unwrap_or(Value::Null))?);
                    }
                    _ => return Err(StreamError::Protocol("XREADGROUP")),
                }
            }
            Ok(all)
        }
        Value::Map(map) => {
            let mut all = Vec::new();
            for (_, entries) in map.inner() {
                all.extend(parse_entries(entries)?);
            }
            Ok(all)
        }
        _ => Err(StreamError::Protocol("XREADGROUP")),
    }
}

/// XAUTOCLAIM's reply: `[next, entries]` (Redis 6.2) or
/// `[next, entries, deleted ids]` (Redis 7).
fn parse_autoclaim(value: Value) -> Result<(String, Vec<Entry>, Vec<String>), StreamError> {
    let Value::Array(parts) = value else {
        return Err(StreamError::Protocol("XAUTOCLAIM"));
    };
    let mut parts = parts.into_iter();
    let next = parts
        .next()
        .as_ref()
        .and_then(text)
        .ok_or(StreamError::Protocol("XAUTOCLAIM"))?;
    let entries = parse_entries(parts.next().unwrap_or(Value::Null))?;
    let deleted = match parts.next() {
        Some(Value::Array(ids)) => ids.iter().filter_map(text).collect(),
        _ => Vec::new(),
    };
    Ok((next, entries, deleted))
}

/// XPENDING's extended reply: `[[id, consumer, idle, deliveries], …]`.
fn parse_pending(value: Value) -> HashMap<String, u32> {
    let Value::Array(rows) = value else {
        return HashMap::new();
    };
    rows.into_iter()
        .filter_map(|row| match row {
            Value::Array(cols) if cols.len() == 4 => {
                let id = text(&cols[0])?;
                let n = cols[3].as_u64()?;
                Some((id, u32::try_from(n).unwrap_or(u32::MAX)))
            }
            _ => None,
        })
        .collect()
}

/// A member of a consumer group on the order-events stream, running an
/// [`EventHandler`] on each entry. See the [module docs](self).
///
/// It owns its Redis connection: `XREADGROUP … BLOCK` holds a connection
/// while it waits, so it must not share one with other work.
pub struct StreamConsumer {
    client: Client,
    options: Options,
    config: StreamConsumerConfig,
    handler: Arc<dyn EventHandler>,
    stats: Arc<ConsumerStats>,
    claim_cursor: String,
    dead_letter: Script,
}

impl std::fmt::Debug for StreamConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamConsumer")
            .field("config", &self.config)
            .field("stats", &self.stats.snapshot())
            .finish_non_exhaustive()
    }
}

/// A running [`StreamConsumer`] (from [`StreamConsumer::spawn`]). Dropping
/// the handle stops the consumer without waiting for it.
#[derive(Debug)]
pub struct StreamConsumerHandle {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    stats: Arc<ConsumerStats>,
}

impl StreamConsumerHandle {
    /// The consumer's counters.
    pub fn stats(&self) -> &Arc<ConsumerStats> {
        &self.stats
    }

    /// Stops the consumer after the entry in hand (within
    /// [`StreamConsumerConfig::block`]) and waits for it.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "stream consumer task failed");
        }
    }

    /// Kills the consumer where it stands, as a crash would: what it read
    /// and did not acknowledge stays pending, for another consumer to take
    /// over after `min_idle`. For tests and emergencies.
    pub async fn abort(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

impl StreamConsumer {
    /// Connects a dedicated client through `setup` and joins the group
    /// (creating the group, and the stream, if missing).
    pub async fn connect(
        setup: &RedisSetup,
        config: StreamConsumerConfig,
        handler: Arc<dyn EventHandler>,
    ) -> Result<StreamConsumer, StreamError> {
        config.validate()?;
        let client = setup.connect().await?;
        StreamConsumer::new(client, config, handler).await
    }

    /// Joins the group on a connected `client`, which the consumer then
    /// owns (see the type's docs).
    pub async fn new(
        client: Client,
        config: StreamConsumerConfig,
        handler: Arc<dyn EventHandler>,
    ) -> Result<StreamConsumer, StreamError> {
        config.validate()?;
        let consumer = StreamConsumer {
            options: command_options(config.command_timeout),
            client,
            config,
            handler,
            stats: Arc::new(ConsumerStats::default()),
            claim_cursor: "0-0".to_owned(),
            dead_letter: Script::from_lua(DEAD_LETTER_LUA),
        };
        consumer.ensure_group().await?;
        Ok(consumer)
    }

    /// The consumer's counters (shared with the running consumer).
    pub fn stats(&self) -> Arc<ConsumerStats> {
        Arc::clone(&self.stats)
    }

    /// The consumer's configuration.
    pub fn config(&self) -> &StreamConsumerConfig {
        &self.config
    }

    /// Runs [`StreamConsumer::run`] on a new task.
    pub fn spawn(self) -> StreamConsumerHandle {
        let (stop, shutdown) = watch::channel(false);
        let stats = self.stats();
        let task = tokio::spawn(self.run(shutdown));
        StreamConsumerHandle { stop, task, stats }
    }

    /// Reads, handles and acknowledges until `shutdown` holds `true` (or
    /// its sender is dropped). Redis errors are retried with backoff; they
    /// never end the loop.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let policy = self.config.policy.clone();
        let mut retry = backoff(policy.retry_initial, policy.retry_max);
        // Take over what dead consumers left at once, then periodically.
        let mut next_claim = Instant::now();
        loop {
            if *shutdown.borrow() {
                break;
            }
            match self.cycle(&mut next_claim, &mut shutdown).await {
                Ok(true) => retry = backoff(policy.retry_initial, policy.retry_max),
                Ok(false) => break,
                Err(e) => {
                    ConsumerStats::inc(&self.stats.bus_failures);
                    tracing::warn!(error = %e, source = ?std::error::Error::source(&e), stream = %self.config.stream, "stream consumer: Redis failed; retrying");
                    if let StreamError::Redis(e) = &e
                        && e.details().starts_with("NOGROUP")
                    {
                        // The stream (and its groups) was deleted.
                        let _ = self.ensure_group().await;
                    }
                    let delay = retry.next().unwrap_or(policy.retry_max);
                    if !sleep_or_stop(delay, &mut shutdown).await {
                        break;
                    }
                }
            }
        }
        let _ = self.client.quit().await;
    }

    async fn ensure_group(&self) -> Result<(), StreamError> {
        let start = match self.config.start {
            GroupStart::Beginning => "0",
            GroupStart::New => "$",
        };
        let created: Result<Value, _> = self
            .client
            .with_options(&self.options)
            .xgroup_create(&self.config.stream, &self.config.group, start, true)
            .await;
        match created {
            Ok(_) => Ok(()),
            Err(e) if e.details().starts_with("BUSYGROUP") => Ok(()),
            Err(e) => Err(StreamError::Redis(e)),
        }
    }

    /// One round: take over idle entries if it is time, then read new ones
    /// (blocking until some arrive or the next claim is due). Returns
    /// `Ok(false)` if told to stop.
    async fn cycle(
        &mut self,
        next_claim: &mut Instant,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<bool, StreamError> {
        let now = Instant::now();
        if now >= *next_claim {
            let (claimed, more) = self.claim().await?;
            *next_claim = if more {
                now
            } else {
                now + self.config.claim_interval
            };
            for (entry, deliveries) in claimed {
                ConsumerStats::inc(&self.stats.reclaimed);
                if !self.process(entry, deliveries, shutdown).await? {
                    return Ok(false);
                }
            }
            if more {
                return Ok(true);
            }
        }
        let until_claim = next_claim.saturating_duration_since(Instant::now());
        // BLOCK 0 would block forever.
        let block = self
            .config
            .block
            .min(until_claim)
            .max(Duration::from_millis(1));
        // Not interrupted by shutdown: what Redis hands over is handled.
        for entry in self.read(block).await? {
            if !self.process(entry, 1, shutdown).await? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    async fn read(&self, block: Duration) -> Result<Vec<Entry>, StreamError> {
        let options = Options {
            timeout: Some(block + self.config.command_timeout),
            ..self.options.clone()
        };
        let reply: Value = self
            .client
            .with_options(&options)
            .xreadgroup(
                &self.config.group,
                &self.config.consumer,
                Some(self.config.batch_size),
                Some(u64::try_from(block.as_millis()).unwrap_or(u64::MAX)),
                false,
                &self.config.stream,
                XID::NewInGroup,
            )
            .await?;
        parse_read(reply)
    }

    /// `XAUTOCLAIM`s a batch of entries idle longer than `min_idle`, with
    /// their delivery counts. Returns whether the scan has more to go.
    async fn claim(&mut self) -> Result<(Vec<(Entry, u32)>, bool), StreamError> {
        let client = self.client.with_options(&self.options);
        let reply: Value = client
            .xautoclaim(
                &self.config.stream,
                &self.config.group,
                &self.config.consumer,
                u64::try_from(self.config.min_idle.as_millis()).unwrap_or(u64::MAX),
                self.claim_cursor.as_str(),
                Some(self.config.batch_size),
                false,
            )
            .await?;
        let (next, entries, deleted) = parse_autoclaim(reply)?;
        let more = next != "0-0";
        self.claim_cursor = next;
        if !deleted.is_empty() {
            tracing::warn!(
                count = deleted.len(),
                stream = %self.config.stream,
                "pending entries were trimmed from the stream before being handled"
            );
        }
        let mut live = Vec::with_capacity(entries.len());
        for entry in entries {
            if entry.fields.is_some() {
                live.push(entry);
            } else {
                // Redis 6.2 hands deleted entries back with no fields:
                // nothing to handle, stop tracking it.
                let _: Value = client
                    .xack(&self.config.stream, &self.config.group, entry.id.as_str())
                    .await?;
            }
        }
        let (Some(first), Some(last)) = (live.first(), live.last()) else {
            return Ok((Vec::new(), more));
        };
        let pending: Value = client
            .xpending(
                &self.config.stream,
                &self.config.group,
                XPendingArgs {
                    idle: None,
                    start: Some(XID::from(first.id.as_str())),
                    end: Some(XID::from(last.id.as_str())),
                    // Entries this consumer already held may share the
                    // range; leave room for them.
                    count: Some(live.len() as u64 + 10_000),
                    consumer: Some(self.config.consumer.as_str().into()),
                },
            )
            .await?;
        let counts = parse_pending(pending);
        let claimed = live
            .into_iter()
            .filter_map(|entry| {
                let n = *counts.get(&entry.id)?;
                Some((entry, n))
            })
            .collect();
        Ok((claimed, more))
    }

    /// Handles one entry to its end: acknowledged, dead-lettered, left
    /// pending for another consumer, or no longer ours. `Ok(false)` if told
    /// to stop meanwhile (the entry stays pending).
    async fn process(
        &self,
        entry: Entry,
        deliveries: u32,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<bool, StreamError> {
        let policy = &self.config.policy;
        let fields = entry.fields.clone().unwrap_or_default();
        let event = match decode(&fields, policy) {
            Ok(event) => event,
            Err(poison) => {
                // Left pending until it has been delivered often enough: a
                // consumer of a newer version in the same group may take it
                // over and understand it.
                if deliveries >= policy.max_deliveries {
                    self.dead_letter(&entry, &poison.to_string(), deliveries)
                        .await?;
                } else {
                    tracing::warn!(id = %entry.id, deliveries, error = %poison, "undecodable stream entry left pending");
                }
                return Ok(true);
            }
        };
        if deliveries > policy.max_deliveries {
            // Delivered that often without an outcome: its consumers died
            // (or hung) handling it.
            let error = format!("delivered {deliveries} times without being acknowledged");
            self.dead_letter(&entry, &error, deliveries).await?;
            return Ok(true);
        }
        let client = self.client.with_options(&self.options);
        let mut deliveries = deliveries;
        let mut retry = policy.backoff();
        loop {
            let error = match self.handler.handle(&event).await {
                Ok(()) => {
                    let _: Value = client
                        .xack(&self.config.stream, &self.config.group, entry.id.as_str())
                        .await?;
                    ConsumerStats::inc(&self.stats.handled);
                    return Ok(true);
                }
                Err(e) => e,
            };
            ConsumerStats::inc(&self.stats.handler_failures);
            let delay = retry.next().unwrap_or(policy.retry_max);
            match error {
                HandlerError::Unavailable(e) => {
                    tracing::warn!(error = %e, id = %entry.id, "event handler unavailable; retrying");
                    if !sleep_or_stop(delay, shutdown).await {
                        return Ok(false);
                    }
                    // Restart its idle time without counting a delivery,
                    // so no one takes it over while we wait for the
                    // handler's dependency.
                    if !self.reclaim(&entry.id, delay, true).await? {
                        return Ok(true);
                    }
                }
                HandlerError::Failed(e) => {
                    if deliveries >= policy.max_deliveries {
                        tracing::error!(error = %e, id = %entry.id, deliveries, "event handler keeps failing; dead-lettered");
                        self.dead_letter(&entry, &e.to_string(), deliveries).await?;
                        return Ok(true);
                    }
                    tracing::warn!(error = %e, id = %entry.id, deliveries, "event handler failed; retrying");
                    if !sleep_or_stop(delay, shutdown).await {
                        return Ok(false);
                    }
                    if !self.reclaim(&entry.id, delay, false).await? {
                        return Ok(true);
                    }
                    deliveries += 1;
                }
            }
        }
    }

    /// `XCLAIM`s our own entry back after a retry wait: a new delivery
    /// (counted, unless `justid`). Fails (returns `false`) if another
    /// consumer took it over meanwhile, since then it has not been idle for
    /// `waited`.
    async fn reclaim(&self, id: &str, waited: Duration, justid: bool) -> Result<bool, StreamError> {
        let reply: Value = self
            .client
            .with_options(&self.options)
            .xclaim(
                &self.config.stream,
                &self.config.group,
                &self.config.consumer,
                u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
                id,
                None,
                None,
                None,
                false,
                justid,
            )
            .await?;
        Ok(matches!(reply, Value::Array(ref claimed) if !claimed.is_empty()))
    }

    async fn dead_letter(
        &self,
        entry: &Entry,
        error: &str,
        deliveries: u32,
    ) -> Result<(), StreamError> {
        let mut args: Vec<Value> = vec![
            Value::from(self.config.group.as_str()),
            Value::from(entry.id.as_str()),
            Value::from(self.config.dead_letter_max_len as i64),
        ];
        let meta = [
            ("original_id", entry.id.clone()),
            ("error", error.to_owned()),
            ("deliveries", deliveries.to_string()),
            ("group", self.config.group.clone()),
            ("consumer", self.config.consumer.clone()),
            ("stream", self.config.stream.clone()),
        ];
        for (k, v) in meta {
            args.push(Value::from(k));
            args.push(Value::from(v));
        }
        for (k, v) in entry.fields.iter().flatten() {
            let name = if DEAD_FIELDS.contains(&k.as_str()) {
                format!("original.{k}")
            } else {
                k.clone()
            };
            args.push(Value::from(name));
            args.push(Value::from(v.as_str()));
        }
        let moved = eval_script(
            &self.client,
            &self.options,
            &self.dead_letter,
            &self.config.stream,
            vec![
                self.config.stream.clone(),
                self.config.dead_letter_stream.clone(),
            ],
            args,
        )
        .await?;
        if moved.as_i64() == Some(1) {
            ConsumerStats::inc(&self.stats.dead_lettered);
            tracing::error!(id = %entry.id, deliveries, error, dead_letter_stream = %self.config.dead_letter_stream, "stream entry dead-lettered");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Event, SCHEMA_VERSION};
    use crate::model::{CancelReason, OrderId};

    fn pairs(fields: &[(&str, &str)]) -> Vec<(String, String)> {
        fields
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn envelope() -> EventEnvelope {
        EventEnvelope::new(
            OrderId::new_at(1_800_000_000_000),
            chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
            Event::OrderCancelled {
                reason: CancelReason::PaymentDeclined,
            },
        )
    }

    #[test]
    fn decoding_checks_the_version_before_the_payload() {
        let policy = ConsumerPolicy::default();
        let event = envelope();
        let json = serde_json::to_string(&event).unwrap();
        let ok = pairs(&[("event", &json), ("schema_version", "1")]);
        assert_eq!(decode(&ok, &policy), Ok(event.clone()));

        let newer = pairs(&[("event", "{not json"), ("schema_version", "99")]);
        assert_eq!(
            decode(&newer, &policy),
            Err(Poison::UnknownVersion("99".into()))
        );
        let garbage = pairs(&[("event", "{not json"), ("schema_version", "1")]);
        assert!(matches!(
            decode(&garbage, &policy),
            Err(Poison::Malformed(_))
        ));
        assert!(matches!(
            decode(&pairs(&[("type", "X")]), &policy),
            Err(Poison::Malformed(_))
        ));

        // A version inside the envelope counts even without the field.
        let mut future = serde_json::to_value(&event).unwrap();
        future["schema_version"] = (SCHEMA_VERSION + 1).into();
        let hidden = pairs(&[("event", &future.to_string())]);
        assert!(matches!(
            decode(&hidden, &policy),
            Err(Poison::UnknownVersion(_))
        ));
    }

    #[test]
    fn replies_parse_in_both_protocol_shapes() {
        let entry = |id: &str, fields: &[&str]| {
            Value::Array(vec![
                Value::from(id),
                Value::Array(fields.iter().map(|f| Value::from(*f)).collect()),
            ])
        };
        let resp2 = Value::Array(vec![Value::Array(vec![
            Value::from("s"),
            Value::Array(vec![
                entry("1-0", &["event", "{}"]),
                entry("2-0", &["a", "b"]),
            ]),
        ])]);
        let read = parse_read(resp2).unwrap();
        assert_eq!(read.len(), 2);
        assert_eq!(read[0].id, "1-0");
        assert_eq!(read[1].fields, Some(pairs(&[("a", "b")])));
        assert!(parse_read(Value::Null).unwrap().is_empty());

        let claimed = Value::Array(vec![
            Value::from("5-0"),
            Value::Array(vec![
                entry("3-0", &["x", "y"]),
                Value::Array(vec![Value::from("4-0"), Value::Null]),
            ]),
            Value::Array(vec![Value::from("0-1")]),
        ]);
        let (next, entries, deleted) = parse_autoclaim(claimed).unwrap();
        assert_eq!(next, "5-0");
        assert_eq!(entries[1].fields, None);
        assert_eq!(deleted, ["0-1"]);

        let pending = Value::Array(vec![Value::Array(vec![
            Value::from("3-0"),
            Value::from("c"),
            Value::Integer(10),
            Value::Integer(4),
        ])]);
        assert_eq!(parse_pending(pending).get("3-0"), Some(&4));
        assert!(parse_read(Value::Integer(1)).is_err());
    }

    #[test]
    fn configs_are_validated() {
        assert!(StreamConsumerConfig::new("bad prefix", "g").is_err());
        let config = StreamConsumerConfig::new("app:", "timeline").unwrap();
        assert_eq!(config.stream, "app:order-events");
        assert_eq!(config.dead_letter_stream, "app:order-events:dead");
        config.validate().unwrap();
        let mut tight = config.clone();
        tight.min_idle = tight.policy.retry_max;
        assert!(tight.validate().is_err());
        let mut empty = config;
        empty.group.clear();
        assert!(empty.validate().is_err());
        assert_eq!(
            StreamPublisherConfig::new("").unwrap().stream,
            "order-events"
        );
    }
}
