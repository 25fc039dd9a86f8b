//! Broker access for the producer: connections from a deadpool-lapin pool (or, when a CA
//! file or client certificate is configured or `amqp.urls` lists several brokers, one
//! shared connection opened through `shared::broker`, since deadpool-lapin can pass
//! neither a TLS identity nor a list of addresses), the topology (declared, or with
//! `topology.declare = false` only checked, at start) and publishing with publisher
//! confirms on confirm-mode channels that are reused between publishes.
//!
//! A publish whose connection is lost before the broker confirmed it (its node died) is
//! retried on a fresh connection, which `shared::broker` opens to the next live node:
//! only the messages not yet confirmed, a few times with backoff. A message whose confirm
//! was lost with the node may have been enqueued already, so it can arrive twice; the
//! workers' outputs are idempotent (same job, same keys). A message the broker could not
//! route is never retried: that is a topology problem, not a lost node.

use std::ops::Deref;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use deadpool_lapin::{Pool, Runtime};
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use shared::broker;
use shared::settings::{AmqpSettings, Settings};
use shared::topology::Topology;

use crate::exit::Failure;

/// One message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub exchange: String,
    pub routing_key: String,
    pub body: Vec<u8>,
    pub properties: BasicProperties,
}

/// A connection lent to a caller: pooled, or the shared TLS-identity connection.
pub enum SharedConnection {
    Pooled(Box<deadpool_lapin::Object>),
    Shared(Arc<Connection>),
}

impl Deref for SharedConnection {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        match self {
            SharedConnection::Pooled(c) => c,
            SharedConnection::Shared(c) => c,
        }
    }
}

/// Where the producer's connections come from.
enum Connections {
    /// deadpool-lapin's pool: plain AMQP, and `amqps://` checked against the system's
    /// trusted roots.
    Pool(Pool),
    /// A CA file or a client certificate is configured, or several broker addresses:
    /// one connection through `shared::broker` (which builds that TLS configuration and
    /// rotates through the addresses), reopened when lost.
    Direct {
        amqp: AmqpSettings,
        conn: tokio::sync::Mutex<Option<Arc<Connection>>>,
    },
}

/// The producer's connection to the broker.
pub struct Broker {
    connections: Connections,
    /// Names of everything on the broker, under the configured prefix.
    pub topology: Topology,
    /// Confirm-mode channels not in use: opening one costs a round trip, so a publish
    /// borrows one and returns it.
    idle: Mutex<Vec<Channel>>,
    /// Attempts of a publish whose connection is lost ([`Self::publish_all`]).
    publish_attempts: u32,
    /// Longest wait between those attempts (`amqp.max_backoff_secs`).
    max_backoff: Duration,
}

/// How one publishing attempt ended badly.
enum PublishError<'a> {
    /// The connection or channel was lost, or the broker nacked: these messages are not
    /// confirmed and may go again, elsewhere.
    Retry {
        unconfirmed: Vec<&'a Outgoing>,
        error: anyhow::Error,
    },
    /// Nothing to retry (an unroutable message).
    Fatal(anyhow::Error),
}

impl Broker {
    /// Connects (one attempt: a CLI should fail fast and say why) and declares the topology.
    pub async fn connect(settings: &Settings) -> Result<Self, Failure> {
        let amqp = &settings.amqp;
        amqp.validate_addresses().map_err(Failure::Usage)?;
        let addresses = amqp.addresses();
        let (key, var) = match amqp.addresses_key() {
            "amqp.urls" => ("amqp.urls", "VIDPIPE__AMQP__URLS"),
            _ => ("amqp.url", "VIDPIPE__AMQP__URL"),
        };
        let topology = Topology::from_settings(settings);
        let connections = if amqp.tls_ca_file.is_some()
            || amqp.tls_client_cert_file.is_some()
            || addresses.len() > 1
        {
            Connections::Direct {
                amqp: amqp.clone(),
                conn: tokio::sync::Mutex::new(None),
            }
        } else {
            let pool = deadpool_lapin::Config {
                url: Some(addresses[0].to_owned()),
                pool: None,
            }
            .create_pool(
                || ConnectionProperties::default().with_connection_name("vidpipe-producer".into()),
                Runtime::Tokio1,
            )
            .map_err(|e| Failure::Usage(anyhow::anyhow!("invalid setting `{key}`: {e}")))?;
            Connections::Pool(pool)
        };
        let broker = Self {
            connections,
            topology,
            idle: Mutex::new(Vec::new()),
            publish_attempts: 2 * addresses.len() as u32 + 1,
            max_backoff: Duration::from_secs_f64(amqp.max_backoff_secs.max(0.1)),
        };
        let channel = broker.channel().await.map_err(|e| {
            // A refused login is not an absent broker: say who was refused where.
            Failure::Infra(match broker::refusal(addresses[0], &format!("{e:#}")) {
                Some(why) => anyhow::anyhow!(
                    "{why}. The user, password and vhost are the setting `{key}` \
                     (environment {var}), now {}",
                    amqp.redacted_addresses()
                ),
                None => anyhow::anyhow!(
                    "cannot reach RabbitMQ at {} ({e:#}); is it running? The address is the \
                     setting `{key}` (environment {var})",
                    amqp.redacted_addresses()
                ),
            })
        })?;
        broker
            .topology
            .ensure(
                &channel,
                settings.topology.declare,
                &broker.topology.work_queue(shared::tasks::TRANSCODE.name),
            )
            .await
            .context("declaring the broker topology")
            .map_err(Failure::Infra)?;
        let _ = channel.close(200, "topology ready".into()).await;
        Ok(broker)
    }

