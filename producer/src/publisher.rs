//! Broker access for the producer: connections from a deadpool-lapin pool (or, when a CA
//! file or client certificate is configured, one shared connection opened through
//! `shared::broker`, since deadpool-lapin cannot pass a TLS identity), the topology
//! (declared, or with `topology.declare = false` only checked, at start) and publishing
//! with publisher confirms on confirm-mode channels that are reused between publishes.

use std::ops::Deref;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use deadpool_lapin::{Pool, Runtime};
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use shared::broker;
use shared::settings::{AmqpSettings, Settings, redact_url};
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
    /// A CA file or a client certificate is configured: one connection through
    /// `shared::broker` (which builds that TLS configuration), reopened when lost.
    Tls {
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
}

impl Broker {
    /// Connects (one attempt: a CLI should fail fast and say why) and declares the topology.
    pub async fn connect(settings: &Settings) -> Result<Self, Failure> {
        let url = settings.amqp.url.expose();
        url.parse::<lapin::uri::AMQPUri>().map_err(|e| {
            Failure::Usage(anyhow::anyhow!(
                "invalid setting `amqp.url` ({}): {e}",
                redact_url(url)
            ))
        })?;
        let topology = Topology::from_settings(settings);
        let amqp = &settings.amqp;
        let connections = if amqp.tls_ca_file.is_some() || amqp.tls_client_cert_file.is_some() {
            Connections::Tls {
                amqp: amqp.clone(),
                conn: tokio::sync::Mutex::new(None),
            }
        } else {
            let pool = deadpool_lapin::Config {
                url: Some(url.to_owned()),
                pool: None,
            }
            .create_pool(
                || ConnectionProperties::default().with_connection_name("vidpipe-producer".into()),
                Runtime::Tokio1,
            )
            .map_err(|e| Failure::Usage(anyhow::anyhow!("invalid setting `amqp.url`: {e}")))?;
            Connections::Pool(pool)
        };
        let broker = Self {
            connections,
            topology,
            idle: Mutex::new(Vec::new()),
        };
        let channel = broker.channel().await.map_err(|e| {
            // A refused login is not an absent broker: say who was refused where.
            Failure::Infra(match broker::refusal(url, &format!("{e:#}")) {
                Some(why) => anyhow::anyhow!(
                    "{why}. The user, password and vhost are the setting `amqp.url` \
                     (environment VIDPIPE__AMQP__URL), now {}",
                    redact_url(url)
                ),
                None => anyhow::anyhow!(
                    "cannot reach RabbitMQ at {} ({e:#}); is it running? The address is the \
                     setting `amqp.url` (environment VIDPIPE__AMQP__URL)",
                    redact_url(url)
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
            Connections::Tls { amqp, conn } => {
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
    /// confirm of each. Ok only if every one was routed and confirmed.
    pub async fn publish_all(&self, messages: &[Outgoing]) -> anyhow::Result<()> {
        let channel = self.confirm_channel().await?;
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
                .with_context(|| format!("publishing to `{}`", m.exchange))?;
            confirms.push(confirm);
        }
        for (m, confirm) in messages.iter().zip(confirms) {
            let confirmation = confirm.await.with_context(|| {
                format!(
                    "waiting for the broker to confirm a publish to `{}`",
                    m.exchange
                )
            })?;
            match confirmation {
                lapin::Confirmation::Ack(None) => {}
                lapin::Confirmation::Ack(Some(_)) => anyhow::bail!(
                    "the broker could not route a message to `{}` with key `{}` (is the topology \
                     declared under this prefix?)",
                    m.exchange,
                    m.routing_key
                ),
                other => anyhow::bail!(
                    "the broker refused a message to `{}`: {other:?}",
                    m.exchange
                ),
            }
        }
        self.idle.lock().expect("idle channels").push(channel);
        Ok(())
    }
}
