//! Connecting to RabbitMQ and publishing with confirms.
//!
//! [`connect`] waits with exponential backoff while the broker is absent (logging why)
//! instead of crashing, so a worker started before its broker, or cut off from it, comes
//! back by itself.

use std::time::Duration;

use anyhow::Context;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio_util::sync::CancellationToken;

use crate::settings::{AmqpSettings, redact_url};

/// Connects, retrying with backoff until it works or `shutdown` fires (then `None`).
pub async fn connect(
    settings: &AmqpSettings,
    name: &str,
    shutdown: &CancellationToken,
) -> Option<Connection> {
    let url = settings.url.expose();
    let max = Duration::from_secs_f64(settings.max_backoff_secs.max(0.1));
    let mut delay = Duration::from_millis(200);
    loop {
        match try_connect(url, name).await {
            Ok(conn) => {
                tracing::info!(broker = %redact_url(url), "connected to the broker");
                return Some(conn);
            }
            Err(e) => {
                tracing::warn!(broker = %redact_url(url), error = %e, retry_in = ?delay, "broker unreachable; waiting before trying again");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(max);
    }
}

/// One connection attempt. lapin's own auto-recovery stays off: [`crate::runtime`]
/// reconnects itself (see its module docs for why), and a publisher that loses its
/// connection must learn it rather than wait on a replay.
pub async fn try_connect(url: &str, name: &str) -> lapin::Result<Connection> {
    let props = ConnectionProperties::default().with_connection_name(name.to_owned().into());
    Connection::connect(url, props).await
}

/// A channel in publisher-confirm mode.
pub async fn confirm_channel(conn: &Connection) -> lapin::Result<Channel> {
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// Persistent JSON message properties with the given headers.
pub fn persistent_json(headers: FieldTable) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_headers(headers)
}

/// Publishes and waits for the broker's confirm. `mandatory`: an unroutable message is
/// an error rather than silently dropped.
pub async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> anyhow::Result<()> {
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            properties,
        )
        .await
        .with_context(|| format!("publishing to `{exchange}`"))?
        .await
        .with_context(|| format!("waiting for the broker to confirm a publish to `{exchange}`"))?;
    match confirm {
        lapin::Confirmation::Ack(None) => Ok(()),
        lapin::Confirmation::Ack(Some(_)) => {
            anyhow::bail!(
                "the broker could not route a message to `{exchange}` with key `{routing_key}`"
            )
        }
        other => anyhow::bail!("the broker refused a message to `{exchange}`: {other:?}"),
    }
}