    /// A connection, for consumers that must live as long as it (event queues).
    pub async fn connection(&self) -> anyhow::Result<SharedConnection> {
        match &self.connections {
            Connections::Pool(pool) => pool
                .get()
                .await
                .map(|c| SharedConnection::Pooled(Box::new(c)))
                .map_err(|e| anyhow::anyhow!("connecting to RabbitMQ: {e}")),
            Connections::Direct { amqp, conn } => {
                let mut current = conn.lock().await;
                if let Some(c) = current.as_ref().filter(|c| c.status().connected()) {
                    return Ok(SharedConnection::Shared(Arc::clone(c)));
                }
                let c = broker::try_connect(amqp, "vidpipe-producer")
                    .await
                    .map(Arc::new)
                    .map_err(|e| anyhow::anyhow!("connecting to RabbitMQ: {e}"))?;
                *current = Some(Arc::clone(&c));
                Ok(SharedConnection::Shared(c))
            }
        }
    }

    /// A fresh plain channel on a connection.
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        let conn = self.connection().await?;
        conn.create_channel().await.context("opening a channel")
    }

    async fn confirm_channel(&self) -> anyhow::Result<Channel> {
        let reused = self.idle.lock().expect("idle channels").pop();
        if let Some(channel) = reused.filter(|c| c.status().connected()) {
            return Ok(channel);
        }
        let conn = self.connection().await?;
        broker::confirm_channel(&conn)
            .await
            .context("opening a publisher-confirm channel")
    }

    /// Publishes every message (persistent, `mandatory`) and waits for the broker's
    /// confirm of each. Ok only if every one was routed and confirmed. When the
    /// connection is lost (or the broker nacks) before every confirm came, the
    /// unconfirmed messages go again on a fresh connection (to the next live node),
    /// with backoff, up to twice per broker address and once more.
    pub async fn publish_all(&self, messages: &[Outgoing]) -> anyhow::Result<()> {
        let mut pending: Vec<&Outgoing> = messages.iter().collect();
        let mut delay = Duration::from_millis(200);
        let mut attempt = 1;
        loop {
            match self.publish_once(&pending).await {
                Ok(()) => return Ok(()),
                Err(PublishError::Fatal(e)) => return Err(e),
                Err(PublishError::Retry { unconfirmed, error }) => {
                    if attempt >= self.publish_attempts {
                        return Err(error.context(format!(
                            "{} message(s) not confirmed after {attempt} attempts",
                            unconfirmed.len()
                        )));
                    }
                    tracing::warn!(
                        error = %format!("{error:#}"),
                        unconfirmed = unconfirmed.len(),
                        retry_in = ?delay,
                        "publishing failed before the broker confirmed; retrying on a fresh connection"
                    );
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.max_backoff);
                    attempt += 1;
                    pending = unconfirmed;
                }
            }
        }
    }

    /// One attempt of [`Self::publish_all`] over `messages`.
    async fn publish_once<'a>(&self, messages: &[&'a Outgoing]) -> Result<(), PublishError<'a>> {
        let retry_all = |error: anyhow::Error| PublishError::Retry {
            unconfirmed: messages.to_vec(),
            error,
        };
        let channel = self.confirm_channel().await.map_err(retry_all)?;
        let mut confirms = Vec::with_capacity(messages.len());
        for m in messages {
            let confirm = channel
                .basic_publish(
                    m.exchange.as_str().into(),
                    m.routing_key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &m.body,
                    m.properties.clone(),
                )
                .await
                .with_context(|| format!("publishing to `{}`", m.exchange));
            match confirm {
                Ok(confirm) => confirms.push(confirm),
                // This one and the rest were not sent; the ones before wait for their
                // confirms below, which fail as well if the connection is gone.
                Err(e) => {
                    let mut unconfirmed = messages[confirms.len()..].to_vec();
                    let sent = &messages[..confirms.len()];
                    for (m, confirm) in sent.iter().zip(confirms) {
                        if !matches!(confirm.await, Ok(lapin::Confirmation::Ack(None))) {
                            unconfirmed.push(m);
                        }
                    }
                    return Err(PublishError::Retry {
                        unconfirmed,
                        error: e,
                    });
                }
            }
        }
        let mut unconfirmed = Vec::new();
        let mut first_error = None;
        for (m, confirm) in messages.iter().zip(confirms) {
            let error = match confirm.await {
                Ok(lapin::Confirmation::Ack(None)) => continue,
                Ok(lapin::Confirmation::Ack(Some(_))) => {
                    return Err(PublishError::Fatal(anyhow::anyhow!(
                        "the broker could not route a message to `{}` with key `{}` (is the \
                         topology declared under this prefix?)",
                        m.exchange,
                        m.routing_key
                    )));
                }
                Ok(other) => anyhow::anyhow!(
                    "the broker refused a message to `{}`: {other:?}",
                    m.exchange
                ),
                Err(e) => anyhow::Error::new(e).context(format!(
                    "waiting for the broker to confirm a publish to `{}`",
                    m.exchange
                )),
            };
            unconfirmed.push(*m);
            first_error.get_or_insert(error);
        }
        match first_error {
            None => {
                self.idle.lock().expect("idle channels").push(channel);
                Ok(())
            }
            Some(error) => Err(PublishError::Retry { unconfirmed, error }),
        }
    }
}
